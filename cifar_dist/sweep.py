"""A grid of training runs: named points, trained one after another here or as a SLURM job array.

    python -m cifar_dist.sweep grid.yaml --list                  # the points, and the sbatch line for them
    python -m cifar_dist.sweep grid.yaml --show 1                # point 1's complete config
    python -m cifar_dist.sweep grid.yaml --run sweeps/lr         # train every point here, one after another
    python -m cifar_dist.sweep grid.yaml --submit sweeps/lr      # check the grid, then the sbatch line below
    sbatch --array=0-3 slurm/sweep.sh grid.yaml sweeps/lr        # array task i trains point i into sweeps/lr/<point>
    python -m cifar_dist.compare sweeps/lr                       # the table

grid.yaml holds settings as ``--config`` files do (flat names, or by section). A list is an axis of the grid; a
single value is the same for every point. Points are the product of the axes, the first axis varying slowest,
and are named after their values, e.g. ``lr=0.0003,freeze_until=layer3``:

    num_epochs: 5
    data_source: /shared/cifar100
    lr: [3.0e-4, 1.0e-3]          # "3e-4" (YAML reads it as a string) is accepted too
    freeze_until: [layer3, layer4]

Every point is a complete, validated config before anything trains or is submitted: an unknown key, a key
given twice (as in a ``--config`` file) or a bad value stops with one line naming it. Each point trains into
ROOT/<point> with ``run_name`` the point's name and one W&B group for the sweep (``WANDB_RUN_GROUP``, default:
ROOT's folder name). A point keeps the trainer's resume: run the same command (or let SLURM requeue the task)
and it continues; finished points are skipped.
With --run, Ctrl-C, a SIGTERM (to the sweep or to the point's trainer) or the sweep's terminal closing stops the
point with a checkpoint and then the sweep.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from cifar_dist.cli import OneLineParser, load_yaml_file, one_line_errors, set_once
from cifar_dist.config import (
    _OWNER,
    _SECTION_TYPES,
    Config,
    UserError,
    _base_type,
    _coerce,
    make_config,
    meaning_keys,
)
from cifar_dist.config import save_config as write_config
from cifar_dist.rundir import live_holder
from cifar_dist.runs import CONFIG_FILE, SWEEP_POINT_FILE, is_finished, load_config, read_records

REPO = Path(__file__).resolve().parents[1]
SET_BY_SWEEP = ("output_dir",)  # each point's output dir is ROOT/<point>
EXIT_STOPPED = 75  # the trainer's graceful stop: the sweep stops too, to be continued by the same command
EXIT_INTERRUPTED = 130  # Ctrl-C, as the trainer and shells report it
# What the point's trainer creates once a SIGTERM/SIGUSR1 stop has saved its checkpoint (--stop-marker): a launcher
# (accelerate launch) reports the trainer's exit code 75 as its own 1, as it would a crash.
STOP_MARKER = ".stopped"
# The signals passed on to the point's trainer, as what. SIGHUP (the sweep's terminal closed) stops it as SIGTERM
# does: in a process group of its own, the trainer would not get the hangup and would train on without the sweep.
FORWARDED = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}


@dataclass(frozen=True)
class Point:
    index: int
    name: str
    values: dict  # the axes' values for this point
    settings: dict  # every setting the grid gives, flat

    def config(self, root: Path) -> Config:
        return make_config(**{"run_name": self.name, **self.settings, "output_dir": str(root / self.name)})


def read_grid(path: str) -> list[Point]:
    """The grid file's points, each checked to be a valid config; UserError naming the key otherwise."""
    file = Path(path)
    if file.is_dir():
        raise UserError(f"{path} is a folder; give the grid's YAML file")
    if not file.is_file():
        raise UserError(f"{path}: no such grid file")
    fixed, axes = {}, {}
    for key, value in _flatten(load_yaml_file(file, path), path).items():  # as strictly as a --config file
        if key in SET_BY_SWEEP:
            raise UserError(f"{path}: {key} is set by the sweep (ROOT/<point>); remove it from the grid")
        if key == "stop_marker":  # never written to a point's config: it would be shown, then dropped
            raise UserError(f"{path}: stop_marker is not read from a grid (a job script passes its own: "
                            "slurm/job.sh); remove it")
        if isinstance(value, list):
            if not value:
                raise UserError(f"{path}: {key} is an empty list; give it at least one value")
            axes[key] = [_check_value(key, v, path) for v in value]
        else:
            fixed[key] = _check_value(key, value, path)
    combos = list(itertools.product(*axes.values()))
    names = [point_name(dict(zip(axes, combo))) for combo in combos]
    if len(set(names)) < len(names):  # values that only differ in characters a folder name cannot hold
        names = [f"{i:02d}-{name}" for i, name in enumerate(names)]
    points = [Point(i, name, dict(zip(axes, combo)), {**fixed, **dict(zip(axes, combo))})
              for i, (name, combo) in enumerate(zip(names, combos))]
    for point in points:
        try:
            point.config(Path("."))
        except UserError as exc:
            where = ", ".join(f"{k}={_show(v)}" for k, v in point.values.items()) or "every point"
            raise UserError(f"{path}: {exc} (point {point.index}: {where})") from None
    return points


def _flatten(data, path: str) -> dict:
    """Flat names or by section, as in --config files; unknown keys refused by name."""
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a mapping of settings to values or lists of values")
    flat = {}
    for key, value in data.items():
        if key in _SECTION_TYPES and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                if _OWNER.get(sub_key) != key:
                    raise UserError(f"{path}: unknown key {key}.{sub_key} (see cifar_dist.train --help)")
                set_once(flat, sub_key, sub_value, path)
        elif key in _OWNER:
            set_once(flat, key, value, path)
        else:
            raise UserError(f"{path}: unknown key {key!r} (see cifar_dist.train --help for the settings)")
    if flat.pop("overwrite", False) is not False:  # as in --config files; false is the default anyway
        raise UserError(f"{path}: overwrite is not read from a grid (every rerun of the sweep would delete its points' "
                        "runs again); remove it; to train a point afresh, move its folder out of ROOT")
    return flat


def _check_value(key: str, value, path: str):
    typ, _ = _base_type(_SECTION_TYPES[_OWNER[key]], key)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if typ is str and isinstance(value, bool):  # and yes/no, which several settings take, as booleans
        value = "yes" if value else "no"
    return _coerce(key, value, path)


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def point_name(values: dict) -> str:
    """key=value pairs joined by commas, each value reduced to characters safe in a folder name."""
    if not values:
        return "base"
    return ",".join(f"{k}={re.sub(r'[^A-Za-z0-9._+-]+', '_', _show(v)).strip('_')}" for k, v in values.items())


def sweep_group(root: Path) -> str:
    return os.environ.get("WANDB_RUN_GROUP") or root.resolve().name


def prepare(point: Point, root: Path) -> Path:
    """Write the point's complete config where its run goes; returns that file (what ``--config`` takes)."""
    out = root.resolve() / point.name
    out.mkdir(parents=True, exist_ok=True)
    write_config(point.config(root.resolve()), out / SWEEP_POINT_FILE)
    return out / SWEEP_POINT_FILE


def finished(point: Point, root: Path) -> bool:
    """The point's run reached the end the grid asks for now. A run made with other values of what a run
    computes (the grid was edited) is not this point's: the trainer, handed it, refuses in one line; more epochs
    than it trained continue it."""
    out = root / point.name
    if not (out / CONFIG_FILE).is_file():
        return False
    wanted = point.config(root)
    made, asked = load_config(out / CONFIG_FILE).flat(), wanted.flat()
    if any(made[key] != asked[key] for key in meaning_keys()):
        return False
    return is_finished(out, wanted, read_records(out))


def run_all(points: list[Point], root: Path, launcher: list[str]) -> int:
    """Train the points one after another; 0 if all finished, 75 if one was stopped by a signal (130 by Ctrl-C),
    else 1."""
    env = {**os.environ, "WANDB_RUN_GROUP": sweep_group(root)}
    failed = []
    for point in points:
        if finished(point, root):
            print(f"sweep: point {point.index} {point.name}: finished already, skipped", flush=True)
            continue
        print(f"sweep: point {point.index} of {len(points)}: {point.name}", flush=True)
        config = prepare(point, root)
        marker = config.parent / STOP_MARKER
        marker.unlink(missing_ok=True)  # left by a stop whose sweep was killed before it read it
        code, received = train_point([*launcher, "-m", "cifar_dist.train", "--config", str(config),
                                      "--stop-marker", str(marker)], env, config.parent)
        stopped = marker.exists()
        marker.unlink(missing_ok=True)
        if received or stopped or code in (EXIT_STOPPED, EXIT_INTERRUPTED, -2, -15):  # the sweep too; rerun
            print(f"sweep: stopped at point {point.index}; run the same command to continue", file=sys.stderr)
            return EXIT_INTERRUPTED if signal.SIGINT in received else EXIT_STOPPED
        if code:
            failed.append(point.name)
            print(f"sweep: point {point.index} {point.name} failed with exit code {code}", file=sys.stderr)
    print(f"sweep: {len(points) - len(failed)} of {len(points)} points finished"
          + (f"; failed: {', '.join(failed)}" if failed else "")
          + f"; compare with: python -m cifar_dist.compare {root}")
    return 1 if failed else 0


def train_point(cmd: list[str], env: dict, out: Path) -> tuple[int, list[int]]:
    """(the point's exit code, the signals of FORWARDED this process got meanwhile), once the point's trainer is
    done.

    The point runs in a process group of its own, and a SIGINT, SIGTERM or SIGHUP this process gets is passed on
    to that group (SIGHUP as SIGTERM): a terminal's Ctrl-C (which reaches only this process's group) reaches the
    trainer once, as it would reach a trainer started at the prompt, and so does a ``kill`` of this process alone.
    The trainer then saves a checkpoint and stops (or, at a second Ctrl-C, stops at once), and this process waits
    for it.
    """
    proc: subprocess.Popen | None = None
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        if proc is not None:
            _signal_group(proc.pid, FORWARDED[signum])

    # A signal the sweep was started to ignore (a background job of a script) stays ignored, by the trainer too.
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED if signal.getsignal(sig) != signal.SIG_IGN}
    try:
        proc = subprocess.Popen(cmd, env=env, preexec_fn=os.setpgrp)
        for signum in received:  # arrived while it was being started
            _signal_group(proc.pid, FORWARDED[signum])
        code = proc.wait()
        wait_for_trainer(out, proc.pid)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code, received


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:  # every process of the point has ended
        pass


def wait_for_trainer(out: Path, pgid: int) -> None:
    """Until the trainer of the point's process group ``pgid`` has let go of ``out`` (its lock, released once its
    checkpoint is saved and its stop marker written). accelerate's launcher for one process exits at once on a
    signal it got too, before its trainer has saved; a lock another run holds is not waited for."""
    while (holder := live_holder(out)) is not None and _running_in_group(holder.get("pid"), pgid):
        time.sleep(0.2)


def _running_in_group(pid, pgid: int) -> bool:
    """Whether process ``pid`` runs (not a zombie no one reaped yet) in process group ``pgid``; where /proc does not
    tell (not Linux), False."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            state, _, group = f.read().rpartition(")")[2].split()[:3]  # after the name, which may hold spaces
        return state != "Z" and int(group) == pgid
    except (OSError, TypeError, ValueError):
        return False


def sbatch_command(grid: str, root: Path, count: int, script: Path, sbatch_args: list[str]) -> list[str]:
    return ["sbatch", f"--array=0-{count - 1}", *sbatch_args, str(script), str(Path(grid).resolve()),
            str(root.resolve())]


def submit(grid: str, root: Path, count: int, script: Path, sbatch_args: list[str]) -> int:
    """sbatch the array (the grid is already checked); job.sh finds the repository through CIFAR_DIST_DIR."""
    cmd = sbatch_command(grid, root, count, script, sbatch_args)
    if shutil.which("sbatch") is None:
        raise UserError(f"no sbatch on PATH: submit from a SLURM login node ({shlex.join(cmd)}), or train the points "
                        "here with --run ROOT")
    Path("logs").mkdir(exist_ok=True)  # the scripts' --output=logs/...
    env = {**os.environ, "CIFAR_DIST_DIR": os.environ.get("CIFAR_DIST_DIR", str(script.resolve().parents[1]))}
    proc = subprocess.run([cmd[0], "--parsable", *cmd[1:]], env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise UserError(f"{shlex.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    print(f"sweep: submitted {count} points as job array {proc.stdout.strip().split(';')[0]}: {shlex.join(cmd)}")
    return 0


def checked_root(raw: str) -> Path:
    """ROOT, once its nearest existing part is known to be a folder: the points' folders are made below it."""
    root = Path(raw)
    existing = next(p for p in (root.absolute(), *root.absolute().parents) if p.exists())
    if not existing.is_dir():
        shown = raw if existing == root.absolute() else f"{raw}: {existing}"
        raise UserError(f"ROOT {shown} is a file; give a folder (each point trains into ROOT/<point>)")
    return root


def checked_launcher(raw: str) -> list[str]:
    """--launcher as a command line, its program found on PATH; checked before any point's config is written."""
    launcher = shlex.split(raw)
    if not launcher or shutil.which(launcher[0]) is None:
        what = f"{launcher[0]} is not found on PATH" if launcher else "no program given"
        raise UserError(f"--launcher {raw!r}: {what}; give a program that runs Python, e.g. 'accelerate launch' "
                        "(default: this Python)")
    return launcher


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="cifar_dist.sweep", allow_abbrev=False, description=__doc__.splitlines()[0],
                     epilog="Arguments after -- go to sbatch with --submit, e.g. -- --partition=gpu --time=2:00:00")
    parser.add_argument("grid", metavar="GRID.yaml")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--list", action="store_true", help="print the points and the sbatch command")
    action.add_argument("--show", type=int, metavar="I", help="print point I's complete config")
    action.add_argument("--run", metavar="ROOT", help="train every point into ROOT/<point>, one after another")
    action.add_argument("--submit", metavar="ROOT", help="sbatch a job array of slurm/sweep.sh over the points")
    action.add_argument("--prepare", metavar="ROOT", help="(for slurm/sweep.sh) write point --point's config "
                        "into ROOT/<point>; prints the W&B group, then the config's path")
    parser.add_argument("--point", type=int, help="with --prepare: the point's index")
    parser.add_argument("--launcher", default=sys.executable, help="with --run: what runs the trainer, e.g. "
                        "'accelerate launch' (default: this Python, one process)")
    parser.add_argument("--script", default=str(REPO / "slurm" / "sweep.sh"), help="with --submit: the sbatch script")
    return parser


def run(argv: list[str]) -> int:
    sbatch_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    points = read_grid(args.grid)
    if args.list:
        for p in points:
            print(f"{p.index:3d}  {p.name}")
        print(f"{len(points)} points; train them with: python -m cifar_dist.sweep {args.grid} --run ROOT, or on "
              f"SLURM: sbatch --array=0-{len(points) - 1} slurm/sweep.sh {args.grid} ROOT")
        return 0
    index = args.show if args.show is not None else args.point
    if (args.show is not None or args.prepare) and (index is None or not 0 <= index < len(points)):
        raise UserError(f"point {index}: the grid has points 0 to {len(points) - 1}"
                        + ("" if index is not None else "; pass --point I"))
    if args.show is not None:
        print(yaml.safe_dump(points[index].config(Path("ROOT")).to_dict(), sort_keys=False), end="")
        return 0
    if args.prepare:
        root = checked_root(args.prepare)
        print(f"{sweep_group(root)}\n{prepare(points[index], root).resolve()}")
        return 0
    if args.run:
        root, launcher = checked_root(args.run), checked_launcher(args.launcher)
        return run_all(points, root, launcher)
    checked_root(args.submit)
    script = Path(args.script)
    if not script.is_file():
        raise UserError(f"--script {args.script}: no such file")
    return submit(args.grid, Path(args.submit), len(points), script, sbatch_args)


def main(argv: list[str] | None = None) -> None:
    with one_line_errors("cifar_dist.sweep"):
        code = run(sys.argv[1:] if argv is None else list(argv))
    raise SystemExit(code)


if __name__ == "__main__":
    main()

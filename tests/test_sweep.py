"""cifar_dist.sweep: grids expanded into named, complete configs; bad grids refused by key before anything runs;
a 2-point sweep trained here, then in compare (the job array on SLURM: test_slurm_sweep.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import conftest
from cifar_dist.cli import parse_config
from cifar_dist.sweep import main, read_grid
from conftest import REPO, records

# The tests' tiny training settings (conftest.TINY) as a grid file, with two learning rates.
GRID = """\
data_source: synthetic
image_size: 32
synthetic_train_samples: 256
synthetic_eval_samples: 100
mixed_precision: no          # YAML reads this as false; the sweep takes it as the setting's "no"
log_every_steps: 2
num_epochs: 1
checkpoint_every_steps: 0
lr: [3e-4, 1.0e-3]           # 3e-4 is a string to YAML 1.1
"""


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def sweep(env, *args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cifar_dist.sweep", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=900, check=False)


def compare_rows(env, root: Path) -> dict[str, list[str]]:
    proc = subprocess.run([sys.executable, "-m", "cifar_dist.compare", str(root)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_points_are_named_complete_configs(tmp_path):
    grid = write(tmp_path / "g.yaml", "num_epochs: 3\nmodel:\n  freeze_until: [layer3, layer4]\nlr: ['3e-4', 1e-3]\n"
                 "weights: /shared/w/resnet50.pth\n")
    points = read_grid(grid)
    assert [p.name for p in points] == ["freeze_until=layer3,lr=0.0003", "freeze_until=layer3,lr=0.001",
                                        "freeze_until=layer4,lr=0.0003", "freeze_until=layer4,lr=0.001"]
    cfg = points[2].config(tmp_path / "root")
    assert (cfg.model.freeze_until, cfg.optim.lr, cfg.train.num_epochs) == ("layer4", 3e-4, 3)
    assert cfg.train.output_dir == str(tmp_path / "root" / points[2].name) and cfg.tracking.run_name == points[2].name
    assert [p.name for p in read_grid(write(tmp_path / "one.yaml", "lr: 0.01\n"))] == ["base"]
    # Values that only differ in characters a folder name cannot hold get the point's index in front.
    same = read_grid(write(tmp_path / "s.yaml", "weights: [/a/w.pth, /a:w.pth]\n"))
    assert [p.name for p in same] == ["00-weights=a_w.pth", "01-weights=a_w.pth"]


def test_list_show_and_prepare(tmp_path, capsys):
    grid = write(tmp_path / "g.yaml", GRID)
    with pytest.raises(SystemExit) as exit_info:
        main([grid, "--list"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.splitlines()[:2] == ["  0  lr=0.0003", "  1  lr=0.001"]
    assert f"sbatch --array=0-1 slurm/sweep.sh {grid} ROOT" in out
    with pytest.raises(SystemExit):
        main([grid, "--show", "1"])
    shown = write(tmp_path / "shown.yaml", capsys.readouterr().out)
    cfg = parse_config(["--config", shown])
    assert (cfg.optim.lr, cfg.train.mixed_precision, cfg.data.image_size) == (1e-3, "no", 32)
    with pytest.raises(SystemExit):
        main([grid, "--prepare", str(tmp_path / "root"), "--point", "0"])
    group, path = capsys.readouterr().out.splitlines()
    assert group == os.environ.get("WANDB_RUN_GROUP", "root")
    assert Path(path) == tmp_path / "root" / "lr=0.0003" / "sweep_point.yaml"
    assert parse_config(["--config", path]).train.output_dir == str(tmp_path / "root" / "lr=0.0003")


@pytest.mark.parametrize("text, message", [
    ("lrr: [1e-3]\n", "unknown key 'lrr'"),
    ("optim:\n  num_epochs: [1, 2]\n", "unknown key optim.num_epochs"),
    ("lr: [1e-3, -1]\n", "--lr must be positive, got -1.0 (point 1: lr=-1)"),
    ("freeze_until: [layer3, layer9]\n", "--freeze-until 'layer9': expected one of"),
    ("num_epochs: [1, two]\n", "num_epochs must be int, got 'two'"),
    ("lr: []\n", "lr is an empty list"),
    ("output_dir: /x\n", "output_dir is set by the sweep"),
    ("cache_frozen_features: true\nfreeze_until: [none, layer4]\n", "nothing is frozen (--freeze-until none)"),
    ("- lr\n", "expected a mapping of settings"),
    ("lr: [1e-3\n", "not valid YAML"),
    # As in a --config file: the last of the two lists silently made the grid.
    ("optim:\n  lr: [1e-3, 3e-4]\n  lr: [1e-2]\n", "g.yaml: duplicate key 'lr' on line 3 (first on line 2); keep one"),
    ("num_epochs: [1, 2]\nnum_epochs: 3\n", "g.yaml: duplicate key 'num_epochs' on line 2 (first on line 1); keep one"),
    ("lr: [1e-3]\noptim: {lr: [3e-4]}\n", "g.yaml: lr is given twice, flat and under optim; keep one"),
    ("overwrite: true\nlr: [1e-3, 3e-4]\n", "overwrite is not read from a grid"),
    ("overwrite: [false, true]\n", "overwrite is not read from a grid"),
    ("stop_marker: /tmp/stopped\n", "stop_marker is not read from a grid"),
])
def test_bad_grids_are_refused_by_key_before_anything(tmp_path, capsys, text, message):
    grid = write(tmp_path / "g.yaml", text)
    root = tmp_path / "root"
    for action in (["--list"], ["--run", str(root)], ["--submit", str(root)]):
        with pytest.raises(SystemExit) as exit_info:
            main([grid, *action])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not root.exists()


def test_other_refusals(tmp_path, capsys, monkeypatch):
    grid = write(tmp_path / "g.yaml", GRID)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: a laptop, not a SLURM login node
    for argv, message in [([str(tmp_path / "none.yaml"), "--list"], "none.yaml: no such grid file"),
                          ([grid, "--show", "2"], "point 2: the grid has points 0 to 1"),
                          ([grid, "--prepare", str(tmp_path)], "pass --point I"),
                          ([grid, "--submit", str(tmp_path), "--script", "/nope.sh"], "--script /nope.sh: no such"),
                          ([grid, "--submit", str(tmp_path)], "no sbatch on PATH: submit from a SLURM login node")]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err


def test_a_root_that_is_a_file_or_a_launcher_not_on_path_is_refused_before_anything_is_written(tmp_path, capsys):
    grid = write(tmp_path / "g.yaml", GRID)
    inside_file = str(tmp_path / "g.yaml" / "sub")
    for argv, message in [([grid, "--run", grid], f"ROOT {grid} is a file; give a folder"),
                          ([grid, "--prepare", grid, "--point", "0"], f"ROOT {grid} is a file"),
                          ([grid, "--run", inside_file], f"ROOT {inside_file}: {grid} is a file"),
                          ([grid, "--submit", grid], f"ROOT {grid} is a file"),
                          ([grid, "--run", str(tmp_path / "root"), "--launcher", "acclerate launch"],
                           "--launcher 'acclerate launch': acclerate is not found on PATH"),
                          ([grid, "--run", str(tmp_path / "root"), "--launcher", ""], "--launcher '': no program")]:
        assert message in conftest.refused(capsys, main, argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.yaml"]


def test_a_grid_that_is_not_utf8_or_a_folder_is_one_line_naming_it(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_bytes("# résumé\nlr: [1e-3]\n".encode("latin-1"))
    assert conftest.refused(capsys, main, [str(grid), "--list"]) == (
        f"cifar_dist.sweep: error: {grid}: must be UTF-8 text (byte 0xe9 on line 1 is not); save it as UTF-8")
    assert f"{tmp_path} is a folder; give the grid's YAML file" in conftest.refused(capsys, main, [str(tmp_path),
                                                                                                 "--list"])


@pytest.mark.slow
def test_run_trains_every_point_then_skips_them(test_env, tmp_path):
    grid = write(tmp_path / "g.yaml", GRID)
    root = tmp_path / "sweep"
    proc = sweep(test_env, grid, "--run", root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sweep: 2 of 2 points finished" in proc.stdout
    rows = compare_rows(test_env, root)
    assert set(rows) == {"lr=0.0003", "lr=0.001"} and all(r[2] == "finished" for r in rows.values())
    again = sweep(test_env, grid, "--run", root)
    assert again.returncode == 0 and again.stdout.count("finished already, skipped") == 2
    # An edited grid: a point's run made with another value of what it computes is not skipped as finished;
    # the trainer refuses it in one line, and the run stays as it was.
    edited = write(tmp_path / "g.yaml", GRID + "bn_momentum: 0.1\n")
    proc = sweep(test_env, edited, "--run", root)
    assert proc.returncode == 1 and "finished already" not in proc.stdout
    assert "was made with --bn-momentum 0.01, this run has 0.1" in proc.stderr
    assert compare_rows(test_env, root) == rows
    # More epochs continue each point's run.
    proc = sweep(test_env, write(tmp_path / "g.yaml", GRID.replace("num_epochs: 1", "num_epochs: 2")), "--run", root)
    assert proc.returncode == 0 and "finished already" not in proc.stdout, proc.stderr[-3000:]
    assert all([r["epoch"] for r in records(root / name)] == [1, 2] for name in rows)


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_after_the_trainer_has_saved_its_checkpoint(test_env, tmp_path):
    """A terminal's Ctrl-C reaches the sweep's process group, and the sweep passes it on to its trainer's (once:
    a second would stop the trainer at once): the trainer saves and stops, and the sweep waits for that (it used
    to kill the trainer 0.25 s later, before any checkpoint)."""
    grid = write(tmp_path / "g.yaml", GRID.replace("synthetic_train_samples: 256", "synthetic_train_samples: 1280"))
    root, log = tmp_path / "sweep", tmp_path / "log"
    proc = subprocess.Popen([sys.executable, "-m", "cifar_dist.sweep", grid, "--run", str(root)], env=test_env,
                            cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while "start-up: " not in log.read_text():  # the first point's trainer has begun its 40 steps
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    out = log.read_text()
    assert "Traceback" not in out and "cifar_dist.train: stopped by SIGINT at step " in out, out[-3000:]
    assert out.rstrip().endswith("sweep: stopped at point 0; run the same command to continue")
    point = root / "lr=0.0003"
    assert [(c / "COMPLETE").exists() for c in (point / "checkpoints").iterdir()] == [True]
    assert not (root / "lr=0.001").exists()  # the sweep stopped there


def default_signals() -> None:
    """SIGINT and SIGHUP at their defaults in a sweep a test starts, as at a terminal: a test run as a background
    job or under nohup would pass them on ignored, and the sweep leaves a signal it was started to ignore alone."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.slow
def test_under_accelerate_launch_a_stop_of_the_trainer_or_a_kill_of_the_sweep_alone_stops_the_sweep(test_env,
                                                                                                    tmp_path):
    """accelerate launch reports its trainer's stop (exit 75) as its own exit 1, as it would a crash: the sweep
    reads the trainer's stop marker instead, and stops rather than going on to the next point. A signal to the
    sweep alone (``kill``, not its process group) is passed on to the trainer, which saves before both stop; a
    hangup too, as SIGTERM."""
    grid = write(tmp_path / "g.yaml", GRID.replace("synthetic_train_samples: 256", "synthetic_train_samples: 1280"))
    root = tmp_path / "sweep"
    point = root / "lr=0.0003"
    launcher = f"{sys.executable} -m accelerate.commands.launch --num_processes 1"

    def start(log: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "cifar_dist.sweep", grid, "--run", str(root), "--launcher",
                                 launcher], env=test_env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=default_signals)
        while "start-up: " not in log.read_text():  # the first point's trainer has begun its 40 steps
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        return proc

    def checkpoint_steps() -> list[int]:
        return [int(c.name.removeprefix("step-")) for c in (point / "checkpoints").iterdir()
                if (c / "COMPLETE").exists()]

    # SIGTERM to the trainer alone, as a scheduler or a user's kill would send it.
    proc = start(tmp_path / "log1")
    os.kill(json.loads((point / ".lock").read_text())["pid"], signal.SIGTERM)
    assert proc.wait(timeout=300) == 75
    out = (tmp_path / "log1").read_text()
    assert "cifar_dist.train: stopped by SIGTERM at step " in out and "failed" not in out, out[-3000:]
    assert out.rstrip().endswith("sweep: stopped at point 0; run the same command to continue")
    assert not (root / "lr=0.001").exists() and not (point / ".stopped").exists()
    first = checkpoint_steps()
    assert len(first) == 1 and 0 < first[0] < 40
    # The same command continues the point; SIGINT to the sweep's own process only.
    proc = start(tmp_path / "log2")
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    out = (tmp_path / "log2").read_text()
    assert f"resuming from {point / 'checkpoints'}" in out and "cifar_dist.train: stopped by SIGINT at step " in out
    assert out.rstrip().endswith("sweep: stopped at point 0; run the same command to continue"), out[-3000:]
    assert not (point / ".lock").exists()  # the sweep ended after its trainer, not before
    second = max(checkpoint_steps())
    assert second > first[0] and not (root / "lr=0.001").exists()
    # A hangup of the sweep (its terminal closed) stops the trainer, in its own process group, as SIGTERM would.
    proc = start(tmp_path / "log3")
    os.kill(proc.pid, signal.SIGHUP)
    assert proc.wait(timeout=300) == 75
    out = (tmp_path / "log3").read_text()
    assert "cifar_dist.train: stopped by SIGTERM at step " in out, out[-3000:]
    assert not (point / ".lock").exists() and max(checkpoint_steps()) > second

"""Compare runs from their files alone: one markdown table and one plot, with no network and no W&B.

    python -m cifar_dist.compare outputs/                       # every run below outputs/
    python -m cifar_dist.compare sweeps/lr runs/baseline --output-dir reports/

Finds every run below the given folders (a folder with a config.yaml, or a sweep point not started yet), and
writes compare.md (to the first folder, or ``--output-dir``), also printed: one row per run, sorted by best
validation top-1, with the settings that differ between the runs, final and best val top-1 and top-5, epochs
done (the last marked partial where --max-steps ended it early), total time (the epochs' training + eval time as
metrics.jsonl records it, without start-up), the median of the epochs' training images/s, device and processes.
A run that has not reached its planned end is "unfinished" ("training now", with its process, while a live run
holds its lock); one that continued from a checkpoint says "resumed"; one an --overwrite start has moved into
.previous-run/ (until the next start puts it back) says so. compare.png overlays the runs' validation top-1 and
loss per epoch.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from cifar_dist.checkpoint import CHECKPOINTS, atomic_write_bytes, atomic_write_text, find_latest
from cifar_dist.cli import OneLineParser, one_line_errors
from cifar_dist.config import Config, UserError
from cifar_dist.rundir import PREVIOUS, live_holder
from cifar_dist.runs import (
    CONFIG_FILE,
    SWEEP_POINT_FILE,
    check_writable,
    is_finished,
    load_config,
    read_records,
    replaced_run,
    resumed_segments,
    run_facts,
)
from cifar_dist.tracking import partial_note

# Settings that say where a run writes or how it reports, not what it computes: never a "difference".
NOT_SETTINGS = {"output_dir", "resume", "overwrite", "stop_marker", "run_name", "log_every_steps",
                "checkpoint_every_steps", "keep_checkpoints", "async_checkpoints", "wandb_project", "wandb_entity",
                "wandb_tags", "log_model", "tracker"}


@dataclass
class RunRow:
    path: Path
    name: str
    settings: dict
    records: list[dict]
    status: str
    facts: dict = field(default_factory=dict)

    @property
    def best(self) -> dict | None:
        return max(self.records, key=lambda r: r["val_acc"]) if self.records else None


def find_runs(dirs: list[str]) -> list[Path]:
    """Run folders at or below ``dirs``: a config.yaml (or a sweep point's config), not looking inside runs."""
    found = []
    for raw in dirs:
        root = Path(raw)
        if not root.is_dir():
            raise UserError(f"{raw}: no such folder")
        for here, subdirs, files in os.walk(root):
            if CONFIG_FILE in files or SWEEP_POINT_FILE in files:
                found.append(Path(here))
                subdirs.clear()  # a run's own folders (checkpoints, wandb, eval-*) hold no other runs
            else:
                subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    if not found:
        raise UserError(f"no runs below {', '.join(dirs)} (a run is a folder with a {CONFIG_FILE})")
    return sorted(set(found))


def read_run(path: Path, name: str) -> RunRow:
    """One run's row; a run whose files cannot be read is shown as such, not dropped."""
    started = (path / CONFIG_FILE).is_file()
    try:
        cfg = load_config(path / (CONFIG_FILE if started else SWEEP_POINT_FILE))
        records = read_records(path) if started else []
    except UserError as exc:
        return RunRow(path, name, {}, [], f"unreadable: {exc}")
    return RunRow(path, name, cfg.flat(), records, status(path, cfg, records, started), run_facts(path))


def status(path: Path, cfg: Config, records: list[dict], started: bool) -> str:
    if not started:
        return "not started"
    if replaced_run(path) is not None:  # the dir's files are that start's; the next start puts the run back
        return f"replaced by an --overwrite start with no checkpoint yet; the run is in {PREVIOUS}/"
    if is_finished(path, cfg, records):
        text = "finished"
    else:
        holder, latest = live_holder(path), find_latest(path / CHECKPOINTS)
        text = f"training now (pid {holder.get('pid', '?')} on {holder.get('host', '?')})" if holder else "unfinished"
        text += f", checkpoint at step {int(latest.name[5:])}" if latest else ""
    resumes = resumed_segments(records)
    return text + (f", resumed{f' {resumes}x' if resumes > 1 else ''}" if resumes else "")


def differing(rows: list[RunRow]) -> list[str]:
    """Settings whose value is not the same in every readable run, in config order."""
    readable = [r.settings for r in rows if r.settings]
    keys = list(readable[0]) if readable else []
    return [k for k in keys if k not in NOT_SETTINGS and len({repr(s.get(k)) for s in readable}) > 1]


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def table(rows: list[RunRow]) -> str:
    """The markdown table, best validation top-1 first; runs without an epoch yet at the bottom."""
    keys = differing(rows)
    head = ["run", *keys, "status", "val top-1", "best top-1 (epoch)", "val top-5", "best top-5", "epochs",
            "time", "train img/s", "device", "processes"]
    left = {"run", *keys, "status", "device"}
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if h in left else "---:" for h in head) + "|"]
    for row in sorted(rows, key=lambda r: -(r.best["val_acc"] if r.best else -1)):
        cells = [row.name, *(_value(row.settings.get(k, "")) for k in keys), row.status]
        if row.records:
            last, best = row.records[-1], row.best
            epochs = f"{last['epoch']}/{row.settings['num_epochs']}{partial_note(last)}"
            cells += [_pct(last["val_acc"]), f"{_pct(best['val_acc'])} ({best['epoch']})", _pct(last["val_top5"]),
                      _pct(max(r["val_top5"] for r in row.records)), epochs,
                      _duration(sum(r.get("epoch_time_s", 0) for r in row.records)),
                      f"{statistics.median(r['train_images_per_s'] for r in row.records):.0f}"]
        else:
            cells += [""] * 7
        facts = row.facts
        device = f"{facts['device']}, {facts['mixed_precision']}" if facts else ""
        cells += [device, str(facts.get("num_processes", ""))]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def plot(rows: list[RunRow]) -> bytes:
    """compare.png: validation top-1 and loss per epoch, one line per run, best run first in the legend."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), dpi=100)
    acc_ax, loss_ax = fig.subplots(1, 2)
    for row in sorted((r for r in rows if r.records), key=lambda r: -r.best["val_acc"]):
        epochs = [r["epoch"] for r in row.records]
        acc_ax.plot(epochs, [100 * r["val_acc"] for r in row.records], "o-", label=row.name[-40:])
        loss_ax.plot(epochs, [r["val_loss"] for r in row.records], "o-", label=row.name[-40:])
    for ax, title in ((acc_ax, "validation top-1 (%)"), (loss_ax, "validation loss")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if any(r.records for r in rows):
        acc_ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def compare(dirs: list[str]) -> list[RunRow]:
    paths = find_runs(dirs)
    base = Path(os.path.commonpath([Path(d).resolve() for d in dirs]))
    return [read_run(p, str(p.resolve().relative_to(base)) if p.resolve() != base else p.resolve().name)
            for p in paths]


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="cifar_dist.compare", allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="folders to search for runs")
    parser.add_argument("--output-dir", help="where compare.md and compare.png go, made if need be (default: the "
                        "first DIR)")
    args = parser.parse_args(argv)
    with one_line_errors("cifar_dist.compare"):
        output_dir = Path(args.output_dir or args.dirs[0])
        if output_dir.exists() and not output_dir.is_dir():
            raise UserError(f"--output-dir {args.output_dir} is a file; give a folder for compare.md and compare.png")
        if args.output_dir:  # (one still to be made: tried in the nearest folder above it that exists)
            check_writable(output_dir, f"--output-dir {args.output_dir}", "give a folder you can write to")
        else:  # the runs' folder, which may be on a read-only share
            check_writable(output_dir, "compare.md and compare.png", "give --output-dir a folder you can write to")
        rows = compare(args.dirs)
    text = table(rows)
    output_dir.mkdir(parents=True, exist_ok=True)  # once there is something to write, as evaluate does
    atomic_write_text(output_dir / "compare.md", f"# {len(rows)} runs below {', '.join(args.dirs)}\n\n{text}\n\n"
                      "![validation curves](compare.png)\n")
    atomic_write_bytes(output_dir / "compare.png", plot(rows))
    print(text)
    print(f"\nwrote {output_dir / 'compare.md'} and compare.png")


if __name__ == "__main__":
    main()

"""Upload offline W&B runs from a login node: ``python -m cifar_dist.sync DIR [DIR ...]``.

Compute nodes without internet leave runs under ``<output-dir>/wandb/offline-run-*`` (under
``$WANDB_DIR/wandb/`` where WANDB_DIR was set: set it here too). This finds every such run below the given
folders and runs ``wandb sync`` on those not uploaded yet (wandb marks an uploaded run with a
``run-<id>.wandb.synced`` file), so it is safe to run again and again, e.g. from cron while jobs run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

# The output dir's record of its W&B run: cifar_dist.tracking.RUN_ID_FILE, not imported (that imports torch).
RUN_ID_FILE = "wandb_run_id"


def find_offline_runs(roots: list[Path], wandb_dir: Path | None = None) -> list[tuple[Path, bool]]:
    """(run folder, already synced) for every offline run below ``roots``, oldest first; and, with ``wandb_dir``
    (the runs' WANDB_DIR, which the trainer writes W&B's files under instead of the output dir), those of the
    output dirs below ``roots``, named by their wandb_run_id files."""
    runs = {p.parent for root in roots for p in root.rglob("offline-run-*/run-*.wandb")}
    if wandb_dir is not None:
        ids = {f.read_text().strip() for root in roots for f in root.rglob(RUN_ID_FILE) if f.is_file()}
        runs |= {p.parent for p in (wandb_dir / "wandb").glob("offline-run-*/run-*.wandb")
                 if p.name.removeprefix("run-").removesuffix(".wandb") in ids}
    return [(run, any(run.glob("run-*.wandb.synced"))) for run in sorted(runs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cifar_dist.sync", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("dirs", nargs="+", type=Path, help="output dirs or any folders above them")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"cifar_dist.sync: error: no such folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs = find_offline_runs(args.dirs, Path(os.environ["WANDB_DIR"]) if os.environ.get("WANDB_DIR") else None)
    pending = [run for run, synced in runs if not synced]
    print(f"{len(runs)} offline run(s) found, {len(runs) - len(pending)} already synced, {len(pending)} to sync")
    failed = 0
    for run in pending:
        if args.dry_run:
            print(f"would sync {run}")
            continue
        # This interpreter's wandb: its command may not be on PATH (a venv used without activating it).
        result = subprocess.run([sys.executable, "-m", "wandb", "sync", str(run)], capture_output=True, text=True)
        ok = result.returncode == 0 and any(run.glob("run-*.wandb.synced"))
        failed += not ok
        last = (result.stdout + result.stderr).strip().splitlines()[-1:] or [""]
        print(f"{'synced' if ok else 'FAILED'} {run}{'' if ok else ': ' + last[0]}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

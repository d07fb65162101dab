"""The one place metrics leave the run: metrics.jsonl, results.md and accelerate's trackers, main process only."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from cifar_dist.checkpoint import atomic_write_text
from cifar_dist.config import TrackingConfig, UserError

# The seed notebook's reported table (Keras, one GPU): epoch -> (train acc, val acc, train loss, val loss).
SEED_RESULTS = {1: (0.498, 0.691, 1.92, 1.02), 5: (0.942, 0.728, 0.17, 1.40), 10: (0.980, 0.749, 0.06, 1.52)}
_TRACKER_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}


def tracker_backend(cfg: TrackingConfig) -> str | None:
    """The ``log_with`` value for the Accelerator, checking the tracker's package is importable."""
    if cfg.tracker == "none":
        return None
    package = _TRACKER_PACKAGES[cfg.tracker]
    if importlib.util.find_spec(package) is None:
        raise UserError(f"--tracker {cfg.tracker} needs the '{package}' package: pip install {package}, "
                        "or pass --tracker none")
    return cfg.tracker


class RunLog:
    """Per-epoch records to disk and trackers; every method is a no-op off the main process."""

    def __init__(self, accelerator, output_dir: Path, header: str, records: list[dict]):
        """``records``: the epochs already logged before a resume, kept so the files never list one twice."""
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.metrics_path = output_dir / "metrics.jsonl"
        self.results_path = output_dir / "results.md"
        self.header = header
        self.records: list[dict] = list(records)
        if self.enabled and self.records:
            self._write()

    def log_step(self, metrics: dict, step: int) -> None:
        if self.enabled:
            self.accelerator.log(metrics, step=step)

    def log_epoch(self, record: dict, step: int) -> None:
        """Add one epoch's record (replacing an earlier one of the same epoch), rewrite the files, log it."""
        self.records = [r for r in self.records if r["epoch"] != record["epoch"]] + [record]
        if not self.enabled:
            return
        self._write()
        self.accelerator.log({k.replace("_", "/", 1): v for k, v in record.items()}, step=step)

    def _write(self) -> None:
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.records))
        atomic_write_text(self.results_path, render_results(self.header, self.records))


def render_results(header: str, records: list[dict]) -> str:
    """results.md: the seed's table for this run, with the seed's own figures alongside."""
    rows = ["| Epoch | Training Accuracy | Validation Accuracy | Training Loss | Validation Loss | Seed val acc |",
            "|-------|-------------------|---------------------|---------------|-----------------|--------------|"]
    for r in records:
        seed = SEED_RESULTS.get(r["epoch"])
        rows.append(f"| {r['epoch']} | {100 * r['train_acc']:.1f}% | {100 * r['val_acc']:.1f}% | "
                    f"{r['train_loss']:.2f} | {r['val_loss']:.2f} | {f'{100 * seed[1]:.1f}%' if seed else ''} |")
    last = records[-1]
    summary = (f"Final validation accuracy {100 * last['val_acc']:.2f}% (top-5 {100 * last['val_top5']:.2f}%) "
               f"on {last['val_num_samples']} test images after {last['step']} optimizer steps.")
    return f"{header}\n\n" + "\n".join(rows) + f"\n\n{summary}\n"

"""Everything the run saves goes through here, written so that a crash at any moment loses nothing.

Files are written to a temporary name and renamed into place. A checkpoint is a folder
``checkpoints/step-00001234`` written by ``accelerator.save_state`` (model, optimizer and every process's RNG
state) plus ``trainer_state.json`` (position in the data, counters, the metrics so far, the config), built under
a temporary name and renamed only once complete, with a ``COMPLETE`` marker the loader checks.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from cifar_dist.atomic import atomic_write_bytes, atomic_write_text
from cifar_dist.config import Config, UserError, meaning_keys

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
COMPLETE = "COMPLETE"
_NAME = re.compile(r"step-(\d{8})")
# What checkpoints from before a setting existed were made with.
LEGACY_VALUES = {"bn_momentum": 0.1}


def save_model(model: torch.nn.Module, path: Path) -> None:
    """The model's weights as safetensors (torchvision key names, head under ``fc.``)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata={"format": "pt"}))


def _flat(config: dict) -> dict:
    return {k: v for section in config.values() for k, v in section.items()}


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable checkpoint, or None if it is."""
    if not path.is_dir():
        return "no such checkpoint folder"
    if not (path / COMPLETE).is_file():
        return "incomplete checkpoint (no COMPLETE marker: the save was interrupted)"
    try:
        state = json.loads((path / STATE_FILE).read_text())
        int(state["step"]), int(state["epoch"]), state["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {STATE_FILE} ({type(exc).__name__})"
    models, others = list(path.glob("model*.safetensors")), [*path.glob("optimizer*.bin"), *path.glob("*.pkl")]
    if not models or not any(p.name.startswith("optimizer") for p in others):
        return "model or optimizer state missing"
    # Read every file through: a checkpoint truncated by a full disk or a crashed copy must not be resumed.
    try:
        for model_file in models:
            with safe_open(str(model_file), "pt") as f:
                f.keys()
        for other in others:
            with zipfile.ZipFile(other) as z:
                if z.testzip() is not None:
                    raise zipfile.BadZipFile(f"bad CRC in {other.name}")
    except (OSError, zipfile.BadZipFile, SafetensorError) as exc:
        return f"damaged file ({type(exc).__name__}: {exc})"
    return None


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``; damaged ones are skipped with a warning."""
    candidates = sorted((p for p in root.glob("step-*") if _NAME.fullmatch(p.name)), reverse=True)
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
    return None


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def check_compatible(path: Path, cfg: Config) -> None:
    """Refuse a checkpoint whose run computed something else (image size, freeze point, global batch...)."""
    saved, current = _flat(read_state(path)["config"]), _flat(cfg.to_dict())
    for key in meaning_keys():
        was = saved.get(key, LEGACY_VALUES.get(key))
        if was != current[key]:
            raise UserError(f"checkpoint {path} was made with --{key.replace('_', '-')} {was}, this run has "
                            f"{current[key]}; resume with the same value or use another --output-dir")


def save_checkpoint(accelerator, output_dir: Path, state: dict, keep: int) -> Path:
    """Save model, optimizer, RNG and ``state`` as ``checkpoints/step-N``; keep the newest ``keep``.

    Every process must call this (each writes its RNG state). The folder appears under its final name only
    once complete, so a crash mid-save leaves the previous checkpoint as the newest complete one; a failed
    save (a full disk) removes its temporary folder and raises OSError naming the checkpoint.
    """
    root = output_dir / CHECKPOINTS
    final = root / f"step-{state['step']:08d}"
    tmp = root / f".tmp-{final.name}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=1))
            atomic_write_text(tmp / COMPLETE, "")
    except (OSError, SafetensorError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        code = _errno_of(exc, root)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(final)) from None
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)  # a stale copy of the same step, e.g. after a stop at epoch end
        os.replace(tmp, final)
        for old in sorted(p for p in root.glob("step-*") if _NAME.fullmatch(p.name))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _errno_of(exc: Exception, root: Path) -> int | None:
    """The OS error behind a failed save: safetensors reports it as "(os error N)" in its message, and torch.save
    as a failed write with no number, which on a full disk is ENOSPC."""
    if isinstance(exc, OSError):
        return exc.errno
    found = re.search(r"\(os error (\d+)\)", str(exc))
    if found:
        return int(found.group(1))
    if "write" in str(exc) and shutil.disk_usage(root).free < 2**20:
        return errno.ENOSPC
    return None


@dataclass
class SaveSchedule:
    """When a mid-epoch checkpoint is due (epoch ends always save): every ``every_steps`` optimizer steps
    and/or every ``every_minutes``. Each process votes by its own clock at the periodic health check, where
    the votes are summed, so all processes save at the same step."""

    every_steps: int
    every_minutes: float
    last_save: float = field(default_factory=time.monotonic)

    def due_at(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def time_vote(self) -> bool:
        return self.every_minutes > 0 and time.monotonic() - self.last_save >= 60 * self.every_minutes

    def saved(self) -> None:
        self.last_save = time.monotonic()

"""Everything the run saves goes through here, written so that a crash at any moment loses nothing.

Files are written to a temporary name and renamed into place. A checkpoint is a folder
``checkpoints/step-00001234`` written by ``accelerator.save_state`` (model, optimizer and every process's RNG
state) plus ``trainer_state.json`` (position in the data, counters, the metrics so far, the config), built under
a temporary name and renamed only once complete, with a ``COMPLETE`` marker the loader checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from cifar_dist.config import Config, UserError

# Files a run leaves in its output dir; their presence means a fresh start there would clobber a run.
RUN_FILES = ("config.yaml", "metrics.jsonl", "results.md", "model.safetensors", "curves.png", "wandb_run_id")
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
COMPLETE = "COMPLETE"
_NAME = re.compile(r"step-(\d{8})")
# Settings that change what a run computes: resuming under different values would silently mix two runs.
MEANING_KEYS = ("data_source", "image_size", "max_train_samples", "synthetic_train_samples", "weights",
                "freeze_until", "num_classes", "head_hidden_dim", "lr", "adam_beta1", "adam_beta2", "adam_eps",
                "global_batch_size", "seed")


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_model(model: torch.nn.Module, path: Path) -> None:
    """The model's weights as safetensors (torchvision key names, head under ``fc.``)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata={"format": "pt"}))


def _flat(config: dict) -> dict:
    return {k: v for section in config.values() for k, v in section.items()}


def check_writable(output_dir: str) -> Path:
    """Create ``output_dir`` and prove it is writable (UserError otherwise)."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=path, prefix=".write-test.").close()
    except OSError as exc:
        raise UserError(f"--output-dir {output_dir} is not writable ({exc.strerror}); choose another directory")
    return path


def resolve_start(cfg: Config) -> tuple[Path, Path | None]:
    """(output dir, checkpoint to resume from or None), applying --resume / --overwrite; raises UserError.

    Reads only: nothing is deleted or written here except the output dir's creation.
    """
    train = cfg.train
    output_dir = check_writable(train.output_dir)
    if train.resume not in ("auto", "never"):
        path = Path(train.resume)
        problem = checkpoint_problem(path)
        if problem:
            raise UserError(f"--resume {train.resume}: {problem}")
        check_compatible(path, cfg)
        return output_dir, path
    if train.resume == "auto" and not train.overwrite:
        latest = find_latest(output_dir / CHECKPOINTS)
        if latest is not None:
            check_compatible(latest, cfg)
            return output_dir, latest
    existing = [name for name in (*RUN_FILES, CHECKPOINTS) if (output_dir / name).exists()]
    if existing and not train.overwrite:
        raise UserError(f"--output-dir {train.output_dir} already holds a run ({', '.join(existing)}) "
                        f"{'and no complete checkpoint to resume' if train.resume == 'auto' else ''}"
                        f"{'' if train.resume == 'auto' else 'and --resume is never'}; "
                        "choose another --output-dir or pass --overwrite")
    return output_dir, None


def clear_previous_run(output_dir: Path) -> None:
    """With --overwrite: remove the old run's files and checkpoints so nothing stale is resumed later."""
    for name in RUN_FILES:
        (output_dir / name).unlink(missing_ok=True)
    shutil.rmtree(output_dir / CHECKPOINTS, ignore_errors=True)


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
    for key in MEANING_KEYS:
        if saved.get(key) != current[key]:
            flag = key.replace("_", "-")
            raise UserError(f"checkpoint {path} was made with --{flag} {saved.get(key)}, this run has "
                            f"{current[key]}; resume with the same value or use another --output-dir")


def save_checkpoint(accelerator, output_dir: Path, state: dict, keep: int) -> Path:
    """Save model, optimizer, RNG and ``state`` as ``checkpoints/step-N``; keep the newest ``keep``.

    Every process must call this (each writes its RNG state). The folder appears under its final name only
    once complete, so a crash mid-save leaves the previous checkpoint as the newest complete one.
    """
    root = output_dir / CHECKPOINTS
    final = root / f"step-{state['step']:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=1))
        atomic_write_text(tmp / COMPLETE, "")
        shutil.rmtree(final, ignore_errors=True)  # a stale copy of the same step, e.g. after a stop at epoch end
        os.replace(tmp, final)
        for old in sorted(p for p in root.glob("step-*") if _NAME.fullmatch(p.name))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final

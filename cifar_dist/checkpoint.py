"""Everything the run saves goes through here, written so that a crash at any moment loses nothing.

Files are written to a temporary name and renamed into place. A checkpoint is a folder
``checkpoints/step-00001234`` written by ``accelerator.save_state`` (model, optimizer and every process's RNG
state) plus ``trainer_state.json`` (position in the data, counters, the metrics so far, the config), built under
a temporary name and renamed only once complete, with a ``COMPLETE`` marker the loader checks.

With a ``BackgroundWriter`` (--async-checkpoints, the trainer's default) a save copies the model and Adam state
to host memory, writes the small files at once, and leaves the large ones, the marker and the rename to a
thread while training goes on: the files and their order are the same, so a checkpoint still appears complete
or not at all. One write is pending at most; the next save, a stop and the run's end wait for it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate.checkpointing import save_accelerator_state
from accelerate.utils import OPTIMIZER_NAME, SAFE_WEIGHTS_NAME
from accelerate.utils import save as accelerate_save
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from cifar_dist.atomic import atomic_write_bytes, atomic_write_text
from cifar_dist.config import WEIGHTS_CHOICES, Config, UserError, flat_settings, meaning_keys
from cifar_dist.model import weights_sha256

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


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable checkpoint, or None if it is."""
    if not path.is_dir():
        return "no such checkpoint folder"
    run = path if (path / CHECKPOINTS).is_dir() else path.parent if path.name == CHECKPOINTS else None
    if run is not None:  # a run's folder (or its checkpoints/) for one of its checkpoints: name the newest
        newest = find_latest(run / CHECKPOINTS)
        return (f"a run's folder, not a checkpoint; give one of its checkpoints, e.g. its newest, {newest}" if newest
                else "a run's folder, not a checkpoint, and it has no complete checkpoint")
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
        # One line of the package's own, as its other notes: a Python warning echoed its source line, and the
        # trainer, compare and evaluate all look for the newest checkpoint through here.
        print(f"cifar_dist: warning: skipping checkpoint {path}: {problem}", file=sys.stderr, flush=True)
    return None


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every weight and BatchNorm statistic of the model in checkpoint ``path``."""
    return load_file(str(path / SAFE_WEIGHTS_NAME))


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def check_compatible(path: Path, cfg: Config,
                     fix: str = "resume with the same value or use another --output-dir") -> None:
    """Refuse a checkpoint whose run computed something else (image size, freeze point, global batch...);
    ``fix`` says what to change. A --weights file named otherwise than the checkpoint's is read and compared by
    content (check_same_weights)."""
    state = read_state(path)
    saved, current = flat_settings(state["config"]), cfg.flat()
    # Generated data cannot have moved, and its settings are no one else's: from or to synthetic, the source
    # itself is the difference to name.
    synthetic = "synthetic" in (saved.get("data_source"), current["data_source"])
    for key in meaning_keys():
        if key == "data_source" and "data_fingerprint" in state and not synthetic:
            continue  # compared by content once the data has loaded (check_same_data): the data may have moved
        if key.startswith("synthetic_") and not synthetic:
            continue
        was = saved.get(key, LEGACY_VALUES.get(key))
        if was == current[key]:
            continue  # (a --weights file named as before is not read: a resume does not load it, build_model)
        if key == "weights" and state.get("weights_sha256") and current[key] not in WEIGHTS_CHOICES:
            check_same_weights(path, was, current[key], state["weights_sha256"], fix)
        else:
            raise UserError(f"checkpoint {path} was made with --{key.replace('_', '-')} {was}, this run has "
                            f"{current[key]}; {fix}")


def check_same_weights(path: Path, was: str, weights: str, sha256: str, fix: str) -> None:
    """Refuse a checkpoint made from another weights file than ``weights``, compared by content (its recorded
    ``sha256``): the same file named by another path passes, so a moved or copied file does not strand a run.
    A checkpoint from before the hash was recorded is held to the file's name instead (check_compatible)."""
    try:
        same = weights_sha256(weights) == sha256
    except OSError as exc:
        raise UserError(f"checkpoint {path} was made with --weights {was}; this run's --weights {weights} cannot be "
                        f"read to compare with it ({exc.strerror}); {fix}") from None
    if not same:
        raise UserError(f"checkpoint {path} was made with --weights {was}; this run's --weights {weights} holds "
                        f"other weights (not the same file content); {fix}")


def check_same_data(path: Path, data_source: str, data_fingerprint: str) -> None:
    """Refuse a checkpoint trained on other data than ``data_source`` loaded (data.fingerprint). The same data
    from another path or format passes: a moved folder does not strand a run. A checkpoint from before
    fingerprints were recorded is held to its source's name instead (check_compatible)."""
    state = read_state(path)
    if state.get("data_fingerprint", data_fingerprint) != data_fingerprint:
        was = flat_settings(state["config"])["data_source"]
        raise UserError(f"checkpoint {path} was trained on other data (--data-source {was}) than --data-source "
                        f"{data_source} holds; resume with that data or use another --output-dir")


def save_checkpoint(accelerator, output_dir: Path, state: dict, keep: int, writer: BackgroundWriter | None = None,
                    on_complete: Callable[[], None] = lambda: None,
                    still_ours: Callable[[], bool] = lambda: True) -> Path:
    """Save model, optimizer, RNG and ``state`` as ``checkpoints/step-N``; keep the newest ``keep``; then call
    ``on_complete`` (main process). Returns the checkpoint's path. Where ``still_ours()`` is False once the
    files are written (another start took the output dir over meanwhile), the checkpoint is dropped instead of
    named: its name could replace, and its pruning remove, that run's checkpoints.

    Every process must call this (each writes its RNG state). The folder appears under its final name only
    once complete, so a crash mid-save leaves the previous checkpoint as the newest complete one; a failed
    save (a full disk) removes its temporary folder and raises OSError naming the checkpoint. With ``writer``
    the main process's large files are written by its thread: the path appears later, and a failure is raised
    by the writer's next ``wait`` (which this save starts with).
    """
    root = output_dir / CHECKPOINTS
    final = root / f"step-{state['step']:08d}"
    tmp = root / f".tmp-{final.name}"
    if writer is not None:
        writer.wait()
    large: dict = {}
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if writer is None:
            accelerator.save_state(str(tmp))
        else:
            large = _state_in_host_memory(accelerator, tmp, writer.buffers)
        accelerator.wait_for_everyone()
    except (OSError, SafetensorError, RuntimeError) as exc:
        raise _save_failed(exc, tmp, root, final) from None
    if accelerator.is_main_process:
        # The state as text now: what the trainer changes next cannot reach a write still to come.
        complete = partial(_complete, tmp, final, large, json.dumps(state, indent=1), keep, on_complete,
                           still_ours)
        if writer is None:
            complete()
        else:
            writer.start(complete)
    accelerator.wait_for_everyone()
    return final


def _state_in_host_memory(accelerator, tmp: Path, buffers: dict) -> dict:
    """``accelerator.save_state`` in two parts: every process writes its small files (RNG states, a gradient
    scaler's) into ``tmp`` now, as save_state does; the main process's model and optimizer state come back as
    copies in host memory, keyed by the file names save_state gives them, for ``_complete`` to write in the
    formats save_state uses (so load_state reads the checkpoint as it reads one of save_state's)."""
    save_accelerator_state(str(tmp), [], [], accelerator._schedulers, accelerator._dataloaders,
                           accelerator.process_index, accelerator.step, accelerator.scaler,
                           save_on_each_node=accelerator.project_configuration.save_on_each_node)
    if not accelerator.is_main_process:
        return {}
    large = {}
    for i, model in enumerate(accelerator._models):
        name = SAFE_WEIGHTS_NAME if i == 0 else SAFE_WEIGHTS_NAME.replace(".", f"_{i}.")
        large[name] = _host_copy(OrderedDict(accelerator.get_state_dict(model, unwrap=False)), buffers, (name,))
    for i, optimizer in enumerate(accelerator._optimizers):
        name = f"{OPTIMIZER_NAME}.bin" if i == 0 else f"{OPTIMIZER_NAME}_{i}.bin"
        large[name] = _host_copy(optimizer.state_dict(), buffers, (name,))
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize(accelerator.device)  # the copies below were queued without blocking
    return large


def _host_copy(obj, buffers: dict, where: tuple):
    """``obj`` with every tensor copied to host memory, so that what training changes next cannot reach the copy.

    The copies go into ``buffers`` (by their place in ``obj``), kept from the save before, whose write is
    complete: allocating and first touching 240 MB of fresh memory costs more than the copy itself, and pinned
    memory lets the copies from a GPU run at full speed. A tensor's buffer is replaced when its shape changes.
    """
    if isinstance(obj, torch.Tensor):
        kept = buffers.get(where)
        if kept is None or kept.shape != obj.shape or kept.dtype != obj.dtype or kept.stride() != obj.stride():
            kept = buffers[where] = torch.empty_like(obj, device="cpu", pin_memory=obj.is_cuda)
        return kept.copy_(obj.detach(), non_blocking=True)
    if isinstance(obj, dict):
        return type(obj)((k, _host_copy(v, buffers, (*where, k))) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v, buffers, (*where, i)) for i, v in enumerate(obj))
    return obj


def _complete(tmp: Path, final: Path, large: dict, state: str, keep: int, on_complete: Callable[[], None],
              still_ours: Callable[[], bool]) -> None:
    """Main process: the large files (if any), the trainer's state and the marker, then the folder under its
    final name; older checkpoints beyond ``keep`` go."""
    root = final.parent
    try:
        for name, obj in large.items():
            accelerate_save(obj, tmp / name, safe_serialization=name.endswith(".safetensors"))
        atomic_write_text(tmp / STATE_FILE, state)
        atomic_write_text(tmp / COMPLETE, "")
    except (OSError, SafetensorError, RuntimeError) as exc:
        raise _save_failed(exc, tmp, root, final) from None
    if not still_ours():  # (a write of seconds, done in the background, on a node that froze meanwhile)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # An earlier save of the same step (a stop at an epoch's last step, then its epoch end) goes first: a folder
    # cannot be renamed onto a full one. A kill in between leaves tmp complete, which the next start names.
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(p for p in root.glob("step-*") if _NAME.fullmatch(p.name))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    on_complete()


def _save_failed(exc: Exception, tmp: Path, root: Path, final: Path) -> Exception:
    """The temporary folder removed; the error to raise: an OSError naming the checkpoint where the OS refused
    a write, else ``exc`` itself."""
    code = _errno_of(exc, root)  # first: removing the half-written files frees the space that ran out
    shutil.rmtree(tmp, ignore_errors=True)
    return exc if code is None else OSError(code, os.strerror(code), str(final))


class BackgroundWriter:
    """Runs one checkpoint's completion at a time on a thread of its own, while training goes on.

    ``wait`` returns once the pending one is done and raises what it failed with (OSError naming the
    checkpoint, as a synchronous save would). The thread is not a daemon: an interpreter that exits without
    waiting still finishes the write first.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.buffers: dict = {}  # the host copies of the state, reused from one save to the next (_host_copy)

    def start(self, complete: Callable[[], None]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(complete,), name="cifar_dist checkpoint")
        self._thread.start()

    def _run(self, complete: Callable[[], None]) -> None:
        try:
            complete()
        except BaseException as exc:  # handed to the main thread by wait()
            self._error = exc

    @property
    def pending(self) -> bool:
        return self._thread is not None

    @property
    def writing(self) -> bool:
        """The pending write is still under way (``pending`` stays true until ``wait`` collects it)."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


def _errno_of(exc: Exception, root: Path) -> int | None:
    """The OS error behind a failed save: safetensors reports it as "(os error N)" in its message, and torch.save
    with no number ("file write failed", or "unexpected pos" when its zip writer finds a file shorter than what it
    wrote), which on a full disk is ENOSPC."""
    if isinstance(exc, OSError):
        return exc.errno
    found = re.search(r"\(os error (\d+)\)", str(exc))
    if found:
        return int(found.group(1))
    if shutil.disk_usage(root).free < 2**20:
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

"""Everything the run saves goes through here, written atomically: a crash mid-write never leaves a torn file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from cifar_dist.config import UserError

# Files a finished or running run leaves in its output dir; their presence means starting there would clobber it.
RUN_FILES = ("config.yaml", "metrics.jsonl", "results.md", "model.safetensors")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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


def prepare_output_dir(output_dir: str, overwrite: bool) -> Path:
    """Create ``output_dir``; refuse (UserError) if it is not writable or already holds a run's files."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test.")
        probe.close()
    except OSError as exc:
        raise UserError(f"--output-dir {output_dir} is not writable ({exc.strerror}); choose another directory")
    existing = [name for name in RUN_FILES if (path / name).exists()]
    if existing and not overwrite:
        raise UserError(f"--output-dir {output_dir} already holds a run ({', '.join(existing)}); "
                        "choose another --output-dir or pass --overwrite")
    return path


def save_model(model: torch.nn.Module, path: Path) -> None:
    """The model's weights as safetensors (torchvision key names, head under ``fc.``)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)

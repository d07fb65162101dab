"""On a CUDA GPU, running out of memory stops the trainer with one line and exit code 4, and a new run that never
reached a checkpoint leaves nothing behind. Skipped without CUDA (never in CI); scripts/gpu_check.sh runs it.

The run is held to CAP_GIB of the card (``torch.cuda.set_per_process_memory_fraction``): past it PyTorch's
allocator raises the same ``torch.OutOfMemoryError`` as a full card does. So the test runs out of memory on
any card, however large, and leaves the rest of the card to the GPU tests in the other files, which
pytest-xdist runs beside it (tests/conftest.py: a worker per file)."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CAP_GIB = 8
# The trainer's command (cifar_dist.train.cli, reading its flags from sys.argv) under the cap.
CAPPED_TRAIN = ("import sys, torch; torch.cuda.set_per_process_memory_fraction(float(sys.argv.pop(1))); "
                "from cifar_dist.train import cli; cli()")


def test_running_out_of_gpu_memory_stops_with_one_line_and_leaves_nothing(tmp_path):
    """A real out-of-memory in evaluation: 10,000 test images at 224 px in one batch (the preprocessed batch is
    6 GB in fp32, conv1's output 16 GB in bf16), against 8 GiB; training's 2 steps of 32 need about 2. Eager,
    from images and without cuDNN's autotuning, so that nothing else sets up first. The other places it is
    caught (setting up, a training step) differ only in their advice, which tests/test_trainer.py checks."""
    fraction = CAP_GIB * 2**30 / torch.cuda.get_device_properties(0).total_memory
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", CAPPED_TRAIN, str(fraction), "--data-source", "synthetic",
         "--synthetic-train-samples", "64", "--synthetic-eval-samples", "10000", "--image-size", "224",
         "--eval-batch-size", "10000", "--max-steps", "2", "--compile-step", "no", "--no-cache-frozen-features",
         "--cache-eval-features", "no", "--cudnn-benchmark", "no", "--weights", "none", "--tracker", "none",
         "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "TQDM_DISABLE": "1"})
    last = proc.stderr.strip().splitlines()[-1]
    print(last)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert last.startswith("cifar_dist.train: out of GPU memory in evaluation (another ") and last.endswith(
        "nothing was saved yet: run again with that change")
    assert not out.exists()  # a new run that never reached a checkpoint leaves nothing behind

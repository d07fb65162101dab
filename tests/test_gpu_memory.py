"""On a CUDA GPU with too little memory: running out stops the trainer with one line and exit code 4, leaving
nothing of a new run behind; and default flags train from images where the feature cache does not fit. Skipped
without CUDA (never in CI); scripts/gpu_check.sh runs them.

The trainer is held to CAP_GIB of the card (``torch.cuda.set_per_process_memory_fraction``): past it PyTorch's
allocator raises the same ``torch.OutOfMemoryError`` as a full card does, and the feature cache's choice
counts with it (``feature_cache.device_memory_free``). So the card is small on any card, however large, and
the rest of it is left to the GPU tests in the other files, which pytest-xdist runs beside these
(tests/conftest.py: a worker per file)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CAP_GIB = 8
# The trainer's command (cifar_dist.train.cli, reading its flags from sys.argv) under the cap.
CAPPED_TRAIN = ("import sys, torch; torch.cuda.set_per_process_memory_fraction(float(sys.argv.pop(1))); "
                "from cifar_dist.train import cli; cli()")
SYNTHETIC = ["--data-source", "synthetic", "--image-size", "224", "--weights", "none", "--tracker", "none"]


def capped_train(flags: list[str]) -> subprocess.CompletedProcess:
    fraction = CAP_GIB * 2**30 / torch.cuda.get_device_properties(0).total_memory
    return subprocess.run([sys.executable, "-c", CAPPED_TRAIN, str(fraction), *SYNTHETIC, *flags],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "TQDM_DISABLE": "1"})


def test_running_out_of_gpu_memory_stops_with_one_line_and_leaves_nothing(tmp_path):
    """A real out-of-memory in evaluation: 10,000 test images at 224 px in one batch (the preprocessed batch is
    6 GB in fp32, conv1's output 16 GB in bf16) against 8 GiB; training's 2 steps of 32 need about 2. Eager,
    from images and without cuDNN's autotuning, so that nothing else sets up first. The other places it is
    caught (setting up, a training step) differ only in their advice, which tests/test_trainer.py checks."""
    out = tmp_path / "run"
    proc = capped_train(["--synthetic-train-samples", "64", "--synthetic-eval-samples", "10000",
                         "--eval-batch-size", "10000", "--max-steps", "2", "--compile-step", "no",
                         "--no-cache-frozen-features", "--cache-eval-features", "no", "--cudnn-benchmark", "no",
                         "--output-dir", str(out)])
    last = proc.stderr.strip().splitlines()[-1]
    print(last)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert last.startswith("cifar_dist.train: out of GPU memory in evaluation (another ") and last.endswith(
        "nothing was saved yet: run again with that change")
    assert f", this process limited to {CAP_GIB:.2f} GiB); " in last  # the share ran out, not the card
    assert not out.exists()  # a new run that never reached a checkpoint leaves nothing behind


def test_default_flags_train_from_images_where_the_feature_cache_does_not_fit(tmp_path):
    """4,800 + 1,000 images at 224 px: their features take 2.2 GiB, more than the 8 GiB less the 6 GiB kept
    for training; the test images' 0.4 GiB fit. So the run says the training images' cache is off, trains from
    images, evaluates from the test images' features, and ends. The compiled step and cuDNN's autotuning are
    off to keep it short; what the cache does is decided before them and without them."""
    out = tmp_path / "run"
    proc = capped_train(["--synthetic-train-samples", "4800", "--synthetic-eval-samples", "1000", "--num-epochs",
                         "1", "--compile-step", "no", "--cudnn-benchmark", "no", "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = next(line for line in proc.stdout.splitlines() if line.startswith("- step: "))
    print(step)
    # The figures: what the cache needs, against what the cap leaves free (the model already in it).
    figures = re.search(r"--cache-frozen-features auto: off, the frozen-stage features need 2\.2 GiB, more than "
                        r"the (\d+\.\d) GiB free on cuda(:0)? less 6 GiB for training \(in host memory "
                        r"with 'yes'\)", step)
    assert figures and float(figures[1]) <= CAP_GIB, step
    assert "evaluation from the test images' cached frozen-stage features" in step
    assert "feature cache: 1000 test images -> 1024x14x14 bfloat16 per image" in proc.stdout
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["val_num_samples"] == 1000 and record["epoch"] == 1

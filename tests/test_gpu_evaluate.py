"""On a CUDA GPU, cifar_dist.evaluate reproduces a run's last-epoch figures exactly, as on the CPU
(tests/test_evaluate.py): with default flags (evaluation from the test images' cached features, after training
with cuDNN's autotuning on) and from images through the whole model. Skipped without CUDA (never in CI);
scripts/gpu_check.sh runs it."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import REPO, records, run_trains_at_once

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# 224 px; 300 test images in batches of 128, 128 and 44: the short last batch is a shape of its own.
RUN = ["--data-source", "synthetic", "--weights", "none", "--synthetic-train-samples", "256",
       "--synthetic-eval-samples", "300", "--eval-batch-size", "128", "--num-epochs", "1", "--tracker", "none"]
# From images, evaluation runs the whole model (the step is left eager: evaluation never runs the compiled one).
CASES = {"default": [], "from_images": ["--no-cache-frozen-features", "--cache-eval-features", "no",
                                        "--compile-step", "no"]}
KEYS = ("val_loss", "val_acc", "val_top5", "val_num_samples")


def test_evaluate_reproduces_the_trainers_last_epoch_exactly(test_env, tmp_path):
    run_trains_at_once(test_env, [[*RUN, *CASES[case], "--output-dir", str(tmp_path / case)] for case in CASES])
    with ThreadPoolExecutor() as pool:  # independent of each other: side by side
        procs = list(pool.map(lambda case: subprocess.run(
            [sys.executable, "-m", "cifar_dist.evaluate", str(tmp_path / case)], env=test_env, cwd=REPO,
            capture_output=True, text=True, timeout=300), CASES))
    for case, proc in zip(CASES, procs):
        assert proc.returncode == 0, f"{case}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        report = json.loads((tmp_path / case / "eval.json").read_text())
        last = records(tmp_path / case)[-1]
        figures = (report["loss"], report["top1"], report["top5"], report["num_samples"])
        print(f"{case}: evaluate {figures}, the trainer's last epoch {tuple(last[k] for k in KEYS)}")
        assert report["device"] == torch.cuda.get_device_name() and report["mixed_precision"] == "bf16", case
        assert figures == tuple(last[k] for k in KEYS), case
        assert report["trainer_last_epoch"]["same"] is True, case

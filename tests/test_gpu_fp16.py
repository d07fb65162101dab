"""On a CUDA GPU, --mixed-precision fp16 (what the README advises for GPUs without native bf16: V100, T4) trains
under accelerate's loss scaler: with default flags (the feature cache; the whole-step graph is off under fp16,
whose loss scaler reads the device every step) and from images (the compiled step). On an H100 this runs the
code path those cards run; their speed is not measured here. Skipped without CUDA (never in CI);
scripts/gpu_check.sh runs it."""

import math

import pytest
import torch

from conftest import records, run_trains_at_once

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# 64 px from the planted ImageNet stand-in (tests/conftest.py: BatchNorm statistics measured at this size, so the
# frozen trunk's activations stay within fp16's range), 2 epochs of 16 steps, at torch's BatchNorm momentum: at
# the recipe's, layer4's running statistics trail training far enough to blow evaluation's logits up.
RUN = ["--data-source", "synthetic", "--image-size", "64", "--synthetic-train-samples", "512",
       "--synthetic-eval-samples", "256", "--num-epochs", "2", "--bn-momentum", "0.1", "--mixed-precision", "fp16",
       "--tracker", "none"]
CASES = {"default": [], "from_images": ["--no-cache-frozen-features"]}


def test_fp16_trains_under_the_loss_scaler_with_default_flags_and_from_images(test_env, tmp_path):
    procs = run_trains_at_once(test_env, [[*RUN, *CASES[case], "--output-dir", str(tmp_path / case)]
                                          for case in CASES])
    for case, proc in zip(CASES, procs):
        step = next(line for line in proc.stdout.splitlines() if line.startswith("- step: "))
        print(f"{case}: {step}")
        assert "mixed precision fp16" in proc.stdout, case
        assert step.startswith("- step: compiled step (torch.compile reduce-overhead"), case
        if case == "default":
            assert "frozen-stage features cached" in step
            assert "--whole-step-graph auto: off under fp16" in step
        epochs = records(tmp_path / case)
        print(f"{case}: " + ", ".join(f"epoch {r['epoch']} train loss {r['train_loss']:.4f} val acc {r['val_acc']:.3f}"
                                      for r in epochs))
        assert len(epochs) == 2 and all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"])
                                        for r in epochs), case
        assert epochs[1]["train_loss"] < epochs[0]["train_loss"], case  # the scaled gradients reach Adam

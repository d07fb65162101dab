"""What one training step and one evaluation pass compute: the trainer's, the benchmark's and the GPU tests'.

Both keep their running figures on the device, so neither waits for it until its caller reads them.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cifar_dist.speed import cudnn_autotuning


def train_step(model, step_model, inputs, labels, optimizer, accelerator, input_name: str = "images") -> torch.Tensor:
    """Forward, backward and (on the last micro-batch of an accumulation) the optimizer step.

    ``step_model`` is ``model`` or its compiled form; ``inputs`` are images, or cached trunk features when
    ``input_name`` is "features". Returns this micro-batch's [loss sum, correct, count, non-finite loss] for the
    epoch's running totals, left on the device so the step never waits for it.
    """
    with accelerator.accumulate(model):
        logits = step_model(**{input_name: inputs})
        loss = F.cross_entropy(logits, labels)  # autocast computes it in fp32 under bf16
        # Read before backward: a CUDA-graph replay may reuse the logits' memory once the step moves on.
        stats = step_figures(loss, logits, labels)
        accelerator.backward(loss)
        if accelerator.sync_gradients:  # the last micro-batch of an accumulation (or the only one)
            torch_optimizer = optimizer_to_step(optimizer)
            torch_optimizer.step()
            torch_optimizer.zero_grad(set_to_none=True)
    return stats


def optimizer_to_step(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer``, unless the wrapper has work to do (a
    gradient scaler, under fp16).

    Otherwise the wrapper only adds host work to every step: its step looks an optional package up on the
    filesystem twice (``is_lomo_available``: eight ``stat`` calls each) and its zero_grad inspects a signature,
    about 130 us a step on a 2-core CPU (``python -m cifar_dist.bench --variants host``: 444 us a step through
    the wrapper, 313 without), more where site-packages sits on a network filesystem. The caller skips the step
    between accumulation micro-batches, as the wrapper would.
    """
    if getattr(optimizer, "scaler", None) is not None:
        return optimizer
    return getattr(optimizer, "optimizer", optimizer)


def step_figures(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[loss sum, correct, count, non-finite loss] of one batch, in float64 on the device."""
    loss_d = loss.detach().double()
    # full_like fills on the device; new_tensor(n) would copy a host scalar and wait for the device.
    return torch.stack([loss_d * labels.numel(), (logits.detach().argmax(1) == labels).sum().double(),
                        torch.full_like(loss_d, labels.numel()), (~torch.isfinite(loss_d)).double()])


def no_progress_bar(accelerator) -> bool:
    """Progress bars on the main process only, and not there either under TQDM_DISABLE=1 (tqdm itself reads
    that variable only for calls that leave ``disable`` out)."""
    return not accelerator.is_main_process or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")


@torch.no_grad()
def evaluate(model, loader, accelerator, class_names: list[str],
             input_name: str = "images") -> tuple[dict, list[tuple[str, float]]]:
    """Loss, top-1, top-5 and per-class accuracy over the whole test split.

    gather_for_metrics drops the samples repeated to pad uneven shards, so every test image counts once. The loop
    never waits for the device (per-class counts are index_add_ed into fixed-size tensors; bincount would read
    the largest label back); the one wait is the final read.

    cuDNN picks its convolution algorithms here by its heuristics, not by timing them (--cudnn-benchmark): the
    timed choice can differ from one process to the next, and with it the rounding, while the heuristics choose
    the same for the same shapes: cifar_dist.evaluate in another process is to reproduce the trainer's figures
    exactly on a GPU as on the CPU (tests/test_gpu_after_training.py).
    """
    model.eval()
    num_classes = len(class_names)
    sums = torch.zeros(4, device=accelerator.device, dtype=torch.float64)
    class_hits = torch.zeros(2, num_classes, device=accelerator.device, dtype=torch.float64)
    progress = tqdm(loader, desc="eval", unit="batch", leave=False, file=sys.stdout,
                    disable=no_progress_bar(accelerator))
    with cudnn_autotuning(False):
        for inputs, labels in progress:
            logits = model(**{input_name: inputs})
            losses = F.cross_entropy(logits, labels, reduction="none")
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            losses, top1, top5, labels = accelerator.gather_for_metrics(
                (losses, top5[:, 0] == labels, (top5 == labels[:, None]).any(1), labels))
            sums += torch.stack([losses.sum(), top1.sum(), top5.sum(), losses.new_full((), losses.numel())]).double()
            class_hits.index_add_(1, labels, torch.stack([top1.double(), torch.ones_like(top1, dtype=torch.float64)]))
    loss_sum, top1, top5, count = sums.tolist()
    per_class = [(name, hits / max(total, 1)) for name, hits, total in zip(class_names, *class_hits.tolist())]
    return ({"val_loss": loss_sum / count, "val_acc": top1 / count, "val_top5": top5 / count,
             "val_num_samples": int(count)}, per_class)

"""Fine-tune ImageNet ResNet50 on CIFAR-100: the seed recipe on Accelerate.

ResNet50 (ImageNet weights) + GAP -> Dense 1024 ReLU -> Dense 100, 32x32 images resized to 224 on the device,
Adam lr 1e-3, global batch 32, 10 epochs, only ``layer4`` and the head trainable. The seed notebook (Keras, one
GPU) reports 74.9% validation accuracy after 10 epochs.

    python -m cifar_dist.train                                   # one process (GPU if present, else CPU)
    accelerate launch -m cifar_dist.train                        # your default accelerate config
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m cifar_dist.train
    sbatch slurm/train.sh                                        # SLURM, several nodes
    python -m cifar_dist.train --data-source synthetic --image-size 64 --num-epochs 2   # no network needed

The global batch stays 32 on any number of processes: per-device batch x processes x accumulation steps = 32.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from cifar_dist.checkpoint import prepare_output_dir, save_model
from cifar_dist.config import BatchPlan, Config, UserError, parse_config, plan_batches, save_config
from cifar_dist.data import build_dataloaders, build_splits
from cifar_dist.model import build_model, convert_sync_batchnorm, count_parameters
from cifar_dist.tracking import RunLog, tracker_backend


def resolve_mixed_precision(choice: str) -> str:
    """'auto' -> the accelerate config's bf16/fp16 if it asks for one, else bf16 on a GPU that has it, else fp32."""
    if choice != "auto":
        return choice
    launched_with = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched_with != "no":
        return launched_with
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def train_one_epoch(model, loader, optimizer, accelerator, run_log, progress, step: int, max_steps: int | None,
                    log_every_steps: int):
    """One pass over this process's shard; returns (optimizer steps so far, global [loss sum, correct, count])."""
    model.train()
    sums = torch.zeros(3, device=accelerator.device, dtype=torch.float64)
    window_start, window_images = time.perf_counter(), 0
    for images, labels in loader:
        with accelerator.accumulate(model):
            logits = model(images)
            loss = F.cross_entropy(logits, labels)  # autocast computes it in fp32 under bf16
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sums += torch.stack([loss.detach().double() * labels.numel(), (logits.argmax(1) == labels).sum().double(),
                             labels.new_tensor(labels.numel()).double()])
        window_images += labels.numel() * accelerator.num_processes
        if not accelerator.sync_gradients:
            continue
        step += 1
        progress.update(1)
        if step % log_every_steps == 0:  # .item() syncs the device, so only every N steps
            images_per_s = window_images / (time.perf_counter() - window_start)
            progress.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{images_per_s:.0f}")
            run_log.log_step({"train/loss": loss.item(), "train/images_per_s": images_per_s}, step=step)
            window_start, window_images = time.perf_counter(), 0
        if max_steps is not None and step >= max_steps:
            break
    return step, accelerator.reduce(sums, reduction="sum")


@torch.no_grad()
def evaluate(model, loader, accelerator) -> dict:
    """Loss, top-1 and top-5 over the whole test split; gather_for_metrics drops the padding of uneven shards."""
    model.eval()
    sums = torch.zeros(4, device=accelerator.device, dtype=torch.float64)
    for images, labels in loader:
        logits = model(images)
        losses = F.cross_entropy(logits, labels, reduction="none")
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        losses, top1, top5 = accelerator.gather_for_metrics(
            (losses, top5[:, 0] == labels, (top5 == labels[:, None]).any(1)))
        sums += torch.stack([losses.sum(), top1.sum(), top5.sum(), labels.new_tensor(losses.numel())]).double()
    loss_sum, top1, top5, count = sums.tolist()
    return {"val_loss": loss_sum / count, "val_acc": top1 / count, "val_top5": top5 / count,
            "val_num_samples": int(count)}


def run(cfg: Config, dtype: torch.dtype = torch.float32) -> list[dict]:
    """Train and evaluate as ``cfg`` says; returns the per-epoch records written to metrics.jsonl.

    ``dtype`` is the parameters' dtype; tests use float64 to compare runs far below float32 rounding.
    """
    # Cheap checks first: nothing is loaded or built until the batch plan and output dir are known to be good.
    # With no accelerator, several launched processes run on the CPU over gloo (accelerate would otherwise
    # treat each as a lone process, since its GPU launcher does not pass the config's use_cpu on).
    cpu = not torch.accelerator.is_available()
    state = PartialState(cpu=cpu)
    plan = plan_batches(cfg.train, state.num_processes)
    log_with = tracker_backend(cfg.tracking)
    output_dir = prepare_output_dir(cfg.train.output_dir, cfg.train.overwrite)
    state.wait_for_everyone()  # every process has checked the output dir before the main one writes into it
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=plan.grad_accum_steps,
        log_with=log_with,
        project_dir=str(output_dir),
    )
    if accelerator.is_main_process:
        save_config(cfg, output_dir / "config.yaml")
    set_seed(cfg.train.seed)

    # Rank 0 decodes the dataset into datasets' cache and fetches the weights; the others then reuse both.
    with accelerator.main_process_first():
        splits = build_splits(cfg.data, seed=cfg.train.seed)
        model = build_model(cfg.model, cfg.data.image_size).to(dtype)
    if accelerator.num_processes > 1:
        model = convert_sync_batchnorm(model)  # trainable BN must see the whole global batch
    counts = count_parameters(model)
    train_loader, eval_loader = build_dataloaders(splits, plan, cfg.train.eval_batch_size, seed=cfg.train.seed)
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
        betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2), eps=cfg.optim.adam_eps,
    )
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)

    header = describe_run(cfg, plan, accelerator, counts, len(splits.train), len(splits.test))
    accelerator.print(header)
    accelerator.init_trackers(cfg.tracking.project, config=cfg.to_dict())
    run_log = RunLog(accelerator, output_dir, header)

    steps_per_epoch = len(train_loader) // plan.grad_accum_steps
    max_steps = cfg.train.max_steps
    total_steps = steps_per_epoch * cfg.train.num_epochs if max_steps is None else min(
        max_steps, steps_per_epoch * cfg.train.num_epochs)
    step = 0
    for epoch in range(1, cfg.train.num_epochs + 1):
        train_loader.set_epoch(epoch)
        epoch_start = time.perf_counter()
        with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.train.num_epochs}", unit="step",
                  disable=not accelerator.is_main_process, file=sys.stdout) as progress:
            step, (loss_sum, correct, count) = train_one_epoch(
                model, train_loader, optimizer, accelerator, run_log, progress, step, max_steps,
                cfg.train.log_every_steps)
        train_time = time.perf_counter() - epoch_start
        record = {"epoch": epoch, "step": step, "train_loss": (loss_sum / count).item(),
                  "train_acc": (correct / count).item(), **evaluate(model, eval_loader, accelerator)}
        record["epoch_time_s"] = round(time.perf_counter() - epoch_start, 3)
        record["train_images_per_s"] = round(count.item() / train_time, 1)
        if not math.isfinite(record["train_loss"]):
            raise RuntimeError(f"training loss became {record['train_loss']} in epoch {epoch} (step {step})")
        run_log.log_epoch(record, step=step)
        accelerator.print(
            f"epoch {epoch}: train loss {record['train_loss']:.4f} acc {100 * record['train_acc']:.2f}% | "
            f"val loss {record['val_loss']:.4f} acc {100 * record['val_acc']:.2f}% top5 "
            f"{100 * record['val_top5']:.2f}% | {record['train_images_per_s']:.0f} img/s")
        if step >= total_steps:
            break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), output_dir / "model.safetensors")
    accelerator.end_training()
    return run_log.records


def describe_run(cfg: Config, plan: BatchPlan, accelerator, counts: dict, num_train: int, num_test: int) -> str:
    device = torch.cuda.get_device_name() if accelerator.device.type == "cuda" else platform.processor() or "cpu"
    return "\n".join([
        "# cifar_dist run",
        "",
        f"- data: {cfg.data.data_source}, {num_train} train / {num_test} test images, resized to "
        f"{cfg.data.image_size}px on the device",
        f"- model: ResNet50 ({cfg.model.weights}) + {cfg.model.head_hidden_dim}-ReLU-{cfg.model.num_classes} head, "
        f"frozen before {cfg.model.freeze_until}; parameters {counts['total']:,} total, {counts['trainable']:,} "
        f"trainable, {counts['frozen']:,} frozen; {counts['bn_running_stats']:,} BN running-stat values",
        f"- batch: global {plan.global_batch_size} = {plan.per_device_batch_size} per device x "
        f"{plan.num_processes} processes x {plan.grad_accum_steps} accumulation steps",
        f"- optimizer: Adam lr {cfg.optim.lr:g}, eps {cfg.optim.adam_eps:g}; {cfg.train.num_epochs} epochs, "
        f"seed {cfg.train.seed}",
        f"- device: {accelerator.num_processes} x {accelerator.device.type} ({device}), mixed precision "
        f"{accelerator.mixed_precision}, torch {torch.__version__}",
    ])


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_config(argv))
    except UserError as exc:
        print(f"cifar_dist.train: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

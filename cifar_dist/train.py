"""Fine-tune ImageNet ResNet50 on CIFAR-100: the seed recipe on Accelerate.

ResNet50 (ImageNet weights) + GAP -> Dense 1024 ReLU -> Dense 100, 32x32 images resized to 224 on the device,
Adam lr 1e-3, global batch 32, 10 epochs, only ``layer4`` and the head trainable. The seed notebook (Keras, one
GPU) reports 74.9% validation accuracy after 10 epochs.

    python -m cifar_dist.train                                   # one process (GPU if present, else CPU)
    accelerate launch -m cifar_dist.train                        # your default accelerate config
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m cifar_dist.train
    sbatch slurm/train.sh                                        # SLURM, several nodes, requeued on preemption
    python -m cifar_dist.train --cache-frozen-features                # frozen stages computed once per image
    python -m cifar_dist.train --data-source synthetic --image-size 64 --num-epochs 2   # no network needed

The global batch stays 32 on any number of processes: per-device batch x processes x accumulation steps = 32.
Runs checkpoint to <output-dir>/checkpoints/ and resume by default: kill one at any moment and run the same
command again. SIGTERM/SIGUSR1 make every process stop at a step boundary, save and exit with code 75.
Metrics go to metrics.jsonl, results.md, curves.png and W&B (online when logged in, else offline).
On CUDA the step uses fused Adam and channels_last and, with one process and no accumulation, is compiled with
CUDA graphs (cifar_dist/speed.py); none of that, nor the feature cache (cifar_dist/feature_cache.py), changes
what is computed.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from cifar_dist.checkpoint import (CHECKPOINTS, clear_previous_run, find_latest, read_state, resolve_start,
                                   save_checkpoint, save_model)
from cifar_dist.config import BatchPlan, Config, UserError, parse_config, plan_batches, save_config
from cifar_dist.data import build_dataloaders, build_splits
from cifar_dist.feature_cache import build_feature_cache
from cifar_dist.model import build_model, convert_sync_batchnorm, count_parameters
from cifar_dist.preflight import preflight
from cifar_dist.speed import (FastPath, adam_implementation, build_optimizer, compile_for_training, compile_summary,
                              ddp_kwargs, match_optimizer_to_run, prepare_model_layout, resolve_fast_path)
from cifar_dist.tracking import RunLog, git_commit, tracker_backend


# How often (optimizer steps) the processes agree on whether to stop. Each check is one tiny all-reduce and
# one wait for the device, so not every step; a signal is acted on within this many steps.
CHECK_EVERY_STEPS = 10
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal with a checkpoint saved; run the same command to resume
EXIT_DIVERGED = 3


def resolve_mixed_precision(choice: str) -> str:
    """'auto' -> the accelerate config's bf16/fp16 if it asks for one, else bf16 on a GPU that has it, else fp32."""
    if choice != "auto":
        return choice
    launched_with = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched_with != "no":
        return launched_with
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


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
        loss_d = loss.detach().double()
        # full_like fills on the device; new_tensor(n) would copy a host scalar and wait for the device.
        stats = torch.stack([loss_d * labels.numel(), (logits.detach().argmax(1) == labels).sum().double(),
                             torch.full_like(loss_d, labels.numel()), (~torch.isfinite(loss_d)).double()])
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return stats


@torch.no_grad()
def evaluate(model, loader, accelerator, class_names: list[str],
             input_name: str = "images") -> tuple[dict, list[tuple[str, float]]]:
    """Loss, top-1, top-5 and per-class accuracy over the whole test split.

    gather_for_metrics drops the samples repeated to pad uneven shards, so every test image counts once. The loop
    never waits for the device (per-class counts are index_add_ed into fixed-size tensors; bincount would read
    the largest label back); the one wait is the final read.
    """
    model.eval()
    num_classes = len(class_names)
    sums = torch.zeros(4, device=accelerator.device, dtype=torch.float64)
    class_hits = torch.zeros(2, num_classes, device=accelerator.device, dtype=torch.float64)
    for inputs, labels in loader:
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


class TrainingStopped(Exception):
    """Raised on every process when the run stops early; ``exit_code`` is what the CLI exits with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """Turns SIGTERM / SIGUSR1 (what SLURM sends before a time limit or preemption) into a flag.

    The handler only sets the flag: saving from inside a signal handler can interleave with a half-done step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run(cfg: Config, dtype: torch.dtype = torch.float32) -> list[dict]:
    """Train and evaluate as ``cfg`` says; returns the per-epoch records written to metrics.jsonl.

    ``dtype`` is the parameters' dtype; tests use float64 to compare runs far below float32 rounding.
    Raises TrainingStopped when a signal or a non-finite loss ends the run early.
    """
    # Cheap checks first: nothing is loaded or built until the batch plan and output dir are known to be good.
    # With no accelerator, several launched processes run on the CPU over gloo (accelerate would otherwise
    # treat each as a lone process, since its GPU launcher does not pass the config's use_cpu on).
    cpu = not torch.accelerator.is_available()
    state = PartialState(cpu=cpu)
    plan = plan_batches(cfg.train, state.num_processes)
    state.print(preflight(state.num_processes, int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))))
    log_with = tracker_backend(cfg.tracking)
    output_dir, resume_from = resolve_start(cfg)
    mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision)
    fast = resolve_fast_path(cfg.speed, state.device, mixed_precision, state.num_processes, plan.grad_accum_steps)
    state.wait_for_everyone()  # every process has looked at the output dir before the main one changes it
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=plan.grad_accum_steps,
        log_with=log_with,
        project_dir=str(output_dir),
        kwargs_handlers=[ddp_kwargs(cfg.speed, fast)],
    )
    if accelerator.is_main_process:
        if cfg.train.overwrite:
            clear_previous_run(output_dir)
        save_config(cfg, output_dir / "config.yaml")
    set_seed(cfg.train.seed)

    # Rank 0 decodes the dataset into datasets' cache and fetches the weights; the others then reuse both.
    with accelerator.main_process_first():
        splits = build_splits(cfg.data, seed=cfg.train.seed)
        model = build_model(cfg.model, cfg.data.image_size).to(dtype)
    if accelerator.device.type == "cuda":
        splits = splits.to(accelerator.device)
    if accelerator.num_processes > 1:
        model = convert_sync_batchnorm(model)  # trainable BN must see the whole global batch
    counts = count_parameters(model)
    model = prepare_model_layout(model, fast)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim, fast)
    model, optimizer = accelerator.prepare(model, optimizer)
    # With the cache the loaders serve the frozen stages' output instead of images, in the same order.
    input_name, data = "images", splits
    if cfg.speed.cache_frozen_features:
        input_name = "features"
        data = dataclasses.replace(splits, **dict(zip(("train", "test"), build_feature_cache(
            accelerator.unwrap_model(model), splits, accelerator, cfg.train.eval_batch_size,
            cfg.speed.feature_cache_location))))
    train_loader, eval_loader = accelerator.prepare(
        *build_dataloaders(data, plan, cfg.train.eval_batch_size, seed=cfg.train.seed))
    step_model, fast = compile_for_training(model, fast, data.train, plan.per_device_batch_size, accelerator,
                                            input_name)

    # Where to start: a checkpoint's position (the data order depends only on seed and epoch, so a position
    # in optimizer steps means the same images whatever the number of processes), or the beginning.
    position = {"epoch": 1, "steps_in_epoch": 0, "step": 0, "train_sums": [0.0, 0.0, 0.0], "records": []}
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        match_optimizer_to_run(optimizer)  # this run's Adam implementation and layouts, whatever the checkpoint's
        position.update({k: v for k, v in read_state(resume_from).items() if k in position})
    header = describe_run(cfg, plan, accelerator, counts, len(splits.train), len(splits.test), fast)
    accelerator.print(header)
    if resume_from is not None:
        accelerator.print(f"resuming from {resume_from} (epoch {position['epoch']}, step {position['step']})")
    run_log = RunLog(accelerator, output_dir, header, position["records"])
    run_log.start(cfg.tracking, {**cfg.to_dict(), "run": run_facts(plan, accelerator, counts, fast, optimizer)})

    steps_per_epoch = len(train_loader) // plan.grad_accum_steps
    total_steps = steps_per_epoch * cfg.train.num_epochs
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    every = cfg.train.checkpoint_every_steps
    step = position["step"]
    run_start = time.perf_counter()
    per_class_acc: list[tuple[str, float]] = []
    stop = StopSignals()
    try:
        for epoch in range(position["epoch"], cfg.train.num_epochs + 1):
            if step >= total_steps:
                break
            done = position["steps_in_epoch"] if epoch == position["epoch"] else 0
            train_loader.set_epoch(epoch)  # before skip_first_batches, whose wrapper cannot pass it on
            loader = train_loader
            if done:  # resuming mid-epoch: skip exactly the micro-batches this process already trained on
                loader = accelerator.skip_first_batches(train_loader, done * plan.grad_accum_steps)
            sums = torch.zeros(4, device=accelerator.device, dtype=torch.float64)
            if done and accelerator.is_main_process:  # the global totals of the steps before the checkpoint
                sums[:3] = torch.tensor(position["train_sums"], dtype=torch.float64)
            epoch_start, first_done = time.perf_counter(), done
            window_start, window_steps, data_wait = epoch_start, 0, 0.0
            batch_requested = time.perf_counter()
            model.train()
            with tqdm(total=steps_per_epoch, initial=done, desc=f"epoch {epoch}/{cfg.train.num_epochs}",
                      unit="step", disable=not accelerator.is_main_process, file=sys.stdout) as progress:
                for inputs, labels in loader:
                    data_wait += time.perf_counter() - batch_requested
                    sums += train_step(model, step_model, inputs, labels, optimizer, accelerator, input_name)
                    batch_requested = time.perf_counter()
                    if not accelerator.sync_gradients:
                        continue
                    step, done, window_steps = step + 1, done + 1, window_steps + 1
                    progress.update(1)
                    if step % cfg.train.log_every_steps == 0:  # .tolist() waits for the device: every N steps only
                        elapsed = time.perf_counter() - window_start
                        images_per_s = window_steps * plan.global_batch_size / elapsed
                        loss_sum, correct, count, _ = sums.tolist()  # this process's shard of the epoch so far
                        progress.set_postfix(loss=f"{loss_sum / count:.3f}", img_s=f"{images_per_s:.0f}")
                        run_log.log_step({"train/loss": loss_sum / count, "train/acc": correct / count,
                                          "train/images_per_s": images_per_s, "train/data_wait_frac":
                                          data_wait / elapsed, "lr": optimizer.param_groups[0]["lr"],
                                          "epoch": epoch - 1 + done / steps_per_epoch}, step=step)
                        window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
                    checkpoint_due = every > 0 and step % every == 0 and done < steps_per_epoch
                    stopping = (checkpoint_due or step % CHECK_EVERY_STEPS == 0) and check_health(
                        accelerator, sums, stop, step, output_dir)
                    if checkpoint_due or stopping:
                        path = save_checkpoint(accelerator, output_dir, _position(
                            epoch, done, step, accelerator, sums, run_log, cfg), cfg.train.keep_checkpoints)
                    if stopping:
                        raise stopped(accelerator, cfg, stop, f"at step {step}", path)
                    if step >= total_steps:
                        break
            stopping = check_health(accelerator, sums, stop, step, output_dir)
            train_time = time.perf_counter() - epoch_start
            loss_sum, correct, count, _ = accelerator.reduce(sums.clone(), reduction="sum").tolist()
            eval_start = time.perf_counter()
            metrics, per_class_acc = evaluate(model, eval_loader, accelerator, splits.class_names, input_name)
            record = {"epoch": epoch, "step": step, "train_loss": loss_sum / count, "train_acc": correct / count,
                      **metrics}
            record["epoch_time_s"] = round(time.perf_counter() - epoch_start, 3)
            record["train_time_s"] = round(train_time, 3)
            record["eval_time_s"] = round(time.perf_counter() - eval_start, 3)
            record["train_images_per_s"] = round((done - first_done) * plan.global_batch_size / train_time, 1)
            run_log.log_epoch(record, step=step)
            accelerator.print(
                f"epoch {epoch}: train loss {record['train_loss']:.4f} acc {100 * record['train_acc']:.2f}% | "
                f"val loss {record['val_loss']:.4f} acc {100 * record['val_acc']:.2f}% top5 "
                f"{100 * record['val_top5']:.2f}% | {record['train_images_per_s']:.0f} img/s")
            finished_epoch = done == steps_per_epoch
            next_position = (epoch + 1, 0) if finished_epoch else (epoch, done)
            path = save_checkpoint(accelerator, output_dir, _position(
                *next_position, step, accelerator, None if finished_epoch else sums, run_log, cfg),
                cfg.train.keep_checkpoints)
            if stopping:
                raise stopped(accelerator, cfg, stop, f"at the end of epoch {epoch}", path)
    finally:
        stop.restore()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), output_dir / "model.safetensors")
        records = run_log.records
        best = max(records, key=lambda r: r["val_acc"])
        summary = {"final_val_acc": records[-1]["val_acc"], "final_val_top5": records[-1]["val_top5"],
                   "best_val_acc": best["val_acc"], "best_epoch": best["epoch"], "steps": step,
                   "total_time_s": round(time.perf_counter() - run_start, 1), **compile_summary(fast)}
        if resume_from is None or step > position["step"]:  # a finished run resumed has nothing new to report
            run_log.finish(summary, per_class_acc, sample_predictions(model, splits, accelerator),
                           output_dir / "model.safetensors" if cfg.tracking.log_model else None)
    accelerator.end_training()
    return run_log.records


def sample_predictions(model, splits, accelerator, num_images: int = 16) -> list[tuple]:
    """(image, predicted class, true class) for the first test images, for a look at what the model does."""
    images, labels = splits.test.images[:num_images], splits.test.labels[:num_images]
    model = accelerator.unwrap_model(model).eval()
    with torch.no_grad(), accelerator.autocast():
        predicted = model(images.to(accelerator.device)).argmax(1).tolist()
    names = splits.class_names
    return [(img.cpu().numpy(), names[p], names[t]) for img, p, t in zip(images, predicted, labels.tolist())]


def run_facts(plan: BatchPlan, accelerator, counts: dict, fast: FastPath, optimizer) -> dict:
    """What the tracker's config records beside the settings: topology, precision, the step as it runs (what
    was compiled, graph breaks, CUDA-graph skips, Adam's implementation), hardware, provenance."""
    return {"num_processes": plan.num_processes, "per_device_batch_size": plan.per_device_batch_size,
            "grad_accum_steps": plan.grad_accum_steps, "mixed_precision": accelerator.mixed_precision,
            **fast.facts(), "adam_implementation": adam_implementation(optimizer),
            "device": _device_name(accelerator), "torch": torch.__version__, "git_commit": git_commit(),
            **{f"params_{k}": v for k, v in counts.items()}}


def _device_name(accelerator) -> str:
    if accelerator.device.type == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or accelerator.device.type


def stopped(accelerator, cfg: Config, stop: StopSignals, where: str, checkpoint: Path) -> TrainingStopped:
    """The exception that ends a run stopped by a signal, once its checkpoint is complete; marks the stop."""
    if cfg.train.stop_marker and accelerator.is_main_process:
        Path(cfg.train.stop_marker).write_text(f"{checkpoint}\n")
    return TrainingStopped(f"stopped by {stop.received or 'a signal to another process'} {where}; saved "
                           f"{checkpoint}; run the same command to resume", EXIT_STOPPED)


def check_health(accelerator, sums, stop: StopSignals, step: int, output_dir: Path) -> bool:
    """All processes agree whether the loss went non-finite (raises) or a stop signal arrived (True)."""
    flags = accelerator.reduce(torch.stack([sums[3].clamp(max=1), sums.new_tensor(stop.received is not None)]),
                               reduction="sum").tolist()
    if flags[0]:
        latest = find_latest(output_dir / CHECKPOINTS)
        raise TrainingStopped(f"training loss became NaN or inf by step {step}; nothing was saved after it "
                              f"(last good checkpoint: {latest or 'none'}); lower --lr or check the data",
                              EXIT_DIVERGED)
    return bool(flags[1])


def _position(epoch: int, steps_in_epoch: int, step: int, accelerator, sums, run_log, cfg: Config) -> dict:
    """What trainer_state.json records: where to continue, the epoch's running totals, metrics, config."""
    train_sums = [0.0, 0.0, 0.0]
    if sums is not None:
        train_sums = accelerator.reduce(sums[:3].clone(), reduction="sum").tolist()
    return {"epoch": epoch, "steps_in_epoch": steps_in_epoch, "step": step, "train_sums": train_sums,
            "records": run_log.records, "config": cfg.to_dict(), "num_processes": accelerator.num_processes}


def describe_run(cfg: Config, plan: BatchPlan, accelerator, counts: dict, num_train: int, num_test: int,
                 fast: FastPath) -> str:
    device = _device_name(accelerator)
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
        f"- step: {fast.describe()}{'; frozen-stage features cached' if cfg.speed.cache_frozen_features else ''}"
        + "".join(f"; {note}" for note in fast.notes),
    ])


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_config(argv))
    except UserError as exc:
        print(f"cifar_dist.train: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingStopped as exc:
        print(f"cifar_dist.train: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None


if __name__ == "__main__":
    main()

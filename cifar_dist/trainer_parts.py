"""The trainer's pieces: ``assemble`` puts a model, data and optimizer on the accelerator the one way the trainer
(``cifar_dist.trainer.setup``), the benchmark and the GPU tests all use.

``build`` makes them in-process from a few arguments instead of a config and a run directory, and ``train``
drives them through the trainer's own step (``train_step``, or with --whole-step-graph the recorded
``GraphedStep``): the benchmark times that, and tests that look inside a step (which operations it runs, its
per-step losses, its gradients, what it leaves in BatchNorm) drive it, neither of which can be done through a
trainer subprocess.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState

from cifar_dist.config import (
    BatchPlan,
    DataConfig,
    ModelConfig,
    OptimConfig,
    SpeedConfig,
    TrainConfig,
    UserError,
    plan_batches,
)
from cifar_dist.data import CifarSplits, build_dataloaders, build_splits, loader_config
from cifar_dist.feature_cache import cache_for_run
from cifar_dist.graphed_step import GraphedStep
from cifar_dist.model import ResNet50Classifier, convert_sync_batchnorm
from cifar_dist.speed import (
    FastPath,
    accelerator_kwargs,
    apply_backends,
    build_optimizer,
    compile_for_training,
    first_line,
    prepare_model_layout,
    resolve_fast_path,
    sync_device,
)
from cifar_dist.steps import train_step


@dataclass
class Assembled:
    """What ``assemble`` returns: the prepared model and optimizer, what the step calls (``step_model``), the
    step itself (``run_step``), and the loaders, which serve images, or with the feature cache the frozen
    stages' output (``input_name`` and ``eval_input_name`` say which)."""

    model: torch.nn.Module
    step_model: object
    run_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # one micro-batch's step, as train_step's
    optimizer: object
    fast: FastPath
    train_loader: object
    eval_loader: object
    input_name: str
    eval_input_name: str
    feature_cache_s: float  # seconds the feature cache took to build (0 without one)


def assemble(accelerator, model: torch.nn.Module, splits: CifarSplits, plan: BatchPlan, fast: FastPath,
             optim: OptimConfig, speed: SpeedConfig, eval_batch_size: int, seed: int, ddp: bool = True) -> Assembled:
    """Data on the GPU, SyncBatchNorm and DDP with several processes (unless ``ddp`` is False: each process
    alone on its share of the batch), layout, optimizer, accelerate's prepare, the feature cache if asked, the
    loaders, and the step compiled and warmed up when the fast path says so."""
    apply_backends(fast)
    if accelerator.device.type == "cuda":
        splits = splits.to(accelerator.device)
    communicate = plan.num_processes > 1 and ddp
    if communicate:
        model = convert_sync_batchnorm(model)  # trainable BN must see the whole global batch
    model = prepare_model_layout(model, fast)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], optim, fast)
    if communicate or plan.num_processes == 1:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:  # placement and autocast as prepare gives them, without the DDP wrapper
        model = accelerator.prepare_model(model, evaluation_mode=True)
        optimizer = accelerator.prepare_optimizer(optimizer)
    # With the cache the loaders serve the frozen stages' output instead of images, in the same order.
    sync_device(accelerator.device)
    start = time.perf_counter()
    data, fast = cache_for_run(accelerator.unwrap_model(model), splits, accelerator, eval_batch_size, speed, fast)
    sync_device(accelerator.device)
    cache_s = time.perf_counter() - start if fast.features_cached else 0.0
    input_name, eval_input_name = ("features" if name in fast.features_cached else "images"
                                   for name in ("train", "test"))
    train_loader, eval_loader = accelerator.prepare(*build_dataloaders(data, plan, eval_batch_size, seed=seed))
    if fast.whole_step_graph:  # recorded by record_step, after any resume
        example = (t.to(accelerator.device) for t in data.train.__getitems__(list(range(plan.per_device_batch_size))))
        step_model, run_step = model, GraphedStep(model, optimizer, tuple(example), input_name, fast.compile_step)
    else:
        step_model, fast = compile_for_training(model, fast, data.train, plan.per_device_batch_size, accelerator,
                                                input_name)
        run_step = partial(train_step, model, step_model, optimizer=optimizer, accelerator=accelerator,
                           input_name=input_name)
    return Assembled(model, step_model, run_step, optimizer, fast, train_loader, eval_loader, input_name,
                     eval_input_name, cache_s)


def record_step(a: Assembled) -> Assembled:
    """With --whole-step-graph, record the step's graph: once the model and Adam hold what the run starts from
    (after any resume), as the graph keeps their addresses. A failure stops the run with one line."""
    if not isinstance(a.run_step, GraphedStep):
        return a
    try:
        seconds = a.run_step.record()
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # dynamo, inductor, triton and CUDA graphs raise many types
        raise UserError(f"--whole-step-graph yes: recording the step failed ({first_line(exc)}); use "
                        "--whole-step-graph no") from exc
    return dataclasses.replace(a, fast=dataclasses.replace(a.fast, graph_record_s=seconds))


@dataclass
class Parts(Assembled):
    """``build``'s: what ``assemble`` returned, with the accelerator and the batch layout they were built for."""

    accelerator: Accelerator
    class_names: list[str]
    grad_accum_steps: int
    global_batch_size: int


def synthetic_splits(num_train: int, num_eval: int) -> CifarSplits:
    return build_splits(DataConfig(data_source="synthetic", synthetic_train_samples=num_train,
                                   synthetic_eval_samples=num_eval), seed=0)


def build(splits: CifarSplits, image_size: int, *, speed: SpeedConfig | None = None, mixed_precision: str = "no",
          global_batch_size: int = 32, per_device_batch_size: int | None = None, lr: float = 1e-3,
          dtype=torch.float32, backbone: dict | None = None, cpu: bool | None = None, eval_batch_size: int = 256,
          ddp: Literal["cifar_dist", "torch_defaults", "none"] = "cifar_dist",
          model: torch.nn.Module | None = None) -> Parts:
    """The trainer's pieces for this process (one, or each of several under torchrun / accelerate launch).

    ``ddp`` matters only with several processes: "cifar_dist" is the trainer (SyncBatchNorm, DDP with
    ``speed.ddp_kwargs``), "torch_defaults" the same with DDP's own defaults, "none" the same step with neither
    DDP nor SyncBatchNorm, each process alone on its share of the batch. ``model`` replaces the recipe's (the
    benchmark's stand-in of negligible compute, which times the host's work around a step). accelerate's state
    is one per process and shared by every Accelerator (and refuses another precision), so it is reset first:
    earlier Parts keep working only while the settings they were built with are the current ones.
    """
    reset()
    cpu = not torch.cuda.is_available() if cpu is None else cpu
    speed = speed or SpeedConfig()
    state = PartialState(cpu=cpu)
    plan = plan_batches(TrainConfig(global_batch_size=global_batch_size,
                                    per_device_batch_size=per_device_batch_size), state.num_processes)
    fast = resolve_fast_path(speed, state.device, mixed_precision, plan.num_processes, plan.grad_accum_steps)
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, dataloader_config=loader_config(),
                              gradient_accumulation_steps=plan.grad_accum_steps,
                              kwargs_handlers=accelerator_kwargs(speed, fast, ddp=ddp == "cifar_dist"))
    torch.manual_seed(0)  # the head's initialisation, as set_seed does in the trainer
    if model is None:
        model = ResNet50Classifier(ModelConfig(weights="none"), image_size)
        if backbone is not None:
            model.load_state_dict({k: v for k, v in backbone.items() if not k.startswith("fc.")}, strict=False)
    a = record_step(assemble(accelerator, model.to(dtype), splits, plan, fast, OptimConfig(lr=lr), speed,
                             eval_batch_size, seed=0, ddp=ddp != "none"))
    return Parts(**vars(a), accelerator=accelerator, class_names=splits.class_names,
                 grad_accum_steps=plan.grad_accum_steps, global_batch_size=plan.global_batch_size)


def reset() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)


def train(parts: Parts, num_steps: int, epoch: int = 1, between_steps=None) -> list[torch.Tensor]:
    """``num_steps`` optimizer steps through the trainer's step (``run_step``); each step's [loss sum, correct,
    count, non-finite] summed over its micro-batches, left on the device. ``between_steps(step)`` runs before
    each."""
    parts.train_loader.set_epoch(epoch)
    parts.model.train()
    stats, step_sums = [], None
    for inputs, labels in parts.train_loader:
        if step_sums is None and between_steps is not None:
            between_steps(len(stats))
        out = parts.run_step(inputs, labels)
        step_sums = out if step_sums is None else step_sums + out
        if parts.accelerator.sync_gradients:
            stats.append(step_sums)
            step_sums = None
            if len(stats) == num_steps:
                break
    assert len(stats) == num_steps, f"the loader ran out after {len(stats)} steps"
    return stats


def losses(stats: list[torch.Tensor]) -> list[float]:
    """Each step's mean loss (one read of the device, at the end)."""
    table = torch.stack(stats).tolist()
    return [loss_sum / count for loss_sum, _, count, _ in table]


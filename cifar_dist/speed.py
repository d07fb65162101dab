"""The fast path: how the training step is executed, never what it computes.

At the recipe's global batch of 32 a ResNet50 step on a modern GPU is launch-bound, not compute-bound: the time
goes to launching a few hundred small kernels, so capturing the step in a CUDA graph (torch.compile's
reduce-overhead mode) matters more than precision. Fused Adam turns the optimizer's per-tensor kernels into a
few, and channels_last is the layout tensor cores want. With one process the model is never wrapped in DDP
(accelerate leaves a lone process unwrapped); with several, DDP gets big buckets and, under bf16, a bf16
gradient all-reduce, because a 32-image backward leaves little compute to hide communication behind.

Each option is 'auto' (on where it is safe and supported: CUDA), 'yes' or 'no'; where one cannot run it falls
back with one line saying so. Every option computes the same function: tests/test_speed.py trains with each
and compares against the plain path.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass, field

import torch
from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

from cifar_dist.config import SpeedConfig

# Triton, which torch.compile generates GPU kernels with, needs compute capability 7.0 (Volta) or newer.
_MIN_COMPILE_CAPABILITY = (7, 0)


@dataclass(frozen=True)
class FastPath:
    """The options resolved for this device; ``notes`` says, one line each, what is off and why."""

    compile_step: bool
    channels_last: bool
    fused_adam: bool
    bf16_grad_reduce: bool
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        on = [name for name, value in (("compiled step (torch.compile reduce-overhead)", self.compile_step),
                                       ("channels_last", self.channels_last), ("fused Adam", self.fused_adam),
                                       ("bf16 gradient all-reduce", self.bf16_grad_reduce)) if value]
        return ", ".join(on) or "plain eager step"


def resolve_fast_path(cfg: SpeedConfig, device: torch.device, mixed_precision: str, num_processes: int) -> FastPath:
    """Turn the 'auto'/'yes'/'no' settings into decisions for ``device``."""
    cuda = device.type == "cuda"
    notes = []

    def decide(name: str, choice: str, supported: bool, why_not: str) -> bool:
        wanted = choice == "yes" or (choice == "auto" and cuda)
        if wanted and not supported:
            notes.append(f"--{name.replace('_', '-')} {choice}: off, {why_not}")
        return wanted and supported

    compile_ok, compile_why = _compile_support(device)
    compile_step = decide("compile_step", cfg.compile_step, compile_ok, compile_why)
    channels_last = decide("channels_last", cfg.channels_last, True, "")
    fused_adam = decide("fused_adam", cfg.fused_adam, True, "")
    auto_off = [f"--{name.replace('_', '-')}" for name in ("compile_step", "channels_last", "fused_adam")
                if getattr(cfg, name) == "auto" and not cuda]
    if auto_off:
        notes.append(f"{', '.join(auto_off)} auto: off on {device.type} (on with 'yes')")
    reduce = cfg.grad_reduce_dtype
    bf16_grad_reduce = num_processes > 1 and (reduce == "bf16" or (reduce == "auto" and mixed_precision == "bf16"))
    return FastPath(compile_step, channels_last, fused_adam, bf16_grad_reduce, notes)


def _compile_support(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < _MIN_COMPILE_CAPABILITY:
            return False, f"this GPU has compute capability {capability[0]}.{capability[1]}; torch.compile needs 7.0+"
        return True, ""
    if device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return False, "torch.compile on the CPU needs a C++ compiler (c++, g++ or clang++) on PATH"
    return True, ""


def ddp_kwargs(cfg: SpeedConfig, fast: FastPath) -> DistributedDataParallelKwargs:
    """DDP settings for several processes (accelerate ignores them for one)."""
    # 1x1 convolutions' gradients can come back with other (equivalent: the dims are of size 1) strides than
    # their bucket view; DDP then copies them, as it always does without bucket views, and warns.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallelKwargs(
        bucket_cap_mb=cfg.ddp_bucket_mb,
        gradient_as_bucket_view=True,  # gradients live in the buckets: no copy in and out of them each step
        comm_hook=DDPCommunicationHookType.BF16 if fast.bf16_grad_reduce else DDPCommunicationHookType.NO,
    )


def prepare_model_layout(model: torch.nn.Module, fast: FastPath) -> torch.nn.Module:
    """Before accelerator.prepare: the parameters' memory format (saved state dicts stay contiguous)."""
    return model.to(memory_format=torch.channels_last) if fast.channels_last else model


def build_optimizer(params, cfg_optim, fast: FastPath) -> torch.optim.Adam:
    """Adam with the recipe's (Keras) hyperparameters; fused or not, its state dict is the same."""
    return torch.optim.Adam(params, lr=cfg_optim.lr, betas=(cfg_optim.adam_beta1, cfg_optim.adam_beta2),
                            eps=cfg_optim.adam_eps, fused=fast.fused_adam or None)


def compile_for_training(model: torch.nn.Module, fast: FastPath) -> torch.nn.Module:
    """The module the training step calls: ``model`` itself, or compiled with CUDA graphs.

    Only the training step is compiled: evaluation runs the same parameters eagerly at a large batch, where
    launches are amortised, instead of recording a graph per eval batch shape. Train batches all have one
    shape (the sampler cuts epochs to whole global batches), so the step is recorded once. A part dynamo cannot
    compile runs eagerly rather than failing the run (suppress_errors).
    """
    if not fast.compile_step:
        return model
    torch._dynamo.config.suppress_errors = True
    return torch.compile(model, mode="reduce-overhead")

"""The fast path: how the training step is executed, never what it computes.

At the recipe's global batch of 32 a ResNet50 step on a modern GPU is launch-bound, not compute-bound: the time
goes to launching a few hundred small kernels, so capturing the step in a CUDA graph (torch.compile's
reduce-overhead mode) matters more than precision. Fused Adam turns the optimizer's per-tensor kernels into a
few, and channels_last is the layout tensor cores want. With one process the model is never wrapped in DDP
(accelerate leaves a lone process unwrapped); with several, DDP gets big buckets and, under bf16, a bf16
gradient all-reduce, because a 32-image backward leaves little compute to hide communication behind.

Each option is 'auto' (on where it is safe and supported: CUDA; the feature cache where it also fits in GPU
memory, and then the whole step as one CUDA graph), 'yes' or 'no'; where one cannot run it falls back with one
line saying so. Every option computes the same function: tests/test_speed.py trains with each
and compares against the plain path.

The compiled step is compiled and its CUDA graphs recorded before training, by a warm-up on a real batch whose
effects (gradients, BatchNorm running statistics) are undone, so what a failed compile leaves behind is
nothing: with 'auto' the run goes on eagerly and says why, with 'yes' it stops with one line. The run header
and run facts say what was compiled (graphs, graph breaks, CUDA-graph skips); the end-of-run summary counts
what happened after the warm-up (recompiles, graph breaks, skips), which in a steady run is nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import shutil
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate.utils import AutocastKwargs, DDPCommunicationHookType, DistributedDataParallelKwargs

from cifar_dist.config import SpeedConfig, UserError

# Triton, which torch.compile generates GPU kernels with, needs compute capability 7.0 (Volta) or newer.
_MIN_COMPILE_CAPABILITY = (7, 0)
# Calls of the compiled step in the warm-up: dynamo and inductor compile on the first, cudagraph trees run the
# first eagerly, record on the second and replay from the third; a failure in any of them shows here.
WARMUP_CALLS = 3
# Where inductor says why it did not use a CUDA graph (a logger of torch's, silent unless a handler is added).
_CUDAGRAPH_LOGGER = "torch._inductor.cudagraph_utils.__cudagraphs"
# The note of 'auto' leaving the compiler out of the whole-step graph from the feature cache (its start).
_COMPILE_OFF_IN_GRAPH = "--compile-step auto: off inside the whole-step graph from the feature cache"
# Optimizer group options that say how the update is computed, not what: this run's, never a checkpoint's.
_IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


@dataclass
class CompileReport:
    """What compiling the step did: the warm-up's time and torch's counters, then a baseline for later events."""

    warmup_s: float = 0.0
    graphs: int = 0
    graph_breaks: int = 0
    cudagraph_skips: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    device_type: str = "cuda"
    baseline: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FastPath:
    """The options resolved for this device; ``notes`` says, one line each, what is off and why."""

    compile_step: bool
    channels_last: bool
    fused_adam: bool
    bf16_grad_reduce: bool
    notes: list[str] = field(default_factory=list)
    compile_choice: str = "auto"  # what was asked for: a failed compile falls back under 'auto', stops under 'yes'
    grad_accum_steps: int = 1
    compiled: CompileReport | None = None  # set once the step is compiled and warmed up
    eval_cache: bool = False  # evaluate from the test images' cached frozen-stage features, if they fit
    cudnn_benchmark: bool = False  # cuDNN times its convolution algorithms per input shape (set by apply_backends)
    whole_step_graph: bool = False  # the whole step (Adam included) as one CUDA graph (cifar_dist/graphed_step.py)
    graph_record_s: float | None = None  # set once that graph is recorded
    device_type: str = "cuda"
    features_cached: tuple[str, ...] = ()  # the splits whose frozen-stage features are cached, once built
    train_cache: bool = False  # cache the training images' frozen-stage features too (if they fit, under 'auto')
    for_the_cache: tuple[str, ...] = ()  # what 'auto' decided for training from the cache: "graph", "no compile"

    def without_train_cache(self, note: str | None = None) -> FastPath:
        """The fast path of a run whose training images' features were not cached after all (--cache-frozen-features
        auto found no room, or nothing frozen): what 'auto' decided for the cache undone, the step from images."""
        notes = [n for n in self.notes if not n.startswith(_COMPILE_OFF_IN_GRAPH)] + ([note] if note else [])
        return dataclasses.replace(self, train_cache=False, for_the_cache=(), notes=notes,
                                   whole_step_graph=self.whole_step_graph and "graph" not in self.for_the_cache,
                                   compile_step=self.compile_step or "no compile" in self.for_the_cache)

    def describe(self) -> str:
        step = "compiled step (torch.compile reduce-overhead"
        if self.whole_step_graph:
            step = self._graph_step()
        elif self.compiled is not None:
            report = self.compiled
            step += (f"; compiled in {report.warmup_s:.1f} s: {report.graphs} graph{'s' * (report.graphs != 1)}, "
                     f"{report.graph_breaks} graph break{'s' * (report.graph_breaks != 1)}, {_cuda_graphs(report)}")
        on = [name for name, value in ((step + ")", self.compile_step or self.whole_step_graph),
                                       ("channels_last", self.channels_last),
                                       ("fused Adam", self.fused_adam),
                                       ("cuDNN-autotuned convolutions", self.cudnn_benchmark),
                                       ("bf16 gradient all-reduce", self.bf16_grad_reduce)) if value]
        cached = {("train", "test"): "; frozen-stage features cached",
                  ("test",): "; evaluation from the test images' cached frozen-stage features"}
        return (", ".join(on) or "plain eager step") + cached.get(self.features_cached, "")

    def _graph_step(self) -> str:
        kernels = "inductor's kernels" if self.compile_step else "eager kernels"
        if self.device_type != "cuda":
            return (f"whole step over static buffers ({kernels}; not recorded as a graph: CUDA graphs need a CUDA "
                    "GPU")
        recorded = f"; recorded in {self.graph_record_s:.1f} s" if self.graph_record_s is not None else ""
        return f"whole step as one CUDA graph (forward, loss, backward and fused Adam; {kernels}{recorded}"

    def facts(self) -> dict:
        """What the run records beside its settings (W&B config): the step as it actually runs."""
        facts = {"fast_path": self.describe(), "compiled_step": self.compile_step, "channels_last": self.channels_last,
                 "fused_adam": self.fused_adam, "bf16_grad_reduce": self.bf16_grad_reduce,
                 "cudnn_benchmark": self.cudnn_benchmark, "whole_step_graph": self.whole_step_graph,
                 "features_cached": list(self.features_cached), "fast_path_notes": list(self.notes)}
        if self.graph_record_s is not None:
            facts["graph_record_s"] = round(self.graph_record_s, 2)
        if self.compiled is not None:
            report = self.compiled
            facts.update({"compile_warmup_s": round(report.warmup_s, 2), "compile_graphs": report.graphs,
                          "compile_graph_breaks": report.graph_breaks, "cudagraph_skips": report.cudagraph_skips})
        return facts


def _cuda_graphs(report: CompileReport) -> str:
    if report.device_type != "cuda":
        return f"no CUDA graphs on {report.device_type}"
    if not report.cudagraph_skips:
        return "CUDA graphs recorded"
    reason = f": {report.skip_reasons[0]}" if report.skip_reasons else " (TORCH_LOGS=cudagraphs says why)"
    return f"CUDA graphs skipped {report.cudagraph_skips}x{reason}"


def resolve_fast_path(cfg: SpeedConfig, device: torch.device, mixed_precision: str, num_processes: int,
                      grad_accum_steps: int = 1, deterministic: bool = False) -> FastPath:
    """Turn the 'auto'/'yes'/'no' settings into decisions for ``device``, this batch layout and, for cuDNN's
    autotuning, whether the run asked for deterministic algorithms."""
    cuda = device.type == "cuda"
    notes = []

    def decide(name: str, choice: str, supported: bool, why_not: str) -> bool:
        wanted = choice == "yes" or (choice == "auto" and cuda)
        if wanted and not supported:
            notes.append(f"--{name.replace('_', '-')} {choice}: off, {why_not}")
        return wanted and supported

    # The training images' features: under 'auto' on CUDA if they fit in device memory, which only building the
    # cache tells (feature_cache.cache_for_run); where they do not, FastPath.without_train_cache undoes what is
    # decided here for training from them.
    train_cache = cfg.cache_frozen_features == "yes" or (
        cfg.cache_frozen_features == "auto" and cuda and cfg.cache_eval_features != "no")
    whole_step_graph = _decide_whole_step_graph(cfg, cuda, train_cache, mixed_precision, num_processes,
                                                grad_accum_steps, notes)
    for_the_cache = ("graph",) if whole_step_graph and cfg.whole_step_graph == "auto" else ()
    compile_ok, compile_why = _compile_support(device)
    compile_step = decide("compile_step", cfg.compile_step, compile_ok, compile_why)
    if compile_step and cfg.compile_step == "auto":
        compile_step, for_the_cache = _auto_compile_exceptions(for_the_cache, num_processes, grad_accum_steps, notes)
    channels_last = decide("channels_last", cfg.channels_last, True, "")
    # The graph records fused Adam's step ('no' with the graph is refused in SpeedConfig).
    fused_adam = decide("fused_adam", cfg.fused_adam, True, "") or whole_step_graph
    # --cache-frozen-features caches the test images' features with the training images'.
    eval_cache = train_cache or decide("cache_eval_features", cfg.cache_eval_features, True, "")
    cudnn_benchmark = _decide_cudnn_benchmark(cfg.cudnn_benchmark, cuda, deterministic, notes)
    auto_names = ["compile_step", "channels_last", *([] if whole_step_graph else ["fused_adam"]),
                  *([] if train_cache else ["cache_frozen_features"]), *([] if eval_cache else ["cache_eval_features"])]
    auto_off = [f"--{name.replace('_', '-')}" for name in auto_names if getattr(cfg, name) == "auto" and not cuda]
    if auto_off:
        notes.append(f"{', '.join(auto_off)} auto: off on {device.type} (on with 'yes')")
    reduce = cfg.grad_reduce_dtype
    bf16_grad_reduce = num_processes > 1 and (reduce == "bf16" or (reduce == "auto" and mixed_precision == "bf16"))
    return FastPath(compile_step, channels_last, fused_adam, bf16_grad_reduce, notes, cfg.compile_step,
                    grad_accum_steps, eval_cache=eval_cache, cudnn_benchmark=cudnn_benchmark,
                    whole_step_graph=whole_step_graph, device_type=device.type, train_cache=train_cache,
                    for_the_cache=for_the_cache)


def _auto_compile_exceptions(for_the_cache: tuple[str, ...], num_processes: int, grad_accum_steps: int,
                             notes: list[str]) -> tuple[bool, tuple[str, ...]]:
    """Where --compile-step auto, on with CUDA, leaves the step uncompiled after all, with a note: under the
    whole-step graph, with several processes, with gradient accumulation. Returns (compile, for_the_cache)."""
    if for_the_cache:
        notes.append(f"{_COMPILE_OFF_IN_GRAPH} (eager kernels, measured faster end to end: nothing to compile at "
                     "start-up); inductor's kernels with 'yes'")
        return False, ("graph", "no compile")
    if num_processes > 1:
        # DDP + SyncBatchNorm inside a graph is reported to skip CUDA graphs ("mutated inputs", PyTorch #139207),
        # leaving compile time and no gain; until measured on GPUs, several processes run the eager step.
        notes.append("--compile-step auto: off with several processes (DDP + SyncBatchNorm keep CUDA graphs from "
                     "recording, PyTorch #139207; not yet measured against eager); on with 'yes'")
        return False, for_the_cache
    if grad_accum_steps > 1:
        notes.append("--compile-step auto: off with gradient accumulation (each micro-batch's graph replay would "
                     "reuse the memory of the gradients being accumulated); on with 'yes', which keeps them apart")
        return False, for_the_cache
    return True, for_the_cache


def _decide_whole_step_graph(cfg: SpeedConfig, cuda: bool, train_cache: bool, mixed_precision: str,
                             num_processes: int, grad_accum_steps: int, notes: list[str]) -> bool:
    # 'auto' turns it on where it was measured faster: training from the feature cache on a CUDA GPU. There the
    # step is layer4 + head alone, short enough that the compiled step's host work (its guards and checks, the
    # loss, Adam) set its pace: 2.5 ms a step, against 1.7 ms as one graph. On an H100
    # (docs/gpu-checks/2026-11-27-h100.md) the recipe end to end took 54.6 s with one graph of eager kernels
    # against 78.8 s with the compiled step: 18,444 against 12,596 training images/s, and nothing compiled at
    # start-up. From images the compiled step is as fast (11,162 images/s against 11,300 as one graph) and stays.
    # What the graph cannot hold: a collective (DDP's all-reduce), gradients summed over replays, fp16's loss
    # scaler (its inf checks read the device), and a non-fused Adam.
    choice = cfg.whole_step_graph
    if choice == "no" or (choice == "auto" and not (cuda and train_cache)):
        return False
    why_not = ("with several processes (DDP's all-reduce is not recorded)" if num_processes > 1 else
               "with gradient accumulation (one replay is one optimizer step)" if grad_accum_steps > 1 else
               "under fp16 (the loss scaler reads the device every step)" if mixed_precision == "fp16" else
               "with --fused-adam no (the graph records fused Adam's step)" if cfg.fused_adam == "no" else "")
    if why_not:
        notes.append(f"--whole-step-graph {choice}: off {why_not}; the step runs as without it")
    return not why_not


def _decide_cudnn_benchmark(choice: str, cuda: bool, deterministic: bool, notes: list[str]) -> bool:
    # Every training batch has one shape, so the timing costs a few calls, once (evaluation leaves the choice to
    # cuDNN's heuristics: steps.evaluate); the choice it makes can differ from process to process and launch to
    # launch, hence never under --deterministic ('yes' with it is refused in Config). Nothing to say on a CPU under
    # 'auto': cuDNN is CUDA's.
    if choice == "no" or (choice == "auto" and not cuda):
        return False
    if not cuda:
        notes.append("--cudnn-benchmark yes: off, cuDNN runs on CUDA GPUs only")
        return False
    if deterministic:
        notes.append("--cudnn-benchmark auto: off with --deterministic (its timed choice of algorithm can differ "
                     "between a run and its resumption)")
        return False
    return True


def apply_backends(fast: FastPath) -> None:
    """Process-wide backend switches the fast path decided; before the first convolution, so every shape is
    timed under them. Set both ways: the benchmark builds variants with and without in one process."""
    torch.backends.cudnn.benchmark = fast.cudnn_benchmark


@contextlib.contextmanager
def cudnn_autotuning(on: bool):
    """cuDNN's autotuning (--cudnn-benchmark) switched ``on`` or off inside the block, the run's setting after.
    Off for passes over shapes that run once: the timing of every algorithm of each convolution at a new shape
    is paid on its first call, and only a shape that runs many times earns it back."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _compile_support(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < _MIN_COMPILE_CAPABILITY:
            return False, f"this GPU has compute capability {capability[0]}.{capability[1]}; torch.compile needs 7.0+"
        return True, ""
    if device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return False, "torch.compile on the CPU needs a C++ compiler (c++, g++ or clang++) on PATH"
    return True, ""


def accelerator_kwargs(cfg: SpeedConfig, fast: FastPath, ddp: bool = True) -> list:
    """The Accelerator's kwargs handlers: DDP's settings (unless ``ddp`` is False: torch's defaults), and under
    --whole-step-graph autocast without its weight-cast cache, as CUDA graphs want it (a cast cached outside a
    recording must not be read inside one). Autocast casts each weight once per forward here anyway, so a run
    whose graph was planned for a feature cache that then did not fit loses nothing by it."""
    ddp_handler = ddp_kwargs(cfg, fast)  # which also silences DDP's stride warning, whatever the settings
    return ([ddp_handler] if ddp else []) + ([AutocastKwargs(cache_enabled=False)] if fast.whole_step_graph else [])


def ddp_kwargs(cfg: SpeedConfig, fast: FastPath) -> DistributedDataParallelKwargs:
    """DDP settings for several processes (accelerate ignores them for one)."""
    # 1x1 convolutions' gradients can come back with other (equivalent: the dims are of size 1) strides than
    # their bucket view; DDP then copies them, as it always does without bucket views, and warns.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallelKwargs(
        bucket_cap_mb=cfg.ddp_bucket_mb,
        # Gradients become views of the buckets, so the reduced values are not copied back out. The copy in
        # stays: zero_grad(set_to_none=True) drops the views every step (set_to_none=False would swap each
        # copy for an in-place add, plus the zeroing).
        gradient_as_bucket_view=True,
        comm_hook=DDPCommunicationHookType.BF16 if fast.bf16_grad_reduce else DDPCommunicationHookType.NO,
    )


def prepare_model_layout(model: torch.nn.Module, fast: FastPath) -> torch.nn.Module:
    """Before accelerator.prepare: the parameters' memory format (saved state dicts stay contiguous)."""
    return model.to(memory_format=torch.channels_last) if fast.channels_last else model


def build_optimizer(params, cfg_optim, fast: FastPath) -> torch.optim.Adam:
    """Adam with the recipe's (Keras) hyperparameters; fused or not, capturable or not, its state dict is the
    same. Capturable (its step counters on the device, no host reads) when the whole step is one CUDA graph."""
    return torch.optim.Adam(params, lr=cfg_optim.lr, betas=(cfg_optim.adam_beta1, cfg_optim.adam_beta2),
                            eps=cfg_optim.adam_eps, fused=fast.fused_adam or None,
                            capturable=fast.whole_step_graph)


def match_optimizer_to_run(optimizer) -> None:
    """After loading a checkpoint: this run's Adam implementation and parameter layouts, not the saved ones.

    ``Optimizer.load_state_dict`` replaces each group's options with the saved ones, ``fused`` included (a
    checkpoint of a non-fused run turns a fused optimizer into the foreach one), and keeps each state tensor in
    the memory format it was saved with, while the fused kernels pair elements by memory position: a
    channels_last checkpoint resumed with contiguous parameters (or the reverse) fails on a GPU and silently
    mixes elements on the CPU. Here the options come back from the optimizer's own defaults (what this run
    built it with), Adam's moments take each parameter's current layout, and the step counters go where the
    implementation keeps them (on the parameter's device for fused/capturable, else on the CPU).
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    for group in inner.param_groups:
        for key in _IMPLEMENTATION_KEYS:
            if key in inner.defaults:
                group[key] = inner.defaults[key]
        steps_on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            state = inner.state.get(param)
            for name, value in (state or {}).items():
                if not torch.is_tensor(value):
                    continue
                if name == "step":
                    state[name] = (value.to(device=param.device, dtype=torch.float32) if steps_on_device
                                   else value.to("cpu"))
                elif value.shape == param.shape and value.stride() != param.stride():
                    state[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def adam_implementation(optimizer) -> str:
    """'fused', 'foreach' or 'for-loop': which of torch's Adam implementations the first group runs."""
    group = getattr(optimizer, "optimizer", optimizer).param_groups[0]
    if group.get("fused"):
        return "fused"
    if group.get("foreach") or (group.get("foreach") is None and all(p.is_cuda for p in group["params"])):
        return "foreach"  # torch's default for CUDA tensors
    return "for-loop"


class CompiledStep:
    """The training step's model call, compiled: every call starts a new CUDA-graph step.

    cudagraph trees give each replay's outputs the memory of the previous replay's, gradients included, which
    autograd adopts as ``.grad`` when a parameter has none. That is fine when the optimizer consumes them before
    the next call, but under gradient accumulation the next micro-batch's replay would overwrite gradients
    still being summed (PyTorch #169545). So when accumulating, missing gradients are allocated before the
    call: autograd then adds each replay's gradients into memory of their own instead of adopting the graph's.
    """

    def __init__(self, model: torch.nn.Module, compiled: torch.nn.Module, grad_accum_steps: int):
        self.model = model
        self.compiled = compiled
        self.trainable = [p for p in model.parameters() if p.requires_grad] if grad_accum_steps > 1 else []

    def __call__(self, *args, **kwargs):
        for param in self.trainable:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(*args, **kwargs)


def compile_for_training(model: torch.nn.Module, fast: FastPath, train_data, batch_size: int, accelerator,
                         input_name: str = "images") -> tuple[torch.nn.Module | CompiledStep, FastPath]:
    """(what the training step calls, the fast path as it turned out): ``model``, or it compiled and warmed up.

    Only the training step is compiled: evaluation runs the same parameters eagerly at a large batch, where
    launches are amortised, instead of recording a graph per eval batch shape. Train batches all have one shape
    (the sampler cuts epochs to whole global batches), so the step is recorded once, here, on the first
    ``batch_size`` examples of ``train_data``; the warm-up leaves parameters, gradients and BatchNorm
    statistics as it found them. A compile that fails runs eagerly with a note under 'auto' and stops the
    run with one line (UserError) under 'yes'.
    """
    if not fast.compile_step:
        return model, fast
    _watch_cudagraph_skips()
    inputs, labels = (t.to(accelerator.device) for t in train_data.__getitems__(list(range(batch_size))))
    step = CompiledStep(model, torch.compile(model, mode="reduce-overhead"), fast.grad_accum_steps)
    before, first_skip = _counters(), len(_SKIPS.messages)
    sync_device(accelerator.device)
    start = time.perf_counter()
    try:
        _warm_up(step, model, inputs, labels, accelerator, input_name)
        sync_device(accelerator.device)
    except Exception as exc:  # dynamo, inductor, triton and CUDA graphs raise many types
        reason = first_line(exc)
        if fast.compile_choice == "yes" or accelerator.num_processes > 1:
            raise UserError(f"--compile-step {fast.compile_choice}: torch.compile failed ({reason}); "
                            f"use --compile-step no") from exc
        torch._dynamo.reset()
        return model, dataclasses.replace(fast, compile_step=False, notes=[
            *fast.notes, f"--compile-step auto: off, torch.compile failed ({reason}); the eager step runs instead"])
    after = _counters()
    report = CompileReport(warmup_s=time.perf_counter() - start, graphs=after["graphs"] - before["graphs"],
                           graph_breaks=after["graph_breaks"] - before["graph_breaks"],
                           cudagraph_skips=after["cudagraph_skips"] - before["cudagraph_skips"],
                           skip_reasons=list(dict.fromkeys(_SKIPS.messages[first_skip:])),
                           device_type=accelerator.device.type, baseline=after)
    return step, dataclasses.replace(fast, compiled=report)


def _warm_up(step: CompiledStep, model: torch.nn.Module, inputs, labels, accelerator, input_name: str) -> None:
    """Forward and backward through the compiled step, then undo their effects: gradients and buffers."""
    model.train()  # the mode the step runs in (frozen stages in eval mode), which the graphs are recorded for
    buffers = list(model.buffers())
    saved = [b.detach().clone() for b in buffers]
    try:
        for _ in range(WARMUP_CALLS):
            accelerator.backward(F.cross_entropy(step(**{input_name: inputs}), labels))
            for param in model.parameters():
                param.grad = None
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)  # in place: the graphs hold these addresses
        for param in model.parameters():
            param.grad = None


def compile_summary(fast: FastPath) -> dict:
    """For the end-of-run summary: what dynamo and inductor did after the warm-up (all zero in a steady run)."""
    if fast.compiled is None:
        return {}
    now, base = _counters(), fast.compiled.baseline
    return {f"{name}_after_warmup": now[key] - base[key] for name, key in (
        ("recompiles", "frames"), ("graph_breaks", "graph_breaks"), ("cudagraph_skips", "cudagraph_skips"))}


def _counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    # Dynamo converts a frame only when no compiled version of it fits: after the warm-up, each is a recompile.
    return {"graphs": counters["stats"]["unique_graphs"], "frames": counters["frames"]["total"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


class _SkipLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(first_line(record.getMessage()).removeprefix("skipping cudagraphs due to "))


_SKIPS = _SkipLog()


def _watch_cudagraph_skips() -> None:
    logger = logging.getLogger(_CUDAGRAPH_LOGGER)
    if _SKIPS not in logger.handlers:
        logger.addHandler(_SKIPS)


def first_line(what) -> str:
    if isinstance(what, BaseException):
        text = str(what).strip().splitlines()
        return f"{type(what).__name__}: {text[0]}" if text else type(what).__name__
    return (str(what).strip().splitlines() or [""])[0]


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_mixed_precision(choice: str) -> str:
    """'auto' -> the accelerate config's bf16/fp16 if it asks for one, else bf16 on a GPU that computes it
    natively, else fp32. Before compute capability 8.0 (V100, T4) torch only emulates bf16, slowly, although
    torch.cuda.is_bf16_supported() says yes by default (emulation counts); there fp32 it is, and
    mixed_precision_note says why. On ROCm, bf16 as torch.cuda.is_bf16_supported() has it."""
    if choice != "auto":
        return choice
    launched_with = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched_with != "no":
        return launched_with
    return "bf16" if _native_bf16() else "no"


def _native_bf16() -> bool:
    return torch.cuda.is_available() and (torch.version.hip is not None or torch.cuda.get_device_capability() >= (8, 0))


def mixed_precision_note(choice: str, resolved: str) -> str:
    """Why 'auto' left a GPU in fp32 ("" where it did not): the run header says it beside the precision."""
    if choice != "auto" or resolved != "no" or not torch.cuda.is_available():
        return ""
    major, minor = torch.cuda.get_device_capability()
    return (f" (auto: this GPU, compute capability {major}.{minor}, has no native bf16; --mixed-precision fp16 "
            "runs on its tensor cores)")


def device_name(accelerator) -> str:
    """The accelerator's name (the GPU model), or the CPU's."""
    if accelerator.device.type == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or accelerator.device.type

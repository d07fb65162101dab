"""Training and eval throughput of the recipe's step, side by side, on synthetic CIFAR-shaped data.

    python -m cifar_dist.bench                       # on the current device, 224 px, batch 32
    python -m cifar_dist.bench --json bench.json     # also write the table as JSON
    python -m cifar_dist.bench --end-to-end          # + the real trainer, 10 epochs of 50,000 + 10,000 images
    torchrun --nproc_per_node 2 -m cifar_dist.bench --variants ddp    # communication cost per world size
    python -m cifar_dist.bench --image-size 32 --steps 3 --warmup 1    # a quick look on a CPU

Every variant but straight_port is the trainer's own step: cifar_dist/trainer_parts.py builds it with the
functions cifar_dist.train.setup uses (fast path, layout, optimizer, loaders, feature cache, compilation) and
drives it through cifar_dist.train.train_step (eval: its evaluate). In one process, warm-up not timed:
  straight_port   the plain PyTorch port: PIL resize to the image size in DataLoader workers, float32, eager
  eager           the trainer with --compile-step no --channels-last no --fused-adam no --cudnn-benchmark no:
                  uint8 batches on the device, resize + normalise in the model, autocast under bf16
  channels_last   eager + --channels-last yes --fused-adam yes (and cuDNN's autotuning, auto: on a GPU)
  compiled        channels_last + --compile-step yes (CUDA graphs; compile s: the trainer's warm-up); GPU only
  compiled_heuristic  compiled with --cudnn-benchmark no: cuDNN's own choice of algorithm; GPU only
  graphed         channels_last + --whole-step-graph yes: the whole step (forward, loss, backward, capturable
                  fused Adam) as one CUDA graph (cifar_dist/graphed_step.py; compile s: its recording); GPU only
  graphed_compiled the same with --compile-step yes: inductor's kernels inside the graph (its fused kernels,
                  without the compiled step's per-call checks); GPU only
  cached_graphed  graphed_compiled from the feature cache: layer4 + head's whole step as one graph; images/s of
                  a whole pass, as cached_trunk's; GPU only
  cached_graphed_eager  the same with eager kernels: what the trainer runs by default on a GPU where the
                  feature cache fits (--cache-frozen-features auto);
                  GPU only
  cached_trunk    eager + --cache-frozen-features (the frozen trunk once per image at the eval batch, then
                  layer4 + head steps from its output); images/s of that whole pass (the cache's second build
                  timed: its one-off costs are spread over a run's 60,000 images, not the benchmark's few)
  cached_compiled cached_trunk + channels_last, fused Adam and --compile-step yes; GPU only
  cache_build     the feature cache's build alone, twice as the trainer builds it (cuDNN's own choice of
                  algorithm), then (on CUDA) twice with cuDNN's autotuning: a first build's extra is one-off,
                  paid once per run; images/s of the trainer's second build
  eval            the trainer's evaluate over --steps batches of --eval-batch-size (its default layout), from
                  images: the whole model
  eval_cached     the same from the test images' cached frozen-stage features, as the trainer evaluates by
                  default on a GPU (--cache-eval-features; building the cache, once per run, not timed)
  host            channels_last's loop (loader, train_step, fused Adam) around a stand-in model of negligible
                  compute: the images/s the host's own work per step allows, the ceiling of any step that is
                  not one CUDA graph (the compiled step adds its graphs' replay overhead to it)
  ddp             under torchrun with N processes (global batch kept at --batch-size): the trainer's
                  multi-process step (DDP + SyncBatchNorm) with cifar_dist's DDP settings and with torch's
                  defaults, against the same step with no communication; reports the communication share
("GPU only": left out on a CPU unless named.) Reported: images/s, the ratio to straight_port, and compile time
separately; the compute floor of the whole workload (FLOPs counted on the model, divided by a matmul rate
measured on this device); what one checkpoint costs (the trainer's save_checkpoint of the trainer's model and
Adam state, timed in --checkpoint-dir); with --end-to-end the wall time of `python -m cifar_dist.train` from
launch to its final report, by default with default flags (on a GPU the feature cache, where it fits) and from
images (--e2e-runs: also with the whole step as one CUDA graph); with --profile VARIANT where a step's time
goes, host or device (cifar_dist/step_profile.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import PartialState
from torch.utils.data import DataLoader, Dataset

from cifar_dist import trainer_parts
from cifar_dist.checkpoint import BackgroundWriter, save_checkpoint
from cifar_dist.config import ModelConfig, SpeedConfig, UserError
from cifar_dist.data import ImageTensorDataset
from cifar_dist.feature_cache import build_feature_cache, cache_layout
from cifar_dist.model import IMAGENET_MEAN, IMAGENET_STD, ResNet50Classifier
from cifar_dist.speed import resolve_mixed_precision, sync_device
from cifar_dist.step_profile import format_profile, profile_steps
from cifar_dist.steps import evaluate

VARIANTS = ("straight_port", "eager", "channels_last", "compiled", "compiled_heuristic", "graphed", "graphed_compiled",
            "cached_trunk", "cached_compiled", "cached_graphed", "cached_graphed_eager", "cache_build", "eval",
            "eval_cached", "host", "ddp")
EVALS = ("eval", "eval_cached")
# The whole step as one CUDA graph (--whole-step-graph, cifar_dist/graphed_step.py): 'compile s' is its recording.
GRAPHED = ("graphed", "graphed_compiled", "cached_graphed", "cached_graphed_eager")
GPU_ONLY = ("compiled", "compiled_heuristic", "cached_compiled", *GRAPHED)  # CUDA graphs; on a CPU only when named
ONLY_WHEN_NAMED = (*GRAPHED, "ddp")  # experiments, and the variant to run under torchrun
# The workload the targets are about: the recipe's 10 epochs over CIFAR-100's 50,000 + 10,000 images.
EPOCHS, TRAIN_IMAGES, EVAL_IMAGES = 10, 50_000, 10_000
# The end-to-end runs' trainer flags (--end-to-end, --e2e-runs).
# "default" trains from the feature cache where it fits (--cache-frozen-features auto), "images" from images.
E2E_RUNS = {"default": [], "images": ["--no-cache-frozen-features"], "cached": ["--cache-frozen-features"],
            "graphed": ["--whole-step-graph", "yes", "--no-cache-frozen-features"],
            "graphed_eager": ["--whole-step-graph", "yes", "--compile-step", "no", "--no-cache-frozen-features"],
            "graphed_cached": ["--whole-step-graph", "yes", "--cache-frozen-features"],
            "graphed_eager_cached": ["--whole-step-graph", "yes", "--compile-step", "no", "--cache-frozen-features"]}
# The trainer's speed options (--compile-step, --channels-last, --fused-adam, --cache-frozen-features) each
# variant is built with; 'yes' rather than 'auto', so that a variant that cannot run as named stops.
# The training variants evaluate nothing, so none builds the evaluation's feature cache. cuDNN's autotuning is
# left at the trainer's 'auto' (there is no cuDNN on a CPU); compiled_heuristic is the compiled step without it.
OFF = {"compile_step": "no", "channels_last": "no", "fused_adam": "no", "cache_frozen_features": "no",
       "cache_eval_features": "no", "cudnn_benchmark": "no", "whole_step_graph": "no"}
FAST = {"compile_step": "no", "channels_last": "yes", "fused_adam": "yes", "cache_frozen_features": "no",
        "cache_eval_features": "no", "whole_step_graph": "no"}
CACHED = {"cache_frozen_features": "yes", "cache_eval_features": "auto"}
STEP_SPEED = {"eager": OFF, "channels_last": FAST, "compiled": {**FAST, "compile_step": "yes"},
              "compiled_heuristic": {**FAST, "compile_step": "yes", "cudnn_benchmark": "no"},
              "graphed": {**FAST, "whole_step_graph": "yes"},
              "graphed_compiled": {**FAST, "compile_step": "yes", "whole_step_graph": "yes"},
              "cached_graphed": {**FAST, "compile_step": "yes", "whole_step_graph": "yes", **CACHED},
              "cached_graphed_eager": {**FAST, "whole_step_graph": "yes", **CACHED},  # auto's choice from the cache
              "cached_trunk": {**OFF, **CACHED},
              "cached_compiled": {**FAST, "compile_step": "yes", **CACHED},
              # Evaluation on the model as the trainer lays it out, from images: the whole model's forward pass.
              "eval": {"compile_step": "no", "cache_frozen_features": "no", "cache_eval_features": "no"},
              # From the test images' cached frozen-stage features, as the trainer evaluates by default on a GPU.
              "eval_cached": {"compile_step": "no", "cache_frozen_features": "no", "cache_eval_features": "yes"},
              "host": FAST}


@dataclass
class Result:
    variant: str
    images_per_s: float
    compile_s: float = 0.0
    # The feature cache's first build and a second one (cache_build: then two with cuDNN's autotuning).
    cache_builds_s: tuple[float, ...] | None = None


def synthetic_images(num_images: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 32, 32, 3) images and labels in 0..99, CIFAR-100's shape and dtype."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (num_images, 32, 32, 3), dtype=torch.uint8, generator=g),
            torch.randint(0, 100, (num_images,), generator=g))


class _PilDataset(Dataset):
    """The straight port's input pipeline: per image, PIL resize and normalisation on the CPU."""

    def __init__(self, images, labels, image_size: int):
        from torchvision import transforms

        self.images, self.labels = images, labels
        self.transform = transforms.Compose([
            transforms.ToPILImage(), transforms.Resize((image_size, image_size)), transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i].permute(2, 0, 1)), self.labels[i]



class StandIn(torch.nn.Module):
    """The host variant's model: a linear layer on each image's first 16 pixels. Its compute is negligible, so a
    step's time is the host's work around it: the loader, the loss and step figures, backward and Adam's calls."""

    def __init__(self, num_classes: int = 100):
        super().__init__()
        self.fc = torch.nn.Linear(48, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(images.reshape(images.shape[0], -1)[:, :48].float())


def _slowest(seconds: float, device) -> float:
    """The largest of every process's ``seconds``: a step ends when the slowest process ends it."""
    if not dist.is_initialized():
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def bench_straight_port(images, labels, args, device) -> Result:
    """The plain PyTorch port, deliberately naive: its own model, Adam and loop, PIL resize in the workers."""
    torch.backends.cudnn.benchmark = False  # torch's default, whichever variant ran before
    model = ResNet50Classifier(ModelConfig(weights="none"), args.image_size).to(device).train()
    model.preprocess = torch.nn.Identity()  # the port resizes and normalises on the CPU instead
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, eps=1e-7)
    loader = DataLoader(_PilDataset(images, labels, args.image_size), batch_size=args.batch_size, shuffle=True,
                        num_workers=args.workers, drop_last=True, pin_memory=device.type == "cuda")
    it = iter(loader)

    def steps(count: int) -> None:
        for _ in range(count):
            x, y = next(it)
            F.cross_entropy(model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return Result("straight_port", args.batch_size / _timed(steps, args, device))


def _build(splits, args, mixed_precision: str, speed: SpeedConfig, **kw) -> trainer_parts.Parts:
    return trainer_parts.build(splits, args.image_size, speed=speed, mixed_precision=mixed_precision,
                               global_batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, **kw)


def _variant_parts(variant: str, splits, args, mixed_precision: str) -> trainer_parts.Parts:
    """The trainer's pieces under ``variant``'s speed options (the host variant's with the stand-in model)."""
    return _build(splits, args, mixed_precision, SpeedConfig(**STEP_SPEED[variant]),
                  model=StandIn() if variant == "host" else None)


def _timed(steps, args, device) -> float:
    """Seconds per step of ``steps(args.steps)`` after an untimed ``steps(args.warmup)``; the slowest process's.
    For the trainer's parts each call of ``trainer_parts.train`` starts the epoch's order again."""
    if args.warmup:
        steps(args.warmup)
    sync_device(device)
    start = time.perf_counter()
    steps(args.steps)
    sync_device(device)
    return _slowest((time.perf_counter() - start) / args.steps, device)


def bench_trainer_step(variant: str, splits, args, mixed_precision: str) -> Result:
    """The trainer's step as ``variant``'s speed options build it (the graphed ones: its pieces with the whole
    step as one CUDA graph, 'compile s' being their warm-up and capture); for the cached variants, images/s of a
    whole pass: the trainer's feature cache (trunk once per image, at the eval batch), then layer4 + head steps."""
    parts = _variant_parts(variant, splits, args, mixed_precision)
    if variant in GRAPHED and parts.fast.graph_record_s is None:  # turned off: several processes, fp16
        raise UserError(f"{variant}: the step could not run as one graph ({'; '.join(parts.fast.notes)})")
    if variant in GRAPHED:
        compile_s = parts.fast.graph_record_s
    elif STEP_SPEED[variant]["compile_step"] == "yes" and parts.fast.compiled is None:
        raise UserError(f"{variant}: the step could not be compiled ({'; '.join(parts.fast.notes)})")
    else:
        compile_s = parts.fast.compiled.warmup_s if parts.fast.compiled else 0.0
    steps = partial(trainer_parts.train, parts)
    device = parts.accelerator.device
    per_image, builds = _timed(steps, args, device) / args.batch_size, None
    if parts.feature_cache_s:  # the cache covers both splits
        # A second build is timed: the first pays one-off costs (first calls) that the benchmark's thousand images
        # cannot spread as a run's 60,000 do. Timed from the first build, cached_graphed came out at 899 images/s
        # on an H100, where the trainer's epochs of the same step ran at 18,444 and its cache was built at 9,500.
        builds = (parts.feature_cache_s, _cache_build_seconds(parts, splits, args))
        per_image += builds[1] / (len(splits.train) + len(splits.test))
    return Result(variant, 1.0 / per_image, compile_s, builds)


def _cache_build_seconds(parts: trainer_parts.Parts, splits, args, autotune: bool = False) -> float:
    """Seconds one build of the feature cache of ``splits`` takes on ``parts``' model (the slowest process's)."""
    device = parts.accelerator.device
    sync_device(device)
    start = time.perf_counter()
    build_feature_cache(parts.accelerator.unwrap_model(parts.model), splits, parts.accelerator,
                        args.eval_batch_size, "auto", layout=cache_layout(parts.fast), autotune=autotune)
    sync_device(device)
    return _slowest(time.perf_counter() - start, device)


def bench_cache_build(splits, args, mixed_precision: str) -> Result:
    """The feature cache of ``splits`` built four times on the model as channels_last lays it out: twice as the
    trainer builds it, without cuDNN's autotuning, then twice with it. What a first build takes beyond a second
    is one-off (first calls; with autotuning, its timing of each shape); the trainer builds once per run, so
    autotuning would pay only if its one-off cost were less than what it saves per image times 60,000 images."""
    parts = _build(splits, args, mixed_precision, SpeedConfig(**STEP_SPEED["channels_last"]))
    autotuned = (True, True) if parts.accelerator.device.type == "cuda" else ()  # no cuDNN elsewhere
    builds = tuple(_cache_build_seconds(parts, splits, args, autotune) for autotune in (False, False, *autotuned))
    return Result("cache_build", (len(splits.train) + len(splits.test)) / builds[1], 0.0, builds)


def bench_eval(variant: str, splits, args, mixed_precision: str) -> Result:
    """The trainer's evaluate (loss, top-1/5, per-class counts, gather_for_metrics) over ``args.steps`` batches:
    of images, or for eval_cached of the test images' cached frozen-stage features (the cache, built once per
    run, left out)."""
    parts = _build(splits, args, mixed_precision, SpeedConfig(**STEP_SPEED[variant]))
    device = parts.accelerator.device
    assert parts.eval_input_name == ("features" if variant == "eval_cached" else "images")

    def evaluate_over(loader):
        evaluate(parts.model, loader, parts.accelerator, parts.class_names, parts.eval_input_name)

    if args.warmup:
        evaluate_over(itertools.islice(parts.eval_loader, args.warmup))
    sync_device(device)
    start = time.perf_counter()
    evaluate_over(parts.eval_loader)
    return Result(variant, len(splits.test) / _slowest(time.perf_counter() - start, device))


def bench_ddp(splits, args, mixed_precision: str) -> list[Result]:
    """The trainer's multi-process step under torchrun: global batch ``args.batch_size`` over the processes.

    ddp_cifar_dist: the trainer's parts as they are (SyncBatchNorm, DDP with --ddp-bucket-mb, gradients as
    bucket views, bf16 all-reduce when training in bf16); ddp_torch_defaults: the same with DDP's defaults (25 MB
    buckets, fp32 all-reduce); no_communication: the same step with neither DDP nor SyncBatchNorm, each process
    alone on its share. All three eager (the trainer's 'auto' with several processes). Images/s are global; the
    communication share is 1 - no_communication / ddp step time. With one process the trainer never wraps the
    model, so the three are the same step.
    """
    speed = SpeedConfig(compile_step="no", cache_frozen_features="no",
                        ddp_bucket_mb=args.ddp_bucket_mb or SpeedConfig().ddp_bucket_mb)
    results = []
    for name, ddp in (("no_communication", "none"), ("ddp_torch_defaults", "torch_defaults"),
                      ("ddp_cifar_dist", "cifar_dist")):
        parts = _build(splits, args, mixed_precision, speed, ddp=ddp)
        parts.accelerator.wait_for_everyone()
        seconds = _timed(partial(trainer_parts.train, parts), args, parts.accelerator.device)
        results.append(Result(f"{name} (x{parts.accelerator.num_processes})", args.batch_size / seconds))
    return results


def compute_floor(image_size: int, device, bf16: bool) -> dict:
    """FLOPs of the recipe's workload (counted on the model) and the time they take at this device's rate.

    The rate is a large matmul's, which convolutions never beat, so the floor is a lower bound; with the cache
    the trunk runs once per image instead of once per image per epoch.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = ResNet50Classifier(ModelConfig(weights="none"), image_size).train()
    images, labels = synthetic_images(2)  # two: training BatchNorm needs more than one value per channel
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        features = model.trunk(images)
    trunk = counter.get_total_flops() / 2
    with counter:
        F.cross_entropy(model(features=features), labels).backward()
    head_train = counter.get_total_flops() / 2
    with counter, torch.no_grad():
        model(features=features)
    head_eval = counter.get_total_flops() / 2
    plain = EPOCHS * (TRAIN_IMAGES * (trunk + head_train) + EVAL_IMAGES * (trunk + head_eval))
    # The default on a GPU: the test images' trunk once (--cache-eval-features auto), the training images' each epoch.
    eval_cached = EVAL_IMAGES * trunk + EPOCHS * (TRAIN_IMAGES * (trunk + head_train) + EVAL_IMAGES * head_eval)
    cached = (TRAIN_IMAGES + EVAL_IMAGES) * trunk + EPOCHS * (TRAIN_IMAGES * head_train + EVAL_IMAGES * head_eval)
    rate = matmul_rate(device, bf16)
    return {"trunk_gflop_per_image": round(trunk / 1e9, 3), "train_step_gflop_per_image":
            round((trunk + head_train) / 1e9, 3), "workload_pflop": round(plain / 1e15, 2),
            "workload_eval_cached_pflop": round(eval_cached / 1e15, 2),
            "workload_cached_pflop": round(cached / 1e15, 2), "matmul_tflop_per_s": round(rate / 1e12, 3),
            "floor_s": round(plain / rate, 1), "floor_eval_cached_s": round(eval_cached / rate, 1),
            "floor_cached_s": round(cached / rate, 1)}


def matmul_rate(device, bf16: bool) -> float:
    """FLOP/s of a large square matmul in the run's precision on ``device``, best of a few."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(5):
        sync_device(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync_device(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best


def checkpoint_cost(args, mixed_precision: str, saves: int = 3) -> dict:
    """Seconds of the trainer's own save_checkpoint (model, Adam state, RNG states, trainer_state.json, written
    atomically) of the trainer's parts after one step, so that Adam's moments exist; the median of ``saves``:
    written in the foreground (``seconds``, --no-async-checkpoints), and what training pauses for when a
    background writer writes it (``background_pause_s``, the default: the copy to host memory and the small
    files), with the write's whole time (``background_total_s``) and the rate that host work keeps meanwhile
    (``background_host_rate``, a share of its rate without the write; see _host_work_rate)."""
    parts = trainer_parts.build(trainer_parts.synthetic_splits(2, 1), args.image_size, global_batch_size=2,
                                speed=SpeedConfig(compile_step="no", cache_frozen_features="no"),
                                mixed_precision=mixed_precision)
    trainer_parts.train(parts, 1)  # batch 2: training BatchNorm needs more than one value per channel
    figures = {"seconds": [], "background_pause_s": [], "background_total_s": [], "background_host_rate": []}
    writer, end = BackgroundWriter(), time.perf_counter() + 0.3
    alone = _host_work_rate(lambda: time.perf_counter() > end)
    with tempfile.TemporaryDirectory(prefix="cifar-dist-bench-checkpoint-", dir=args.checkpoint_dir) as tmp:
        for step in range(1, 2 * saves + 1):
            background = step > saves
            sync_device(parts.accelerator.device)
            start = time.perf_counter()
            path = save_checkpoint(parts.accelerator, Path(tmp), {"step": step}, keep=2,
                                   writer=writer if background else None)
            paused = time.perf_counter() - start
            if background:
                figures["background_host_rate"].append(_host_work_rate(lambda: not writer.writing) / alone)
            writer.wait()
            total = time.perf_counter() - start
            figures["background_pause_s" if background else "seconds"].append(paused)
            if background:
                figures["background_total_s"].append(total)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {**{k: round(sorted(v)[len(v) // 2], 3) for k, v in figures.items()}, "megabytes": round(size / 1e6, 1),
            "directory": args.checkpoint_dir or tempfile.gettempdir()}


def _host_work_rate(done: Callable[[], bool]) -> float:
    """Rounds per second of a loop of small tensor operations, run until ``done()`` (one round at least): a
    training step's host work in miniature, each operation going through Python and torch's dispatcher, which
    need the GIL. Beside a background checkpoint it runs slower where the write holds the GIL (or, on a machine
    of few cores, takes the core)."""
    x, rounds, start = torch.zeros(64), 0, time.perf_counter()
    while True:
        for _ in range(50):
            x = x * 0.5 + 1.0
        rounds += 1
        if done():
            return rounds / (time.perf_counter() - start)


def end_to_end_runs(args) -> list[dict]:
    """Each of --e2e-runs over one copy of synthetic data of CIFAR-100's size and format, generated once (11 s
    each time on the H200 machine of docs/gpu-checks/2026-11-26-h200.md)."""
    with tempfile.TemporaryDirectory(prefix="cifar-dist-e2e-") as tmp:
        data = Path(tmp) / "data"
        # Saved as a datasets folder, so the timed run loads it the way it loads CIFAR-100 from the hub cache,
        # instead of also timing the generation of 180 MB of random images.
        subprocess.run([sys.executable, "-c", "import sys; from cifar_dist.config import DataConfig; from "
                        "cifar_dist.data import load_cifar100; load_cifar100(DataConfig(data_source='synthetic', "
                        "synthetic_train_samples=int(sys.argv[1]), synthetic_eval_samples=int(sys.argv[2])))"
                        ".save_to_disk(sys.argv[3])", str(args.e2e_train_samples), str(args.e2e_eval_samples),
                        str(data)], env={**os.environ, "HF_DATASETS_CACHE": str(Path(tmp) / "hf")}, check=True,
                       capture_output=True)
        return [end_to_end(args, run, data) for run in args.e2e_runs]


def end_to_end(args, run: str, data: Path) -> dict:
    """Wall time of the real trainer on ``data``, launch to final report, with ``run``'s flags (E2E_RUNS) and
    --e2e-args."""
    with tempfile.TemporaryDirectory(prefix="cifar-dist-e2e-run-") as tmp:
        out = Path(tmp) / "run"
        env = {**os.environ, "HF_DATASETS_CACHE": str(Path(tmp) / "hf"), "TQDM_DISABLE": "1"}
        cmd = [sys.executable, "-m", "cifar_dist.train", "--data-source", str(data), "--weights", "none",
               "--image-size", str(args.image_size), "--num-epochs", str(args.e2e_epochs), "--tracker", "none",
               "--output-dir", str(out), *E2E_RUNS[run], *args.e2e_args]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"cifar_dist.bench: the end-to-end run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = records[1:] or records  # the first epoch also pays for compilation
    steady_train_s = sum(r["train_time_s"] for r in steady) / len(steady)
    from_launch_s, times = trainer_times(proc.stdout)
    return {"variant": "end_to_end" + ("" if run == "default" else f"_{run}"), "wall_s": round(wall, 1),
            "epochs": len(records), "final_val_acc": records[-1]["val_acc"],
            "val_acc_per_epoch": [round(r["val_acc"], 4) for r in records],
            "train_images_per_s": round(sum(r["train_images_per_s"] for r in steady) / len(steady), 1),
            # Where the wall time went: training, evaluation, the first epoch's extra (compilation, cache
            # building is outside epochs), and everything outside the epochs (start-up, checkpoints, report).
            "train_s": round(sum(r["train_time_s"] for r in records), 1),
            "eval_s": round(sum(r["eval_time_s"] for r in records), 1),
            "first_epoch_extra_s": round(records[0]["train_time_s"] - steady_train_s, 1),
            "outside_epochs_s": round(wall - sum(r["epoch_time_s"] for r in records), 1),
            "startup_s": records[0]["startup_s"],  # the trainer's own split of its start-up
            # ... and of its whole time; what follows its last line (its exit) is the rest of the wall time.
            "time_s": times, "exit_s": round(wall - from_launch_s, 1)}


def trainer_times(stdout: str) -> tuple[float, dict[str, float]]:
    """The trainer's closing line, "time: T s from launch (start-up 21.2, training 27.1, ...)": T and its parts."""
    line = next(line for line in reversed(stdout.splitlines()) if line.startswith("time: "))
    total, parts = line.removeprefix("time: ").removesuffix(")").split(" s from launch (")
    return float(total), {name: float(seconds) for name, seconds in (p.rsplit(" ", 1) for p in parts.split(", "))}


def run(args) -> dict:
    state = PartialState(cpu=not torch.cuda.is_available())  # under torchrun: joins the process group
    device, main_process, world_size = state.device, state.is_main_process, state.num_processes
    mixed_precision = resolve_mixed_precision("auto")
    variants = args.variants or [v for v in VARIANTS if (device.type == "cuda" or v not in GPU_ONLY)
                                 and v not in ONLY_WHEN_NAMED]
    num_train = args.batch_size * (args.warmup + args.steps)
    # Only the eval variants read more than one eval batch (the feature cache reads one).
    num_eval = args.eval_batch_size * (args.steps if set(EVALS) & set(variants) else 1)
    splits = trainer_parts.synthetic_splits(num_train, num_eval)
    # The training variants' test split is one eval batch: only the feature cache reads it.
    train_splits = dataclasses.replace(splits, test=ImageTensorDataset(
        splits.test.images[:args.eval_batch_size], splits.test.labels[:args.eval_batch_size]))
    results = []
    for variant in variants:
        if variant == "straight_port":
            torch.manual_seed(0)
            found = [bench_straight_port(*synthetic_images(num_train), args, device)]
        elif variant in EVALS:
            found = [bench_eval(variant, splits, args, mixed_precision)]
        elif variant == "cache_build":
            found = [bench_cache_build(train_splits, args, mixed_precision)]
        elif variant == "ddp":
            found = bench_ddp(train_splits, args, mixed_precision)
        else:
            found = [bench_trainer_step(variant, train_splits, args, mixed_precision)]
        for result in found if main_process else []:
            print(f"  {result.variant}: {result.images_per_s:,.0f} img/s", file=sys.stderr)
        results += found
    base = next((r.images_per_s for r in results if r.variant == "straight_port"), None)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "precision": {"no": "fp32"}.get(mixed_precision, mixed_precision),
        "image_size": args.image_size, "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
        "steps": args.steps, "world_size": world_size,
        "results": [{"variant": r.variant, "images_per_s": round(r.images_per_s, 1),
                     "vs_straight_port": round(r.images_per_s / base, 2) if base else None,
                     "compile_s": round(r.compile_s, 1),
                     **({"cache_builds_s": [round(t, 3) for t in r.cache_builds_s]} if r.cache_builds_s else {})}
                    for r in results],
        "cached_images": len(train_splits.train) + len(train_splits.test),
    }
    by_name = {r.variant.split(" ")[0]: r.images_per_s for r in results}
    if "ddp_cifar_dist" in by_name and report["world_size"] > 1:
        report["communication_share"] = round(1 - by_name["ddp_cifar_dist"] / by_name["no_communication"], 3)
    if args.floor and main_process:
        report["compute_floor"] = compute_floor(args.image_size, device, mixed_precision == "bf16")
    if args.checkpoint and world_size == 1:  # save_state with one process; under torchrun, skipped
        report["checkpoint"] = checkpoint_cost(args, mixed_precision)
    if args.profile and world_size == 1:
        parts = _variant_parts(args.profile, train_splits, args, mixed_precision)
        steps = partial(trainer_parts.train, parts)
        report["profile"] = {"variant": args.profile, **profile_steps(parts.accelerator.device, steps, args.steps,
                                                                      args.warmup, trace=args.profile_trace)}
    if args.end_to_end and main_process:
        report["end_to_end"] = end_to_end_runs(args)
    if dist.is_initialized():
        dist.destroy_process_group()
    return report if main_process else {}


def format_table(report: dict) -> str:
    lines = [f"device: {report['device']}, torch {report['torch']}, {report['precision']}, "
             f"{report['image_size']} px, batch {report['batch_size']} (eval {report['eval_batch_size']})",
             "| variant | images/s | x straight port | compile s |", "| --- | ---: | ---: | ---: |"]
    for r in report["results"]:
        ratio = f"{r['vs_straight_port']:.2f}" if r["vs_straight_port"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['images_per_s']:,.0f} | {ratio} | {r['compile_s'] or '-'} |")
    for r in report["results"]:
        builds = r.get("cache_builds_s")
        if builds:  # the first build's extra is one-off: first calls (and with autotuning, its timing of each shape)
            autotuned = (f"; with cuDNN's autotuning in {builds[2]} s, again in {builds[3]} s" if len(builds) == 4
                         else "")
            lines.append(f"{r['variant']}: the feature cache of {report['cached_images']:,} images built in "
                         f"{builds[0]} s, again in {builds[1]} s{autotuned} (the images/s above count the second)")
    if "communication_share" in report:
        lines.append(f"communication share of a step with {report['world_size']} processes: "
                     f"{100 * report['communication_share']:.0f}%")
    floor = report.get("compute_floor")
    if floor:
        lines.append(f"compute floor of {EPOCHS} epochs x ({TRAIN_IMAGES:,} + {EVAL_IMAGES:,}) images: "
                     f"{floor['workload_pflop']} PFLOP / {floor['matmul_tflop_per_s']} TFLOP/s (measured matmul) = "
                     f"{floor['floor_s']} s; evaluating from cached features (the default on a GPU) "
                     f"{floor['workload_eval_cached_pflop']} PFLOP = {floor['floor_eval_cached_s']} s; with the "
                     f"feature cache {floor['workload_cached_pflop']} PFLOP = {floor['floor_cached_s']} s")
    checkpoint = report.get("checkpoint")
    if checkpoint:
        lines.append(f"checkpoint (the trainer's save_checkpoint: model + Adam state, {checkpoint['megabytes']:,} MB): "
                     f"{checkpoint['seconds']} s per save into {checkpoint['directory']}; written in the background "
                     f"(--async-checkpoints, the default) training pauses {checkpoint['background_pause_s']} s of "
                     f"{checkpoint['background_total_s']} s, and host work beside the write keeps "
                     f"{checkpoint['background_host_rate']:.0%} of its rate")
    if "profile" in report:
        lines.append(format_profile(report["profile"]["variant"], report["profile"]))
    for e2e in report.get("end_to_end", []):
        lines.append(f"{e2e['variant']}: {e2e['wall_s']} s launch to report ({e2e['train_s']} s training, of "
                     f"which {e2e['first_epoch_extra_s']} s first-epoch extra; {e2e['eval_s']} s evaluation; "
                     f"{e2e['outside_epochs_s']} s outside the epochs: start-up {e2e['startup_s']['total']} s, "
                     f"then checkpoints and report), {e2e['epochs']} epochs, "
                     f"{e2e['train_images_per_s']:,.0f} train img/s (epochs after the first), "
                     f"final val acc {e2e['final_val_acc']:.3f} (per epoch: "
                     f"{' '.join(f'{acc:.3f}' for acc in e2e['val_acc_per_epoch'])})\n  start-up: "
                     + ", ".join(f"{k} {v}" for k, v in e2e["startup_s"].items() if k != "total") + " s\n  all of it: "
                     + ", ".join(f"{k} {v}" for k, v in e2e["time_s"].items()) + f", exit {e2e['exit_s']} s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar_dist.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224, help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch (default: %(default)s, the "
                        "recipe's global batch)")
    parser.add_argument("--eval-batch-size", type=int, default=256, help="default: %(default)s")
    parser.add_argument("--steps", type=int, default=50, help="timed batches per variant (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches first, after the trainer's compile "
                        "warm-up in the compiled variants (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of the straight port (default: "
                        "%(default)s)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        help="default: all that run on this device, except the graphed experiments and ddp (run "
                             "that one under torchrun)")
    parser.add_argument("--ddp-bucket-mb", type=int, help="bucket size of the ddp_cifar_dist variant (default: the "
                        "trainer's --ddp-bucket-mb default)")
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                        help="count the workload's FLOPs and measure this device's matmul rate")
    parser.add_argument("--checkpoint", action=argparse.BooleanOptionalAction, default=True,
                        help="time the trainer's save_checkpoint of the model and Adam state (one process only)")
    parser.add_argument("--checkpoint-dir", help="where to time it (default: the temp dir; give the filesystem "
                        "your --output-dir is on)")
    parser.add_argument("--profile", choices=[v for v in STEP_SPEED if v not in EVALS],
                        help="also profile --steps steady steps of this variant: host vs device time per step and "
                             "the costliest host operations (one process)")
    parser.add_argument("--profile-trace", help="write the profile's Chrome trace to this file")
    parser.add_argument("--end-to-end", action="store_true",
                        help="also time `python -m cifar_dist.train` for the whole workload, once per --e2e-runs")
    parser.add_argument("--e2e-runs", nargs="+", choices=E2E_RUNS, default=["default", "images"],
                        help="the trainer's flags of each end-to-end run: " + "; ".join(
                            f"{name}: {' '.join(flags) or 'none'}" for name, flags in E2E_RUNS.items()))
    parser.add_argument("--e2e-epochs", type=int, default=EPOCHS)
    parser.add_argument("--e2e-train-samples", type=int, default=TRAIN_IMAGES)
    parser.add_argument("--e2e-eval-samples", type=int, default=EVAL_IMAGES)
    parser.add_argument("--e2e-args", nargs=argparse.REMAINDER, default=[],
                        help="further flags for the end-to-end trainer runs (give last)")
    parser.add_argument("--json", help="also write the report to this file")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One line for a bad value, before any timing."""
    for name in ("image_size", "batch_size", "eval_batch_size", "steps", "e2e_epochs", "e2e_train_samples",
                 "e2e_eval_samples"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    # Folders the report goes to are checked now, not after the minutes of timing that come first.
    if args.checkpoint and args.checkpoint_dir and not os.path.isdir(args.checkpoint_dir):
        parser.error(f"--checkpoint-dir {args.checkpoint_dir}: no such folder")
    for flag, path in (("--json", args.json), ("--profile-trace", args.profile_trace)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"{flag} {path}: no such folder {os.path.dirname(os.path.abspath(path))}")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        report = run(args)
    except UserError as exc:
        parser.exit(2, f"cifar_dist.bench: error: {exc}\n")
    if not report:
        return  # not the main process
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

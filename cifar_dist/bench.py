"""Training and eval throughput of the recipe's step, side by side, on synthetic CIFAR-shaped data.

    python -m cifar_dist.bench                       # on the current device, 224 px, batch 32
    python -m cifar_dist.bench --json bench.json     # also write the table as JSON
    python -m cifar_dist.bench --end-to-end          # + the real trainer, 10 epochs of 50,000 + 10,000 images
    torchrun --nproc_per_node 2 -m cifar_dist.bench --variants ddp    # communication cost per world size
    python -m cifar_dist.bench --image-size 32 --steps 3 --warmup 1    # a quick look on a CPU

Variants (each in this one process, on the same card, warm-up excluded from timings):
  straight_port   the plain PyTorch port: PIL resize to the image size in DataLoader workers, float32, eager
  eager           cifar_dist's step: uint8 batches on the device, resize + normalise in the model, autocast
  channels_last   eager + channels_last memory format + fused Adam
  compiled        channels_last + torch.compile(mode="reduce-overhead") (CUDA graphs); GPU only by default
  cached_trunk    the frozen trunk (conv1..layer3) run once over the data at the eval batch size, then
                  layer4 + head trained from its output (what --cache-frozen-features does)
  cached_compiled cached_trunk with the layer4 + head step compiled (reduce-overhead); GPU only by default
  eval            forward only at the eval batch size
  ddp             under torchrun with N processes (global batch kept at --batch-size): the trainer's
                  multi-process step (DDP + SyncBatchNorm) with torch's default DDP settings and with
                  cifar_dist's, against the same step with no communication; reports the communication share
Reported: images/s, the ratio to straight_port, and compile time separately; the compute floor of the whole
workload (FLOPs counted on the model, divided by a matmul rate measured on this device); what one checkpoint
costs (the trainer's save_checkpoint of the model and Adam state, timed in --checkpoint-dir); with --end-to-end the
wall time of `python -m cifar_dist.train` from launch to its final report, with and without the feature cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from cifar_dist.config import ModelConfig
from cifar_dist.model import IMAGENET_MEAN, IMAGENET_STD, ResNet50Classifier

VARIANTS = ("straight_port", "eager", "channels_last", "compiled", "cached_trunk", "cached_compiled", "eval", "ddp")
GPU_ONLY = ("compiled", "cached_compiled")  # CUDA graphs; on a CPU only when named
# The workload the targets are about: the recipe's 10 epochs over CIFAR-100's 50,000 + 10,000 images.
EPOCHS, TRAIN_IMAGES, EVAL_IMAGES = 10, 50_000, 10_000


@dataclass
class Result:
    variant: str
    images_per_s: float
    compile_s: float = 0.0


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


def _model(image_size: int, device, channels_last: bool = False) -> ResNet50Classifier:
    model = ResNet50Classifier(ModelConfig(weights="none"), image_size).to(device).train()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _optimizer(model, fused: bool = False):
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, eps=1e-7,
                            fused=fused or None)


def _timed(step, batches, warmup: int, device) -> tuple[float, float]:
    """(seconds per batch after warm-up, seconds spent in warm-up) for ``step`` over ``batches``."""
    start = time.perf_counter()
    for batch in batches[:warmup]:
        step(*batch)
    _sync(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(*batch)
    _sync(device)
    return (time.perf_counter() - start) / max(len(batches) - warmup, 1), warm


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_straight_port(images, labels, args, device) -> Result:
    model = _model(args.image_size, device)
    model.preprocess = torch.nn.Identity()  # the port resizes and normalises on the CPU instead
    opt = _optimizer(model)
    loader = DataLoader(_PilDataset(images, labels, args.image_size), batch_size=args.batch_size, shuffle=True,
                        num_workers=args.workers, drop_last=True, pin_memory=device.type == "cuda")
    batches_needed = args.warmup + args.steps
    it = iter(loader)

    def step():
        x, y = next(it)
        loss = F.cross_entropy(model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, _ = _timed(lambda: step(), [()] * batches_needed, args.warmup, device)
    return Result("straight_port", args.batch_size / seconds)


def _train_step(model, opt, autocast):
    def step(x, y):
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_device_step(variant: str, images, labels, args, device, autocast) -> Result:
    channels_last = variant in ("channels_last", "compiled")
    model = _model(args.image_size, device, channels_last)
    opt = _optimizer(model, fused=channels_last)
    forward = model
    compile_s = 0.0
    if variant == "compiled":
        forward = torch.compile(model, mode="reduce-overhead")
    batches = _device_batches(images, labels, args.batch_size, args.warmup + args.steps, device)
    step = _train_step(forward, opt, autocast)
    seconds, warm = _timed(step, batches, args.warmup, device)
    if variant == "compiled":
        compile_s = warm
    return Result(variant, args.batch_size / seconds, compile_s)


def bench_cached_trunk(images, labels, args, device, autocast, compiled: bool = False) -> Result:
    """Trunk once over every image at the eval batch, then layer4 + head steps from the cached output."""
    model = _model(args.image_size, device, channels_last=compiled)
    opt = _optimizer(model, fused=compiled)
    num = args.batch_size * (args.warmup + args.steps)
    x_all, y_all = images[:num].to(device), labels[:num].to(device)
    start = time.perf_counter()
    with torch.no_grad(), autocast():
        feats = torch.cat([model.trunk(x_all[i:i + args.eval_batch_size]) for i in range(0, num, args.eval_batch_size)])
    _sync(device)
    trunk_s = time.perf_counter() - start
    forward = torch.compile(model, mode="reduce-overhead") if compiled else model

    def step(f, y):
        with autocast():
            loss = F.cross_entropy(forward(features=f), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    batches = [(feats[i:i + args.batch_size], y_all[i:i + args.batch_size]) for i in range(0, num, args.batch_size)]
    seconds, warm = _timed(step, batches, args.warmup, device)
    # One pass over the data costs the trunk once plus the head steps; report images/s of that whole pass.
    per_image = trunk_s / num + seconds / args.batch_size
    return Result("cached_compiled" if compiled else "cached_trunk", 1.0 / per_image, warm if compiled else 0.0)


def bench_eval(images, labels, args, device, autocast) -> Result:
    model = _model(args.image_size, device).eval()
    batches = _device_batches(images, labels, args.eval_batch_size, args.warmup + args.steps, device)

    def step(x, y):
        with torch.no_grad(), autocast():
            model(x)

    seconds, _ = _timed(step, batches, args.warmup, device)
    return Result("eval", args.eval_batch_size / seconds)


def _device_batches(images, labels, batch_size, count, device):
    n = len(images) // batch_size
    return [(images[(i % n) * batch_size:(i % n + 1) * batch_size].to(device),
             labels[(i % n) * batch_size:(i % n + 1) * batch_size].to(device)) for i in range(count)]


def bench_ddp(images, labels, args, device, autocast) -> list[Result]:
    """The trainer's multi-process step under torchrun: global batch ``args.batch_size`` over the processes.

    ddp_torch_defaults: DDP with torch's settings (25 MB buckets, fp32 all-reduce); ddp_cifar_dist: the
    trainer's settings (--ddp-bucket-mb, gradients as bucket views, bf16 all-reduce when training in bf16);
    no_communication: the same step with neither gradient all-reduce nor SyncBatchNorm, each process alone.
    Images/s are global (all processes); the communication share is 1 - no_communication / ddp step time.
    """
    import torch.distributed as dist
    from accelerate.utils import DDPCommunicationHookType
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from cifar_dist.config import SpeedConfig
    from cifar_dist.model import convert_sync_batchnorm
    from cifar_dist.speed import ddp_kwargs, resolve_fast_path

    world, rank = dist.get_world_size(), dist.get_rank()
    if args.batch_size % world:
        raise SystemExit(f"cifar_dist.bench: error: --batch-size {args.batch_size} cannot be split over {world} "
                         f"processes")
    per_process = args.batch_size // world
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    speed = SpeedConfig(ddp_bucket_mb=args.ddp_bucket_mb or SpeedConfig().ddp_bucket_mb)
    fast = resolve_fast_path(speed, device, "bf16" if bf16 else "no", world)
    ours = ddp_kwargs(speed, fast)
    device_ids = [device.index or 0] if device.type == "cuda" else None
    results = []
    for name in ("no_communication", "ddp_torch_defaults", "ddp_cifar_dist"):
        torch.manual_seed(0)
        model = _model(args.image_size, device)
        if name != "no_communication":
            model = convert_sync_batchnorm(model) if world > 1 else model
            settings = {"bucket_cap_mb": ours.bucket_cap_mb, "gradient_as_bucket_view": ours.gradient_as_bucket_view}
            model = DistributedDataParallel(model, device_ids=device_ids,
                                            **(settings if name == "ddp_cifar_dist" else {}))
            if name == "ddp_cifar_dist" and ours.comm_hook == DDPCommunicationHookType.BF16:
                model.register_comm_hook(None, default_hooks.bf16_compress_hook)
        opt = _optimizer(model)
        shard = images[rank::world], labels[rank::world]
        batches = _device_batches(*shard, per_process, args.warmup + args.steps, device)
        dist.barrier()
        seconds, _ = _timed(_train_step(model, opt, autocast), batches, args.warmup, device)
        seconds = max(_all(seconds, dist))  # the step ends when the slowest process ends it
        results.append(Result(f"{name} (x{world})", args.batch_size / seconds))
    return results


def _all(value: float, dist) -> list[float]:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def compute_floor(image_size: int, device, bf16: bool) -> dict:
    """FLOPs of the recipe's workload (counted on the model) and the time they take at this device's rate.

    The rate is a large matmul's, which convolutions never beat, so the floor is a lower bound; with the cache
    the trunk runs once per image instead of once per image per epoch.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(image_size, torch.device("cpu"))
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
    cached = (TRAIN_IMAGES + EVAL_IMAGES) * trunk + EPOCHS * (TRAIN_IMAGES * head_train + EVAL_IMAGES * head_eval)
    rate = matmul_rate(device, bf16)
    return {"trunk_gflop_per_image": round(trunk / 1e9, 3), "train_step_gflop_per_image":
            round((trunk + head_train) / 1e9, 3), "workload_pflop": round(plain / 1e15, 2),
            "workload_cached_pflop": round(cached / 1e15, 2), "matmul_tflop_per_s": round(rate / 1e12, 1),
            "floor_s": round(plain / rate, 1), "floor_cached_s": round(cached / rate, 1)}


def matmul_rate(device, bf16: bool) -> float:
    """FLOP/s of a large square matmul in the run's precision on ``device``, best of a few."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best


def checkpoint_cost(image_size: int, device, directory: str | None, saves: int = 3) -> dict:
    """Seconds of the trainer's own save_checkpoint (model, Adam state, RNG states, trainer_state.json, written
    atomically) for the recipe's model after one step, so that Adam's moments exist; the median of ``saves``."""
    from accelerate import Accelerator

    from cifar_dist.checkpoint import save_checkpoint

    accelerator = Accelerator(cpu=device.type == "cpu")
    cuda = device.type == "cuda"
    model = _model(image_size, device, channels_last=cuda)
    optimizer = _optimizer(model, fused=cuda)
    model, optimizer = accelerator.prepare(model, optimizer)
    images, labels = synthetic_images(2)
    F.cross_entropy(model(images.to(device)), labels.to(device)).backward()
    optimizer.step()
    seconds = []
    with tempfile.TemporaryDirectory(prefix="cifar-dist-bench-checkpoint-", dir=directory) as tmp:
        for step in range(1, saves + 1):
            _sync(device)
            start = time.perf_counter()
            path = save_checkpoint(accelerator, Path(tmp), {"step": step}, keep=2)
            seconds.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"seconds": round(sorted(seconds)[len(seconds) // 2], 3), "megabytes": round(size / 1e6, 1),
            "directory": directory or tempfile.gettempdir()}


def end_to_end(args, cache: bool) -> dict:
    """Wall time of the real trainer, launch to final report, on synthetic data of CIFAR-100's size and format."""
    with tempfile.TemporaryDirectory(prefix="cifar-dist-e2e-") as tmp:
        out, data = Path(tmp) / "run", Path(tmp) / "data"
        env = {**os.environ, "HF_DATASETS_CACHE": str(Path(tmp) / "hf"), "TQDM_DISABLE": "1"}
        # Generated once and saved as a datasets folder, so the timed run loads it the way it loads CIFAR-100 from
        # the hub cache, instead of also timing the generation of 180 MB of random images.
        subprocess.run([sys.executable, "-c", "import sys; from cifar_dist.config import DataConfig; from "
                        "cifar_dist.data import load_cifar100; load_cifar100(DataConfig(data_source='synthetic', "
                        "synthetic_train_samples=int(sys.argv[1]), synthetic_eval_samples=int(sys.argv[2])))"
                        ".save_to_disk(sys.argv[3])", str(args.e2e_train_samples), str(args.e2e_eval_samples),
                        str(data)], env=env, check=True, capture_output=True)
        cmd = [sys.executable, "-m", "cifar_dist.train", "--data-source", str(data), "--weights", "none",
               "--image-size", str(args.image_size), "--num-epochs", str(args.e2e_epochs), "--tracker", "none",
               "--output-dir", str(out), *(["--cache-frozen-features"] if cache else []), *args.e2e_args]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"cifar_dist.bench: the end-to-end run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = records[1:] or records  # the first epoch also pays for compilation
    steady_train_s = sum(r["train_time_s"] for r in steady) / len(steady)
    return {"variant": "end_to_end" + ("_cached" if cache else ""), "wall_s": round(wall, 1),
            "epochs": len(records), "final_val_acc": records[-1]["val_acc"],
            "train_images_per_s": round(sum(r["train_images_per_s"] for r in steady) / len(steady), 1),
            # Where the wall time went: training, evaluation, the first epoch's extra (compilation, cache
            # building is outside epochs), and everything outside the epochs (start-up, checkpoints, report).
            "train_s": round(sum(r["train_time_s"] for r in records), 1),
            "eval_s": round(sum(r["eval_time_s"] for r in records), 1),
            "first_epoch_extra_s": round(records[0]["train_time_s"] - steady_train_s, 1),
            "outside_epochs_s": round(wall - sum(r["epoch_time_s"] for r in records), 1)}


def run(args) -> dict:
    import torch.distributed as dist

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "ddp" in (args.variants or [])
    if distributed and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if "WORLD_SIZE" not in os.environ:  # one process, not under torchrun
            os.environ.update({"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"})
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    main_process = not dist.is_initialized() or dist.get_rank() == 0
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    variants = args.variants or [v for v in VARIANTS if (device.type == "cuda" or v not in GPU_ONLY) and v != "ddp"]
    pool = max(args.batch_size, args.eval_batch_size) * (args.warmup + args.steps)
    images, labels = synthetic_images(pool)
    results = []
    for variant in variants:
        torch.manual_seed(0)
        if variant == "straight_port":
            found = [bench_straight_port(images, labels, args, device)]
        elif variant in ("cached_trunk", "cached_compiled"):
            found = [bench_cached_trunk(images, labels, args, device, autocast, compiled=variant == "cached_compiled")]
        elif variant == "eval":
            found = [bench_eval(images, labels, args, device, autocast)]
        elif variant == "ddp":
            found = bench_ddp(images, labels, args, device, autocast)
        else:
            found = [bench_device_step(variant, images, labels, args, device, autocast)]
        for result in found:
            if main_process:
                print(f"  {result.variant}: {result.images_per_s:,.0f} img/s", file=sys.stderr)
        results += found
    base = next((r.images_per_s for r in results if r.variant == "straight_port"), None)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "precision": "bf16" if bf16 else "fp32", "image_size": args.image_size,
        "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size, "steps": args.steps,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "results": [{"variant": r.variant, "images_per_s": round(r.images_per_s, 1),
                     "vs_straight_port": round(r.images_per_s / base, 2) if base else None,
                     "compile_s": round(r.compile_s, 1)} for r in results],
    }
    by_name = {r.variant.split(" ")[0]: r.images_per_s for r in results}
    if "ddp_cifar_dist" in by_name and report["world_size"] > 1:
        report["communication_share"] = round(1 - by_name["ddp_cifar_dist"] / by_name["no_communication"], 3)
    if args.floor and main_process:
        report["compute_floor"] = compute_floor(args.image_size, device, bf16)
    if args.checkpoint and not dist.is_initialized():  # save_state with one process; under torchrun, skipped
        report["checkpoint"] = checkpoint_cost(args.image_size, device, args.checkpoint_dir)
    if args.end_to_end and main_process:
        report["end_to_end"] = [end_to_end(args, cache) for cache in (False, True)]
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
    if "communication_share" in report:
        lines.append(f"communication share of a step with {report['world_size']} processes: "
                     f"{100 * report['communication_share']:.0f}%")
    floor = report.get("compute_floor")
    if floor:
        lines.append(f"compute floor of {EPOCHS} epochs x ({TRAIN_IMAGES:,} + {EVAL_IMAGES:,}) images: "
                     f"{floor['workload_pflop']} PFLOP / {floor['matmul_tflop_per_s']} TFLOP/s (measured matmul) = "
                     f"{floor['floor_s']} s; with the feature cache {floor['workload_cached_pflop']} PFLOP = "
                     f"{floor['floor_cached_s']} s")
    checkpoint = report.get("checkpoint")
    if checkpoint:
        lines.append(f"checkpoint (the trainer's save_checkpoint: model + Adam state, {checkpoint['megabytes']:,} MB): "
                     f"{checkpoint['seconds']} s per save into {checkpoint['directory']}")
    for e2e in report.get("end_to_end", []):
        lines.append(f"{e2e['variant']}: {e2e['wall_s']} s launch to report ({e2e['train_s']} s training, of "
                     f"which {e2e['first_epoch_extra_s']} s first-epoch extra; {e2e['eval_s']} s evaluation; "
                     f"{e2e['outside_epochs_s']} s start-up, cache, checkpoints and report), {e2e['epochs']} epochs, "
                     f"{e2e['train_images_per_s']:,.0f} train img/s (epochs after the first), "
                     f"final val acc {e2e['final_val_acc']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cifar_dist.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32, help="training batch (the recipe's global batch)")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50, help="timed batches per variant")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches first (compilation happens here)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of the straight port")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        help="default: all that run on this device, except ddp (run that one under torchrun)")
    parser.add_argument("--ddp-bucket-mb", type=int, help="bucket size of the ddp_cifar_dist variant (default: the "
                        "trainer's --ddp-bucket-mb default)")
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                        help="count the workload's FLOPs and measure this device's matmul rate")
    parser.add_argument("--checkpoint", action=argparse.BooleanOptionalAction, default=True,
                        help="time the trainer's save_checkpoint of the model and Adam state (one process only)")
    parser.add_argument("--checkpoint-dir", help="where to time it (default: the temp dir; give the filesystem "
                        "your --output-dir is on)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="also time `python -m cifar_dist.train` for the whole workload, without and with "
                             "--cache-frozen-features")
    parser.add_argument("--e2e-epochs", type=int, default=EPOCHS)
    parser.add_argument("--e2e-train-samples", type=int, default=TRAIN_IMAGES)
    parser.add_argument("--e2e-eval-samples", type=int, default=EVAL_IMAGES)
    parser.add_argument("--e2e-args", nargs=argparse.REMAINDER, default=[],
                        help="further flags for the end-to-end trainer runs (give last)")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args(argv)
    for name in ("image_size", "batch_size", "eval_batch_size", "steps", "e2e_epochs", "e2e_train_samples",
                 "e2e_eval_samples"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    report = run(args)
    if not report:
        return  # not the main process
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

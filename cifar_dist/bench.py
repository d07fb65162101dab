"""Training and eval throughput of the recipe's step, side by side, on synthetic CIFAR-shaped data.

    python -m cifar_dist.bench                       # on the current device, 224 px, batch 32
    python -m cifar_dist.bench --json bench.json     # also write the table as JSON
    python -m cifar_dist.bench --image-size 32 --steps 3 --warmup 1    # a quick look on a CPU

Variants (each in this one process, on the same card, warm-up excluded from timings):
  straight_port   the plain PyTorch port: PIL resize to the image size in DataLoader workers, float32, eager
  eager           cifar_dist's step: uint8 batches on the device, resize + normalise in the model, autocast
  channels_last   eager + channels_last memory format + fused Adam
  compiled        channels_last + torch.compile(mode="reduce-overhead") (CUDA graphs); GPU only by default
  cached_trunk    the frozen trunk (conv1..layer3) run once over the data at the eval batch size, then
                  layer4 + head trained from its output (the frozen-feature cache's ceiling)
  eval            forward only at the eval batch size
Reported: images/s, the ratio to straight_port, and compile time separately.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from cifar_dist.config import ModelConfig
from cifar_dist.model import IMAGENET_MEAN, IMAGENET_STD, ResNet50Classifier

VARIANTS = ("straight_port", "eager", "channels_last", "compiled", "cached_trunk", "eval")


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


def bench_cached_trunk(images, labels, args, device, autocast) -> Result:
    """Trunk once over every image at the eval batch, then layer4 + head steps from the cached output."""
    model = _model(args.image_size, device)
    opt = _optimizer(model)
    num = args.batch_size * (args.warmup + args.steps)
    x_all, y_all = images[:num].to(device), labels[:num].to(device)
    start = time.perf_counter()
    with torch.no_grad(), autocast():
        feats = torch.cat([_trunk(model, x_all[i:i + args.eval_batch_size])
                           for i in range(0, num, args.eval_batch_size)])
    _sync(device)
    trunk_s = time.perf_counter() - start

    def step(f, y):
        with autocast():
            x = model.layer4(f)
            loss = F.cross_entropy(model.fc(torch.flatten(model.avgpool(x), 1)), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    batches = [(feats[i:i + args.batch_size], y_all[i:i + args.batch_size]) for i in range(0, num, args.batch_size)]
    seconds, _ = _timed(step, batches, args.warmup, device)
    # One pass over the data costs the trunk once plus the head steps; report images/s of that whole pass.
    per_image = trunk_s / num + seconds / args.batch_size
    return Result("cached_trunk", 1.0 / per_image)


def _trunk(model, images):
    x = model.preprocess(images)
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer3(model.layer2(model.layer1(x)))


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


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    variants = args.variants or [v for v in VARIANTS if device.type == "cuda" or v != "compiled"]
    pool = max(args.batch_size, args.eval_batch_size) * (args.warmup + args.steps)
    images, labels = synthetic_images(pool)
    results = []
    for variant in variants:
        torch.manual_seed(0)
        if variant == "straight_port":
            results.append(bench_straight_port(images, labels, args, device))
        elif variant == "cached_trunk":
            results.append(bench_cached_trunk(images, labels, args, device, autocast))
        elif variant == "eval":
            results.append(bench_eval(images, labels, args, device, autocast))
        else:
            results.append(bench_device_step(variant, images, labels, args, device, autocast))
        print(f"  {variant}: {results[-1].images_per_s:,.0f} img/s", file=sys.stderr)
    base = next((r.images_per_s for r in results if r.variant == "straight_port"), None)
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "precision": "bf16" if bf16 else "fp32", "image_size": args.image_size,
        "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size, "steps": args.steps,
        "results": [{"variant": r.variant, "images_per_s": round(r.images_per_s, 1),
                     "vs_straight_port": round(r.images_per_s / base, 2) if base else None,
                     "compile_s": round(r.compile_s, 1)} for r in results],
    }


def format_table(report: dict) -> str:
    lines = [f"device: {report['device']}, torch {report['torch']}, {report['precision']}, "
             f"{report['image_size']} px, batch {report['batch_size']} (eval {report['eval_batch_size']})",
             "| variant | images/s | x straight port | compile s |", "| --- | ---: | ---: | ---: |"]
    for r in report["results"]:
        ratio = f"{r['vs_straight_port']:.2f}" if r["vs_straight_port"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['images_per_s']:,.0f} | {ratio} | {r['compile_s'] or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cifar_dist.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32, help="training batch (the recipe's global batch)")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50, help="timed batches per variant")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches first (compilation happens here)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of the straight port")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="default: all that run on this device")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args(argv)
    for name in ("image_size", "batch_size", "eval_batch_size", "steps"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    report = run(args)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

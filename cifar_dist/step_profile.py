"""Where the training step's time goes: the host (Python, kernel launches) or the device (the kernels).

At the recipe's batch of 32 a step on a current GPU takes a few milliseconds, and whether the device or the host
sets the pace decides what can make it faster: fewer kernels (fusion, a larger batch) or less host work per
step (one CUDA graph for the whole step, optimizer included). ``profile_steps`` runs steady steps of the
trainer's step under torch.profiler and reports, per step: the wall time, the host's time to queue the steps,
the device's busy time (its kernels' time, summed), and the host operations that cost most. The profiler adds
host work of its own, so its host figures are upper bounds; the device figures are the kernels' own times.
"""

from __future__ import annotations

import time

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from cifar_dist.speed import sync_device

TOP_OPS = 8


def profile_steps(device, steps, num_steps: int, warmup: int, trace: str | None = None) -> dict:
    """Per-step figures of ``steps(num_steps, epoch=2)`` (e.g. ``trainer_parts.train`` on the trainer's parts)
    after an untimed ``steps(warmup)``; with ``trace``, the profiler's Chrome trace is written there (open it
    in https://ui.perfetto.dev)."""
    if warmup:
        steps(warmup)
    sync_device(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        steps(num_steps, epoch=2)  # another epoch's order: not the warm-up's batches again
        queued = time.perf_counter() - start
        sync_device(device)
        wall = time.perf_counter() - start
    per_step = 1e3 / num_steps  # seconds in total -> milliseconds per step
    report = {"steps": num_steps, "wall_ms_per_step": round(wall * per_step, 3),
              "host_queue_ms_per_step": round(queued * per_step, 3), "device_busy_ms_per_step": None,
              "device_busy_share": None}
    if device.type == "cuda":
        kernels_us = sum(e.self_device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA)
        report["device_busy_ms_per_step"] = round(kernels_us / 1e6 * per_step, 3)
        report["device_busy_share"] = round(kernels_us / 1e6 / wall, 3)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP_OPS]
    report["top_host_ops"] = [{"name": e.key, "self_host_ms_per_step": round(e.self_cpu_time_total / 1e6 * per_step, 3),
                               "calls_per_step": round(e.count / num_steps, 1)} for e in ops]
    if trace:
        prof.export_chrome_trace(trace)
    return report


def format_profile(variant: str, report: dict) -> str:
    device = ("device busy {:.3f} ms ({:.0%} of the wall time)".format(report["device_busy_ms_per_step"],
                                                                       report["device_busy_share"])
              if report["device_busy_ms_per_step"] is not None else "no device timeline on a CPU")
    lines = [f"profile of {variant}, per step over {report['steps']} steps: wall {report['wall_ms_per_step']:.3f} ms, "
             f"host done queueing after {report['host_queue_ms_per_step']:.3f} ms, {device}",
             "| host op | self ms per step | calls per step |", "| --- | ---: | ---: |"]
    lines += [f"| {op['name']} | {op['self_host_ms_per_step']:.3f} | {op['calls_per_step']:g} |"
              for op in report["top_host_ops"]]
    return "\n".join(lines)

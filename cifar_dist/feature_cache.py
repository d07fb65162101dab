"""``--cache-frozen-features``: run the frozen stages once per image, then train and evaluate the rest from it.

Exact, not an approximation: the images are not augmented and the frozen stages (BatchNorm in eval mode, no
dropout, nothing trainable) are a fixed function of the image, so their output is the same every epoch.
``check_cacheable`` refuses a model for which that does not hold. The features are kept in the dtype the trunk
produces under the run's autocast (bf16 under bf16: the very values the plain path hands to layer4), in the
memory layout of the model's weights (channels_last under --channels-last), on the device when they fit,
else in host memory. For the recipe at 224 px the trunk ends at layer3, 1024x14x14 values per image: 20 GB for
the 50,000 training images in bf16, 4 GB for the 10,000 test images. By default (``auto``) both are cached on a
CUDA GPU where they fit in device memory beside training; where they do not, ``--cache-eval-features`` (``auto``
likewise) caches the test images alone: every evaluation then runs layer4 and the head only, while training runs
the whole model.

With several processes each computes a contiguous shard of the images and an all-gather fills every
process's full copy: the data order (which image any process trains on at any step) stays exactly what it is
without the cache, so runs with and without it, on any number of processes, train the same weights.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch
from torch.utils.data import Dataset

from cifar_dist.config import SpeedConfig, UserError
from cifar_dist.data import CifarSplits, index_on
from cifar_dist.speed import FastPath, cudnn_autotuning

# Device memory left free for the training step and evaluation next to the cache.
DEVICE_HEADROOM_BYTES = 6 * 2**30
# The location of a cache that is only worth having in device memory: there or nowhere.
DEVICE_IF_FITS = "device-if-fits"


class DoesNotFit(Exception):
    """A DEVICE_IF_FITS cache that device memory cannot hold beside training; its message gives the figures."""


class FeatureDataset(Dataset):
    """The trunk's output per image (N, C, H, W), wherever it lives, with the labels, as (features, label)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features = features
        self.labels = labels.to(features.device)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.features[i], self.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = index_on(self.features.device, indices)
        return self.features[idx], self.labels[idx]  # stacked; the loaders' collate_fn is data.take_batch


def check_cacheable(model) -> None:
    """Raise UserError unless the frozen stages are a fixed function of the image (that some stage is frozen at
    all, the config checks)."""
    for name, module in model.named_modules():
        if name.split(".")[0] not in model.frozen_module_names():
            continue
        if module.training:
            raise UserError(f"--cache-frozen-features: frozen module {name} is in training mode, so its output "
                            f"depends on the batch, not only on the image; use --no-cache-frozen-features")
        trainable = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if trainable:
            raise UserError(f"--cache-frozen-features: {name}.{trainable[0]} belongs to a frozen stage but is "
                            f"trainable, so cached features would go stale; use --no-cache-frozen-features")


def choose_location(choice: str, nbytes: int, device: torch.device, device_free: int | None,
                    host_free: int) -> str:
    """'device' or 'host' for a cache of ``nbytes``; UserError when the chosen (or any) place is too small, but
    DoesNotFit for DEVICE_IF_FITS when device memory is (auto's choice, which then goes without the cache)."""
    fits_device = device.type != "cpu" and device_free is not None and nbytes <= device_free - DEVICE_HEADROOM_BYTES
    fits_host = nbytes <= host_free
    # The figures, for the error or auto's note: what the cache needs against what training leaves it.
    short = (f"{size(nbytes)}, more than the {size(max(device_free or 0, 0))} free on {device} less "
             f"{DEVICE_HEADROOM_BYTES / 2**30:.0f} GiB for training")
    if choice == DEVICE_IF_FITS:
        if not fits_device:
            raise DoesNotFit(short if device.type != "cpu" else f"{size(nbytes)} of device memory, which {device} "
                             f"does not have")
        return "device"
    if device.type == "cpu":
        choice = "host"  # one memory
    if choice == "device":
        if not fits_device:
            raise UserError(f"the feature cache needs {short}; use --feature-cache-location host")
        return "device"
    if choice == "auto" and fits_device:
        return "device"
    if not fits_host:
        raise UserError(f"the feature cache needs {size(nbytes)}, more than the {size(host_free)} of host memory "
                        f"available to this process; lower --image-size or use --no-cache-frozen-features")
    return "host"


def size(nbytes: int) -> str:
    """'22.4 GiB', or '1.5 MiB' below a GiB: what a cache needs, readable at the recipe's size and a test's."""
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def device_memory_free(device: torch.device) -> int:
    """Bytes this process can still take on CUDA ``device``: what the card has free, and no more than the share
    ``torch.cuda.set_per_process_memory_fraction`` leaves it, past which PyTorch's allocator fails as on a full
    card."""
    free = torch.cuda.mem_get_info(device)[0]
    try:
        fraction = torch.cuda.get_per_process_memory_fraction(device)
    except RuntimeError:  # an allocator that keeps no such share (CUDAPluggableAllocator)
        return free
    if fraction < 1:  # the allocator counts what it holds, used or cached, against fraction x the card's total
        allowed = int(fraction * torch.cuda.get_device_properties(device).total_memory)
        free = min(free, allowed - torch.cuda.memory_reserved(device))
    return free


def host_memory_available() -> int:
    """Bytes of host memory this process may use for a cache: MemAvailable shared by the node's processes."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def cache_for_run(model, splits: CifarSplits, accelerator, batch_size: int, speed: SpeedConfig,
                  fast: FastPath) -> tuple[CifarSplits, FastPath]:
    """(splits, fast) as the run reads them: the frozen stages' output in place of the images of both splits
    when ``fast.train_cache`` (under 'auto' only where it fits in device memory, else the step from images:
    FastPath.without_train_cache), or of the test split alone when ``fast.eval_cache`` (under 'auto' likewise:
    in host memory the copies to the device would eat the gain). A note says what 'auto' left off and why.
    ``fast.features_cached`` names the cached splits."""
    frozen = bool(getattr(model, "frozen_stages", ()))  # nothing frozen: nothing to cache
    if fast.train_cache and frozen:
        auto = speed.cache_frozen_features == "auto"
        try:
            cached = build_feature_cache(model, splits, accelerator, batch_size,
                                         DEVICE_IF_FITS if auto else speed.feature_cache_location,
                                         layout=cache_layout(fast))
            return dataclasses.replace(splits, **cached), dataclasses.replace(fast, features_cached=("train", "test"))
        except DoesNotFit as short:
            fast = fast.without_train_cache(f"--cache-frozen-features auto: off, the frozen-stage features need "
                                            f"{short} (in host memory with 'yes')")
    elif fast.train_cache:
        fast = fast.without_train_cache()
    if not (fast.eval_cache and frozen):
        return splits, fast
    location = speed.feature_cache_location if speed.cache_eval_features == "yes" else DEVICE_IF_FITS
    try:
        cached = build_feature_cache(model, splits, accelerator, batch_size, location, ("test",), cache_layout(fast))
    except DoesNotFit as short:
        return splits, dataclasses.replace(fast, notes=[
            *fast.notes, f"--cache-eval-features auto: off, the test images' frozen-stage features need {short} "
            "(in host memory with 'yes')"])
    return dataclasses.replace(splits, **cached), dataclasses.replace(fast, features_cached=("test",))


@torch.no_grad()
def build_feature_cache(model, splits, accelerator, batch_size: int, location_choice: str,
                        which: tuple[str, ...] = ("train", "test"), layout=torch.contiguous_format,
                        autotune: bool = False) -> dict[str, FeatureDataset]:
    """{split name: FeatureDataset} holding ``model.trunk``'s output for every image of the splits named in
    ``which``, kept in the memory format ``layout`` (``cache_layout(fast)``); DoesNotFit when ``location_choice``
    is DEVICE_IF_FITS and device memory is too small.

    cuDNN's autotuning (--cudnn-benchmark) is left off here unless ``autotune`` (and the run's setting) ask for
    it: it times every algorithm of every convolution on the first call of each input shape, and the trunk's
    shapes at this batch size run in this one pass only, never again in the run. The autotuned step gained 5.6%
    on an H100, so a pass of a few seconds might gain some tenths of a second, against timing about twenty
    convolution shapes at 224 px. The benchmark's cache_build times both ways: on an H200, 0.42 s for 6,656
    images with autotuning and without."""
    model.train()  # the configuration training runs in (frozen stages in eval mode), which the cache must match
    check_cacheable(model)
    with cudnn_autotuning(autotune and torch.backends.cudnn.benchmark):
        return _build(model, splits, accelerator, batch_size, location_choice, which, layout)


def _build(model, splits, accelerator, batch_size: int, location_choice: str, which: tuple[str, ...],
           layout) -> dict[str, FeatureDataset]:
    device = accelerator.device
    with accelerator.autocast(), cudnn_autotuning(False):  # one image, for the features' shape and dtype
        probe = model.trunk(splits.train.images[:1].to(device))
    per_image = probe[0].numel() * probe.element_size()
    nbytes = per_image * sum(len(getattr(splits, name)) for name in which)
    free = torch.tensor([device_memory_free(device) if device.type == "cuda" else 0, host_memory_available()],
                        dtype=torch.int64, device=device)
    if accelerator.num_processes > 1:  # every process decides on the tightest figures: all go on, or all stop
        free = accelerator.gather(free[None]).min(0).values
    device_free, host_free = free.tolist()
    location = choose_location(location_choice, nbytes, device, device_free if device.type == "cuda" else None,
                               host_free)
    start = time.perf_counter()
    store = device if location == "device" else torch.device("cpu")
    cached = {name: FeatureDataset(_features(model, getattr(splits, name).images, accelerator, batch_size, probe,
                                             store, layout), getattr(splits, name).labels) for name in which}
    counts = " + ".join(f"{len(getattr(splits, name))} {name}" for name in which)
    accelerator.print(f"feature cache: {counts} images -> {'x'.join(map(str, probe.shape[1:]))} "
                      f"{str(probe.dtype).removeprefix('torch.')} per image, {nbytes / 2**30:.2f} GiB in {location} "
                      f"memory, computed in {time.perf_counter() - start:.1f} s")
    return cached


def cache_layout(fast: FastPath) -> torch.memory_format:
    """The memory format the features are kept in: the weights' (--channels-last). A convolution computes in
    channels_last when its input or its weight is, converting the other: contiguous features beside
    channels_last weights (a GPU's default) would be transposed by each convolution that reads them, every step;
    channels_last features beside contiguous weights (a CPU's default) make the CPU's convolutions compute in
    channels_last, which ran evaluation from the cache 16% slower there (the benchmark's eval_cached, 64 px)."""
    return torch.channels_last if fast.channels_last else torch.contiguous_format


def _features(model, images: torch.Tensor, accelerator, batch_size: int, probe: torch.Tensor,
              store: torch.device, layout=torch.contiguous_format) -> torch.Tensor:
    """trunk(images) for all images: each process computes a contiguous shard; all-gather completes each copy.
    Batches are slices and land in slices, so the loop never waits for the device (an index mask would, twice a
    batch) and the host queues the next batch's kernels while the device runs this one's. Every batch is whole,
    the last ones padded with repeats of the last image and their rows dropped: one input shape, which the
    all-gather needs (and cuDNN's autotuning, where asked for, times once, not again for each remainder)."""
    n, world, rank = len(images), accelerator.num_processes, accelerator.process_index
    shard = -(-n // world)
    out = torch.empty((n, *probe.shape[1:]), dtype=probe.dtype, device=store, memory_format=layout)
    for begin in range(0, shard, batch_size):
        start = min(rank * shard + begin, n - 1)
        batch = images[start:start + batch_size]
        if len(batch) < batch_size:
            batch = torch.cat([batch, images[n - 1:].expand(batch_size - len(batch), *images.shape[1:])])
        with accelerator.autocast():
            features = model.trunk(batch.to(accelerator.device, non_blocking=True))
        if world > 1:
            features = accelerator.gather(features.contiguous())  # every process's batch, in rank order
        for r, part in enumerate(features.split(batch_size)):
            lo = r * shard + begin
            rows = min(batch_size, shard - begin, n - lo)  # this process's images in the batch
            if rows > 0:
                out[lo:lo + rows] = part[:rows].to(store)
    return out

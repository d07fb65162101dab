"""``--cache-frozen-features``: run the frozen stages once per image, then train and evaluate the rest from it.

Exact, not an approximation: the images are not augmented and the frozen stages (BatchNorm in eval mode, no
dropout, nothing trainable) are a fixed function of the image, so their output is the same every epoch.
``check_cacheable`` refuses a model for which that does not hold. The features are kept in the dtype the trunk
produces under the run's autocast (bf16 under bf16: the very values the plain path hands to layer4), on the
device when they fit, else in host memory. For the recipe at 224 px the trunk ends at layer3, 1024x14x14
values per image: 20 GB for the 50,000 training images in bf16, 4 GB for the 10,000 test images.

With several processes each computes a contiguous shard of the images and an all-gather fills every
process's full copy: the data order (which image any process trains on at any step) stays exactly what it is
without the cache, so runs with and without it, on any number of processes, train the same weights.
"""

from __future__ import annotations

import os
import time

import torch
from torch.utils.data import Dataset

from cifar_dist.config import UserError
from cifar_dist.data import index_on

# Device memory left free for the training step and evaluation next to the cache.
DEVICE_HEADROOM_BYTES = 6 * 2**30


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
                            f"depends on the batch, not only on the image; drop --cache-frozen-features")
        trainable = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if trainable:
            raise UserError(f"--cache-frozen-features: {name}.{trainable[0]} belongs to a frozen stage but is "
                            f"trainable, so cached features would go stale; drop --cache-frozen-features")


def choose_location(choice: str, nbytes: int, device: torch.device, device_free: int | None,
                    host_free: int) -> str:
    """'device' or 'host' for a cache of ``nbytes``; UserError when the chosen (or any) place is too small."""
    need = f"the feature cache needs {nbytes / 2**30:.1f} GiB"
    fits_device = device.type != "cpu" and device_free is not None and nbytes <= device_free - DEVICE_HEADROOM_BYTES
    fits_host = nbytes <= host_free
    if device.type == "cpu":
        choice = "host"  # one memory
    if choice == "device":
        if not fits_device:
            raise UserError(f"{need}, more than the {max(device_free or 0, 0) / 2**30:.1f} GiB free on {device} "
                            f"less {DEVICE_HEADROOM_BYTES / 2**30:.0f} GiB for training; use "
                            f"--feature-cache-location host")
        return "device"
    if choice == "auto" and fits_device:
        return "device"
    if not fits_host:
        raise UserError(f"{need}, more than the {host_free / 2**30:.1f} GiB of host memory available to this "
                        f"process; lower --image-size or drop --cache-frozen-features")
    return "host"


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


@torch.no_grad()
def build_feature_cache(model, splits, accelerator, batch_size: int, location_choice: str):
    """(train, test) FeatureDatasets holding ``model.trunk``'s output for every image of both splits."""
    model.train()  # the configuration training runs in (frozen stages in eval mode), which the cache must match
    check_cacheable(model)
    device = accelerator.device
    with accelerator.autocast():
        probe = model.trunk(splits.train.images[:1].to(device))
    per_image = probe[0].numel() * probe.element_size()
    nbytes = per_image * (len(splits.train) + len(splits.test))
    free = torch.tensor([torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0,
                         host_memory_available()], dtype=torch.int64, device=device)
    if accelerator.num_processes > 1:  # every process decides on the tightest figures: all go on, or all stop
        free = accelerator.gather(free[None]).min(0).values
    device_free, host_free = free.tolist()
    location = choose_location(location_choice, nbytes, device, device_free if device.type == "cuda" else None,
                               host_free)
    start = time.perf_counter()
    store = device if location == "device" else torch.device("cpu")
    train, test = (FeatureDataset(_features(model, split.images, accelerator, batch_size, probe, store),
                                  split.labels) for split in (splits.train, splits.test))
    accelerator.print(f"feature cache: {len(splits.train)} train + {len(splits.test)} test images -> "
                      f"{'x'.join(map(str, probe.shape[1:]))} {str(probe.dtype).removeprefix('torch.')} per image, "
                      f"{nbytes / 2**30:.2f} GiB in {location} memory, computed in "
                      f"{time.perf_counter() - start:.1f} s")
    return train, test


def _features(model, images: torch.Tensor, accelerator, batch_size: int, probe: torch.Tensor,
              store: torch.device) -> torch.Tensor:
    """trunk(images) for all images: each process computes a contiguous shard; all-gather completes each copy."""
    n, world, rank = len(images), accelerator.num_processes, accelerator.process_index
    shard = -(-n // world)
    out = torch.empty((n, *probe.shape[1:]), dtype=probe.dtype, device=store)
    # The same number of equally sized batches on every process (the all-gather needs that); indices past the
    # end (the last shard may be short) compute a duplicate image and are dropped.
    for begin in range(0, shard, batch_size):
        index = torch.arange(rank * shard + begin, rank * shard + min(begin + batch_size, shard))
        batch = images[index.clamp(max=n - 1)].to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            features = model.trunk(batch)
        index = index.to(accelerator.device)
        if world > 1:
            features, index = accelerator.gather(features.contiguous()), accelerator.gather(index)
        keep = index < n
        out[index[keep].to(store)] = features[keep].to(store)
    return out

"""CIFAR-100 as in-memory uint8 tensors, and the loaders that serve them in an order independent of the number
of processes. Where the data comes from is ``sources.py``'s business."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cifar_dist.config import BatchPlan, DataConfig, UserError
from cifar_dist.sources import IMAGE_SHAPE, load_cifar100

__all__ = ["CifarSplits", "EpochShuffleSampler", "ImageTensorDataset", "build_dataloaders", "build_splits",
           "eval_loader", "fingerprint", "load_cifar100"]

FINGERPRINT_IMAGES = 1024  # images a fingerprint reads, evenly spread (3 MB of CIFAR's 150: milliseconds)


class ImageTensorDataset(Dataset):
    """uint8 images (N,32,32,3) + int64 labels (N,), held in memory as torch tensors."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"images must be uint8 (N, 32, 32, 3), got {images.dtype} {tuple(images.shape)}")
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be int64 ({len(images)},), got {labels.dtype} {tuple(labels.shape)}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # The whole batch in one fancy-index per tensor, already stacked (the loaders' collate_fn is take_batch):
        # no per-image Python work, which at ~10k images/s would cost a noticeable share of each step.
        idx = index_on(self.images.device, indices)
        return self.images[idx], self.labels[idx]

    def to(self, device) -> ImageTensorDataset:
        return ImageTensorDataset(self.images.to(device), self.labels.to(device))


def fingerprint(split: ImageTensorDataset) -> str:
    """A short hash of a split's size, every label and an even spread of its images, read from the host: the same
    data under another path or in another format (a moved folder, a local copy of the hub's) has the same one,
    and a checkpoint records it so that a resume can tell."""
    picked = torch.linspace(0, len(split) - 1, min(FINGERPRINT_IMAGES, len(split))).round().long()
    digest = hashlib.blake2b(str(len(split)).encode(), digest_size=12)
    digest.update(split.labels.cpu().numpy().tobytes())
    digest.update(split.images[picked.to(split.images.device)].cpu().numpy().tobytes())
    return digest.hexdigest()


def index_on(device: torch.device, indices: list[int]) -> torch.Tensor:
    """``indices`` as a long tensor on ``device``, without making the host wait for the GPU.

    A plain host-to-GPU copy from pageable memory synchronises with the work already queued; through pinned
    memory with non_blocking it does not, so the host keeps preparing steps ahead of the GPU.
    """
    idx = torch.as_tensor(indices, dtype=torch.long)
    if device.type == "cuda":
        idx = idx.pin_memory().to(device, non_blocking=True)
    return idx


def take_batch(batch):
    """collate_fn for datasets whose ``__getitems__`` returns the stacked batch itself."""
    return batch


@dataclass(frozen=True)
class CifarSplits:
    """Both splits in memory, plus the 100 fine label names (index = label)."""

    train: ImageTensorDataset
    test: ImageTensorDataset
    class_names: list[str]

    def to(self, device) -> CifarSplits:
        """Both splits on ``device``: CIFAR-100 as uint8 is 184 MB, so on a GPU it lives there and each batch
        is one indexing kernel instead of a host-to-device copy."""
        return CifarSplits(self.train.to(device), self.test.to(device), self.class_names)


# ---------------------------------------------------------------------------------------------------------------
# Tensors and loaders


def build_splits(cfg: DataConfig, seed: int = 0) -> CifarSplits:
    """Load ``cfg.data_source`` and hold both splits in memory as uint8/int64 tensors."""
    dd = load_cifar100(cfg, seed)
    return CifarSplits(
        train=_to_tensor_dataset(dd["train"]),
        test=_to_tensor_dataset(dd["test"]),
        class_names=list(dd["train"].features["label"].names),
    )


def _to_tensor_dataset(ds: datasets.Dataset) -> ImageTensorDataset:
    # datasets' numpy formatter widens integer arrays to int64 unless given a dtype; images stay uint8 (8x less).
    images = ds.with_format("numpy", columns=["image"], dtype=np.uint8)[:]["image"]
    labels = ds.with_format("numpy", columns=["label"])[:]["label"]
    return ImageTensorDataset(
        torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64, copy=False))
    )


def _epoch_seed(seed: int, epoch: int) -> int:
    # torch's CPU generator keeps only the low 32 bits of a seed, so (seed, epoch) is hashed into those.
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF]).generate_state(1)[0])


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation per epoch, the same on every process, cut to whole global batches.

    The order depends only on (seed, epoch), never on the world size, so global step k sees the same images
    whatever the layout. Deliberately no ``generator`` attribute: accelerate's prepare() would otherwise replace
    it with a randomly seeded one and re-seed it every epoch.
    """

    def __init__(self, num_samples: int, seed: int, multiple_of: int):
        if multiple_of <= 0:
            raise ValueError(f"multiple_of must be positive, got {multiple_of}")
        self.num_samples = num_samples
        self.seed = seed
        self.multiple_of = multiple_of
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.multiple_of * self.multiple_of

    def __iter__(self):
        rng = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.num_samples, generator=rng)[: len(self)].tolist())


def build_dataloaders(
    splits: CifarSplits, plan: BatchPlan, eval_batch_size: int, seed: int
) -> tuple[DataLoader, DataLoader]:
    """Train loader (per-device batches of an epoch permutation cut to whole global batches) and eval loader.

    Meant for ``accelerator.prepare``, which deals the per-device batches round-robin to the processes, so global
    step k sees exactly ``permutation[k * global : (k + 1) * global]`` for any processes x accumulation layout.
    prepare() keeps our sampler (it only swaps a ``RandomSampler``, and only with use_seedable_sampler), and
    ``DataLoaderShard.set_epoch(e)`` reaches ``EpochShuffleSampler.set_epoch`` (its iterator also calls it with an
    epoch counter of its own at the start of every pass). Call ``set_epoch(epoch)`` on the prepared train loader
    every epoch, before iterating it or before ``accelerator.skip_first_batches``: the loader that returns wraps
    one more level and its own set_epoch no longer reaches the sampler when there are several processes.
    The eval loader keeps the last partial batch; with several processes accelerate pads it by repeating
    samples, so gather eval outputs with ``accelerator.gather_for_metrics``. ``splits.train``/``test`` may also
    be FeatureDatasets (the frozen-feature cache): the same sampler, so the same order.
    """
    n = len(splits.train)
    if n < plan.global_batch_size:
        raise UserError(
            f"the training set has {n} images, fewer than one global batch of {plan.global_batch_size}; lower "
            f"--global-batch-size or raise --max-train-samples"
        )
    train = DataLoader(
        splits.train,
        batch_size=plan.per_device_batch_size,
        sampler=EpochShuffleSampler(n, seed, plan.global_batch_size),
        drop_last=True,
        num_workers=0,
        collate_fn=take_batch,
        pin_memory=pinned(splits.train),
    )
    return train, eval_loader(splits.test, eval_batch_size)


def eval_loader(dataset, eval_batch_size: int) -> DataLoader:
    """The eval loader alone (cifar_dist.evaluate's, which has no use for a training split's batches)."""
    return DataLoader(dataset, batch_size=eval_batch_size, shuffle=False, drop_last=False, num_workers=0,
                      pin_memory=pinned(dataset), collate_fn=take_batch)


def pinned(dataset) -> bool:
    """Whether the loader over ``dataset`` pins its batches: with CUDA, for data in host memory (a feature cache
    kept there), each split on its own; data already on the GPU cannot be."""
    return torch.cuda.is_available() and all(t.device.type == "cpu" for t in dataset[0])


def loader_config():
    """The prepared loaders' configuration: pinned batches (``pinned``) copied to the GPU without blocking.
    accelerate's default copies with non_blocking=False, so every batch from host memory would wait for the GPU
    to finish the queued steps, and the host could no longer prepare steps ahead of it."""
    from accelerate import DataLoaderConfiguration

    return DataLoaderConfiguration(non_blocking=True)

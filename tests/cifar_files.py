"""Write tiny CIFAR-100 fixtures in every on-disk format the loader reads, all from the same arrays.

Each writer takes a directory and a ``CifarArrays`` and returns the path to pass as ``--data-source``. The
keyword arguments that deviate from the real layout exist to write malformed variants.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

NUM_CLASSES = 100
FINE_NAMES = [f"fine_{i:03d}" for i in range(NUM_CLASSES)]
COARSE_NAMES = [f"coarse_{i:02d}" for i in range(20)]


@dataclass
class CifarArrays:
    """split -> uint8 images (N,32,32,3) and int64 fine labels (N,), plus the 100 fine names."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    class_names: list[str] = field(default_factory=lambda: list(FINE_NAMES))


def make_cifar_arrays(num_train: int = 40, num_test: int = 20, seed: int = 0) -> CifarArrays:
    """Random images; labels are a shuffled cover of 0..99 that always includes 0 and 99 in both splits."""
    rng = np.random.default_rng(seed)
    images, labels = {}, {}
    for split, n in (("train", num_train), ("test", num_test)):
        images[split] = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        split_labels = rng.integers(0, NUM_CLASSES, size=n)
        split_labels[:2] = (0, NUM_CLASSES - 1)
        labels[split] = rng.permutation(split_labels).astype(np.int64)
    return CifarArrays(images, labels)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def hub_dataset_dict(
    arrays: CifarArrays,
    image_column: str = "img",
    label_column: str = "fine_label",
    class_label: bool = True,
) -> datasets.DatasetDict:
    """The hub's schema: ``img`` (PNG Image), ``fine_label`` and ``coarse_label`` (ClassLabel).

    ``class_label=False`` stores plain int64 labels, which is the only way to store out-of-range ones.
    """
    label_feature = datasets.ClassLabel(names=arrays.class_names) if class_label else datasets.Value("int64")
    features = datasets.Features(
        {
            image_column: datasets.Image(),
            label_column: label_feature,
            "coarse_label": datasets.ClassLabel(names=COARSE_NAMES),
        }
    )
    splits = {}
    for split, images in arrays.images.items():
        labels = arrays.labels[split]
        splits[split] = datasets.Dataset.from_dict(
            {
                image_column: [{"bytes": png_bytes(img), "path": None} for img in images],
                label_column: labels,
                "coarse_label": labels % len(COARSE_NAMES),
            },
            features=features,
        )
    return datasets.DatasetDict(splits)


def write_parquet_folder(root: Path, arrays: CifarArrays, **hub_kwargs) -> Path:
    """``root/cifar100/{split}-00000-of-00001.parquet``, laid out like the hub repo."""
    (root / "cifar100").mkdir(parents=True, exist_ok=True)
    for split, ds in hub_dataset_dict(arrays, **hub_kwargs).items():
        ds.to_parquet(str(root / "cifar100" / f"{split}-00000-of-00001.parquet"))
    return root


def write_saved_dataset(root: Path, arrays: CifarArrays, **hub_kwargs) -> Path:
    """``DatasetDict.save_to_disk`` of the hub's schema."""
    hub_dataset_dict(arrays, **hub_kwargs).save_to_disk(str(root))
    return root


# -- cifar-100-python


class Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2's cPickle wrote it: text and bytes as byte strings, numpy under ``numpy.core``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_string(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_string
    dispatch[str] = save_py2_string

    def save_global(self, obj, name=None):
        if obj is np._core.multiarray._reconstruct:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def pickle_bytes(obj, py2: bool = True) -> bytes:
    if not py2:
        return pickle.dumps(obj, protocol=2)
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def python_split(images: np.ndarray, labels: np.ndarray, split: str) -> dict:
    """The dict of one split file: rows of 1024 R, 1024 G, then 1024 B values."""
    n = len(images)
    return {
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(n)],
        b"batch_label": b"training batch 1 of 1" if split == "train" else b"testing batch 1 of 1",
        b"fine_labels": [int(x) for x in labels],
        b"coarse_labels": [int(x) % len(COARSE_NAMES) for x in labels],
        b"data": np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(n, -1),
    }


def python_files(arrays: CifarArrays, py2: bool = True, overrides: dict | None = None) -> dict[str, bytes]:
    """File name -> pickled contents; ``overrides`` replaces whole objects (a name -> any picklable object)."""
    objects = {split: python_split(arrays.images[split], arrays.labels[split], split) for split in ("train", "test")}
    objects["meta"] = {
        b"fine_label_names": [n.encode() for n in arrays.class_names],
        b"coarse_label_names": [n.encode() for n in COARSE_NAMES],
    }
    objects.update(overrides or {})
    return {name: obj if isinstance(obj, bytes) else pickle_bytes(obj, py2) for name, obj in objects.items()}


def write_python_folder(root: Path, arrays: CifarArrays, py2: bool = True, overrides: dict | None = None) -> Path:
    """The extracted ``root/cifar-100-python/`` folder with ``train``, ``test`` and ``meta``."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in python_files(arrays, py2, overrides).items():
        (folder / name).write_bytes(data)
    return folder


def write_tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    """A gzipped tar of in-memory members; a name ending in "/" is a directory entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return path


def write_python_tarball(root: Path, arrays: CifarArrays, py2: bool = True, overrides: dict | None = None) -> Path:
    """``root/cifar-100-python.tar.gz`` with members ``cifar-100-python/{meta,test,train}``."""
    members = {"cifar-100-python/": b"", "cifar-100-python/file.txt~": b""}
    members.update({f"cifar-100-python/{n}": d for n, d in python_files(arrays, py2, overrides).items()})
    return write_tar_gz(root / "cifar-100-python.tar.gz", members)


def truncate_file(path: Path, fraction: float = 0.5) -> Path:
    """Cut a file short, as an interrupted download would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path

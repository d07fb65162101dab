"""CIFAR-100 from any supported source as one canonical ``DatasetDict``.

Every source ends up with splits ``train`` and ``test`` and columns ``image`` (uint8 32x32x3) and ``label``
(``ClassLabel`` with the 100 fine names), so the rest of the trainer never sees where the data came from:
the Hugging Face Hub, a parquet folder laid out like the hub repo, a ``save_to_disk`` folder, the original
``cifar-100-python.tar.gz`` (read without unpickling arbitrary objects or extracting anything) or its folder,
and generated synthetic data.
"""

from __future__ import annotations

import io
import pickle
import re
import tarfile
import zlib
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from cifar_dist.config import DataConfig, UserError
from cifar_dist.hub import first_line as _first_line
from cifar_dist.hub import from_hub

NUM_CLASSES = 100
IMAGE_SHAPE = (32, 32, 3)
IMAGE_COLUMNS = ("img", "image")
LABEL_COLUMNS = ("fine_label", "label")
PYTHON_FILES = ("train", "test", "meta")

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_PATH_SUFFIXES = (".tar", ".gz", ".tgz", ".parquet", ".json", ".arrow")
_SOURCES_HELP = (
    "a hub dataset id, a parquet folder laid out like the hub repo, a save_to_disk folder, "
    "cifar-100-python.tar.gz or its extracted folder, or 'synthetic'"
)


def canonical_features(class_names: list[str]) -> datasets.Features:
    """The features every source is converted to."""
    return datasets.Features(
        {"image": datasets.Array3D(IMAGE_SHAPE, "uint8"), "label": datasets.ClassLabel(names=list(class_names))}
    )




def load_cifar100(cfg: DataConfig, seed: int = 0) -> datasets.DatasetDict:
    """The canonical ``DatasetDict`` (train/test; image, label) for ``cfg.data_source``; raises UserError."""
    source = cfg.data_source
    class_names = None
    keep_in_memory = False
    path = Path(source).expanduser()
    if source == "synthetic":
        dd, class_names = _synthetic(cfg.synthetic_train_samples, cfg.synthetic_eval_samples, seed)
    elif path.is_file():
        dd, class_names = _from_python_tarball(path)
    elif path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            dd = _from_saved(path)
            # Without cache files every later map/cast stays in memory too, so nothing is written into the user's
            # folder (it may be read-only shared storage). Decoding all 60k PNGs costs a few seconds per run, too
            # little to justify a disk cache keyed on datasets' private fingerprint that processes could race on.
            keep_in_memory = True
        elif any((path / name).is_file() for name in PYTHON_FILES):
            dd, class_names = _from_python_folder(path)
        elif next(path.rglob("*.parquet"), None) is not None:
            dd = _from_parquet_folder(path)
        else:
            raise UserError(f"--data-source {source}: folder is not a recognised dataset; expected {_SOURCES_HELP}")
    elif _HUB_ID.fullmatch(source) and not source.lower().endswith(_PATH_SUFFIXES):
        dd = from_hub(source, _SOURCES_HELP)
    else:
        raise UserError(f"--data-source {source}: no such file or folder; expected {_SOURCES_HELP}")
    return _canonicalize(dd, source, cfg.max_train_samples, cfg.max_eval_samples, class_names, keep_in_memory)


def _from_parquet_folder(path: Path) -> datasets.DatasetDict:
    # load_dataset keeps its Arrow files (and so the decode map's cache) in datasets' cache dir, not in `path`.
    try:
        return datasets.load_dataset(str(path))
    except (OSError, ValueError, pa.ArrowException, datasets.exceptions.DatasetGenerationError) as exc:
        raise UserError(f"--data-source {path}: cannot read the parquet files ({_first_line(exc)})") from None


def _from_saved(path: Path) -> datasets.DatasetDict:
    try:
        loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise UserError(f"--data-source {path}: cannot read the save_to_disk folder ({_first_line(exc)})") from None
    if not isinstance(loaded, datasets.DatasetDict):
        raise UserError(
            f"--data-source {path}: holds a single Dataset; save a DatasetDict with splits 'train' and 'test'"
        )
    return loaded


# -- cifar-100-python (the pickled version from the CIFAR site)


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles written by Python 3 spell each bytes object as _codecs.encode(str, "latin1"); allow only
    # that spelling rather than handing out the whole codec registry.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UserError(f"pickle asks for _codecs.encode with encoding {encoding!r}; refusing to load it")
    return text.encode("latin1")


_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a pickle can otherwise run any code it names."""

    def find_class(self, module, name):
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise UserError(
                f"pickle references {module}.{name}, which a CIFAR-100 file never does; refusing to load it"
            ) from None


def _unpickle(fileobj, where: str) -> dict:
    try:
        obj = _RestrictedUnpickler(fileobj, encoding="bytes").load()
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise UserError(f"{where}: not a readable CIFAR-100 pickle ({_first_line(exc)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _from_python_folder(path: Path):
    missing = [name for name in PYTHON_FILES if not (path / name).is_file()]
    if missing:
        raise UserError(f"--data-source {path}: cifar-100-python folder lacks {', '.join(missing)}")
    parts = {}
    for name in PYTHON_FILES:
        with open(path / name, "rb") as f:
            parts[name] = _unpickle(f, str(path / name))
    return _python_to_dataset_dict(parts, str(path))


def _from_python_tarball(path: Path):
    parts, names = {}, []
    try:
        if not tarfile.is_tarfile(path):
            raise UserError(f"--data-source {path}: file is not a recognised dataset; expected {_SOURCES_HELP}")
        # Members are read in archive order straight from the stream: nothing is extracted, so member names (and
        # any path traversal in them) never reach the filesystem.
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                names.append(member.name)
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in PYTHON_FILES and base not in parts:
                    parts[base] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise UserError(f"--data-source {path}: corrupt or truncated tar archive ({_first_line(exc)})") from None
    missing = [name for name in PYTHON_FILES if name not in parts]
    if missing:
        raise UserError(
            f"--data-source {path}: archive lacks cifar-100-python/{', '.join(missing)} "
            f"(members: {', '.join(names[:6]) or 'none'}{', ...' if len(names) > 6 else ''})"
        )
    parts = {name: _unpickle(io.BytesIO(data), f"{path}:cifar-100-python/{name}") for name, data in parts.items()}
    return _python_to_dataset_dict(parts, str(path))


def _python_to_dataset_dict(parts: dict, where: str):
    try:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in parts["meta"][b"fine_label_names"]]
    except (KeyError, TypeError):
        raise UserError(f"{where}: meta has no fine_label_names") from None
    splits = {}
    for split in ("train", "test"):
        part = parts[split]
        if b"data" not in part or b"fine_labels" not in part:
            found = ", ".join(k.decode() if isinstance(k, bytes) else str(k) for k in part)
            raise UserError(f"{where}: {split} lacks data or fine_labels (found keys: {found})")
        data, labels = np.asarray(part[b"data"]), np.asarray(part[b"fine_labels"])
        if data.ndim != 2 or data.shape[1] != 32 * 32 * 3 or data.dtype != np.uint8:
            raise UserError(
                f"{where}: split {split} has image data of shape {data.shape} ({data.dtype}); "
                f"expected uint8 (N, 3072), i.e. 32x32 RGB images"
            )
        if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"{where}: split {split} has {len(data)} images but fine_labels of shape {labels.shape}")
        # Each row is the R plane, then G, then B, each 32x32 row-major.
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        splits[split] = _dataset_from_arrays(images, labels)
    return datasets.DatasetDict(splits), names


def _dataset_from_arrays(images: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
    """In-memory Dataset with an Array3D ``image`` and an int64 ``label`` column, without per-row conversion."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    nested = pa.array(images.reshape(-1))
    for dim in reversed(images.shape[1:]):
        nested = pa.ListArray.from_arrays(pa.array(np.arange(0, len(nested) + 1, dim, dtype=np.int32)), nested)
    features = datasets.Features(
        {"image": datasets.Array3D(images.shape[1:], "uint8"), "label": datasets.Value("int64")}
    )
    return datasets.Dataset.from_dict({"image": nested, "label": np.asarray(labels, dtype=np.int64)}, features)


# -- synthetic


def _synthetic(num_train: int, num_test: int, seed: int):
    """Learnable stand-in: each class is a fixed smooth colour layout, each image that layout plus noise."""
    rng = np.random.default_rng([seed, 0xC1FA])
    # A distinct base colour per class survives the global average pooling of any conv trunk, random ones included;
    # the upsampled 4x4 grid on top gives each class a smooth spatial layout as well.
    base = rng.uniform(0.0, 255.0, size=(NUM_CLASSES, 3, 1, 1))
    grid = torch.from_numpy((base + rng.uniform(-48.0, 48.0, size=(NUM_CLASSES, 3, 4, 4))).astype(np.float32))
    prototypes = torch.nn.functional.interpolate(grid, size=IMAGE_SHAPE[:2], mode="bilinear", align_corners=False)
    prototypes = prototypes.permute(0, 2, 3, 1).numpy()
    splits = {}
    for split, n in (("train", num_train), ("test", num_test)):
        labels = np.arange(n) % NUM_CLASSES
        noise = rng.normal(0.0, 20.0, size=(n, *IMAGE_SHAPE)).astype(np.float32)
        images = np.clip(prototypes[labels] + noise, 0, 255).round().astype(np.uint8)
        splits[split] = _dataset_from_arrays(images, labels)
    return datasets.DatasetDict(splits), [f"class_{i:03d}" for i in range(NUM_CLASSES)]


# -- the one canonicalisation step


def _canonicalize(dd, source: str, max_train: int | None, max_eval: int | None, class_names, keep_in_memory: bool):
    """Validate and convert any loaded DatasetDict to the canonical splits, columns and features."""
    found = ", ".join(dd) or "none"
    missing = [split for split in ("train", "test") if split not in dd]
    if missing:
        raise UserError(f"--data-source {source}: missing split {', '.join(missing)} (found splits: {found}); "
                        f"CIFAR-100 needs 'train' and 'test'")
    out = {}
    for split, limit in (("train", max_train), ("test", max_eval)):
        ds = dd[split]
        image_col = next((c for c in IMAGE_COLUMNS if c in ds.column_names), None)
        label_col = next((c for c in LABEL_COLUMNS if c in ds.column_names), None)
        if image_col is None or label_col is None:
            raise UserError(
                f"--data-source {source}: split {split} has no {'image' if image_col is None else 'label'} column "
                f"(found columns: {', '.join(ds.column_names)}); expected an image column 'img' or 'image' and a "
                f"label column 'fine_label' or 'label'"
            )
        if len(ds) == 0:
            raise UserError(f"--data-source {source}: split {split} is empty")
        if limit is not None and limit < len(ds):
            ds = ds.select(range(limit))
        label_feature = ds.features[label_col]
        if isinstance(label_feature, datasets.ClassLabel):
            if label_feature.num_classes != NUM_CLASSES:
                raise UserError(
                    f"--data-source {source}: label column {label_col!r} has {label_feature.num_classes} classes; "
                    f"expected the {NUM_CLASSES} CIFAR-100 fine labels"
                )
            if split == "train":
                class_names = label_feature.names
        _check_label_range(ds, label_col, split, source)
        if split == "train":
            class_names = canonical_names(class_names)
        out[split] = _canonical_split(ds, image_col, label_col, split, source, class_names, keep_in_memory)
    return datasets.DatasetDict(out)


# Misspellings of CIFAR-100's fine label names in copies of the dataset (the Hugging Face copy has "cra").
_NAME_FIXES = {"cra": "crab"}


def canonical_names(names: list[str] | None) -> list[str]:
    """CIFAR-100's own class names whatever the source: known misspellings fixed, placeholders if unnamed."""
    if names is None:
        return [f"class_{i:03d}" for i in range(NUM_CLASSES)]
    return [_NAME_FIXES.get(name, name) for name in names]


def _check_label_range(ds, label_col: str, split: str, source: str):
    labels = ds.with_format("arrow")[:][label_col]
    if not pa.types.is_integer(labels.type):
        raise UserError(f"--data-source {source}: split {split} label column {label_col!r} is {labels.type}, "
                        f"expected integer class ids")
    bounds = pc.min_max(labels)
    lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
    if labels.null_count or lo < 0 or hi >= NUM_CLASSES:
        raise UserError(f"--data-source {source}: split {split} has labels in [{lo}, {hi}]"
                        f"{' and missing labels' if labels.null_count else ''}; expected 0..{NUM_CLASSES - 1}")


def _canonical_split(ds, image_col, label_col, split, source, class_names, keep_in_memory):
    features = canonical_features(class_names)
    image_feature = ds.features[image_col]
    if isinstance(image_feature, datasets.Image):
        _check_decoded(np.asarray(ds[0][image_col]), split, source)
        return ds.map(
            _decode_batch,
            batched=True,
            fn_kwargs={"image_col": image_col, "label_col": label_col, "split": split, "source": source},
            remove_columns=ds.column_names,
            features=features,
            keep_in_memory=keep_in_memory,
            desc=f"decoding {split} images",
        )
    if isinstance(image_feature, datasets.Array3D):
        _check_image_shape(tuple(image_feature.shape), split, source)
        if image_feature.dtype != "uint8":
            raise UserError(f"--data-source {source}: split {split} images are {image_feature.dtype}, expected uint8")
        ds = ds.select_columns([image_col, label_col]).rename_columns({image_col: "image", label_col: "label"})
        return ds if ds.features == features else ds.cast(features, keep_in_memory=keep_in_memory)
    raise UserError(
        f"--data-source {source}: split {split} column {image_col!r} is {type(image_feature).__name__}; expected "
        f"an Image or Array3D((32, 32, 3), uint8) column"
    )


def _check_image_shape(shape, split: str, source: str):
    if tuple(shape) != IMAGE_SHAPE:
        raise UserError(
            f"--data-source {source}: split {split} has an image of shape {tuple(shape)}; expected 32x32 RGB, "
            f"i.e. shape {IMAGE_SHAPE}"
        )


def _check_decoded(image: np.ndarray, split: str, source: str):
    _check_image_shape(image.shape, split, source)
    if image.dtype != np.uint8:
        raise UserError(f"--data-source {source}: split {split} has a {image.dtype} image; expected 8-bit RGB")


def _decode_batch(batch, image_col, label_col, split, source):
    arrays = [np.asarray(img) for img in batch[image_col]]
    for a in arrays:
        _check_decoded(a, split, source)
    return {"image": np.stack(arrays), "label": batch[label_col]}

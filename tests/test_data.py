import dataclasses
import http.server
import logging
import os
import pickle
import threading
import time
from pathlib import Path

import datasets
import httpx
import httpx2
import huggingface_hub
import numpy as np
import pytest
import requests
import torch
from accelerate.data_loader import BatchSamplerShard, DataLoaderShard, prepare_data_loader, skip_first_batches
from accelerate.state import AcceleratorState, PartialState
from PIL import Image

from cifar_dist.config import BatchPlan, DataConfig, UserError
from cifar_dist.data import (
    CifarSplits,
    EpochShuffleSampler,
    ImageTensorDataset,
    build_dataloaders,
    build_splits,
    fingerprint,
    load_cifar100,
)
from cifar_files import (
    CifarArrays,
    hub_dataset_dict,
    make_cifar_arrays,
    pickle_bytes,
    truncate_file,
    write_parquet_folder,
    write_python_folder,
    write_python_tarball,
    write_saved_dataset,
    write_tar_gz,
)
from conftest import _free_port, run_train


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """A private datasets cache per test: datasets reads these config values at call time, the env var at import."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", cache / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", cache / "downloads" / "extracted")
    return cache


@pytest.fixture(scope="module")
def arrays():
    return make_cifar_arrays(num_train=40, num_test=20, seed=0)


def load(source, **kw):
    return build_splits(DataConfig(data_source=str(source), **kw))


def assert_matches(splits: CifarSplits, arrays: CifarArrays):
    for split in ("train", "test"):
        got = getattr(splits, split)
        assert got.images.dtype == torch.uint8 and got.labels.dtype == torch.int64
        np.testing.assert_array_equal(got.images.numpy(), arrays.images[split])
        np.testing.assert_array_equal(got.labels.numpy(), arrays.labels[split])
    assert splits.class_names == arrays.class_names


def user_error(source, **kw) -> str:
    with pytest.raises(UserError) as info:
        load(source, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- every local format gives the same data


WRITERS = {
    "parquet": write_parquet_folder,
    "save_to_disk": write_saved_dataset,
    "python_folder": write_python_folder,
    "python_tarball": write_python_tarball,
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_local_formats_load_identically(fmt, arrays, tmp_path):
    source = WRITERS[fmt](tmp_path / "src", arrays)
    dd = load_cifar100(DataConfig(data_source=str(source)))
    assert set(dd) == {"train", "test"}
    assert dd["train"].features == datasets.Features(
        {"image": datasets.Array3D((32, 32, 3), "uint8"), "label": datasets.ClassLabel(names=arrays.class_names)}
    )
    assert_matches(load(source), arrays)


def test_the_same_data_has_one_fingerprint_in_every_format_and_other_data_another(arrays, tmp_path):
    prints = {fingerprint(load(write(tmp_path / fmt, arrays)).train) for fmt, write in WRITERS.items()}
    assert len(prints) == 1
    relabelled = dataclasses.replace(arrays, labels={**arrays.labels, "train": arrays.labels["train"].copy()})
    relabelled.labels["train"][5] = (relabelled.labels["train"][5] + 1) % 100
    repainted = dataclasses.replace(arrays, images={**arrays.images, "train": arrays.images["train"].copy()})
    repainted.images["train"][-1, 0, 0, 0] ^= 1  # the last image is always among those read
    others = {fingerprint(load(write_parquet_folder(tmp_path / name, changed)).train)
              for name, changed in (("relabelled", relabelled), ("repainted", repainted))}
    others.add(fingerprint(load(write_parquet_folder(tmp_path / "again", arrays), max_train_samples=39).train))
    assert len(others) == 3 and not others & prints


@pytest.mark.parametrize("fmt", ["python_folder", "python_tarball"])
def test_python3_protocol2_pickles_load(fmt, arrays, tmp_path):
    source = WRITERS[fmt](tmp_path / "src", arrays, py2=False)
    assert_matches(load(source), arrays)


def test_the_hub_copys_misspelt_crab_comes_out_as_crab(arrays, tmp_path):
    names = list(arrays.class_names)
    names[26] = "cra"  # as the Hugging Face copy of CIFAR-100 spells it
    saved = write_saved_dataset(tmp_path / "saved", dataclasses.replace(arrays, class_names=names))
    splits = build_splits(DataConfig(data_source=str(saved)))
    assert splits.class_names[26] == "crab" and splits.class_names[:26] == names[:26]


def test_source_folders_stay_untouched_and_cache_is_private(arrays, tmp_path, hf_cache):
    saved = write_saved_dataset(tmp_path / "saved", arrays)
    parquet = write_parquet_folder(tmp_path / "parquet", arrays)
    before = {p: sorted(q.name for q in p.rglob("*")) for p in (saved, parquet)}
    for source in (saved, parquet):
        load(source)
        load(source)
    assert {p: sorted(q.name for q in p.rglob("*")) for p in (saved, parquet)} == before
    decoded = load_cifar100(DataConfig(data_source=str(parquet)))["train"]
    assert decoded.cache_files and all(str(f["filename"]).startswith(str(hf_cache)) for f in decoded.cache_files)


def test_max_samples_take_the_first_rows(arrays, tmp_path):
    source = write_parquet_folder(tmp_path / "src", arrays)
    splits = load(source, max_train_samples=7, max_eval_samples=3)
    np.testing.assert_array_equal(splits.train.images.numpy(), arrays.images["train"][:7])
    np.testing.assert_array_equal(splits.test.labels.numpy(), arrays.labels["test"][:3])
    whole = load(source, max_train_samples=1000)
    assert len(whole.train) == 40


# -- synthetic


def synthetic(seed=0, **kw):
    kw = {"synthetic_train_samples": 300, "synthetic_eval_samples": 200, **kw}
    return build_splits(DataConfig(data_source="synthetic", **kw), seed=seed)


def test_synthetic_is_deterministic_and_seeded():
    a, b, c = synthetic(0), synthetic(0), synthetic(1)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.train.images, c.train.images)
    assert len(a.train) == 300 and len(a.test) == 200
    assert a.class_names == [f"class_{i:03d}" for i in range(100)]
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape[1:] == (32, 32, 3)
    assert torch.bincount(a.train.labels, minlength=100).tolist() == [3] * 100
    small = synthetic(0, max_train_samples=50, max_eval_samples=10)
    assert len(small.train) == 50 and len(small.test) == 10
    assert torch.equal(small.train.images, a.train.images[:50])


def test_synthetic_is_learnable_from_a_frozen_random_trunk():
    splits = synthetic(0, synthetic_train_samples=2000, synthetic_eval_samples=500)
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(64, 128, 3, 2, 1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
    ).requires_grad_(False)
    head = torch.nn.Linear(128, 100)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)

    def logits(images):
        return head(trunk(images.permute(0, 3, 1, 2).float() / 127.5 - 1))

    train, test = build_dataloaders(splits, BatchPlan(32, 32, 1, 1), eval_batch_size=250, seed=0)
    for step, (images, labels) in enumerate(train):
        loss = torch.nn.functional.cross_entropy(logits(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 40:
            break
    with torch.no_grad():
        correct = sum((logits(x).argmax(1) == y).sum().item() for x, y in test)
    assert correct / len(splits.test) > 0.05  # chance is 0.01


# -- malformed sources


def test_missing_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (the relative path must not exist whoever runs the tests from where)
    assert "no such file or folder" in user_error(tmp_path / "nowhere")
    assert "no such file or folder" in user_error("./cifar-100-python.tar.gz")


def test_unrecognised_file_and_folder(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 100)
    assert "file is not a recognised dataset" in user_error(text)
    (tmp_path / "empty").mkdir()
    assert "folder is not a recognised dataset" in user_error(tmp_path / "empty")


def test_corrupt_tarball(arrays, tmp_path):
    tarball = truncate_file(write_python_tarball(tmp_path, arrays), 0.5)
    assert "corrupt or truncated tar archive" in user_error(tarball)
    tarball.write_bytes(b"\x1f\x8b" + os.urandom(2000))
    message = user_error(tarball)
    assert "corrupt or truncated" in message or "not a recognised dataset" in message


def test_tarball_without_meta(arrays, tmp_path):
    tarball = write_tar_gz(tmp_path / "c.tar.gz", {"cifar-100-python/train": pickle_bytes({b"data": 1})})
    message = user_error(tarball)
    assert "archive lacks cifar-100-python/test, meta" in message and "cifar-100-python/train" in message


def test_python_folder_missing_file(arrays, tmp_path):
    folder = write_python_folder(tmp_path, arrays)
    (folder / "meta").unlink()
    assert "cifar-100-python folder lacks meta" in user_error(folder)


def test_missing_split(arrays, tmp_path):
    only_train = CifarArrays({"train": arrays.images["train"]}, {"train": arrays.labels["train"]})
    message = user_error(write_saved_dataset(tmp_path / "saved", only_train))
    assert "missing split test (found splits: train)" in message
    message = user_error(write_parquet_folder(tmp_path / "parquet", only_train))
    assert "missing split test (found splits: train)" in message


def test_single_dataset_saved(arrays, tmp_path):
    hub_dataset_dict(arrays)["train"].save_to_disk(str(tmp_path / "one"))
    assert "holds a single Dataset" in user_error(tmp_path / "one")


def test_missing_columns(arrays, tmp_path):
    message = user_error(write_saved_dataset(tmp_path / "a", arrays, image_column="picture"))
    assert "split train has no image column (found columns: picture, fine_label, coarse_label)" in message
    message = user_error(write_parquet_folder(tmp_path / "b", arrays, label_column="target"))
    assert "split train has no label column (found columns: img, target, coarse_label)" in message


def test_alternative_column_names(arrays, tmp_path):
    source = write_saved_dataset(tmp_path / "a", arrays, image_column="image", label_column="label")
    assert_matches(load(source), arrays)


def test_labels_out_of_range(arrays, tmp_path):
    bad = CifarArrays(dict(arrays.images), {**arrays.labels, "test": arrays.labels["test"].copy()})
    bad.labels["test"][3] = 100
    message = user_error(write_python_folder(tmp_path / "py", bad))
    assert "split test has labels in [0, 100]; expected 0..99" in message
    bad.labels["test"][3] = -1
    message = user_error(write_saved_dataset(tmp_path / "saved", bad, class_label=False))
    assert "split test has labels in [-1, 99]; expected 0..99" in message


def test_wrong_number_of_classes(tmp_path):
    ten = make_cifar_arrays(10, 10)
    ten = CifarArrays(ten.images, {k: v % 10 for k, v in ten.labels.items()}, [f"c{i}" for i in range(10)])
    assert "'fine_label' has 10 classes; expected the 100" in user_error(write_parquet_folder(tmp_path, ten))


def test_wrong_image_size(arrays, tmp_path):
    rng = np.random.default_rng(1)
    small = CifarArrays({k: v[:, :28, :28] for k, v in arrays.images.items()}, arrays.labels)
    message = user_error(write_python_folder(tmp_path / "py", small))
    assert "split train has image data of shape (40, 2352)" in message
    message = user_error(write_parquet_folder(tmp_path / "pq", small))
    assert "split train has an image of shape (28, 28, 3); expected 32x32 RGB" in message
    gray = CifarArrays({k: v[..., 0] for k, v in arrays.images.items()}, arrays.labels)
    assert "split train has an image of shape (32, 32)" in user_error(write_saved_dataset(tmp_path / "gray", gray))
    # A bad image past the first one is caught while decoding, not only by the up-front look at row 0.
    mixed = list(arrays.images["test"])
    mixed[5] = rng.integers(0, 256, size=(32, 32, 4), dtype=np.uint8)
    mixed_arrays = CifarArrays({**arrays.images, "test": mixed}, arrays.labels)
    message = user_error(write_saved_dataset(tmp_path / "mixed", mixed_arrays))
    assert "split test has an image of shape (32, 32, 4)" in message


# -- the restricted unpickler


class RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class CallsEval:
    def __reduce__(self):
        return eval, ("__import__('os').system('true')",)


@pytest.mark.parametrize("where", ["folder", "tarball"])
def test_malicious_pickle_is_refused_unexecuted(arrays, tmp_path, where):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": RunsCommand(f"touch {marker}")}, protocol=2)
    writer = write_python_folder if where == "folder" else write_python_tarball
    source = writer(tmp_path / "src", arrays, overrides={"train": payload})
    message = user_error(source)
    assert "pickle references posix.system" in message and "refusing to load it" in message
    assert not marker.exists()


def test_other_pickle_tricks_are_refused(arrays, tmp_path):
    source = write_python_folder(tmp_path / "a", arrays, overrides={"meta": pickle.dumps(CallsEval(), protocol=2)})
    assert "pickle references __builtin__.eval" in user_error(source)  # protocol 2 writes py2 module names
    codec = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    source = write_python_folder(tmp_path / "b", arrays, overrides={"test": codec})
    assert "_codecs.encode with encoding 'rot13'" in user_error(source)
    source = write_python_folder(tmp_path / "c", arrays, overrides={"test": b"not a pickle at all"})
    assert "not a readable CIFAR-100 pickle" in user_error(source)
    source = write_python_folder(tmp_path / "d", arrays, overrides={"test": [1, 2, 3]})
    assert "expected a pickled dict, got list" in user_error(source)


# -- the hub


def test_hub_offline_gives_the_local_copy_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read the variables once at import, so the module constants are what actually switch them.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    message = user_error("uoft-cs/cifar100")
    assert time.monotonic() - start < 15  # no retries (datasets' own take 23 s); room for a busy machine
    assert "--data-source uoft-cs/cifar100:" in message and "cannot be reached" in message
    assert "--data-source PATH" in message and "cifar-100-python.tar.gz" in message
    assert "datasets.load_dataset('uoft-cs/cifar100').save_to_disk('DIR')" in message


@pytest.fixture()
def hub_at(monkeypatch, tmp_path):
    """Point datasets and huggingface_hub at ``endpoint`` (online, empty hub cache); returns the setter. Both
    read HF_ENDPOINT / HF_HUB_OFFLINE once at import, so their module constants are what actually switch them."""

    def point(endpoint: str) -> str:
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
        return endpoint

    return point


@pytest.fixture()
def hub_answering_404(hub_at):
    """A local server that answers every request as the Hub does for a repo it does not have."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield hub_at(f"http://127.0.0.1:{server.server_address[1]}")
    server.shutdown()
    server.server_close()


def chained(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    "error, reason",
    [
        (ConnectionError("Couldn't reach 'someone/cifar' on the Hub (ConnectError)"), "ConnectionError: Couldn't"),
        (httpx2.ConnectError("[Errno 111] Connection refused"), "ConnectError: [Errno 111] Connection refused"),
        (httpx.ReadTimeout("timed out"), "ReadTimeout: timed out"),
        (requests.exceptions.ConnectionError("Max retries exceeded"), "ConnectionError: Max retries exceeded"),
        (TimeoutError("read timed out"), "TimeoutError: read timed out"),
        # huggingface_hub reports a failed download as a missing local file, the network error as its cause
        (chained(huggingface_hub.errors.LocalEntryNotFoundError("not in cache"),
                 httpx2.RemoteProtocolError("peer closed connection")), "RemoteProtocolError: peer closed connection"),
    ],
)
def test_network_errors_during_the_load_are_one_line(hub_answering_404, monkeypatch, error, reason):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", fail)
    message = user_error("someone/cifar")
    assert message.startswith(f"--data-source someone/cifar: not a local path, and the Hugging Face Hub "
                              f"({hub_answering_404}) cannot be reached to download it ({reason}")


def test_a_dataset_the_hub_does_not_have_is_a_user_error(hub_answering_404):
    message = user_error("someone/cifar")  # the real load_dataset against a hub that answers 404
    assert message.startswith("--data-source someone/cifar: no such local path nor dataset on the Hugging Face Hub")


def test_other_load_failures_are_not_disguised_as_network_errors(hub_answering_404, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        load("someone/cifar")


def test_unreachable_hub_is_one_fast_line_without_retries(hub_at, caplog):
    # The real load_dataset against a closed local port, nothing cached: datasets alone would retry for 23 s
    # and log 11 lines.
    endpoint = hub_at(f"http://127.0.0.1:{_free_port()}")
    start = time.monotonic()
    with caplog.at_level(logging.INFO):
        message = user_error("someone/cifar100-copy")
    assert time.monotonic() - start < 15  # no retries (they take 23 s); room for a busy machine
    assert message.startswith(f"--data-source someone/cifar100-copy: not a local path, and the Hugging Face Hub "
                              f"({endpoint}) cannot be reached to download it (ConnectError: ")
    assert "Connection refused" in message and "--data-source PATH" in message
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub") and r.levelno >= logging.WARNING]


def test_unreachable_hub_uses_the_cached_copy_and_says_so(hub_at, hf_cache, arrays, tmp_path, capsys):
    cache_hub_dataset("someone/cifar100-copy", arrays, tmp_path / "files")
    endpoint = hub_at(f"http://127.0.0.1:{_free_port()}")
    start = time.monotonic()
    assert_matches(load("someone/cifar100-copy"), arrays)
    assert time.monotonic() - start < 15  # no retries (they take 23 s)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cifar_dist:")]
    assert len(notes) == 1
    assert notes[0].startswith(f"cifar_dist: warning: the Hugging Face Hub ({endpoint}) cannot be reached "
                               f"(ConnectError: ")
    assert notes[0].endswith("); using the cached copy of someone/cifar100-copy")


def cache_hub_dataset(repo_id: str, arrays: CifarArrays, scratch: Path) -> None:
    """Leave in datasets' cache what ``load_dataset(repo_id)`` leaves after a download (default config), built
    from local parquet files: ``<cache>/<namespace>___<name>/default/0.0.0/<hash>/<name>-<split>.arrow``."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    name = repo_id.split("/")[1]
    scratch.mkdir(parents=True)
    for split, ds in hub_dataset_dict(arrays).items():
        ds.to_parquet(str(scratch / f"{split}.parquet"))
    files = datasets.data_files.DataFilesDict.from_patterns({s: [str(scratch / f"{s}.parquet")] for s in arrays.images})
    builder = Parquet(dataset_name=name, config_name="default", data_files=files, hash="0123abcd")
    builder.download_and_prepare()
    built = Path(builder.cache_dir)  # <cache>/<name>/default-<config hash>/0.0.0/0123abcd
    target = Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___") / "default"
    target.parent.mkdir(parents=True)
    built.parent.parent.rename(target)


@pytest.mark.slow
def test_trainer_with_the_hub_unreachable_exits_2_with_one_line(test_env, tmp_path):
    port = _free_port()
    env = {**test_env, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    start = time.monotonic()
    proc = run_train(env, ["--data-source", "someone/cifar100-copy", "--output-dir", str(tmp_path / "out")],
                     check=False, timeout=120)
    assert time.monotonic() - start < 60  # most of it is importing torch; the hub check itself is instant
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"cifar_dist.train: error: --data-source someone/cifar100-copy: not a local path, "
                               f"and the Hugging Face Hub (http://127.0.0.1:{port}) cannot be reached to download "
                               f"it (ConnectError: ")


# -- sampler and loaders


def index_splits(n=100) -> CifarSplits:
    """Labels equal row indices, so each batch's labels say which rows it holds."""
    data = ImageTensorDataset(torch.zeros(n, 32, 32, 3, dtype=torch.uint8), torch.arange(n))
    return CifarSplits(train=data, test=data, class_names=[])


def epoch_order(n, seed, epoch, multiple_of=32) -> list[int]:
    sampler = EpochShuffleSampler(n, seed, multiple_of)
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.fixture
def accelerate_state():
    fresh = not PartialState._shared_state
    yield PartialState()
    if fresh:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_sampler_orders():
    order = epoch_order(100, seed=3, epoch=0)
    assert len(order) == 96 == len(EpochShuffleSampler(100, 3, 32))
    assert len(set(order)) == 96 and set(order) <= set(range(100))
    assert order == epoch_order(100, seed=3, epoch=0)
    assert order != epoch_order(100, seed=3, epoch=1)
    assert order != epoch_order(100, seed=4, epoch=0)
    assert sorted(epoch_order(64, seed=0, epoch=2)) == list(range(64))


def shard_batches(plan: BatchPlan, seed=0, epoch=None, n=100) -> list[list[list[int]]]:
    """Per process, the label (= row index) lists of its batches, through accelerate's own prepare step."""
    train, _ = build_dataloaders(index_splits(n), plan, eval_batch_size=8, seed=seed)
    out = []
    for rank in range(plan.num_processes):
        loader = prepare_data_loader(train, num_processes=plan.num_processes, process_index=rank)
        assert isinstance(loader, DataLoaderShard)
        assert loader.batch_sampler.sampler is train.sampler if plan.num_processes == 1 else (
            isinstance(loader.batch_sampler, BatchSamplerShard) and loader.batch_sampler.batch_sampler.sampler
            is train.sampler
        )
        if epoch is not None:
            loader.set_epoch(epoch)
        out.append([labels.tolist() for _, labels in loader])
    return out


def global_steps(plan: BatchPlan, per_rank: list[list[list[int]]]) -> list[list[int]]:
    a = plan.grad_accum_steps
    num_steps = len(per_rank[0]) // a
    return [sorted(i for rank in per_rank for batch in rank[k * a:(k + 1) * a] for i in batch)
            for k in range(num_steps)]


LAYOUTS = [BatchPlan(32, 32, 1, 1), BatchPlan(32, 16, 2, 1), BatchPlan(32, 8, 2, 2), BatchPlan(32, 8, 4, 1)]


@pytest.mark.usefixtures("accelerate_state")
@pytest.mark.parametrize("epoch", [0, 5])
def test_global_steps_do_not_depend_on_the_layout(epoch):
    order = epoch_order(100, seed=0, epoch=epoch)
    expected = [sorted(order[32 * k:32 * (k + 1)]) for k in range(3)]
    for plan in LAYOUTS:
        per_rank = shard_batches(plan, epoch=epoch)
        assert all(len(b) == plan.per_device_batch_size for rank in per_rank for b in rank)
        assert global_steps(plan, per_rank) == expected, plan


@pytest.mark.usefixtures("accelerate_state")
def test_two_process_shards_cover_each_epoch_once():
    plan = BatchPlan(32, 16, 2, 1)
    for epoch in range(3):
        per_rank = shard_batches(plan, epoch=epoch)
        seen = [i for rank in per_rank for batch in rank for i in batch]
        assert sorted(seen) == sorted(epoch_order(100, 0, epoch))
        assert len(seen) == len(set(seen)) == 96
    first, second = (shard_batches(plan, epoch=e) for e in (0, 1))
    assert first != second


@pytest.mark.usefixtures("accelerate_state")
def test_prepared_loader_set_epoch_reaches_the_sampler():
    plan = BatchPlan(32, 16, 2, 1)
    train, _ = build_dataloaders(index_splits(), plan, eval_batch_size=8, seed=7)
    loader = prepare_data_loader(train, num_processes=2, process_index=1)
    loader.set_epoch(4)
    assert train.sampler.epoch == 4
    assert [b.tolist() for _, b in loader] == [epoch_order(100, 7, 4)[32 * k + 16:32 * k + 32] for k in range(3)]
    # Without set_epoch, accelerate's own counter moves on after each full pass (and overrides the sampler's).
    train.sampler.set_epoch(0)
    assert [b.tolist() for _, b in loader] == [epoch_order(100, 7, 5)[32 * k + 16:32 * k + 32] for k in range(3)]


@pytest.mark.usefixtures("accelerate_state")
@pytest.mark.parametrize("num_processes", [1, 2])
def test_resuming_mid_epoch_after_set_epoch(num_processes):
    # The trainer's contract: set_epoch on the prepared loader, then skip_first_batches for the rest of the epoch.
    plan = BatchPlan(32, 32 // num_processes, num_processes, 1)
    train, _ = build_dataloaders(index_splits(), plan, eval_batch_size=8, seed=7)
    loader = prepare_data_loader(train, num_processes=num_processes, process_index=0)
    loader.set_epoch(2)
    resumed = skip_first_batches(loader, 1)
    order = epoch_order(100, 7, 2)
    assert [b.tolist() for _, b in resumed] == [order[32 * k:32 * k + plan.per_device_batch_size] for k in (1, 2)]


def test_dataloader_batches(arrays, tmp_path):
    splits = load(write_python_folder(tmp_path, arrays))
    train, test = build_dataloaders(splits, BatchPlan(32, 8, 2, 2), eval_batch_size=6, seed=0)
    assert len(train) == 4 and len(test) == 4
    images, labels = next(iter(train))
    assert images.dtype == torch.uint8 and images.shape == (8, 32, 32, 3)
    assert labels.dtype == torch.int64 and labels.shape == (8,)
    got = [(x, y) for x, y in test]
    assert [len(y) for _, y in got] == [6, 6, 6, 2]
    np.testing.assert_array_equal(torch.cat([x for x, _ in got]).numpy(), arrays.images["test"])
    assert torch.equal(torch.cat([y for _, y in got]), splits.test.labels)
    images, labels = splits.train.__getitems__([3, 1])  # the stacked batch, as the loaders take it
    assert torch.equal(images, torch.stack([splits.train[3][0], splits.train[1][0]]))
    assert labels.tolist() == [splits.train[3][1].item(), splits.train[1][1].item()]


def test_training_set_smaller_than_a_global_batch(arrays, tmp_path):
    splits = load(write_python_folder(tmp_path, arrays))
    with pytest.raises(UserError, match="has 40 images, fewer than one global batch of 64"):
        build_dataloaders(splits, BatchPlan(64, 32, 2, 1), eval_batch_size=8, seed=0)


def test_image_decoding_is_plain_pil(arrays):
    # Guards the fixture: the PNG round trip is lossless, so any mismatch above is the loader's fault.
    image = arrays.images["train"][0]
    assert np.array_equal(np.asarray(Image.fromarray(image)), image)


def test_each_split_is_pinned_where_it_lives_in_host_memory_and_copied_without_blocking(monkeypatch):
    # With CUDA: the images on the GPU, the test split's cached features left in host memory (--cache-eval-features
    # yes where they do not fit): only the test loader pins, and the prepared loaders copy without blocking, so a
    # batch from host memory does not make the host wait for the GPU.
    from cifar_dist.data import loader_config, pinned

    on_gpu = ImageTensorDataset(torch.zeros(64, 32, 32, 3, dtype=torch.uint8, device="meta"),
                                torch.zeros(64, dtype=torch.int64, device="meta"))
    in_host = ImageTensorDataset(torch.zeros(8, 32, 32, 3, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    train, test = build_dataloaders(CifarSplits(on_gpu, in_host, ["a"]), BatchPlan(32, 32, 1, 1), 8, seed=0)
    assert (train.pin_memory, test.pin_memory) == (False, True)
    assert pinned(in_host) and not pinned(on_gpu)
    assert loader_config().non_blocking
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not pinned(in_host)  # no GPU: nothing to copy to

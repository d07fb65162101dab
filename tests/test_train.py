"""The real trainer, one process, through its command line."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cifar_dist.cli import parse_config
from conftest import TINY, V1_FILE, run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_process_run(test_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    proc = run_train(test_env, [*TINY, "--num-epochs", "2", "--max-steps", "10", "--checkpoint-every-steps", "3",
                                "--output-dir", str(out)])
    return out, proc


def test_run_writes_every_output(one_process_run):
    out, proc = one_process_run
    assert {"config.yaml", "metrics.jsonl", "results.md", "curves.png", "model.safetensors", "checkpoints"} <= {
        p.name for p in out.iterdir()}
    cfg = parse_config(["--config", str(out / "config.yaml")])
    assert cfg.train.max_steps == 10 and cfg.data.data_source == "synthetic"

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 256 images / 32 = 8 steps per epoch; --max-steps 10 ends in epoch 2, after 2 of its steps.
    assert [(r["epoch"], r["step"], r.get("partial"), r.get("steps_in_epoch")) for r in records] == [
        (1, 8, None, None), (2, 10, True, 2)]
    for r in records:
        assert {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "epoch_time_s",
                "train_images_per_s"} <= set(r)
        assert r["val_num_samples"] == 100
        assert 0 <= r["val_acc"] <= r["val_top5"] <= 1
    # Epoch 1 saved mid-epoch at steps 3 and 6: that time is counted once, apart from training, so images/s
    # measures the steps alone (a GPU step is far faster than a save: counted in, it halved the figure).
    first = records[0]
    assert first["checkpoint_time_s"] > 0 and first["train_time_s"] > 0
    parts = first["train_time_s"] + first["checkpoint_time_s"] + first["eval_time_s"]
    assert parts <= first["epoch_time_s"] + 0.002  # each figure is rounded to the millisecond
    assert first["train_images_per_s"] == pytest.approx(8 * 32 / first["train_time_s"], rel=1e-2)
    # The launch's first epoch says where the time before its first step went; the phases make up the total.
    startup = first["startup_s"]
    assert {"launch", "imports", "preflight", "accelerator", "data", "model", "device", "tracker"} <= set(startup)
    assert sum(v for k, v in startup.items() if k != "total") == pytest.approx(startup["total"], abs=0.05)
    assert startup["launch"] > 0 and startup["imports"] > 0.3  # the interpreter, then torch's import and more
    assert "startup_s" not in records[1]
    assert re.search(r"^start-up: [\d.]+ s before the first step \(launch [\d.]+, imports [\d.]+, preflight",
                     proc.stdout, re.M)
    # ... and its closing line, where all of its time went: the parts make up the time since the launch.
    from cifar_dist.bench import trainer_times

    total, times = trainer_times(proc.stdout)
    assert list(times) == ["start-up", "training", "evaluation", "checkpoints", "report", "other"]
    assert sum(times.values()) == pytest.approx(total, abs=0.35) and times["other"] >= 0  # each rounded to 0.1
    assert times["start-up"] == pytest.approx(startup["total"], abs=0.06)
    assert times["training"] == pytest.approx(sum(r["train_time_s"] for r in records), abs=0.06)
    assert times["checkpoints"] >= first["checkpoint_time_s"] - 0.05 and times["report"] > 0

    results = (out / "results.md").read_text()
    assert "| Epoch | Training Accuracy | Validation Accuracy | Training Loss | Validation Loss |" in results
    assert (f"| 2 (partial, 2 steps) | {100 * records[1]['train_acc']:.1f}% | {100 * records[1]['val_acc']:.1f}% |"
            in results)

    # Parameter counts are announced at start (the seed's Keras count differs by its conv biases).
    assert "25,708,708 total, 17,165,412 trainable, 8,543,296 frozen" in proc.stdout


def test_only_layer4_and_head_changed(one_process_run, test_env):
    out, _ = one_process_run
    final = load_file(str(out / "model.safetensors"))
    start = torch.load(Path(test_env["TORCH_HOME"]) / "hub" / "checkpoints" / V1_FILE, weights_only=True)
    for key, value in start.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(final[key], value) != key.startswith("layer4."), key
    assert {k for k in final if k.startswith("fc.")} == {"fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"}


def assert_refused(proc, message: str):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--per-device-batch-size", "12"], "global batch 32 is not divisible by 1 processes x per-device batch 12"),
    (["--per-device-batch-size", "64"], "--per-device-batch-size 64 is larger than global batch 32"),
    (["--weights", "missing.pth"], "--weights missing.pth: no such file"),
    # The weights are read before the data: a typo in the file fails in seconds, not after a download.
    (["--weights", "missing.pth", "--data-source", "/nonexistent/cifar"], "--weights missing.pth: no such file"),
    (["--data-source", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--num-classes", "10"], "--num-classes 10: the training data has 100 classes (labels 0 to 99)"),
])
def test_bad_input_stops_before_work(test_env, tmp_path, args, message):
    out = tmp_path / "out"
    proc = run_train(test_env, [*TINY, "--output-dir", str(out), *args], check=False)
    assert_refused(proc, message)
    assert not (out / "model.safetensors").exists() and not (out / "metrics.jsonl").exists()


def test_unwritable_output_dir(test_env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    proc = run_train(test_env, [*TINY, "--output-dir", str(blocker / "out")], check=False)
    assert_refused(proc, f"--output-dir {blocker / 'out'} is not writable")
    assert blocker.read_text() == "keep me"


@pytest.mark.multiprocess
@pytest.mark.parametrize("bad, message", [
    # Found by the main process while the others wait for it to load the data and weights first.
    ("weights", "--weights {path}: not a readable state dict (SafetensorError); is the file complete?"),
    ("head", "--num-classes 10: the training data has 100 classes (labels 0 to 99); give at least that many"),
])
def test_bad_input_found_while_loading_stops_every_process_with_one_line(test_env, tmp_path, bad, message):
    out, weights = tmp_path / "out", tmp_path / "truncated.safetensors"
    weights.write_bytes(b"not a state dict")
    args = ["--weights", str(weights)] if bad == "weights" else ["--num-classes", "10"]
    proc = run_train(test_env, [*TINY, *args, "--output-dir", str(out)], num_processes=2, check=False, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("cifar_dist.train: ")]
    assert errors == [f"cifar_dist.train: error: {message.format(path=weights)}"], errors
    assert "[rank" not in proc.stderr  # no process but the launcher prints a traceback
    assert not out.exists()


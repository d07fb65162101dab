"""cifar_dist.evaluate: the trainer's own figures, exactly, from real runs on 1 and 2 processes; the figures it
adds (confusion, calibration, confused pairs) on known inputs; its refusals; and predict agreeing with it."""

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import conftest
from cifar_dist.checkpoint import save_model
from cifar_dist.config import ModelConfig, make_config, save_config
from cifar_dist.data import build_splits
from cifar_dist.evaluate import (
    CIFAR100_SUPERCLASSES,
    SUPERCLASS_OF,
    calibration,
    confusion_matrix,
    main,
    most_confused,
    plot_confusion,
    superclass_order,
)
from cifar_dist.model import build_model
from conftest import CPU_2PROC, REPO, TINY, _free_port, records, run_train
from wandb_log import read_records, run_id

# Several eval batches of 32 per process, the last one short: the gather has padding to drop.
RUN = [*TINY, "--num-epochs", "1", "--eval-batch-size", "32", "--checkpoint-every-steps", "0"]
KEYS = ("val_loss", "val_acc", "val_top5", "val_num_samples")


def launch(env, module: str, args: list[str], num_processes: int = 1, check: bool = True):
    """``python -m module`` in a fresh process, or under ``accelerate launch`` (gloo) for several."""
    cmd = [sys.executable, "-m", module, *args]
    if num_processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC), "--num_processes",
               str(num_processes), "--main_process_port", str(_free_port()), "-m", module, *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    if check:
        assert proc.returncode == 0, \
            f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wandb_env(test_env):
    return {**test_env, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def run_1proc(wandb_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval1") / "run"
    run_train(wandb_env, [*RUN, "--tracker", "wandb", "--output-dir", str(out)])
    return out


def summary(wandb_file: Path) -> dict:
    out = {}
    for record in read_records(wandb_file):
        if record.WhichOneof("record_type") == "summary":
            out.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.summary.update})
    return out


@pytest.mark.slow
def test_one_process_equals_the_trainer_and_reaches_wandb(run_1proc, wandb_env):
    proc = launch(wandb_env, "cifar_dist.evaluate", [str(run_1proc)])
    report = json.loads((run_1proc / "eval.json").read_text())
    last = records(run_1proc)[-1]
    assert (report["loss"], report["top1"], report["top5"], report["num_samples"]) == tuple(last[k] for k in KEYS)
    assert report["trainer_last_epoch"]["same"] is True and "same as the trainer's epoch 1: yes" in proc.stdout
    assert sum(report["per_class_accuracy"].values()) / 100 == pytest.approx(report["top1"])  # 1 image per class
    assert 0 <= report["ece"] <= 1 and sum(b["count"] for b in report["calibration_bins"]) == 100
    assert (run_1proc / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "Same as the trainer's: yes, exactly" in (run_1proc / "eval.md").read_text()
    # The figures go into the run's own W&B run: a new offline segment under the same id.
    segments = sorted((run_1proc / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(segments) == 2 and run_id(segments[1]) == (run_1proc / "wandb_run_id").read_text().strip()
    figures = summary(segments[1])
    assert figures["eval/top1"] == last["val_acc"] and figures["eval/loss"] == last["val_loss"]
    assert figures["eval/ece"] == report["ece"] and figures["eval/confusion"]["_type"] == "image-file"


@pytest.mark.multiprocess
def test_two_processes_equal_the_two_process_trainer(test_env, tmp_path):
    out = tmp_path / "run"
    run_train(test_env, [*RUN, "--output-dir", str(out)], num_processes=2)
    proc = launch(test_env, "cifar_dist.evaluate", [str(out), "--output-dir", str(tmp_path / "eval"),
                                                    "--predictions", str(tmp_path / "p.csv")], num_processes=2)
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    last = records(out)[-1]
    assert (report["loss"], report["top1"], report["top5"], report["num_samples"]) == tuple(last[k] for k in KEYS)
    assert report["num_processes"] == 2 and proc.stdout.count("same as the trainer's epoch 1: yes") == 1
    # The gathered logits are the split's images in order, each once: the labels column is the split's labels.
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [int(r["index"]) for r in rows] == list(range(100))
    assert [r["label"] for r in rows] == [f"class_{i:03d}" for i in range(100)]  # synthetic: image i has label i
    assert sum(r["class_1"] == r["label"] for r in rows) == round(last["val_acc"] * 100)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--cache-frozen-features"], ["--cache-eval-features", "yes"]],
                         ids=["train_and_eval", "eval"])
def test_a_checkpoint_of_a_feature_cache_run(test_env, tmp_path, flags):
    # The run evaluated from cached trunk features; evaluating its epoch-end checkpoint goes the same way and
    # lands beside the run, in eval-<checkpoint>.
    out = tmp_path / "run"
    run_train(test_env, [*RUN, *flags, "--output-dir", str(out)])
    checkpoint = out / "checkpoints" / "step-00000008"
    # The checkpoint's record of the config as runs wrote it before --cache-frozen-features took auto: a boolean.
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["config"]["speed"]["cache_frozen_features"] = flags == ["--cache-frozen-features"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    proc = launch(test_env, "cifar_dist.evaluate", [str(checkpoint)])
    report = json.loads((out / "eval-step-00000008" / "eval.json").read_text())
    last = records(out)[-1]
    assert (report["loss"], report["top1"], report["top5"], report["num_samples"]) == tuple(last[k] for k in KEYS)
    assert report["model"] == f"step-00000008 of {out}" and "feature cache:" in proc.stdout


def write_images(images: np.ndarray, folder: Path) -> dict[str, int]:
    """Test images as files of several sizes and formats; -> file name: test index. Nearest-neighbour
    enlargement by an integer factor, which area averaging undoes exactly, and lossless formats reproduce the
    32x32 pixels exactly; the JPEG is close."""
    folder.mkdir()
    files = {}
    for i, (fmt, factor, mode) in enumerate([("png", 1, "RGB"), ("png", 2, "RGBA"), ("png", 3, "RGB"),
                                             ("webp", 4, "RGB"), ("jpeg", 4, "RGB")]):
        name = f"img{i}.{fmt}"
        img = Image.fromarray(images[i]).resize((32 * factor, 32 * factor), Image.Resampling.NEAREST).convert(mode)
        img.save(folder / name, **({"lossless": True} if fmt == "webp" else {"quality": 98, "subsampling": 0}
                                   if fmt == "jpeg" else {}))
        files[name] = i
    good = (folder / "img0.png").read_bytes()
    (folder / "broken.png").write_bytes(good[: len(good) // 2])  # truncated
    return files


@pytest.mark.slow
def test_predict_agrees_with_evaluate(run_1proc, test_env, tmp_path):
    launch(test_env, "cifar_dist.evaluate", [str(run_1proc), "--output-dir", str(tmp_path / "eval"), "--no-wandb",
                                             "--predictions", str(tmp_path / "eval.csv"), "--top-k", "3"])
    expected = {int(r["index"]): r for r in csv.DictReader((tmp_path / "eval.csv").open())}
    cfg = make_config(data_source="synthetic", synthetic_train_samples=256, synthetic_eval_samples=100)
    images = build_splits(cfg.data, seed=0).test.images.numpy()
    files = write_images(images, tmp_path / "images")
    proc = launch(test_env, "cifar_dist.predict", [str(run_1proc), str(tmp_path / "images"), "--top-k", "3",
                                                   "--batch-size", "2"], check=False)
    assert proc.returncode == 1, proc.stderr
    failures = [line for line in proc.stderr.splitlines() if "cannot read" in line]
    assert len(failures) == 1 and str(tmp_path / "images" / "broken.png") in failures[0]
    rows = {Path(r["file"]).name: r for r in csv.DictReader(io.StringIO(proc.stdout))}
    assert set(rows) == set(files)
    for name, index in files.items():
        ours, theirs = rows[name], expected[index]
        if name.endswith(".jpeg"):  # lossy (pixels off by a level or two), and this tiny model is sensitive to that
            assert ours["class_1"] == theirs["class_1"]
            continue
        # The same pixels (tests/test_predict.py checks that), in batches of another size: float rounding only.
        assert [ours[f"class_{k}"] for k in (1, 2, 3)] == [theirs[f"class_{k}"] for k in (1, 2, 3)], name
        for k in (1, 2, 3):
            assert float(ours[f"prob_{k}"]) == pytest.approx(float(theirs[f"prob_{k}"]), abs=1e-4), name


# -- in-process: the figures on known inputs


def test_superclasses_cover_cifar100_once():
    assert len(CIFAR100_SUPERCLASSES) == 20 and all(len(f) == 5 for f in CIFAR100_SUPERCLASSES.values())
    assert len(SUPERCLASS_OF) == 100
    names = sorted(SUPERCLASS_OF)  # CIFAR-100's label order is alphabetical
    groups = superclass_order(names)
    assert groups[0] == ("aquatic_mammals", [names.index(n) for n in ("beaver", "dolphin", "otter", "seal", "whale")])
    assert sorted(i for _, members in groups for i in members) == list(range(100))
    assert superclass_order([f"class_{i:03d}" for i in range(100)]) is None


def test_confusion_calibration_and_most_confused():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 2])
    confusion = confusion_matrix(labels, predicted, 3)
    assert confusion.tolist() == [[1, 2, 0], [0, 1, 1], [0, 0, 1]]
    pairs = most_confused(confusion, ["a", "b", "c"], k=5)
    assert pairs == [{"true": "a", "predicted": "b", "count": 2, "share_of_true": 2 / 3},
                     {"true": "b", "predicted": "c", "count": 1, "share_of_true": 0.5}]
    # Two bins: confidences 0.25 (right) and 0.75 (wrong), 0.95 twice (both right).
    ece, bins = calibration(torch.tensor([0.25, 0.75, 0.95, 0.95]), torch.tensor([True, False, True, True]), 2)
    assert [b["count"] for b in bins] == [1, 3]
    assert ece == pytest.approx(0.25 * 0.75 + 0.75 * abs(2 / 3 - (0.75 + 0.95 + 0.95) / 3))
    perfect, _ = calibration(torch.ones(4), torch.ones(4, dtype=torch.bool))
    assert perfect == 0


def test_top1_between_tied_logits_is_the_trainers(fresh_accelerate_state):
    # bf16 logits tie often enough over 10,000 images that topk(1) and the trainer's topk(5)[:, 0] (which pick
    # different classes between ties) made the analysis disagree with the trainer's accuracy.
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, TensorDataset

    from cifar_dist.evaluate import GatherLogits, analyse
    from cifar_dist.steps import evaluate

    class Tied(torch.nn.Module):
        def forward(self, images):
            out = torch.zeros(len(images), 100)
            out[:, 7] = out[:, 42] = 1.0  # two classes tie for every image
            return out

    names, labels = [f"c{i}" for i in range(100)], torch.tensor([42, 7, 42, 3])
    accelerator, model = Accelerator(cpu=True), Tied()
    gather = GatherLogits(accelerator)
    model.register_forward_hook(gather)
    metrics, _ = evaluate(model, DataLoader(TensorDataset(torch.zeros(4, 3), labels), batch_size=2), accelerator,
                          names)
    figures = analyse(torch.cat(gather.parts), torch.cat(gather.top1), labels, names)
    assert figures["top1_correct"] == round(metrics["val_acc"] * 4) == 2


def test_confusion_png_groups_by_superclass():
    names = sorted(SUPERCLASS_OF)
    confusion = torch.eye(100, dtype=torch.long) * 10
    grouped = plot_confusion(confusion, names, "t")
    plain = plot_confusion(confusion, [f"class_{i:03d}" for i in range(100)], "t")
    assert grouped[:4] == plain[:4] == b"\x89PNG" and grouped != plain


# -- in-process: refusals, one line and exit code 2, before any data is read


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A real run folder holding only config.yaml and model.safetensors, and a 10-class model file."""
    root = tmp_path_factory.mktemp("models")
    run = root / "run"
    run.mkdir()
    cfg = make_config(data_source="/nonexistent/data", image_size=32, weights="none")
    save_config(cfg, run / "config.yaml")
    save_model(build_model(cfg.model, 32), run / "model.safetensors")
    other = root / "other"
    other.mkdir()
    save_model(build_model(ModelConfig(weights="none", num_classes=10), 32), other / "model.safetensors")
    return run, other


def refused(capsys, argv) -> str:
    return conftest.refused(capsys, main, argv)


@pytest.fixture()
def fresh_accelerate_state():
    """The refusal of a bad data source comes after evaluate has set up accelerate's process-wide state."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_refusals(model_files, tmp_path, capsys, fresh_accelerate_state):
    run, other = model_files
    assert "/nope: no such file or folder" in refused(capsys, ["/nope"])
    assert "not a cifar_dist run (no config.yaml)" in refused(capsys, [str(tmp_path)])
    (tmp_path / "w.pt").write_bytes(b"x")
    assert "not a .safetensors file" in refused(capsys, [str(tmp_path / "w.pt")])
    assert "no config.yaml beside it; pass the run's config with --config" in refused(
        capsys, [str(other / "model.safetensors")])
    assert "--image-size 64: this model was trained at 32 px" in refused(capsys, [str(run), "--image-size", "64"])
    assert "its head is 2048 -> 1024 -> 10 classes but" in refused(
        capsys, [str(other / "model.safetensors"), "--config", str(run / "config.yaml")])
    assert "--top-k must be between 1 and 100, got 0" in refused(capsys, [str(run), "--top-k", "0"])
    assert "--eval-batch-size must be positive, got 0" in refused(capsys, [str(run), "--eval-batch-size", "0"])
    assert "--predictions /nope/p.csv: its folder does not exist" in refused(
        capsys, [str(run), "--predictions", "/nope/p.csv"])
    # Output paths of the wrong kind: refused before the pass, not after it with the results lost.
    assert f"--predictions {tmp_path} is a folder; give a file name for the CSV" in refused(
        capsys, [str(run), "--predictions", str(tmp_path)])
    assert f"--output-dir {run / 'config.yaml'} is a file; give a folder" in refused(
        capsys, [str(run), "--output-dir", str(run / "config.yaml")])
    # The model is fine; the data source is not: refused after the model, before anything is written.
    assert "--data-source /nonexistent/data" in refused(capsys, [str(run)])
    assert not (run / "eval.json").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((run / "config.yaml").read_text())
    (broken / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes()[:1000])
    assert "not a readable safetensors file" in refused(capsys, [str(broken)])
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((run / "config.yaml").read_text())
    assert "has no model.safetensors (it has not finished) and no complete checkpoint" in refused(
        capsys, [str(unfinished)])


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """A run folder (config.yaml and untrained model.safetensors) on small synthetic data, evaluated in-process."""
    run = tmp_path_factory.mktemp("synthetic") / "run"
    run.mkdir()
    cfg = make_config(data_source="synthetic", image_size=32, weights="none", synthetic_train_samples=64,
                      synthetic_eval_samples=20)
    save_config(cfg, run / "config.yaml")
    save_model(build_model(cfg.model, 32), run / "model.safetensors")
    return run


def test_max_eval_samples_limits_the_split_evaluated(synthetic_run, tmp_path, fresh_accelerate_state):
    # It used to cut the test split, after which --split train evaluated all 64 training images.
    main([str(synthetic_run), "--split", "train", "--max-eval-samples", "8", "--output-dir", str(tmp_path),
          "--no-wandb"])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert (report["split"], report["num_samples"]) == ("train", 8)


def test_config_over_the_runs_own_is_refused(model_files, tmp_path, capsys):
    # A 64-px config over a 32-px run's own ran at 64 px on the other config's data, over the run's eval.json.
    run, _ = model_files
    other = tmp_path / "other.yaml"
    save_config(make_config(data_source="synthetic", image_size=64, weights="none"), other)
    for model in (run, run / "model.safetensors"):
        line = refused(capsys, [str(model), "--config", str(other)])
        assert f"has its own config ({run / 'config.yaml'})" in line and "drop --config" in line
    assert not (run / "eval.json").exists()
    # Naming the run's own config changes nothing, so it is taken.
    from cifar_dist.runs import resolve_model

    assert resolve_model(str(run / "model.safetensors"), str(run / "config.yaml")).config.data.image_size == 32


@pytest.mark.slow  # reuses run_1proc's training
def test_config_over_a_checkpoints_own_is_refused_and_its_own_is_taken(run_1proc, tmp_path, capsys,
                                                                      fresh_accelerate_state):
    # A checkpoint's config is the one in its state file; any other file (the run's config.yaml among them: it
    # describes the run's last launch) would evaluate another model. Naming the state file itself was read as a
    # config file and failed on its other keys.
    checkpoint = run_1proc / "checkpoints" / "step-00000008"
    own = checkpoint / "trainer_state.json"
    other = tmp_path / "other.yaml"
    save_config(make_config(data_source="synthetic", image_size=64, weights="none"), other)
    before = conftest.tree_digest(run_1proc)
    for config in (other, run_1proc / "config.yaml"):
        assert refused(capsys, [str(checkpoint), "--config", str(config)]) == (
            f"cifar_dist.evaluate: error: --config {config}: {checkpoint / 'model.safetensors'} has its own config "
            f"({own}), which is the one it was trained with; drop --config (--data-source selects other data)")
    # Its own settings are taken, named or not: the trainer's own figures for the epoch the checkpoint ends.
    for name, extra in (("plain", []), ("named", ["--config", str(own)])):
        main([str(checkpoint), *extra, "--output-dir", str(tmp_path / name), "--no-wandb"])
        report = json.loads((tmp_path / name / "eval.json").read_text())
        assert report["model"] == f"step-00000008 of {run_1proc}" and report["num_samples"] == 100
        assert report["trainer_last_epoch"]["epoch"] == 1 and report["trainer_last_epoch"]["same"], report
    assert conftest.tree_digest(run_1proc) == before


def test_a_run_replaced_by_a_stopped_overwrite_start_says_where_it_is(model_files, tmp_path, capsys):
    # A start with --overwrite killed before its first checkpoint: the run waits in .previous-run/ for the next
    # start to put it back. The tools said the run had no model; they say where it is, and change nothing.
    import shutil

    from cifar_dist.predict import main as predict
    from cifar_dist.rundir import FreshStart

    run = tmp_path / "run"
    shutil.copytree(model_files[0], run)
    FreshStart(run).begin(overwrite=True)
    shutil.copy(run / ".previous-run" / "config.yaml", run / "config.yaml")  # the new start's first file
    before = conftest.tree_digest(run)
    for line in (refused(capsys, [str(run)]), conftest.refused(capsys, predict, [str(run), str(tmp_path)])):
        assert line.endswith(f"{run}: a start with --overwrite has not reached its first checkpoint here; the "
                             f"earlier run is intact in {run / '.previous-run'}/ and, once that start has stopped, "
                             f"the next cifar_dist.train start with --output-dir {run} puts it back first "
                             f"(`python -m cifar_dist.train --output-dir {run} --resume never --tracker none` does "
                             "only that: it then stops, the dir holding a run)")
    assert conftest.tree_digest(run) == before


def test_outputs_over_a_runs_own_files_are_refused(model_files, tmp_path, capsys, fresh_accelerate_state):
    # --predictions run/config.yaml wrote the CSV over the run's config, after which no tool could read the run.
    import shutil

    run, other = tmp_path / "run", tmp_path / "other"
    shutil.copytree(model_files[0], run)
    shutil.copytree(model_files[0], other)
    (run / "checkpoints").mkdir()
    (run / "wandb").mkdir()
    before = conftest.tree_digest(run)
    assert f"--predictions {run / 'config.yaml'} is the model's config" in refused(
        capsys, [str(run), "--predictions", str(run / "config.yaml")])
    for name, label in (("metrics.jsonl", "metrics.jsonl"), ("checkpoints/p.csv", "checkpoints/"),
                        ("eval.json", "eval.json")):
        assert f"is among the run's own files ({label} in {run}); give another file name" in refused(
            capsys, [str(run), "--predictions", str(run / name)])
    assert f"--predictions {tmp_path / 'eval.md'} is where this evaluation writes its report" in refused(
        capsys, [str(run), "--output-dir", str(tmp_path), "--predictions", str(tmp_path / "eval.md")])
    assert f"--output-dir {run / 'wandb'} is inside the run's wandb in {run}" in refused(
        capsys, [str(run), "--output-dir", str(run / "wandb")])
    assert f"--output-dir {other} would replace the evaluation of another run ({other})" in refused(
        capsys, [str(run), "--output-dir", str(other)])
    assert conftest.tree_digest(run) == before
    # An earlier call's predictions are written again: this call gets as far as the data.
    (tmp_path / "p.csv").write_text("index,label\n")
    assert "--data-source /nonexistent/data" in refused(capsys, [str(run), "--predictions", str(tmp_path / "p.csv")])


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_pass(model_files, tmp_path, capsys,
                                                                             fresh_accelerate_state):
    # A run on a read-only share was evaluated in full, then the report's write failed with a traceback.
    import shutil

    shared = tmp_path / "shared"
    run = shared / "run"
    shutil.copytree(model_files[0], run)
    with conftest.read_only(shared):
        line = refused(capsys, [str(run)])
        assert line.startswith(f"cifar_dist.evaluate: error: eval.json, eval.md and confusion.png: cannot write into "
                               f"{run} (") and line.endswith("); give --output-dir a folder you can write to")
        assert f"--output-dir {shared / 'eval' / 'new'}: cannot write into {shared} (" in refused(
            capsys, [str(run), "--output-dir", str(shared / "eval" / "new")])
        assert f"--predictions {shared / 'p.csv'}: cannot write into {shared} (" in refused(
            capsys, [str(run), "--output-dir", str(tmp_path), "--predictions", str(shared / "p.csv")])
        # Given a folder it can write to, the read-only run is evaluated (here: up to its data).
        assert "--data-source /nonexistent/data" in refused(capsys, [str(run), "--output-dir", str(tmp_path / "e")])
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "model.safetensors"]


@pytest.mark.slow
def test_a_read_only_run_keeps_its_wandb_figures_in_the_output_dir_and_says_so(synthetic_run, wandb_env, tmp_path):
    # W&B, refused the run's folder, wrote into a temporary folder of its own, and the line named RUN/wandb.
    import shutil

    shared = tmp_path / "shared"
    run = shared / "run"
    shutil.copytree(synthetic_run, run)
    (run / "wandb_run_id").write_text("ro1234ab\n")
    out = tmp_path / "eval"
    with conftest.read_only(shared):
        proc = launch(wandb_env, "cifar_dist.evaluate", [str(run), "--output-dir", str(out)])
    assert proc.stdout.rstrip().splitlines()[-1].endswith(
        f"run ro1234ab is kept in {out}/wandb; upload it later with: wandb sync {out}/wandb ({run} cannot be written)")
    segments = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [run_id(s) for s in segments] == ["ro1234ab"]
    assert summary(segments[0])["eval/top1"] == json.loads((out / "eval.json").read_text())["top1"]
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "model.safetensors", "wandb_run_id"]

"""W&B: real offline runs made by real training runs, read back from disk; the mode and identity rules;
curves.png; the sync helper."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from cifar_dist.config import TrackingConfig, UserError
from cifar_dist.sync import find_offline_runs
from cifar_dist.tracking import (
    WANDB_INIT_TIMEOUT_S,
    RunLog,
    offline_fallback_note,
    plot_curves,
    run_id_for,
    sample_predictions,
    tracker_backend,
    wandb_init_kwargs,
)
from conftest import REPO, TINY, _free_port, run_train
from wandb_log import config, history, run_id, summary

SECRET = "planted0secret0key0that0must0never0be0written0anywhere"


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def offline_runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


def run_log(run_dir: Path) -> Path:
    return next(run_dir.glob("run-*.wandb"))


@pytest.fixture(scope="module")
def wandb_env(test_env):
    return {**test_env, "WANDB_MODE": "offline", "WANDB_API_KEY": SECRET, "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def two_process_wandb_run(wandb_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("wandb") / "out"
    proc = run_train(wandb_env, [*TINY, "--num-epochs", "2", "--tracker", "wandb", "--wandb-tags", "ci,cpu",
                                 "--output-dir", str(out)], num_processes=2)
    return out, proc


@pytest.mark.slow  # real training processes
def test_one_offline_run_holds_the_epoch_metrics_and_config(two_process_wandb_run):
    out, proc = two_process_wandb_run
    runs = offline_runs(out)
    assert len(runs) == 1  # one run per job, not one per process
    rows = history(run_log(runs[0]))
    logged = [(row["epoch"], row["val/acc"], row["val/top5"]) for row in rows if "val/acc" in row]
    assert logged == [(r["epoch"], r["val_acc"], r["val_top5"]) for r in records(out)]
    layouts = [(row["epoch/num_processes"], row["epoch/per_device_batch_size"], row["epoch/grad_accum_steps"])
               for row in rows if "val/acc" in row]
    assert layouts == [(2, 16, 1)] * 2 and "epoch/partial" not in {k for row in rows for k in row}
    steps = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(steps) == 16 // 2  # --log-every-steps 2 over 16 steps
    cfg = config(run_log(runs[0]))
    assert cfg["train"]["global_batch_size"] == 32 and cfg["data"]["data_source"] == "synthetic"
    assert cfg["run"]["num_processes"] == 2 and cfg["run"]["per_device_batch_size"] == 16
    assert cfg["run"]["params_trainable"] == 17_165_412
    assert run_id(run_log(runs[0])) == (out / "wandb_run_id").read_text().strip()
    assert "W&B: offline" in proc.stdout and f"wandb sync {out}/wandb" in proc.stdout


@pytest.mark.slow  # real training processes
def test_step_metrics_cover_every_process(two_process_wandb_run):
    """train/loss at an epoch's last step is the loss over every image of the epoch so far, as metrics.jsonl has
    it; process 0's half of the batches alone would differ."""
    out, _ = two_process_wandb_run
    by_step = {row["_step"]: row for row in history(run_log(offline_runs(out)[0])) if "train/loss" in row}
    for record in records(out):
        assert by_step[record["step"]]["train/loss"] == pytest.approx(record["train_loss"], rel=1e-12)
        assert by_step[record["step"]]["train/acc"] == pytest.approx(record["train_acc"], rel=1e-12)


@pytest.mark.slow  # real training processes
def test_summary_tables_and_report(two_process_wandb_run):
    out, _ = two_process_wandb_run
    rows = history(run_log(offline_runs(out)[0]))
    tables = {k for row in rows for k in row if k.endswith("/_type") and row[k] == "table-file"}
    assert tables == {"val/per_class_acc/_type", "val/samples/_type"}
    ended = summary(run_log(offline_runs(out)[0]))
    assert ended["final_val_acc"] == records(out)[-1]["val_acc"]
    # Where the launch's time before its first step went, inside the run's total from the process's start.
    assert {"total", "launch", "data", "model", "device", "tracker"} <= set(ended["startup_s"])
    assert 0 < ended["startup_s"]["total"] < ended["total_time_s"]
    # ... and where all of it went, up to the report (which the printed closing line adds).
    assert list(ended["time_s"]) == ["startup", "training", "evaluation", "checkpoints"]
    assert ended["time_s"]["startup"] == pytest.approx(ended["startup_s"]["total"], abs=0.01)
    assert 0 < sum(ended["time_s"].values()) < ended["total_time_s"]
    assert not any("startup" in key for row in rows for key in row)  # in the summary, not the history
    results = (out / "results.md").read_text()
    assert "Best validation accuracy" in results and "![curves](curves.png)" in results


@pytest.mark.slow  # real training processes
def test_api_key_is_written_nowhere(two_process_wandb_run):
    out, _ = two_process_wandb_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked


@pytest.mark.slow  # real training processes
def test_resumed_job_logs_into_the_same_run(wandb_env, tmp_path):
    out = tmp_path / "out"
    args = [*TINY, "--tracker", "wandb", "--output-dir", str(out)]
    run_train(wandb_env, [*args, "--num-epochs", "1"])
    run_train(wandb_env, [*args, "--num-epochs", "2"])  # resumes from the epoch-1 checkpoint
    first, second = offline_runs(out)
    assert run_id(run_log(first)) == run_id(run_log(second))
    steps_before = [row["_step"] for row in history(run_log(first))]
    steps_after = [row["_step"] for row in history(run_log(second))]
    assert steps_after and min(steps_after) > max(steps_before)
    assert [row["epoch"] for row in history(run_log(second)) if "val/acc" in row] == [2]


@pytest.mark.slow  # real training processes
def test_without_wandb_installed(test_env, tmp_path):
    # A module named wandb that fails to import, first on the path: wandb is "not installed" for this run.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "wandb.py").write_text("raise ImportError('no wandb here')\n")
    env = {**test_env, "PYTHONPATH": f"{shadow}{os.pathsep}{test_env['PYTHONPATH']}"}
    proc = run_train(env, [*TINY, "--tracker", "wandb", "--output-dir", str(tmp_path / "a")], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        ("cifar_dist.train: error: --tracker wandb needs the 'wandb' package, which does not import here: "
         "pip install wandb, or pass --tracker none")]
    run_train(env, [*TINY, "--max-steps", "1", "--tracker", "none", "--output-dir", str(tmp_path / "b")])
    run_train(env, [*TINY, "--max-steps", "1", "--output-dir", str(tmp_path / "c")])  # auto: quietly none
    assert not (tmp_path / "c" / "wandb").exists()


def test_mode_follows_wandb_mode_then_login(tmp_path):
    cfg = TrackingConfig(wandb_tags="a, b", run_name="seed-recipe", wandb_entity="lab")
    kwargs, note = wandb_init_kwargs(cfg, tmp_path, "abc", env={"NETRC": str(tmp_path / "none")})
    assert kwargs["mode"] == "offline" and f"wandb sync {tmp_path}/wandb" in note
    assert kwargs["tags"] == ["a", "b"] and kwargs["name"] == "seed-recipe" and kwargs["entity"] == "lab"
    assert kwargs["id"] == "abc" and kwargs["resume"] == "allow" and kwargs["dir"] == str(tmp_path)
    assert wandb_init_kwargs(cfg, tmp_path, "abc", env={"WANDB_API_KEY": "k"})[0]["mode"] == "online"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password k\n")
    assert wandb_init_kwargs(cfg, tmp_path, "abc", env={"NETRC": str(netrc)})[0]["mode"] == "online"
    env = {"WANDB_MODE": "disabled", "WANDB_API_KEY": "k", "WANDB_RUN_GROUP": "sweep", "WANDB_DIR": "/w"}
    kwargs, _ = wandb_init_kwargs(cfg, tmp_path, "abc", env=env)
    assert (kwargs["mode"], kwargs["group"], kwargs["dir"]) == ("disabled", "sweep", "/w")


def test_run_id_is_stable_per_output_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    new = run_id_for(tmp_path)
    assert new.startswith("slurm4242-")
    (tmp_path / "wandb_run_id").write_text("kept123\n")
    assert run_id_for(tmp_path) == "kept123"


def test_the_seed_is_shown_only_beside_the_recipe(tmp_path):
    from cifar_dist.cli import parse_config
    from cifar_dist.tracking import compares_to_seed, plot_title, render_results

    whole = (50_000, 10_000)
    assert compares_to_seed(parse_config([]), *whole)
    synthetic = parse_config(["--data-source", "synthetic", "--run-name", "smoke"])
    assert not compares_to_seed(synthetic, *whole) and not compares_to_seed(parse_config(["--weights", "none"]), *whole)
    for subset in ("--max-train-samples", "--max-eval-samples"):  # a part of the data: not the notebook's figures
        assert not compares_to_seed(parse_config([subset, "5000"]), *whole)
    # Nor a local folder holding a part of it (or other images): its sizes tell.
    local = parse_config(["--data-source", "/data/cifar-part"])
    assert compares_to_seed(local, *whole) and not compares_to_seed(local, 128, 64)
    assert plot_title(synthetic, tmp_path).startswith("smoke: synthetic, weights IMAGENET1K_V1, 224 px")
    record = {"epoch": 1, "step": 8, "train_loss": 2.0, "val_loss": 1.5, "train_acc": 0.4, "val_acc": 0.5,
              "val_top5": 0.9, "val_num_samples": 100}
    assert "| 69.1% |" in render_results("# run", [record])
    assert "Seed" not in render_results("# run", [record], seed_reference=False)
    # The total time is the last launch's: where the run was resumed, the results say so, and what all took.
    summary = {"best_val_acc": 0.5, "best_epoch": 1, "total_time_s": 37.2}
    assert "; total time 37 s.\n" in render_results("# run", [record], summary)
    resumed = [{**record, "epoch_time_s": 30.0}, {**record, "epoch": 2, "epoch_time_s": 20.4, "resumed_from_step": 12}]
    assert ("; total time 37 s for this launch (the run was resumed; its epochs took 50 s in all launches).\n"
            in render_results("# run", resumed, summary))
    a, b = plot_curves([record], "a", seed_reference=True), plot_curves([record], "a", seed_reference=False)
    assert a != b


def test_results_mark_an_epoch_cut_short_by_max_steps():
    # Its training loss and accuracy cover the steps trained; the row read as a whole epoch's. An older run's
    # records, without the mark or the batch layout, are whole epochs.
    from cifar_dist.tracking import render_results

    old = {"epoch": 1, "step": 8, "train_loss": 2.0, "val_loss": 1.5, "train_acc": 0.4, "val_acc": 0.5,
           "val_top5": 0.9, "val_num_samples": 100}
    partial = {**old, "epoch": 2, "step": 13, "partial": True, "steps_in_epoch": 5, "num_processes": 1,
               "per_device_batch_size": 32, "grad_accum_steps": 1}
    rows = render_results("# run", [old, partial], seed_reference=False).splitlines()
    assert "| 1 | 40.0% | 50.0% | 2.00 | 1.50 |" in rows
    assert "| 2 (partial, 5 steps) | 40.0% | 50.0% | 2.00 | 1.50 |" in rows
    whole = {k: v for k, v in partial.items() if k not in ("partial", "steps_in_epoch")}
    assert "| 2 | 40.0% | 50.0% | 2.00 | 1.50 |" in render_results("# run", [old, whole], seed_reference=False)


def test_sample_predictions_are_one_pass_without_cudnn_autotuning(monkeypatch):
    # One batch of 16 at a shape nothing else runs: cuDNN's timing of every convolution for it would cost more.
    import torch
    from accelerate import Accelerator

    from cifar_dist import trainer_parts
    from cifar_dist.config import ModelConfig
    from cifar_dist.model import ResNet50Classifier

    splits = trainer_parts.synthetic_splits(4, 20)
    model, seen = ResNet50Classifier(ModelConfig(weights="none"), 32), []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda images: seen.append(torch.backends.cudnn.benchmark) or forward(images))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    samples = sample_predictions(model, splits, Accelerator(cpu=True))
    assert seen == [False] and torch.backends.cudnn.benchmark  # the run's setting is back
    assert len(samples) == 16 and all(predicted in splits.class_names for _, predicted, _ in samples)
    trainer_parts.reset()


def test_without_wandb_the_report_runs_no_sample_predictions(tmp_path):
    # They are W&B's table only; elsewhere (tensorboard, --tracker none) not worth a pass of the whole model.
    from accelerate import Accelerator

    record = {"epoch": 1, "step": 8, "train_loss": 4.0, "train_acc": 0.1, "val_loss": 4.2, "val_acc": 0.05,
              "val_top5": 0.2, "val_num_samples": 64}
    log = RunLog(Accelerator(cpu=True), tmp_path, "# a run", [record])

    def samples():
        raise AssertionError("sample predictions without W&B")

    log.finish({"best_val_acc": 0.05, "best_epoch": 1, "total_time_s": 3.0}, [], samples, None)
    assert (tmp_path / "curves.png").is_file()
    assert "Best validation accuracy 5.00%" in (tmp_path / "results.md").read_text()


def test_curves_png_depends_on_the_data():
    one = [{"epoch": 1, "train_loss": 2.0, "val_loss": 1.5, "train_acc": 0.4, "val_acc": 0.5}]
    two = one + [{"epoch": 2, "train_loss": 1.0, "val_loss": 1.2, "train_acc": 0.7, "val_acc": 0.6}]
    a, b = plot_curves(one), plot_curves(two)
    assert a[:8] == b[:8] == b"\x89PNG\r\n\x1a\n"
    assert a != b and len(b) > 10_000  # two axes with lines and legends, not an empty canvas


@pytest.mark.slow  # real training processes
def test_sync_finds_offline_runs_and_skips_synced_ones(two_process_wandb_run, tmp_path):
    out, _ = two_process_wandb_run
    runs = find_offline_runs([out.parent])
    assert [(r, synced) for r, synced in runs] == [(offline_runs(out)[0], False)]
    proc = subprocess.run([sys.executable, "-m", "cifar_dist.sync", "--dry-run", str(out.parent)],
                          capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 0
    assert "1 offline run(s) found, 0 already synced, 1 to sync" in proc.stdout
    assert f"would sync {offline_runs(out)[0]}" in proc.stdout
    # wandb sync marks an uploaded run with run-<id>.wandb.synced; such a run is not uploaded again.
    copy = tmp_path / "copy" / "wandb" / offline_runs(out)[0].name
    shutil.copytree(offline_runs(out)[0], copy)
    (copy / (run_log(copy).name + ".synced")).write_text("")
    assert find_offline_runs([tmp_path]) == [(copy, True)]
    proc = subprocess.run([sys.executable, "-m", "cifar_dist.sync", str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, check=False)
    assert proc.returncode == 0 and "1 offline run(s) found, 1 already synced, 0 to sync" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "cifar_dist.sync", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 2 and "no such folder" in proc.stderr
    # A venv's python run without activating the venv: no `wandb` command on PATH, and here no login either.
    # The upload is tried with this interpreter's wandb and fails in one line per run, not a traceback.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PATH="/usr/bin:/bin", HOME=str(tmp_path), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "cifar_dist.sync", str(out.parent)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"FAILED {offline_runs(out)[0]}: " in proc.stdout and "API key" in proc.stdout


def test_sync_help_is_plain_text(capsys):
    from cifar_dist.sync import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # as wrapped to any width
    assert exit_info.value.code == 0 and "from a login node: python -m cifar_dist.sync DIR [DIR ...]." in out
    assert "``" not in out


def test_sync_finds_the_offline_runs_of_output_dirs_under_wandb_dir(tmp_path):
    # With WANDB_DIR set, W&B's files go under $WANDB_DIR/wandb/ (offline-run-<time>-<id>/run-<id>.wandb), not the
    # output dir: the output dir's wandb_run_id names its run there; other runs there are not the folders'.
    wandb_dir, out = tmp_path / "w", tmp_path / "runs" / "r"
    out.mkdir(parents=True)
    (out / "wandb_run_id").write_text("abc123\n")
    for name in ("abc123", "other9"):
        run = wandb_dir / "wandb" / f"offline-run-20261128_070000-{name}"
        run.mkdir(parents=True)
        (run / f"run-{name}.wandb").write_bytes(b"")
    ours = wandb_dir / "wandb" / "offline-run-20261128_070000-abc123"
    assert find_offline_runs([tmp_path / "runs"]) == []
    assert find_offline_runs([tmp_path / "runs"], wandb_dir) == [(ours, False)]
    env = {**os.environ, "WANDB_DIR": str(wandb_dir)}
    proc = subprocess.run([sys.executable, "-m", "cifar_dist.sync", "--dry-run", str(tmp_path / "runs")],
                          capture_output=True, text=True, cwd=REPO, env=env, check=False)
    assert proc.returncode == 0 and f"1 offline run(s) found, 0 already synced, 1 to sync\nwould sync {ours}\n" \
        in proc.stdout, proc.stdout + proc.stderr


# -- W&B environment failures: a missing login is one line before any work; an unreachable server never costs
# the run (it goes offline within 30 s, under the same run id).

NO_CREDENTIALS = ("WANDB_MODE={mode} but no W&B credentials (WANDB_API_KEY, or a netrc entry for {host}): run "
                  "`wandb login` or set WANDB_API_KEY; or unset WANDB_MODE to log offline and upload later with "
                  "`wandb sync`")


@pytest.mark.parametrize("tracker, env, message", [
    ("wandb", {"WANDB_MODE": "online"}, NO_CREDENTIALS.format(mode="online", host="api.wandb.ai")),
    ("auto", {"WANDB_MODE": "online"}, NO_CREDENTIALS.format(mode="online", host="api.wandb.ai")),
    ("wandb", {"WANDB_MODE": "run", "WANDB_BASE_URL": "https://wandb.lab.example"},
     NO_CREDENTIALS.format(mode="run", host="wandb.lab.example")),
    ("wandb", {"WANDB_MODE": "offlne"}, "WANDB_MODE=offlne is not a W&B mode; use online, offline or disabled"),
    ("wandb", {"WANDB_MODE": "online", "WANDB_API_KEY": "k" * 40}, None),
    ("wandb", {"WANDB_MODE": "online", "WANDB_IDENTITY_TOKEN_FILE": "/var/run/token"}, None),
    ("wandb", {"WANDB_MODE": "offline"}, None),
    ("wandb", {"WANDB_MODE": "disabled"}, None),
    ("wandb", {}, None),  # not logged in and no mode asked for: offline, announced at start
    ("none", {"WANDB_MODE": "online"}, None),  # no tracker: W&B's settings do not matter
])
def test_wandb_mode_and_credentials_are_checked_up_front(tmp_path, tracker, env, message):
    env = {"NETRC": str(tmp_path / "no-netrc"), **env}
    cfg = TrackingConfig(tracker=tracker)
    if message is None:
        assert tracker_backend(cfg, env=env) == (None if tracker == "none" else "wandb")
        return
    with pytest.raises(UserError) as info:
        tracker_backend(cfg, env=env)
    assert str(info.value) == message


def test_a_netrc_entry_for_the_wandb_host_counts_as_login(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine wandb.lab.example\n  login user\n  password " + "k" * 40 + "\n")
    env = {"NETRC": str(netrc), "WANDB_MODE": "online"}
    assert tracker_backend(TrackingConfig(tracker="wandb"), env={**env, "WANDB_BASE_URL": "https://wandb.lab.example"})
    with pytest.raises(UserError, match="no W&B credentials .* netrc entry for api.wandb.ai"):
        tracker_backend(TrackingConfig(tracker="wandb"), env=env)  # an entry for another host is no login here


def test_online_runs_wait_a_bounded_time_for_the_server(tmp_path):
    cfg = TrackingConfig()
    kwargs, _ = wandb_init_kwargs(cfg, tmp_path, "abc", env={"WANDB_API_KEY": "k"})
    assert kwargs["settings"] == {"quiet": True, "init_timeout": WANDB_INIT_TIMEOUT_S}
    assert WANDB_INIT_TIMEOUT_S + 5 < 30  # the fallback budget: init timeout, then an offline start
    kwargs, _ = wandb_init_kwargs(cfg, tmp_path, "abc", env={"WANDB_API_KEY": "k", "WANDB_INIT_TIMEOUT": "120"})
    assert kwargs["settings"] == {"quiet": True}  # the user's own WANDB_INIT_TIMEOUT wins
    kwargs, note = wandb_init_kwargs(cfg, tmp_path, "abc", env={"WANDB_API_KEY": "k", "WANDB_MODE": "dryrun"})
    assert kwargs["mode"] == "offline" and "settings" not in kwargs and "wandb sync" in note


def test_offline_fallback_note_is_one_line_with_the_sync_command(tmp_path):
    error = RuntimeError("Failed to get resume status: context deadline exceeded\nwhile retrying: connection refused")
    note = offline_fallback_note("abc123", tmp_path, error)
    assert note == (f"W&B: cannot start the run online (Failed to get resume status: context deadline exceeded "
                    f"while retrying: connection refused); continuing offline: run abc123 is kept in {tmp_path}/wandb; "
                    f"upload it later with: wandb sync {tmp_path}/wandb")
    long = offline_fallback_note("abc123", tmp_path, RuntimeError("x" * 1000))
    assert "x" * 237 + "...)" in long and "x" * 238 not in long


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def isolated_wandb_env(test_env, tmp_path) -> dict[str, str]:
    """W&B state (config, cache, netrc) under tmp_path, so neither the user's login nor ours leaks in or out."""
    env = {k: v for k, v in test_env.items() if k not in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE",
                                                          "WANDB_INIT_TIMEOUT", "WANDB_SILENT", "WANDB_DIR")}
    wandb_home = tmp_path / "wandb-home"
    return {**env, "NETRC": str(wandb_home / "netrc"), "WANDB_CONFIG_DIR": str(wandb_home / "config"),
            "WANDB_CACHE_DIR": str(wandb_home / "cache"), "WANDB_DATA_DIR": str(wandb_home / "data"),
            "WANDB_ERROR_REPORTING": "false"}


@pytest.mark.slow
def test_online_without_credentials_fails_in_one_line_before_any_work(isolated_wandb_env, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("a file that must survive\n")
    before = _snapshot(out)
    proc = run_train({**isolated_wandb_env, "WANDB_MODE": "online"},
                     [*TINY, "--tracker", "wandb", "--output-dir", str(out)], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "cifar_dist.train: error: " + NO_CREDENTIALS.format(mode="online", host="api.wandb.ai")]
    assert _snapshot(out) == before


def _run_timed(env: dict, args: list[str], timeout: float = 300) -> tuple[int, list[tuple[float, str]]]:
    """Run the real trainer; (exit code, [(seconds since start, line)]) of its merged stdout and stderr."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "cifar_dist.train", *args], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watchdog = threading.Timer(timeout, proc.kill)  # a hang fails the test instead of stalling the suite
    watchdog.start()
    try:
        lines = [(time.monotonic() - start, line.rstrip("\n")) for line in proc.stdout]
        return proc.wait(), lines
    finally:
        watchdog.cancel()
        proc.stdout.close()


@pytest.mark.slow
def test_unreachable_wandb_server_falls_back_to_offline_after_the_init_timeout(isolated_wandb_env, tmp_path):
    # A real online start against a closed local port, with a well-formed key no server will ever see. The
    # user's WANDB_INIT_TIMEOUT (5 s here) replaces the trainer's 20 s; the bound below leaves W&B's service
    # start and teardown 20 s on a busy machine.
    env = {**isolated_wandb_env, "WANDB_MODE": "online", "WANDB_API_KEY": "f" * 40,
           "WANDB_BASE_URL": f"http://127.0.0.1:{_free_port()}", "WANDB_INIT_TIMEOUT": "5"}
    out = tmp_path / "out"
    code, lines = _run_timed(env, [*TINY, "--synthetic-train-samples", "64", "--num-epochs", "1", "--tracker",
                                   "wandb", "--output-dir", str(out)])
    text = "\n".join(line for _, line in lines)
    assert code == 0, text
    assert "Traceback" not in text
    run = (out / "wandb_run_id").read_text().strip()
    online = [t for t, line in lines if line == f"W&B: online, run {run}"]
    fallback = [(t, line) for t, line in lines if "cannot start the run online" in line]
    assert len(online) == 1 and len(fallback) == 1, text
    (fallback_at, note), = fallback
    assert note.startswith("W&B: cannot start the run online (") and "connection refused" in note
    assert note.endswith(f"continuing offline: run {run} is kept in {out}/wandb; upload it later with: "
                         f"wandb sync {out}/wandb")
    assert fallback_at - online[0] < 5 + 20
    runs = offline_runs(out)
    assert len(runs) == 1 and run_id(run_log(runs[0])) == run
    rows = history(run_log(runs[0]))
    assert [(row["epoch"], row["val/acc"]) for row in rows if "val/acc" in row] == [
        (r["epoch"], r["val_acc"]) for r in records(out)]
    # The evaluation CLI adds its figures to the same run: with the server still out of reach, it goes into an
    # offline copy of the run as the trainer did, one line, no traceback; without credentials it stops before
    # its pass, in one line, as the trainer does.
    proc = subprocess.run([sys.executable, "-m", "cifar_dist.evaluate", str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "W&B: cannot start the run online (" in proc.stdout and (out / "eval.json").is_file()
    assert [run_id(run_log(r)) for r in offline_runs(out)] == [run, run]
    (out / "eval.json").unlink()
    no_key = {k: v for k, v in env.items() if k != "WANDB_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "cifar_dist.evaluate", str(out)], env=no_key, cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "cifar_dist.evaluate: error: " + NO_CREDENTIALS.format(mode="online", host="127.0.0.1")]
    assert not (out / "eval.json").exists()


@pytest.mark.slow  # real training processes
def test_tensorboard_logs_every_epoch_and_a_replaced_run_takes_its_logs_along(test_env, tmp_path):
    # TensorBoard's hparams take only scalars: the run's nested config (with None values) made the start fail.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    env = {k: v for k, v in test_env.items() if k != "WANDB_PROJECT"}

    def logged(tag: str) -> list[tuple[int, float]]:
        (logs,) = (out / "tensorboard").iterdir()  # <output-dir>/tensorboard/<project>/
        return [(e.step, e.value) for e in EventAccumulator(str(logs)).Reload().Scalars(tag)]

    run_train(env, [*TINY, "--num-epochs", "2", "--tracker", "tensorboard", "--output-dir", str(out)])
    assert [v for _, v in logged("val/acc")] == pytest.approx([r["val_acc"] for r in records(out)])
    assert [s for s, _ in logged("val/acc")] == [r["step"] for r in records(out)] == [8, 16]
    assert logged("epoch/num_processes") == logged("epoch/grad_accum_steps") == [(8, 1), (16, 1)]  # the layout
    assert logged("epoch/per_device_batch_size") == [(8, 32), (16, 32)]
    hparams = yaml.safe_load(next((out / "tensorboard").rglob("hparams.yml")).read_text())
    assert hparams["optim/lr"] == 1e-3 and hparams["data/max_train_samples"] == "None"
    # --overwrite moves the old run's logs aside with the rest of it, and they go once the new run has a checkpoint.
    run_train(env, [*TINY, "--max-steps", "1", "--tracker", "tensorboard", "--output-dir", str(out), "--overwrite"])
    assert [s for s, _ in logged("val/acc")] == [1]
    # That epoch ended after 1 of its 8 steps: marked, as in metrics.jsonl.
    assert logged("epoch/partial") == logged("epoch/steps_in_epoch") == [(1, 1)]


@pytest.mark.parametrize("freeze_until, said", [("layer4", "frozen before layer4; "), ("none", "nothing frozen; ")])
def test_the_run_header_says_what_is_frozen(freeze_until, said):
    import torch
    from accelerate import Accelerator

    from cifar_dist.config import SpeedConfig, make_config, plan_batches
    from cifar_dist.speed import resolve_fast_path
    from cifar_dist.tracking import describe_run

    cfg = make_config(freeze_until=freeze_until)
    counts = {"total": 10, "trainable": 4, "frozen": 6, "bn_running_stats": 2}
    header = describe_run(cfg, plan_batches(cfg.train, 1), Accelerator(cpu=True), counts, 4, 8,
                          resolve_fast_path(SpeedConfig(), torch.device("cpu"), "no", 1))
    assert f"-100 head, {said}parameters 10 total, 4 trainable, 6 frozen; 2 BN running-stat values" in header

"""Kill a run at any moment and resume it: it must end exactly where an uninterrupted run ends.

Runs are fp32 on the CPU with a fixed seed and the same number of processes before and after the kill, so the
same operations run in the same order and the comparison is bit for bit.
"""

import json
import os
import shutil
import signal
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, run_train, start_train, tree_digest, wait_for

pytestmark = pytest.mark.slow

# 2 epochs x 8 steps, a checkpoint every 3 steps (3, 6, end of epoch 1 at 8, 9, 12, 15, end at 16).
RUN = [*TINY, "--num-epochs", "2", "--checkpoint-every-steps", "3"]
# Timings, and the resume bookkeeping only a resumed run has, are not part of what the runs computed.
TIMING = ("epoch_time_s", "train_time_s", "eval_time_s", "train_images_per_s", "checkpoint_time_s",
          "resumed_from_step", "startup_s")


def records(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_identical_runs(a: Path, b: Path):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert records(a) == records(b)


def kill_when(env, args, path: Path, sig=signal.SIGKILL, num_processes=1, whole_tree=True, log_dir=None):
    """Start a run, wait for ``path``, send ``sig`` to the launcher (and, with whole_tree, to every worker).
    Its output goes to ``log_dir``, by default the folder holding the run's output dir (``path`` a checkpoint)."""
    log_dir = log_dir or path.parents[2]
    proc = start_train(env, args, log_dir, num_processes)
    wait_for(path, proc)
    # torchrun starts each worker in a session of its own, so a process-group kill would miss them.
    targets = [proc.pid] + ([c.pid for c in psutil.Process(proc.pid).children(recursive=True)] if whole_tree else [])
    for pid in targets:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    proc.wait(timeout=300)
    for pid in targets:  # the killed launcher's workers must be gone before anyone resumes
        try:
            psutil.Process(pid).wait(timeout=60)
        except psutil.NoSuchProcess:
            pass
    return proc.returncode, (log_dir / "stdout").read_text(), (log_dir / "stderr").read_text()


@pytest.fixture(scope="module")
def reference(test_env, tmp_path_factory):
    """Uninterrupted runs, one and two processes."""
    root = tmp_path_factory.mktemp("reference")
    run_train(test_env, [*RUN, "--output-dir", str(root / "one")])
    run_train(test_env, [*RUN, "--output-dir", str(root / "two")], num_processes=2)
    return root


@pytest.mark.parametrize("kill_at", ["step-00000006", "step-00000012"])
def test_sigkill_mid_epoch_then_resume_is_exact(test_env, reference, tmp_path, kill_at):
    out = tmp_path / "out"
    args = [*RUN, "--output-dir", str(out)]
    code, _, _ = kill_when(test_env, args, out / "checkpoints" / kill_at)
    assert code == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()
    resumed = run_train(test_env, args)  # --resume auto is the default
    assert "resuming from" in resumed.stdout
    assert_identical_runs(reference / "one", out)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first_resumed = next(r for r in lines if "resumed_from_step" in r)
    assert first_resumed["startup_s"]["resume"] > 0  # that launch's own start-up, loading the checkpoint included


def test_crash_during_checkpoint_write_resumes_from_the_previous_one(test_env, reference, tmp_path):
    out = tmp_path / "out"
    args = [*RUN, "--output-dir", str(out)]
    kill_when(test_env, args, out / "checkpoints" / "step-00000009")
    checkpoints = out / "checkpoints"
    newest = max(p for p in checkpoints.glob("step-*"))
    # A save cut short leaves a temporary folder; a copy cut short leaves a damaged folder under a final name.
    partial = checkpoints / ".tmp-step-00000099"
    shutil.copytree(newest, partial)
    (partial / "COMPLETE").unlink()
    damaged = checkpoints / "step-00000098"
    shutil.copytree(newest, damaged)
    with open(damaged / "optimizer.bin", "r+b") as f:
        f.truncate(1000)
    resumed = run_train(test_env, args)
    assert f"skipping checkpoint {damaged}" in resumed.stderr
    assert f"resuming from {newest}" in resumed.stdout
    assert_identical_runs(reference / "one", out)


def test_a_checkpoint_written_in_the_foreground_resumes_exactly_in_the_background_writers_run(test_env, reference,
                                                                                             tmp_path):
    # The reference runs write their checkpoints in the background (the default); this one writes them before
    # training goes on (--no-async-checkpoints), is killed, and resumes with the default.
    out = tmp_path / "out"
    args = [*RUN, "--output-dir", str(out)]
    kill_when(test_env, [*args, "--no-async-checkpoints"], out / "checkpoints" / "step-00000009")
    resumed = run_train(test_env, args)
    assert "resuming from" in resumed.stdout
    assert_identical_runs(reference / "one", out)


def test_sigterm_saves_and_exits_75_then_resumes_exactly(test_env, reference, tmp_path):
    out = tmp_path / "out"
    args = [*RUN, "--output-dir", str(out), "--checkpoint-every-steps", "0"]
    # Signalled once epoch 1's record is written, just before its checkpoint: it stops at the next check (step 10).
    # Not once the checkpoint's folder appears: it is written in the background while training goes on, and may
    # appear only after that check.
    code, _, err = kill_when(test_env, args, out / "metrics.jsonl", sig=signal.SIGTERM, whole_tree=False,
                             log_dir=tmp_path)
    assert code == 75, err[-3000:]
    assert "cifar_dist.train: stopped by SIGTERM at step 10" in err
    assert (out / "checkpoints" / "step-00000010" / "COMPLETE").exists()
    run_train(test_env, args)
    assert_identical_runs(reference / "one", out)


def test_two_processes_sigkill_then_resume_is_exact(test_env, reference, tmp_path):
    out = tmp_path / "out"
    args = [*RUN, "--output-dir", str(out)]
    kill_when(test_env, args, out / "checkpoints" / "step-00000006", num_processes=2)
    run_train(test_env, args, num_processes=2)
    assert_identical_runs(reference / "two", out)


def test_two_processes_sigterm_to_the_launcher(test_env, reference, tmp_path):
    out = tmp_path / "out"
    args = [*RUN, "--output-dir", str(out), "--checkpoint-every-steps", "0"]
    # The launcher forwards SIGTERM to both workers, which agree on a step, save and exit with 75; the
    # launcher itself reports the signal it got as a failure. Signalled as the single-process case is (above).
    code, _, err = kill_when(test_env, args, out / "metrics.jsonl", sig=signal.SIGTERM, num_processes=2,
                             whole_tree=False, log_dir=tmp_path)
    assert code != 0
    assert err.count("cifar_dist.train: stopped by SIGTERM at step 10") == 2
    run_train(test_env, args, num_processes=2)
    assert_identical_runs(reference / "two", out)


def test_resume_on_another_world_size_continues_the_same_position(test_env, tmp_path):
    out = tmp_path / "out"
    args = [*RUN, "--output-dir", str(out)]
    kill_when(test_env, args, out / "checkpoints" / "step-00000003", num_processes=2)
    newest = max(p.name for p in (out / "checkpoints").glob("step-*"))
    resumed = run_train(test_env, args)  # one process now: 32 per device instead of 16
    assert f"(epoch 1, step {int(newest[5:])})" in resumed.stdout
    assert [(r["epoch"], r["step"]) for r in records(out)] == [(1, 8), (2, 16)]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(test_env, tmp_path):
    out = tmp_path / "out"
    # An absurd learning rate blows the weights up after the first step.
    proc = run_train(test_env, [*TINY, "--lr", "1e30", "--checkpoint-every-steps", "1", "--output-dir", str(out)],
                     check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("cifar_dist.train: training loss became NaN or inf by step 2;")
    assert f"last good checkpoint: {out / 'checkpoints' / 'step-00000001'}" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]
    assert (out / "checkpoints" / "step-00000001" / "COMPLETE").exists()


@pytest.fixture(scope="module")
def finished(test_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "out"
    run_train(test_env, [*TINY, "--max-steps", "3", "--checkpoint-every-steps", "2", "--output-dir", str(out)])
    return out


@pytest.mark.parametrize("flag, value", [("--image-size", "64"), ("--freeze-until", "layer3"),
                                         ("--global-batch-size", "16")])
def test_checkpoint_from_another_config_is_refused(test_env, finished, flag, value):
    before = tree_digest(finished)
    proc = run_train(test_env, [*TINY, "--output-dir", str(finished), flag, value], check=False)
    assert proc.returncode == 2
    message = proc.stderr.strip().splitlines()[-1]
    assert f"was made with {flag} " in message and f"this run has {value}" in message
    assert tree_digest(finished) == before


def test_named_damaged_checkpoint_is_an_error(test_env, finished, tmp_path):
    broken = tmp_path / "step-00000002"
    shutil.copytree(finished / "checkpoints" / "step-00000002", broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(4096)
    proc = run_train(test_env, [*TINY, "--output-dir", str(tmp_path / "new"), "--resume", str(broken)],
                     check=False)
    assert proc.returncode == 2
    assert f"--resume {broken}: damaged file" in proc.stderr
    proc = run_train(test_env, [*TINY, "--output-dir", str(tmp_path / "new"), "--resume", str(tmp_path / "nope")],
                     check=False)
    assert "no such checkpoint folder" in proc.stderr


def test_resume_to_a_run_folder_names_its_newest_checkpoint_and_a_mismatch_points_at_the_checkpoint(finished,
                                                                                                     tmp_path):
    # In process: what the trainer decides before loading anything (rundir.resolve_start).
    from cifar_dist.cli import parse_config
    from cifar_dist.config import UserError
    from cifar_dist.rundir import resolve_start

    new, newest = tmp_path / "new", finished / "checkpoints" / "step-00000003"
    for given in (finished, finished / "checkpoints"):  # the run, or its checkpoints/: not "incomplete"
        with pytest.raises(UserError) as info:
            resolve_start(new, parse_config([*TINY, "--output-dir", str(new), "--resume", str(given)]))
        assert str(info.value) == (f"--resume {given}: a run's folder, not a checkpoint; give one of its checkpoints, "
                                   f"e.g. its newest, {newest}")
    # Into an empty output dir, another output dir would not help: the checkpoint is what differs.
    with pytest.raises(UserError) as info:
        resolve_start(new, parse_config([*TINY, "--output-dir", str(new), "--resume", str(newest), "--image-size",
                                         "64"]))
    assert str(info.value).endswith("this run has 64; start from it with the same value, or from another checkpoint")
    assert resolve_start(new, parse_config([*TINY, "--output-dir", str(new), "--resume", str(newest)])) == (newest,
                                                                                                           None)
    assert not new.exists()


def test_resume_never_refuses_a_used_output_dir(test_env, finished):
    before = tree_digest(finished)
    proc = run_train(test_env, [*TINY, "--output-dir", str(finished), "--resume", "never"], check=False)
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr and "pass --overwrite" in proc.stderr
    assert tree_digest(finished) == before


def test_overwrite_starts_fresh(test_env, tmp_path):
    out = tmp_path / "out"
    run_train(test_env, [*TINY, "--max-steps", "2", "--checkpoint-every-steps", "1", "--output-dir", str(out)])
    run_train(test_env, [*TINY, "--max-steps", "1", "--output-dir", str(out), "--overwrite"])
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]
    assert [r["step"] for r in records(out)] == [1]

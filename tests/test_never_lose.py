"""A user's mistake or a failing environment never loses a run: real trainer processes, real signals, a real
full filesystem. Every case checks the exit code, the one line the user sees, and that the files of the run
that was there before are byte for byte what they were."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

import conftest
from cifar_dist.bench import trainer_times
from conftest import FLOAT64, TINY, records, run_train, run_trains_at_once, start_train, tmpfs, tree_digest, wait_for

pytestmark = pytest.mark.slow

RUN = [*TINY, "--num-epochs", "1"]
LONG = [*TINY, "--num-epochs", "1", "--synthetic-train-samples", "4096"]  # 128 steps: long enough to catch


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def finished_run(test_env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "out"
    run_train(test_env, [*RUN, "--max-steps", "3", "--checkpoint-every-steps", "2", "--output-dir", str(out)])
    return out


@pytest.fixture()
def old_run(finished_run, tmp_path) -> Path:
    """A private copy of a finished run, for tests that try to damage it."""
    out = tmp_path / "old"
    shutil.copytree(finished_run, out)
    return out


@pytest.mark.parametrize("flag, value", [("--weights", "typo.safetensors"), ("--data-source", "no/such.tar.gz")])
def test_overwrite_with_a_bad_input_keeps_the_old_run(test_env, old_run, flag, value):
    before = tree_digest(old_run)
    proc = run_train(test_env, [*RUN, "--output-dir", str(old_run), "--overwrite", flag, value], check=False)
    assert proc.returncode == 2
    assert last_line(proc.stderr).startswith(f"cifar_dist.train: error: {flag} ")
    assert tree_digest(old_run) == before


def test_a_failed_start_leaves_nothing_and_the_same_command_then_works(test_env, tmp_path):
    out = tmp_path / "new"
    weights = tmp_path / "resnet50.safetensors"
    args = [*RUN, "--max-steps", "1", "--output-dir", str(out), "--weights", str(weights)]
    proc = run_train(test_env, args, check=False)
    assert proc.returncode == 2 and "no such file" in last_line(proc.stderr)
    assert not out.exists()
    from safetensors.torch import save_file
    from torchvision.models import resnet50

    save_file(resnet50().state_dict(), weights)
    run_train(test_env, args)
    assert [r["step"] for r in records(out)] == [1]


def test_a_killed_overwrite_is_undone_by_the_next_start(test_env, old_run):
    before = tree_digest(old_run)
    proc = start_train(test_env, [*LONG, "--output-dir", str(old_run), "--overwrite"], old_run.parent)
    wait_for(old_run / ".previous-run" / "checkpoints", proc)  # the old run moved aside...
    wait_for(old_run / "config.yaml", proc)  # ...and the new one begun
    proc.kill()
    proc.wait()
    assert not (old_run / "model.safetensors").exists()  # moved aside, not deleted
    # The next start cleans up first; this one then fails on its weights, so the dir must be as it was.
    proc = run_train(test_env, [*RUN, "--output-dir", str(old_run), "--weights", "typo.pt"], check=False)
    assert proc.returncode == 2
    assert f"undid an earlier start in {old_run} that stopped before its first checkpoint" in proc.stdout
    assert tree_digest(old_run) == before


def test_overwrite_replaces_the_old_run_once_the_new_one_has_a_checkpoint(test_env, old_run):
    run_train(test_env, [*RUN, "--max-steps", "1", "--output-dir", str(old_run), "--overwrite"])
    assert sorted(p.name for p in old_run.iterdir()) == sorted(
        ["checkpoints", "config.yaml", "curves.png", "metrics.jsonl", "model.safetensors", "results.md",
         "wandb_run_id"])
    assert [p.name for p in (old_run / "checkpoints").iterdir()] == ["step-00000001"]
    assert "overwrite" not in yaml.safe_load((old_run / "config.yaml").read_text())["train"]


def test_a_second_start_on_the_same_output_dir_is_refused(test_env, tmp_path):
    out = tmp_path / "out"
    # The first runs until told to stop: however long the second takes to start, the first still holds the dir.
    first = start_train(test_env, [*LONG, "--output-dir", str(out)], tmp_path)
    wait_for(out / "config.yaml", first)
    second = run_train(test_env, [*LONG, "--output-dir", str(out)], check=False)
    while "start-up: " not in (tmp_path / "stdout").read_text():  # training under way: the stop saves a step
        assert first.poll() is None
        time.sleep(0.05)
    assert second.returncode == 2
    assert last_line(second.stderr).startswith(
        f"cifar_dist.train: error: --output-dir {out} is in use by another run (pid {first.pid} on ")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=600) == 75  # the first run went on undisturbed, to its own stop and checkpoint
    step = int(re.search(r"stopped by SIGTERM at step (\d+)", (tmp_path / "stderr").read_text())[1])
    assert (out / "checkpoints" / f"step-{step:08d}" / "COMPLETE").exists()


def test_ctrl_c_saves_and_exits_130_then_a_second_stops_at_once(test_env, tmp_path):
    out = tmp_path / "out"
    args = [*LONG, "--checkpoint-every-steps", "4", "--output-dir", str(out)]
    proc = start_train(test_env, args, tmp_path)
    wait_for(out / "checkpoints" / "step-00000004", proc)  # training is under way
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    err = (tmp_path / "stderr").read_text()
    assert "Traceback" not in err
    line = last_line(err)
    assert line.startswith("cifar_dist.train: stopped by SIGINT at step ") and "run the same command" in line
    newest = max((out / "checkpoints").glob("step-*"))
    assert f"saved {newest};" in line and (newest / "COMPLETE").exists()

    saved = sorted((out / "checkpoints").glob("step-*"))
    proc = start_train(test_env, [*LONG, "--output-dir", str(out)], tmp_path)
    wait_for(out / ".lock", proc)  # from about here a first Ctrl-C only asks for a stop at a step boundary
    proc.send_signal(signal.SIGINT)
    while "press it again to stop at once" not in (tmp_path / "stderr").read_text() and proc.poll() is None:
        time.sleep(0.05)
    if proc.poll() is None:  # (a Ctrl-C in the instant before the handler is installed stops at once by itself)
        proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    err = (tmp_path / "stderr").read_text()
    assert "Traceback" not in err
    # (On a busy machine the set-up may end before the second Ctrl-C arrives: then the first stops the run before
    # its first step, with nothing to save. Either way no checkpoint changes.)
    assert last_line(err).startswith(("cifar_dist.train: interrupted; nothing was saved since the newest checkpoint",
                                      "cifar_dist.train: stopped by SIGINT before training began; nothing to save"))
    assert sorted((out / "checkpoints").glob("step-*")) == saved


@pytest.mark.multiprocess
def test_ctrl_c_under_accelerate_launch_stops_both_processes_with_a_checkpoint(test_env, tmp_path):
    out = tmp_path / "out"
    proc = start_train(test_env, [*LONG, "--checkpoint-every-steps", "4", "--output-dir", str(out)], tmp_path,
                       num_processes=2)
    wait_for(out / "checkpoints" / "step-00000004", proc)  # training is under way
    proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends the launcher; it forwards it to both
    assert proc.wait(timeout=300) != 0
    err = (tmp_path / "stderr").read_text()
    assert "cifar_dist.train: stopped by SIGINT at step " in err and "KeyboardInterrupt" not in err
    newest = max((out / "checkpoints").glob("step-*"))
    assert newest.name != "step-00000004" and (newest / "COMPLETE").exists()  # the stop's own checkpoint


# Another layout on resume: a run stopped at step 5 (mid-epoch) continues on another number of processes or
# accumulation steps and must train exactly the remaining images, compared in float64 with a run that never
# stopped. With only the head trainable (--freeze-until fc) no BatchNorm sees the micro-batches, so even a
# change of accumulation steps must give the same weights.
LAYOUT_RUN = [*TINY, "--num-epochs", "2", "--checkpoint-every-steps", "0"]
LAYOUTS = {
    "1->2 processes": ([], 1, [], 2),
    "2->1 processes": ([], 2, [], 1),
    "accumulation 1->2": (["--freeze-until", "fc"], 1, ["--per-device-batch-size", "16"], 1),
}


def batch_layout(record: dict) -> tuple[int, int, int]:
    return record["num_processes"], record["per_device_batch_size"], record["grad_accum_steps"]


@pytest.fixture(scope="module")
def uninterrupted(test_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    layouts = {"layer4": [], "fc": ["--freeze-until", "fc"]}
    run_trains_at_once(test_env, [[*LAYOUT_RUN, *extra, "--output-dir", str(root / name)]
                                  for name, extra in layouts.items()], script=FLOAT64)
    return root


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_on_another_layout_trains_exactly_the_remaining_images(test_env, uninterrupted, initial_weights,
                                                                       tmp_path, layout):
    common, procs_before, after, procs_after = LAYOUTS[layout]
    out = tmp_path / "out"
    args = [*LAYOUT_RUN, *common, "--output-dir", str(out)]
    cut = run_train(test_env, [*args, "--max-steps", "5"], num_processes=procs_before, script=FLOAT64)
    # Epoch 1's record covers its first 5 steps of 8, and says so wherever it is shown, with the launch's layout.
    (first,) = records(out)
    assert (first["epoch"], first["step"], first["partial"], first["steps_in_epoch"]) == (1, 5, True, 5)
    assert batch_layout(first) == (procs_before, 32 // procs_before, 1)
    assert "\nepoch 1 (partial, 5 steps): train loss " in cut.stdout
    assert "\n| 1 (partial, 5 steps) | " in (out / "results.md").read_text()
    resumed = run_train(test_env, [*args, *after], num_processes=procs_after, script=FLOAT64)
    assert "(epoch 1, step 5)" in resumed.stdout
    assert [(r["epoch"], r["step"]) for r in records(out)] == [(1, 8), (2, 16)]
    # The run that completed epoch 1 replaced its record with a whole one; both epochs were trained in its layout.
    per_device = int(after[-1]) if after else 32 // procs_after
    assert [(r.get("partial"), batch_layout(r)) for r in records(out)] == [
        (None, (procs_after, per_device, 32 // procs_after // per_device))] * 2
    assert "(partial" not in (out / "results.md").read_text()
    reference = uninterrupted / ("fc" if common else "layer4")
    prefixes = ("fc.",) if common else ("layer4.", "fc.")
    assert conftest.update_difference(reference, out, initial_weights, prefixes) < 1e-9
    for mine, theirs in zip(records(out), records(reference)):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-9)


def test_a_resumed_run_needs_neither_its_starting_weights_nor_the_network(test_env, uninterrupted, initial_weights,
                                                                        tmp_path):
    """A job requeued onto a node whose torch cache lacks the ImageNet weights, without network, resumes from its
    checkpoint alone, to the weights the uninterrupted run reaches."""
    out = tmp_path / "out"
    args = [*LAYOUT_RUN, "--output-dir", str(out)]
    run_train(test_env, [*args, "--max-steps", "5"], script=FLOAT64)
    # An empty torch cache, and every download refused at once.
    bare = {**test_env, "TORCH_HOME": str(tmp_path / "empty"), "https_proxy": "http://127.0.0.1:9",
            "HTTPS_PROXY": "http://127.0.0.1:9"}
    fresh = run_train(bare, [*LAYOUT_RUN, "--output-dir", str(tmp_path / "fresh")], check=False)
    assert fresh.returncode == 2 and "could not load ResNet50 weights IMAGENET1K_V1" in last_line(fresh.stderr)
    resumed = run_train(bare, args, script=FLOAT64)
    assert "(epoch 1, step 5)" in resumed.stdout
    assert [(r["epoch"], r["step"]) for r in records(out)] == [(1, 8), (2, 16)]
    assert conftest.update_difference(uninterrupted / "layer4", out, initial_weights, ("layer4.", "fc.")) < 1e-9


def test_data_moved_elsewhere_resumes_and_other_data_is_refused(test_env, tmp_path):
    """The data source is compared by content: a moved folder does not strand the run, other data in its place
    does not mix into it."""
    from cifar_files import make_cifar_arrays, write_parquet_folder, write_python_tarball

    arrays = make_cifar_arrays(num_train=64, num_test=20)
    first, out = write_parquet_folder(tmp_path / "data", arrays), tmp_path / "out"
    args = ["--image-size", "32", "--mixed-precision", "no", "--num-epochs", "2", "--output-dir", str(out)]
    run_train(test_env, ["--data-source", str(first), *args, "--max-steps", "3"])
    moved = first.rename(tmp_path / "moved")
    other = write_python_tarball(tmp_path / "other", make_cifar_arrays(num_train=64, num_test=20, seed=1))
    before = tree_digest(out)
    proc = run_train(test_env, ["--data-source", str(other), *args], check=False)
    assert proc.returncode == 2
    assert last_line(proc.stderr) == (
        f"cifar_dist.train: error: checkpoint {out / 'checkpoints' / 'step-00000003'} was trained on other data "
        f"(--data-source {first}) than --data-source {other} holds; resume with that data or use another "
        "--output-dir")
    assert tree_digest(out) == before
    proc = run_train(test_env, ["--data-source", str(moved), *args])
    assert f"(epoch 2, step 3); its data (--data-source {first}) comes from {moved} now" in proc.stdout
    assert [r["step"] for r in records(out)] == [2, 4]
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["data_source"] == str(moved)


def test_a_weights_file_named_by_another_path_resumes_and_other_weights_are_refused(test_env, tmp_path):
    """--weights is compared by content: the same file named by its absolute path after a relative one does not
    strand the run, a file of other weights is refused before anything is written."""
    weights = tmp_path / "resnet50.pth"
    shutil.copy(Path(test_env["TORCH_HOME"]) / "hub" / "checkpoints" / conftest.V1_FILE, weights)
    relative = os.path.relpath(weights, conftest.REPO)  # run_train's working directory
    out = tmp_path / "out"
    args = [*RUN, "--output-dir", str(out)]
    run_train(test_env, [*args, "--weights", relative, "--max-steps", "3"])
    other = tmp_path / "other.pth"
    state = torch.load(weights, weights_only=True)
    state["conv1.weight"][0, 0, 0, 0] += 1.0
    torch.save(state, other)
    before = tree_digest(out)
    proc = run_train(test_env, [*args, "--weights", str(other)], check=False)
    assert proc.returncode == 2
    assert last_line(proc.stderr) == (
        f"cifar_dist.train: error: checkpoint {out / 'checkpoints' / 'step-00000003'} was made with --weights "
        f"{relative}; this run's --weights {other} holds other weights (not the same file content); resume with the "
        "same value or use another --output-dir")
    assert tree_digest(out) == before
    proc = run_train(test_env, [*args, "--weights", str(weights)])
    assert (f"(epoch 1, step 3); its weights (--weights {relative}) come from {weights} now: the same file content"
            in proc.stdout)
    assert [r["step"] for r in records(out)] == [8]
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["weights"] == str(weights)
    # The resumed run's checkpoints carry the hash of the file the run started from, which it did not read again.
    state = json.loads((out / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())
    assert state["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_time_based_checkpoints_land_on_a_health_check(test_env, tmp_path):
    out = tmp_path / "out"
    proc = run_train(test_env, [*TINY, "--num-epochs", "2", "--checkpoint-every-minutes", "0.0001",
                                "--keep-checkpoints", "5", "--output-dir", str(out)])
    assert "| ETA " in proc.stdout.split("epoch 1: train loss")[1].splitlines()[0]  # the run's time left
    # Due at every check (each 10 steps) by then: step 10 mid-epoch, plus the epoch ends 8 and 16.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000008", "step-00000010", "step-00000016"]


def test_deterministic_runs_and_says_so(test_env, tmp_path):
    proc = run_train(test_env, [*RUN, "--max-steps", "2", "--deterministic", "--output-dir", str(tmp_path / "o")])
    assert "; deterministic algorithms only" in proc.stdout


@pytest.fixture()
def small_disk(tmp_path):
    """A real 300 MB filesystem: room for two checkpoints of a head-only run (~120 MB each), not three."""
    with tmpfs(tmp_path / "disk", 300) as mount:
        yield mount


def test_a_full_disk_stops_with_one_line_and_keeps_every_checkpoint(test_env, small_disk):
    out = small_disk / "out"
    args = [*RUN, "--freeze-until", "fc", "--checkpoint-every-steps", "1", "--keep-checkpoints", "3",
            "--output-dir", str(out)]
    proc = run_train(test_env, args, check=False)
    assert proc.returncode == 74, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = last_line(proc.stderr)
    assert line.startswith(f"cifar_dist.train: no space left on the device writing {out / 'checkpoints'}/step-")
    kept = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in kept] == ["step-00000001", "step-00000002"]  # complete, and nothing half-written
    assert line.endswith(f"run the same command to resume from the newest complete checkpoint, {kept[-1]}")
    from cifar_dist.checkpoint import checkpoint_problem

    assert [checkpoint_problem(p) for p in kept] == [None, None]
    # With room again, the same command resumes from the newest one and finishes.
    subprocess.run(["mount", "-o", "remount,size=2g", str(small_disk)], check=True)
    resumed = run_train(test_env, args)
    assert "resuming from" in resumed.stdout and f"{kept[-1]}" in resumed.stdout
    assert [r["step"] for r in records(out)] == [8]


def test_a_full_disk_at_the_first_checkpoint_says_nothing_was_saved_and_undoes_the_start(test_env, old_run,
                                                                                        tmp_path):
    """A 100 MB filesystem holds no checkpoint at all (the weights alone are 103 MB): the line promises none, the
    new run's folder is gone, and a run --overwrite was replacing is back as it was."""
    with tmpfs(tmp_path / "disk", 100) as disk:
        args = [*RUN, "--freeze-until", "fc", "--checkpoint-every-steps", "1"]
        nothing_yet = ("the run had no checkpoint yet, so its start was undone: free some and run the same command "
                       "to start again")
        proc = run_train(test_env, [*args, "--output-dir", str(disk / "new")], check=False)
        assert proc.returncode == 74, proc.stderr[-3000:]
        assert last_line(proc.stderr).endswith(nothing_yet)
        assert not (disk / "new").exists()
        # A run without checkpoints (its small files only fit), replaced with --overwrite: put back unchanged.
        before = disk / "before"
        before.mkdir()
        for name in ("config.yaml", "metrics.jsonl", "results.md"):
            shutil.copy(old_run / name, before / name)
        digest = tree_digest(before)
        proc = run_train(test_env, [*args, "--output-dir", str(before), "--overwrite"], check=False)
        assert proc.returncode == 74, proc.stderr[-3000:]
        assert last_line(proc.stderr).endswith(nothing_yet)
        assert tree_digest(before) == digest and sorted(p.name for p in before.iterdir()) == sorted(digest)


def test_a_stop_asked_for_by_the_last_step_finishes_the_run_instead(test_env, tmp_path):
    # One epoch of 8 steps: no health check before the epoch's end, which is the last step. Stopped there, the run
    # would have nothing left to train when resumed, and no report: it finishes instead, and exits 0.
    out = tmp_path / "out"
    proc = start_train(test_env, [*RUN, "--checkpoint-every-steps", "0", "--output-dir", str(out)], tmp_path)
    while "start-up: " not in (tmp_path / "stdout").read_text():  # printed once setup is done: training begins
        assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, (tmp_path / "stderr").read_text()[-3000:]
    assert ("cifar_dist.train: SIGTERM arrived by the last step; the run finishes instead of stopping"
            in (tmp_path / "stderr").read_text())
    assert [r["step"] for r in records(out)] == [8]
    assert (out / "model.safetensors").is_file() and (out / "curves.png").is_file()
    assert "Best validation accuracy" in (out / "results.md").read_text()
    assert "\ntime: " in (tmp_path / "stdout").read_text()


def test_a_finished_run_killed_before_its_report_writes_it_when_started_again(test_env, old_run):
    # Its last checkpoint holds the whole run; a kill before the report left no final weights or curves. The
    # same command resumes with nothing to train, and writes them.
    (old_run / "model.safetensors").unlink()
    (old_run / "curves.png").unlink()
    before = records(old_run)
    proc = run_train(test_env, [*RUN, "--max-steps", "3", "--checkpoint-every-steps", "2", "--output-dir",
                                str(old_run)])
    assert "resuming from" in proc.stdout
    assert "nothing left to train: the run is at step 3 and this one ends at step 3; a larger --max-steps trains " \
           "on" in proc.stdout
    assert (old_run / "model.safetensors").is_file() and (old_run / "curves.png").is_file()
    assert records(old_run) == before
    # Its closing line counts no training, which the run's earlier launch did.
    times = trainer_times(proc.stdout)[1]
    assert times["training"] == 0 and times["evaluation"] == 0 and times["other"] >= 0


def test_a_finished_run_started_again_ends_at_once_and_changes_nothing(test_env, old_run):
    # Its report is complete: the same command builds nothing (no step, no feature cache, no tracker) and
    # writes nothing, where before it built all of that to find there was nothing to train.
    before = tree_digest(old_run)
    proc = run_train(test_env, [*RUN, "--max-steps", "3", "--checkpoint-every-steps", "2", "--output-dir",
                                str(old_run)])
    assert last_line(proc.stdout) == ("nothing left to train: the run is at step 3 and this one ends at step 3; a "
                                      f"larger --max-steps trains on; its results: {old_run / 'results.md'}")
    assert "- step: " not in proc.stdout and "start-up: " not in proc.stdout and not proc.stderr.strip()
    assert tree_digest(old_run) == before


def test_a_report_older_than_the_newest_checkpoint_is_written_again(test_env, old_run):
    # As a run leaves it that trained on past its report (a larger --max-steps) and was stopped after its last
    # checkpoint, before its own report: the report is older than the newest checkpoint. The same command
    # writes it again, over the run's epochs as they now stand.
    curves = old_run / "curves.png"
    state = next((old_run / "checkpoints").glob("step-*/trainer_state.json"))
    os.utime(curves, ns=(state.stat().st_mtime_ns - 10**9,) * 2)
    stale = curves.stat().st_mtime_ns
    proc = run_train(test_env, [*RUN, "--max-steps", "3", "--checkpoint-every-steps", "2", "--output-dir",
                                str(old_run)])
    assert "nothing left to train: the run is at step 3 and this one ends at step 3; a larger --max-steps trains " \
           "on\n" in proc.stdout
    assert curves.stat().st_mtime_ns > stale and "Best validation accuracy" in (old_run / "results.md").read_text()


def test_resume_path_starts_a_run_that_the_same_command_then_continues(test_env, finished_run, tmp_path):
    # --resume PATH is where a run starts, not where every launch of it starts: the same command again (a rerun
    # after a stop, a SLURM requeue) continues from the run's own newest checkpoint instead of throwing it away.
    source = finished_run / "checkpoints" / "step-00000002"
    source_before, out = tree_digest(finished_run), tmp_path / "from-2"
    args = [*RUN, "--max-steps", "6", "--checkpoint-every-steps", "2", "--output-dir", str(out), "--resume",
            str(source)]
    first = run_train(test_env, args)
    assert f"resuming from {source} (epoch 1, step 2)" in first.stdout
    weights = (out / "model.safetensors").read_bytes()
    again = run_train(test_env, args)
    assert f"--resume {source}: this run went on from it; resuming from its newest checkpoint" in again.stdout
    assert "nothing left to train: the run is at step 6 and this one ends at step 6" in again.stdout
    assert (out / "model.safetensors").read_bytes() == weights and [r["step"] for r in records(out)] == [6]
    # Going back to an older checkpoint in the same dir would overwrite the newer one: refused, nothing changed.
    kept = tree_digest(out)
    older = out / "checkpoints" / "step-00000004"
    back = run_train(test_env, [*RUN, "--output-dir", str(out), "--resume", str(older)], check=False)
    assert back.returncode == 2
    assert last_line(back.stderr) == (
        f"cifar_dist.train: error: --resume {older}: {out} holds a newer checkpoint of that run (step-00000006), "
        "which going back would overwrite; resume step-00000004 into another --output-dir")
    assert tree_digest(out) == kept and tree_digest(finished_run) == source_before


def test_resume_path_into_an_output_dir_holding_another_run_is_refused(test_env, finished_run, old_run):
    source = finished_run / "checkpoints" / "step-00000002"
    before = tree_digest(old_run)
    proc = run_train(test_env, [*RUN, "--output-dir", str(old_run), "--resume", str(source)], check=False)
    assert proc.returncode == 2
    assert last_line(proc.stderr) == (
        f"cifar_dist.train: error: --output-dir {old_run} already holds another run (newest checkpoint "
        f"step-00000003); resume {source} into another --output-dir, or leave --resume out to continue the run there")
    assert tree_digest(old_run) == before
    shutil.rmtree(old_run / "checkpoints")  # a run whose checkpoints are gone is still a run
    before = tree_digest(old_run)
    proc = run_train(test_env, [*RUN, "--output-dir", str(old_run), "--resume", str(source)], check=False)
    assert proc.returncode == 2 and last_line(proc.stderr).startswith(
        f"cifar_dist.train: error: --output-dir {old_run} already holds a run (config.yaml, ")
    assert last_line(proc.stderr).endswith(f"and --resume {source} would start another run in it; choose another "
                                           "--output-dir")
    assert tree_digest(old_run) == before


def test_ctrl_c_during_the_imports_is_one_line(test_env, tmp_path):
    out = tmp_path / "out"
    proc = start_train(test_env, [*RUN, "--output-dir", str(out)], tmp_path)
    # Torch's library mapped: the flags are parsed and seconds of imports (torch's own, torchvision, accelerate,
    # datasets) are still to come. A fixed sleep was not enough on a busy machine.
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.monotonic() + 60
    while "libtorch" not in maps.read_text():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    err = (tmp_path / "stderr").read_text()
    assert "Traceback" not in err and last_line(err).startswith("cifar_dist.train: interrupted; nothing was saved")
    assert not out.exists()

"""The output dir's lock and provisional start, in-process: who holds it, when a lock is stale, and an undo
that a crash can interrupt at any point."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from cifar_dist import rundir
from cifar_dist.config import UserError, make_config
from cifar_dist.rundir import (
    LOCK,
    PREVIOUS,
    STALE_AFTER_S,
    STARTING,
    FreshStart,
    acquire_lock,
    clear_leftovers,
    undo_start,
)


def plant_lock(out, **holder):
    out.mkdir(exist_ok=True)
    (out / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then", "token": "x", **holder}))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_lock_refuses_a_second_start_naming_the_holder(tmp_path):
    lock, note = acquire_lock(tmp_path)
    assert note is None
    with pytest.raises(UserError, match=rf"--output-dir {tmp_path} is in use by another run \(pid {os.getpid()} on "):
        acquire_lock(tmp_path)
    lock.release()
    assert not (tmp_path / LOCK).exists()
    acquire_lock(tmp_path)[0].release()


def test_a_live_holder_elsewhere_keeps_its_lock(tmp_path, monkeypatch):
    plant_lock(tmp_path, slurm_job="77")
    with pytest.raises(UserError, match="pid 1 on elsewhere, SLURM job 77, since then"):
        acquire_lock(tmp_path)
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "x"


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path):
    from cifar_dist.preflight import node_name

    pid = dead_pid()
    plant_lock(tmp_path, host=node_name(), pid=pid)
    lock, note = acquire_lock(tmp_path)
    assert note == f"took over the lock of {tmp_path}: its process {pid} on {node_name()} is gone"
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_not_refreshed_for_two_minutes_is_taken_over(tmp_path):
    plant_lock(tmp_path)
    old = time.time() - STALE_AFTER_S - 30
    os.utime(tmp_path / LOCK, (old, old))
    lock, note = acquire_lock(tmp_path)
    assert "it has not been refreshed for" in note
    lock.release()


def test_a_live_holder_on_this_host_keeps_its_lock_however_old(tmp_path):
    # A run stopped with Ctrl-Z refreshes nothing, but it is still the run: starting a second one beside it would
    # have both write the same checkpoints.
    from cifar_dist.preflight import node_name

    me = rundir._me()
    plant_lock(tmp_path, host=node_name(), pid=me["pid"], pid_start=me["pid_start"])
    old = time.time() - STALE_AFTER_S - 30
    os.utime(tmp_path / LOCK, (old, old))
    with pytest.raises(UserError, match=f"is in use by another run \\(pid {me['pid']} on "):
        acquire_lock(tmp_path)
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "x"


def test_a_pid_that_a_later_process_took_is_a_holder_gone(tmp_path):
    from cifar_dist.preflight import node_name

    me = rundir._me()
    assert me["pid_start"] is not None  # Linux: /proc tells when a process started
    plant_lock(tmp_path, host=node_name(), pid=me["pid"], pid_start=me["pid_start"] - 1)
    lock, note = acquire_lock(tmp_path)
    assert note == f"took over the lock of {tmp_path}: its process {me['pid']} on {node_name()} is gone"
    lock.release()


def test_a_holder_whose_lock_was_taken_over_says_so_and_stops_refreshing_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rundir, "REFRESH_EVERY_S", 0.05)
    lock, _ = acquire_lock(tmp_path)
    plant_lock(tmp_path, host="node7", pid=99)  # another start judged this one gone and took the lock
    old = time.time() - 1000
    os.utime(tmp_path / LOCK, (old, old))
    assert lock.lost.wait(timeout=60)  # for the trainer's next health check; a wait, not a sleep: on a busy
    # machine the refreshing thread may take a while to get its turn
    os.utime(tmp_path / LOCK, (old, old))  # (a refresh may have been under way as the lock was planted)
    time.sleep(0.3)  # six refresh periods
    assert (tmp_path / LOCK).stat().st_mtime == old  # not refreshed any more: it is not this run's
    err = capsys.readouterr().err
    assert f"warning: another start took over the lock of {tmp_path} (pid 99 on node7)" in err
    lock.release()


def test_an_earlier_attempt_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    plant_lock(tmp_path, slurm_job="42", slurm_restart="0")
    lock, note = acquire_lock(tmp_path)
    assert note.endswith("it was an earlier attempt of this SLURM job 42")
    lock.release()


def test_release_leaves_a_lock_someone_else_took_over(tmp_path):
    lock, _ = acquire_lock(tmp_path)
    plant_lock(tmp_path)  # as if this holder had been declared stale and replaced
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "x"


def make_run(out, tag: str):
    (out / "checkpoints" / "step-00000001").mkdir(parents=True)
    (out / "checkpoints" / "step-00000001" / "COMPLETE").write_text(tag)
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors"):
        (out / name).write_text(f"{tag} {name}")


def snapshot(out):
    return {str(p.relative_to(out)): p.read_text() for p in sorted(out.rglob("*")) if p.is_file()}


def test_overwrite_moves_the_old_run_aside_and_a_failed_start_puts_it_back(tmp_path):
    make_run(tmp_path, "old")
    (tmp_path / "notes.txt").write_text("the user's own file")
    before = snapshot(tmp_path)
    start = FreshStart(tmp_path)
    start.begin(overwrite=True)
    assert snapshot(tmp_path / PREVIOUS) == {k: v for k, v in before.items() if k != "notes.txt"}
    make_run(tmp_path, "new")
    start.rollback()
    assert snapshot(tmp_path) == before


def test_the_first_checkpoint_makes_the_new_run_stay(tmp_path):
    make_run(tmp_path, "old")
    start = FreshStart(tmp_path)
    start.begin(overwrite=True)
    make_run(tmp_path, "new")
    start.commit()
    start.rollback()  # too late: no effect
    assert snapshot(tmp_path)["config.yaml"] == "new config.yaml"
    assert not (tmp_path / PREVIOUS).exists() and not (tmp_path / STARTING).exists()


@pytest.mark.parametrize("cut_after", ["new files removed", "half the old files moved back"])
def test_an_undo_cut_short_is_finished_by_the_next_start(tmp_path, cut_after):
    make_run(tmp_path, "old")
    before = snapshot(tmp_path)
    FreshStart(tmp_path).begin(overwrite=True)
    make_run(tmp_path, "new")
    # Replay undo_start's steps up to the cut by hand, as a crash would leave them.
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors"):
        (tmp_path / name).unlink()
    import shutil

    shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / STARTING).write_text(json.dumps({"phase": "restoring"}))
    if cut_after == "half the old files moved back":
        os.replace(tmp_path / PREVIOUS / "config.yaml", tmp_path / "config.yaml")
    assert clear_leftovers(tmp_path) == [f"undid an earlier start in {tmp_path} that stopped before its first "
                                         "checkpoint"]
    assert snapshot(tmp_path) == before
    assert undo_start(tmp_path) is False


def test_half_written_checkpoints_are_removed_once_the_lock_is_held(tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step-00000003").mkdir(parents=True)
    notes = clear_leftovers(tmp_path)
    assert notes == [f"removed the unfinished checkpoint {tmp_path / 'checkpoints' / '.tmp-step-00000003'}"]
    assert list((tmp_path / "checkpoints").iterdir()) == []


def write_checkpoint(path, step: int, weight: float):
    """A checkpoint folder as checkpoint_problem checks it: weights, optimizer state, the state file, COMPLETE."""
    path.mkdir(parents=True)
    save_file({"w": torch.full((2,), weight)}, path / "model.safetensors")
    torch.save({"state": {}}, path / "optimizer.bin")
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "epoch": 1, "config": {}}))
    (path / "COMPLETE").write_text("")


def test_a_complete_checkpoint_left_under_its_temporary_name_takes_its_name(tmp_path):
    # A kill between removing an earlier save of the same step and renaming the new one (a stop at an epoch's
    # last step, then that epoch's end) must not lose the step: the next start names the complete copy.
    checkpoints = tmp_path / "checkpoints"
    write_checkpoint(checkpoints / "step-00000002", 2, 2.0)
    write_checkpoint(checkpoints / ".tmp-step-00000004", 4, 4.0)
    write_checkpoint(checkpoints / "step-00000006", 6, 6.0)  # an older save of step 6, cut short by its rmtree
    (checkpoints / "step-00000006" / "COMPLETE").unlink()
    write_checkpoint(checkpoints / ".tmp-step-00000006", 6, 6.5)
    notes = clear_leftovers(tmp_path)
    assert notes == [f"completed the checkpoint {checkpoints / name}, whose save was stopped as it was being named"
                     for name in ("step-00000004", "step-00000006")]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004", "step-00000006"]
    from cifar_dist.checkpoint import find_latest

    assert find_latest(checkpoints) == checkpoints / "step-00000006"
    assert (checkpoints / "step-00000006" / "COMPLETE").exists()
    assert load_file(checkpoints / "step-00000006" / "model.safetensors")["w"].tolist() == [6.5, 6.5]  # the newer


def test_a_write_cut_short_leaves_no_temporary_file_once_the_lock_is_held(tmp_path):
    # A process killed (SIGKILL) inside atomic_write_bytes, between mkstemp and the rename, leaves its temporary
    # file, named as mkstemp names it there; the next start removes those of the run's files and nothing else.
    (tmp_path / "wandb_run_id").write_text("old")
    kept = [tmp_path / ".notes.1.tmp", tmp_path / "mine.tmp"]
    for path in kept:
        path.write_text("the user's")
    leftovers = [tmp_path / ".wandb_run_id.k2j8s.tmp", tmp_path / ".metrics.jsonl.x81.tmp"]
    for path in leftovers:
        path.write_text("half")
    assert clear_leftovers(tmp_path) == []
    assert sorted(tmp_path.iterdir()) == sorted([tmp_path / "wandb_run_id", *kept])
    assert (tmp_path / "wandb_run_id").read_text() == "old"


@pytest.mark.parametrize("marker, message", [
    ("nope/stopped", "--stop-marker {marker}: its folder {tmp_path}/nope does not exist or is not a folder; create "
                    "it or choose another path"),
    ("file/stopped", "--stop-marker {marker}: its folder {tmp_path}/file does not exist or is not a folder; create "
                    "it or choose another path"),
    ("", "--stop-marker {marker} is a folder; give the path of a file to create"),
])
def test_a_stop_marker_that_could_not_be_written_is_refused_before_the_output_dir_is_touched(tmp_path, marker,
                                                                                              message):
    # Written only once a stop has saved its checkpoint: there, a failure would end the job with 1, not 75.
    (tmp_path / "file").write_text("")
    marker, out = str(tmp_path / marker), tmp_path / "out"
    with pytest.raises(UserError) as info:
        rundir.claim_output_dir(make_config(output_dir=str(out), stop_marker=marker))
    assert str(info.value) == message.format(marker=marker, tmp_path=tmp_path)
    assert not out.exists()
    rundir.claim_output_dir(make_config(output_dir=str(out), stop_marker=str(tmp_path / "stopped"))).release()


def test_a_damaged_checkpoint_is_skipped_with_one_line_of_the_packages_own(tmp_path, capfd, recwarn):
    from cifar_dist.checkpoint import find_latest

    checkpoints = tmp_path / "checkpoints"
    write_checkpoint(checkpoints / "step-00000002", 2, 2.0)
    write_checkpoint(checkpoints / "step-00000004", 4, 4.0)
    (checkpoints / "step-00000004" / "optimizer.bin").write_bytes(b"PK\x03\x04 cut short")
    assert find_latest(checkpoints) == checkpoints / "step-00000002"
    err = capfd.readouterr().err
    assert err.startswith(f"cifar_dist: warning: skipping checkpoint {checkpoints / 'step-00000004'}: damaged file (")
    assert err.count("\n") == 1 and "warnings.warn" not in err and "find_latest" not in err
    assert not recwarn.list  # not a Python warning, which printed the calling source line under it

"""Checkpoints written in the background (--async-checkpoints): the same files as accelerate's save_state, the
state of the moment the save was called, a folder that appears only once complete, and failures that reach the
trainer as a synchronous save's would.

In-process, on the trainer's own parts (trainer_parts.build), on the CPU.
"""

import errno
import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from cifar_dist import checkpoint, trainer_parts
from cifar_dist.checkpoint import COMPLETE, BackgroundWriter, checkpoint_problem, save_checkpoint
from cifar_dist.config import SpeedConfig
from cifar_dist.trainer import finish_writing
from conftest import tmpfs


@pytest.fixture()
def parts():
    """The trainer's model and Adam after two steps, so that Adam's moments exist."""
    parts = trainer_parts.build(trainer_parts.synthetic_splits(64, 8), 32,
                                speed=SpeedConfig(cache_frozen_features="no"))
    trainer_parts.train(parts, 2)
    yield parts
    trainer_parts.reset()


def state(step: int) -> dict:
    """The trainer's state file, as little as a checkpoint needs to be usable."""
    return {"step": step, "epoch": 1, "config": {}}


def same(a, b) -> bool:
    """Equal, tensors by value, containers item by item."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def contents(folder) -> dict:
    """Every file of a checkpoint, loaded."""
    out = {}
    for f in sorted(folder.iterdir()):
        if f.suffix == ".safetensors":
            out[f.name] = load_file(str(f))
        elif f.suffix == ".bin":
            out[f.name] = torch.load(f, weights_only=False)
        elif f.suffix == ".pkl":  # torch.save'd, numpy's state among them
            states = torch.load(f, weights_only=False)
            out[f.name] = {k: v for k, v in states.items() if k != "numpy_random_seed"}
            out[f.name]["numpy"] = [getattr(x, "tolist", lambda x=x: x)() for x in states["numpy_random_seed"]]
        else:
            out[f.name] = f.read_text()
    return out


class Gate:
    """Holds the background write at its first large file until ``open``; counts the files written."""

    def __init__(self, monkeypatch):
        self.opened, self.written = threading.Event(), []
        real = checkpoint.accelerate_save

        def held(obj, path, **kwargs):
            assert self.opened.wait(60), "the test never opened the gate"
            real(obj, path, **kwargs)
            self.written.append(path.name)

        monkeypatch.setattr(checkpoint, "accelerate_save", held)

    def open(self):
        self.opened.set()


def test_a_background_checkpoint_holds_what_save_state_writes(parts, tmp_path):
    foreground = save_checkpoint(parts.accelerator, tmp_path / "a", state(2), keep=2)
    writer = BackgroundWriter()
    background = save_checkpoint(parts.accelerator, tmp_path / "b", state(2), keep=2, writer=writer)
    writer.wait()
    assert checkpoint_problem(background) is None
    a, b = contents(foreground), contents(background)
    assert list(a) == list(b) == [COMPLETE, "model.safetensors", "optimizer.bin", "random_states_0.pkl",
                                  "trainer_state.json"]
    different = [name for name in a if not same(a[name], b[name])]
    assert not different
    assert len(b["optimizer.bin"]["state"]) == sum(p.requires_grad for p in parts.model.parameters())

    # And load_state restores it: the weights go back to the saved ones after another step.
    saved = {k: v.clone() for k, v in parts.model.state_dict().items()}
    trainer_parts.train(parts, 1, epoch=2)
    assert not same(saved, parts.model.state_dict())
    parts.accelerator.load_state(str(background))
    assert same(saved, parts.model.state_dict())


def test_the_checkpoint_is_the_state_when_saved_and_appears_only_once_complete(parts, tmp_path, monkeypatch):
    gate, writer, completed = Gate(monkeypatch), BackgroundWriter(), []
    saved = {k: v.clone() for k, v in parts.model.state_dict().items()}
    trainer_state = state(2)
    path = save_checkpoint(parts.accelerator, tmp_path, trainer_state, keep=2, writer=writer,
                           on_complete=lambda: completed.append(path))
    # Training goes on while the write is held: the next step changes the weights, Adam's moments and the
    # trainer's own state.
    assert writer.pending and not path.exists() and not completed
    assert not (path.parent / f".tmp-{path.name}" / COMPLETE).exists()
    trainer_parts.train(parts, 1, epoch=2)
    trainer_state["step"] = 3
    gate.open()
    writer.wait()
    assert gate.written == ["model.safetensors", "optimizer.bin"] and completed == [path]
    assert checkpoint_problem(path) is None and not writer.pending
    assert same(load_file(str(path / "model.safetensors")), saved)  # the moment of the save, not the step after
    assert json.loads((path / "trainer_state.json").read_text()) == state(2)


def test_a_write_that_ends_after_another_start_took_the_output_dir_over_is_dropped(parts, tmp_path, monkeypatch,
                                                                                    capsys):
    # The node froze mid-write; another start took the lock (after 2 minutes) and resumed the run there, up to
    # and past the same step. Named, this write would replace that run's step-2 and its pruning remove others.
    from cifar_dist.rundir import LOCK, Claim, acquire_lock

    lock, _ = acquire_lock(tmp_path)
    claim, gate, writer, completed = Claim(tmp_path, lock=lock), Gate(monkeypatch), BackgroundWriter(), []
    path = save_checkpoint(parts.accelerator, tmp_path, state(2), keep=1, writer=writer,
                           on_complete=lambda: completed.append(path), still_ours=claim.holds)
    theirs = {name: tmp_path / "checkpoints" / name for name in ("step-00000002", "step-00000003")}
    for folder in theirs.values():
        folder.mkdir(parents=True)
        (folder / COMPLETE).write_text("theirs")
    (tmp_path / LOCK).write_text(json.dumps({"host": "node7", "pid": 99, "since": "now", "token": "theirs"}))
    gate.open()
    writer.wait()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == sorted(theirs)  # no .tmp-, no pruning
    assert all((folder / COMPLETE).read_text() == "theirs" for folder in theirs.values()) and not completed
    assert f"warning: another start took over the lock of {tmp_path} (pid 99 on node7)" in capsys.readouterr().err
    assert lock.lost.is_set()  # and the trainer stops at its next check
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "theirs"


def test_the_next_save_waits_for_the_pending_one_and_keeps_the_newest(parts, tmp_path, monkeypatch):
    gate, writer = Gate(monkeypatch), BackgroundWriter()
    first = save_checkpoint(parts.accelerator, tmp_path, state(1), keep=1, writer=writer)
    threading.Timer(0.5, gate.open).start()
    second = save_checkpoint(parts.accelerator, tmp_path, state(2), keep=1, writer=writer)  # waits for the first
    assert gate.written[:2] == ["model.safetensors", "optimizer.bin"]
    writer.wait()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [second.name]  # keep 1: the first pruned
    assert not first.exists()


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("failed to write (os error 28)")])
def test_a_failed_background_write_is_raised_naming_the_checkpoint(parts, tmp_path, monkeypatch, failure):
    writer, completed = BackgroundWriter(), []
    kept = save_checkpoint(parts.accelerator, tmp_path, state(1), keep=2, writer=writer)
    writer.wait()

    def full_disk(obj, path, **kwargs):
        raise failure

    monkeypatch.setattr(checkpoint, "accelerate_save", full_disk)
    path = save_checkpoint(parts.accelerator, tmp_path, state(2), keep=2, writer=writer,
                           on_complete=lambda: completed.append(path))
    with pytest.raises(OSError) as raised:
        writer.wait()
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [kept.name]  # the temporary folder is gone
    assert checkpoint_problem(kept) is None and not completed
    writer.wait()  # raised once, then the writer is ready again


@pytest.fixture()
def disk_of_150mb(tmp_path):
    """A real 150 MB filesystem: room for a checkpoint's weights (103 MB), not also for Adam's state (137 MB)."""
    with tmpfs(tmp_path / "disk", 150) as mount:
        yield mount


def test_a_disk_that_fills_up_in_torch_save_is_no_space_naming_the_checkpoint(parts, disk_of_150mb):
    # torch.save's zip writer says only "unexpected pos ..." when the disk fills under it; the half-written
    # folder's removal frees the space again, so the disk is measured before that.
    with pytest.raises(OSError) as raised:
        save_checkpoint(parts.accelerator, disk_of_150mb, state(1), keep=2)
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(disk_of_150mb / "checkpoints" / "step-00000001")
    assert list((disk_of_150mb / "checkpoints").iterdir()) == []  # the half-written folder is gone


def test_a_run_ending_for_another_reason_lets_the_write_complete_and_says_if_it_failed(capsys):
    done = []
    writer = BackgroundWriter()
    writer.start(lambda: done.append(1))
    finish_writing(writer)
    assert done == [1] and not writer.pending and capsys.readouterr().err == ""

    def fails():
        raise OSError(errno.ENOSPC, "No space left on device", "out/checkpoints/step-00000008")

    writer.start(fails)
    finish_writing(writer)
    assert capsys.readouterr().err == ("cifar_dist.train: a checkpoint was not completed ([Errno 28] No space left "
                                       "on device: 'out/checkpoints/step-00000008')\n")
    finish_writing(None)

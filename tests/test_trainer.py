"""Pieces of the training loop (cifar_dist/trainer.py) on their own, without a run."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer

from cifar_dist import steps, trainer, trainer_parts


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_step_meter_leaves_a_checkpoint_out_of_images_per_s_and_the_data_wait(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(trainer.time, "perf_counter", clock)
    meter = trainer.StepMeter(clock())
    for step in range(5):  # five steps of 1 s, each after 0.25 s of waiting for its batch, as the loop calls it
        clock.now += 0.25
        meter.batch_arrived()
        clock.now += 0.75
        meter.batch_requested()
        if step == 2:  # a checkpoint save between the step and the next batch
            clock.now += 10.0
            meter.leave_out(10.0)
    elapsed, wait_frac = meter.read_and_reset()
    assert elapsed == 5.0 and wait_frac == 0.25


def test_progress_bars_are_off_on_other_processes_and_under_tqdm_disable(monkeypatch):
    class Main:
        is_main_process = True

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert not steps.no_progress_bar(Main())
    assert steps.no_progress_bar(type("Other", (), {"is_main_process": False})())
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert steps.no_progress_bar(Main())


@pytest.fixture
def accelerator_with_accumulation():
    trainer_parts.reset()
    yield Accelerator(cpu=True, gradient_accumulation_steps=2)
    trainer_parts.reset()


def test_a_step_runs_torchs_adam_itself_on_an_accumulations_last_micro_batch_only(accelerator_with_accumulation,
                                                                                  monkeypatch):
    accelerator = accelerator_with_accumulation
    model = torch.nn.Linear(4, 3)
    model, optimizer = accelerator.prepare(model, torch.optim.Adam(model.parameters(), lr=0.1))

    def refused(*args, **kwargs):
        raise AssertionError("accelerate's optimizer wrapper was called")
    monkeypatch.setattr(AcceleratedOptimizer, "step", refused)
    monkeypatch.setattr(AcceleratedOptimizer, "zero_grad", refused)
    inputs, labels = torch.randn(2, 4), torch.tensor([0, 2])
    before = model.weight.detach().clone()
    steps.train_step(model, model, inputs, labels, optimizer, accelerator, input_name="input")
    assert torch.equal(model.weight, before) and model.weight.grad is not None  # the first of two: gradients only
    steps.train_step(model, model, inputs, labels, optimizer, accelerator, input_name="input")
    assert not torch.equal(model.weight, before) and model.weight.grad is None  # stepped, gradients dropped


def test_under_a_gradient_scaler_the_step_goes_through_accelerates_wrapper(accelerator_with_accumulation):
    adam = torch.optim.Adam(torch.nn.Linear(4, 3).parameters())
    scaled = AcceleratedOptimizer(adam, device_placement=False, scaler=torch.amp.GradScaler("cpu"))
    assert steps.optimizer_to_step(scaled) is scaled  # fp16: the scaler unscales, checks for inf, then steps
    assert steps.optimizer_to_step(AcceleratedOptimizer(adam, device_placement=False)) is adam
    assert steps.optimizer_to_step(adam) is adam


def test_the_start_up_clock_splits_its_phases_and_carves_the_compile_out_of_its_phase(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(trainer.time, "perf_counter", clock)
    monkeypatch.setattr(trainer, "process_age_s", lambda: 3.0)
    startup = trainer.StartUp()
    clock.now += 1.0
    startup.lap("data")
    clock.now += 20.0
    startup.lap("device")
    startup.carve("device", "compile", 18.5)
    startup.carve("device", "feature_cache", 0.0)  # no cache: no phase
    assert startup.seconds == {"launch": 3.0, "data": 1.0, "device": 1.5, "compile": 18.5}
    assert startup.total() == 24.0 and startup.figures()["total"] == 24.0
    assert startup.line() == ("start-up: 24.0 s before the first step (launch and imports 3.0, data 1.0, device 1.5, "
                              "compile 18.5)")
    clock.now += 6.0
    assert startup.since_launch() == 30.0  # the summary's total time counts from the process's start
    # Timed by cifar_dist.train's main, the imports are a phase of their own.
    split = trainer.StartUp(imports_s=2.5)
    assert split.seconds == {"launch": 0.5, "imports": 2.5}
    assert split.line() == "start-up: 3.0 s before the first step (launch 0.5, imports 2.5)"


def test_the_closing_line_says_where_all_of_the_time_went_and_the_benchmark_reads_it():
    from cifar_dist.bench import trainer_times

    line = trainer.time_line(10.0, {"startup": 2.0, "training": 5.04, "evaluation": 1.0, "checkpoints": 0.5,
                                    "report": 0.3})
    assert line == ("time: 10.0 s from launch (start-up 2.0, training 5.0, evaluation 1.0, checkpoints 0.5, "
                    "report 0.3, other 1.2)")
    assert trainer_times(f"epoch 2: ...\n{line}\n") == (10.0, {"start-up": 2.0, "training": 5.0, "evaluation": 1.0,
                                                                "checkpoints": 0.5, "report": 0.3, "other": 1.2})
    # Rounding never shows as a negative remainder.
    assert trainer.time_line(1.0, {"training": 1.02}) == "time: 1.0 s from launch (training 1.0, other 0.0)"


def test_the_process_age_is_read_from_proc_and_left_out_where_there_is_none(monkeypatch):
    code = "import time; time.sleep(1); from cifar_dist.trainer import process_age_s; print(process_age_s())"
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 1.0 <= age < 120  # the sleep, then the imports
    monkeypatch.setattr(trainer, "Path", lambda path: Path("/nonexistent") / path.lstrip("/"))
    assert trainer.process_age_s() is None
    assert "launch" not in trainer.StartUp().seconds


# What the CUDA caching allocator says when it runs out (torch 2.x), cut short.
CUDA_OUT_OF_MEMORY = ("CUDA out of memory. Tried to allocate 7.66 GiB. GPU 0 has a total capacity of 79.19 GiB of "
                      "which 2.31 GiB is free. Including non-PyTorch memory, this process has 76.87 GiB memory in use.")


# The same past the share torch.cuda.set_per_process_memory_fraction gives the process (PyTorch's
# CUDACachingAllocator adds "allowed"): the card may have plenty free.
CUDA_OUT_OF_MEMORY_CAPPED = ("CUDA out of memory. Tried to allocate 14.90 GiB. GPU 0 has a total capacity of 79.19 GiB "
                             "of which 60.05 GiB is free. Including non-PyTorch memory, this process has 8.61 GiB "
                             "memory in use. 8.00 GiB allowed; Of the allocated memory 7.85 GiB is allocated by "
                             "PyTorch, and 12.00 MiB is reserved by PyTorch but unallocated.")


@pytest.mark.parametrize("message, short", [
    (CUDA_OUT_OF_MEMORY, " (another 7.66 GiB wanted, 2.31 GiB of 79.19 GiB free)"),
    (CUDA_OUT_OF_MEMORY_CAPPED,
     " (another 14.90 GiB wanted, 60.05 GiB of 79.19 GiB free, this process limited to 8.00 GiB)"),
    ("MPS backend out of memory", ""),  # another allocator's words: the line still says what to change
])
def test_running_out_of_gpu_memory_is_one_line_saying_what_to_change(tmp_path, message, short):
    with pytest.raises(trainer.TrainingStopped) as info, trainer.out_of_memory_stops("setting up", tmp_path):
        raise torch.OutOfMemoryError(message)
    assert info.value.exit_code == 4 and info.value.__cause__ is None and info.value.__suppress_context__
    assert str(info.value) == (f"out of GPU memory setting up{short}; lower --eval-batch-size (the feature cache is "
                               "computed at it) or --per-device-batch-size (gradient accumulation keeps the global "
                               "batch at 32), or free what other processes hold on the GPU; nothing was saved yet: run "
                               "again with that change")
    with trainer.out_of_memory_stops("in evaluation", tmp_path), pytest.raises(RuntimeError):
        raise RuntimeError("anything else goes through")


def stopped_in_process(out, max_steps: int):
    """The real trainer's command in this process (so that monkeypatches reach it) on a tiny synthetic run with a
    checkpoint every 2 steps, expected to exit early; the SystemExit's info."""
    from cifar_dist import train

    try:
        with pytest.raises(SystemExit) as info:
            train.main(["--data-source", "synthetic", "--synthetic-train-samples", "128", "--synthetic-eval-samples",
                        "16", "--image-size", "32", "--weights", "none", "--tracker", "none", "--max-steps",
                        str(max_steps), "--checkpoint-every-steps", "2", "--output-dir", str(out)])
    finally:
        trainer_parts.reset()
    return info


def test_running_out_of_gpu_memory_in_evaluation_stops_the_run_and_keeps_its_checkpoint(monkeypatch, tmp_path,
                                                                                         capsys):
    # The trainer's own path from evaluate to the exit code; a real out-of-memory is tests/test_gpu_memory.py's.
    from cifar_dist.checkpoint import checkpoint_problem

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(CUDA_OUT_OF_MEMORY)

    monkeypatch.setattr(trainer, "evaluate", out_of_memory)
    out = tmp_path / "run"
    info = stopped_in_process(out, max_steps=3)
    assert info.value.code == 4
    checkpoint = out / "checkpoints" / "step-00000002"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"cifar_dist.train: out of GPU memory in evaluation (another 7.66 GiB wanted, 2.31 GiB of 79.19 GiB free); "
        f"lower --eval-batch-size; the newest checkpoint, {checkpoint}, is intact: run again with that change to "
        f"resume from it")
    assert checkpoint_problem(checkpoint) is None


def test_the_loss_flag_on_the_cpu_is_read_at_once_whether_or_not_the_check_may_wait():
    # Reading a CPU tensor waits for nothing, so the check a GPU makes a step late is immediate here.
    totals = trainer.Totals(torch.device("cpu"))
    assert not totals.nonfinite(wait=False) and not totals.nonfinite()
    totals.add(torch.tensor([float("nan"), 0, 32, 1], dtype=torch.float64))
    assert totals.nonfinite(wait=False) and totals.nonfinite()
    assert totals.global_values(Accelerator(cpu=True))["count"] == 32


def test_a_run_whose_lock_was_taken_over_stops_without_saving_and_leaves_the_lock(monkeypatch, tmp_path, capsys):
    # Another start (on another node, after 2 minutes without a refresh: this node froze) judged the run gone and
    # took its output dir over. The run says so at its next check and leaves the directory to the other run.
    import json

    from cifar_dist import rundir

    monkeypatch.setattr(rundir, "REFRESH_EVERY_S", 0.05)
    out, saved = tmp_path / "run", trainer.save

    def save_then_taken_over(r, *args, **kwargs):
        path = saved(r, *args, **kwargs)
        if r.step == 2:
            if r.writer is not None:
                r.writer.wait()  # step 2 is written: the takeover comes after it (a write it overtakes is dropped)
            (out / rundir.LOCK).write_text(json.dumps({"host": "node7", "pid": 99, "since": "now", "token": "theirs"}))
            assert r.claim.lock.lost.wait(60)  # the lock's refresh thread finds it (before the check at step 4)
        return path

    monkeypatch.setattr(trainer, "save", save_then_taken_over)
    info = stopped_in_process(out, max_steps=8)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(f"warning: another start took over the lock of {out} (pid 99 on node7)" in line for line in err)
    assert err[-1] == (f"cifar_dist.train: another start took over --output-dir {out} as if this run were gone; "
                       "stopped at step 4 without saving, leaving the directory to it")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]  # nothing saved after it
    assert json.loads((out / rundir.LOCK).read_text())["token"] == "theirs"  # the other run's lock, left alone


@pytest.mark.parametrize("at_save", [1, 2])
def test_a_checkpoint_overtaken_by_another_start_is_dropped_and_the_run_leaves_the_dir_as_it_is(monkeypatch, tmp_path,
                                                                                               capsys, at_save):
    # The lock is taken over while a checkpoint is being written (in the background, as by default): the write is
    # dropped. At the run's last save (2) it has no health check left, and must neither write its final weights
    # and report into the other run's directory nor exit 0. At its first (1), it must not undo the new run's
    # start either: the start files are the other run's now.
    import json

    from cifar_dist import rundir

    monkeypatch.setattr(rundir, "REFRESH_EVERY_S", 3600)  # only the checks around the writes notice it
    out, saved, calls = tmp_path / "run", trainer.save, []

    def taken_over_while_saving(r, *args, **kwargs):
        calls.append(r.step)
        if len(calls) == at_save:  # step 2 twice: mid-epoch, then the epoch's end under --max-steps 2
            r.writer.wait()  # (the save before is written by then)
            (out / rundir.LOCK).write_text(json.dumps({"host": "node7", "pid": 99, "since": "now", "token": "x"}))
        return saved(r, *args, **kwargs)

    monkeypatch.setattr(trainer, "save", taken_over_while_saving)
    info = stopped_in_process(out, max_steps=2)
    assert info.value.code == 2 and calls == [2, 2]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"cifar_dist.train: another start took over --output-dir {out} as if this run were gone; stopped at step 2 "
        "without saving, leaving the directory to it")
    assert not (out / "model.safetensors").exists() and not (out / "curves.png").exists()  # no final report
    named = [p.name for p in (out / "checkpoints").iterdir()] if (out / "checkpoints").exists() else []
    assert named == ["step-00000002"][:at_save - 1]  # the write before the takeover, named
    assert (out / "config.yaml").exists()  # left as it is
    assert json.loads((out / rundir.LOCK).read_text())["token"] == "x"


def test_a_second_ctrl_c_stops_at_once():
    import signal

    stop = trainer.StopSignals()
    try:
        stop._handle(signal.SIGINT, None)  # the first asks for a stop at a step boundary
        assert stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)
    finally:
        stop.restore()


def test_a_sigint_the_run_was_started_to_ignore_stays_ignored():
    """A script's background job (``cmd &``) or nohup starts with SIGINT ignored: the trainer's stop handling
    takes SIGTERM and SIGUSR1 but leaves that SIGINT alone, as Python itself does."""
    import signal

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop = trainer.StopSignals()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        stop.restore()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stop = trainer.StopSignals()
        assert signal.getsignal(signal.SIGINT) == stop._handle  # a terminal's Ctrl-C: the stop at a step
        stop.restore()
        assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)

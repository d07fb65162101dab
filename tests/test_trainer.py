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


def test_the_process_age_is_read_from_proc_and_left_out_where_there_is_none(monkeypatch):
    code = "import time; time.sleep(1); from cifar_dist.trainer import process_age_s; print(process_age_s())"
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 1.0 <= age < 120  # the sleep, then the imports
    monkeypatch.setattr(trainer, "Path", lambda path: Path("/nonexistent") / path.lstrip("/"))
    assert trainer.process_age_s() is None
    assert "launch" not in trainer.StartUp().seconds

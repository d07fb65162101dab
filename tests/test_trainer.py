"""Pieces of the training loop (cifar_dist/trainer.py) on their own, without a run."""

from cifar_dist import steps, trainer


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

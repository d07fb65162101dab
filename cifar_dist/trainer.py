"""The training loop behind ``python -m cifar_dist.train`` (see cifar_dist/train.py for the commands).

``run(cfg)`` claims the output dir (rundir.py), sets up data, model and optimizer on the accelerator
(``setup``), trains epoch by epoch (``train_one_epoch``: the step, logging, health checks, checkpoints) and
writes the final weights and report (``finish``). The global batch stays 32 on any number of processes; runs
checkpoint and resume exactly; SIGTERM/SIGUSR1 or a first Ctrl-C stop at a step boundary with a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cifar_dist.checkpoint import (
    STATE_FILE,
    BackgroundWriter,
    SaveSchedule,
    check_same_data,
    checkpoint_weights,
    find_latest,
    read_state,
    save_checkpoint,
    save_model,
)
from cifar_dist.cli import TrainingStopped
from cifar_dist.config import BatchPlan, Config, TrainConfig, UserError, flat_settings, plan_batches, save_config
from cifar_dist.data import CifarSplits, build_splits, fingerprint, loader_config
from cifar_dist.model import build_model, count_parameters, weights_sha256
from cifar_dist.preflight import main_first, preflight
from cifar_dist.rundir import CHECKPOINTS, Claim, claim_output_dir
from cifar_dist.speed import (
    FastPath,
    accelerator_kwargs,
    compile_summary,
    match_optimizer_to_run,
    resolve_fast_path,
    resolve_mixed_precision,
)
from cifar_dist.steps import evaluate, no_progress_bar
from cifar_dist.tracking import (
    TENSORBOARD_DIR,
    RunLog,
    compares_to_seed,
    describe_run,
    partial_note,
    plot_title,
    run_facts,
    sample_predictions,
    tracker_backend,
)
from cifar_dist.train import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_NO_SPACE,
    EXIT_OUT_OF_MEMORY,
    EXIT_STOPPED,
    EXIT_USER_ERROR,
    no_space,
)
from cifar_dist.trainer_parts import Assembled, assemble, record_step

# What to change when the GPU runs out of memory, by what was running then. None of these settings changes what
# the run computes, so a checkpoint resumes under the new value.
LESS_MEMORY = {
    "setting up": "lower --eval-batch-size (the feature cache is computed at it) or --per-device-batch-size "
                  "(gradient accumulation keeps the global batch at 32), or free what other processes hold on the GPU",
    "in a training step": "lower --per-device-batch-size (gradient accumulation keeps the global batch at 32)",
    "in evaluation": "lower --eval-batch-size",
}

# How often (optimizer steps) the processes agree on whether to stop. With several processes each check is one
# tiny all-reduce and one wait for the device, so not every step (a lone process's waits for nothing: see
# check_health); a signal is acted on within this many steps.
CHECK_EVERY_STEPS = 10


class StopSignals:
    """Turns SIGTERM / SIGUSR1 (what SLURM sends before a time limit or preemption) and a first Ctrl-C into a
    flag; a second Ctrl-C stops at once.

    The handler only sets the flag: saving from inside a signal handler can interleave with a half-done step.
    A SIGINT the process was started to ignore (a background job of a script) stays ignored, as Python leaves
    it.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS
                          if not (sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN)}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.received == "SIGINT":
                raise KeyboardInterrupt
            os.write(2, b"cifar_dist.train: Ctrl-C: stopping at the next step boundary with a checkpoint; "
                        b"press it again to stop at once\n")
        self.received = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Totals:
    """An epoch's running training totals, summed on the device so that adding a step never waits for it."""

    NAMES = ("loss_sum", "correct", "count", "nonfinite")

    def __init__(self, device, saved: list[float] | None = None):
        """``saved``: the global loss sum, correct and count before a checkpoint (one process holds them)."""
        self.sums = torch.zeros(len(self.NAMES), device=device, dtype=torch.float64)
        if saved:
            self.sums[:3] = torch.tensor(saved, dtype=torch.float64)
        self._copied: HostCopy | None = None

    def add(self, stats: torch.Tensor) -> None:
        self.sums += stats

    def global_values(self, accelerator) -> dict[str, float]:
        """Summed over all processes (a collective: every process calls it at the same step)."""
        return dict(zip(self.NAMES, accelerator.reduce(self.sums.clone(), reduction="sum").tolist()))

    def nonfinite(self, wait: bool = True) -> bool:
        """Whether a non-finite loss was summed in on this process. Reading it waits for a GPU, unless ``wait``
        is False: then the flag is copied to the host without waiting and read at the next call, when the GPU
        has long produced it, so the answer is as of the previous call."""
        if wait or self.sums.device.type != "cuda":
            return bool(self.sums[3].item())
        previous, self._copied = self._copied, HostCopy(self.sums[3])
        return previous is not None and bool(previous.value())


class HostCopy:
    """A device value on its way to the host, the host not waiting for it."""

    def __init__(self, value: torch.Tensor):
        # Into pinned memory: only from there does a copy leave the host free (from pageable memory it waits).
        self.copy = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        self.copy.copy_(value, non_blocking=True)
        self.done = torch.cuda.Event()
        self.done.record()

    def value(self) -> float:
        if not self.done.query():  # (recorded a check ago, so long done)
            self.done.synchronize()
        return self.copy.item()


class StartUp:
    """Where this launch's time before its first step went, phase by phase: the run's "start-up:" line, the
    first epoch record's ``startup_s`` and the summary's. On a GPU most of it is compiling the step."""

    NAMES = {"launch": "launch and imports", "feature_cache": "feature cache"}

    def __init__(self, imports_s: float = 0.0):
        """``imports_s``: how long importing the trainer took (torch, torchvision, accelerate, datasets), timed by
        cifar_dist.train's main; "launch" is then the rest (the interpreter's start, the flags), else both."""
        age = process_age_s()  # everything before run()
        self.seconds = {} if age is None else {"launch": age}
        self.last = time.perf_counter()
        self.began = self.last - (age or 0.0)
        if age is not None and 0 < imports_s <= age:
            self.carve("launch", "imports", imports_s)

    def lap(self, phase: str) -> None:
        """The time since the last lap was ``phase``'s."""
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now

    def carve(self, phase: str, part: str, seconds: float) -> None:
        """``seconds`` of ``phase`` (timed inside it) were ``part``'s."""
        if seconds:
            self.seconds[phase] -= seconds
            self.seconds[part] = seconds

    def total(self) -> float:
        return sum(self.seconds.values())

    def since_launch(self) -> float:
        return time.perf_counter() - self.began

    def figures(self) -> dict[str, float]:
        return {"total": round(self.total(), 2), **{k: round(v, 2) for k, v in self.seconds.items()}}

    def line(self) -> str:
        names = {**self.NAMES, "launch": "launch"} if "imports" in self.seconds else self.NAMES
        parts = ", ".join(f"{names.get(k, k)} {v:.1f}" for k, v in self.seconds.items())
        return f"start-up: {self.total():.1f} s before the first step ({parts})"


def process_age_s() -> float | None:
    """Seconds since this process started (Linux; None elsewhere). Under accelerate launch or torchrun this is
    the worker's age: the launcher's own start came before it."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22, starttime, in clock ticks


class AlreadyFinished(Exception):
    """A finished run started again with its report complete: the same command ends at once, having built and
    changed nothing. ``records``: the run's epochs, as ``run`` returns them."""

    def __init__(self, message: str, records: list[dict]):
        super().__init__(message)
        self.records = records


@dataclass
class Run:
    """Everything a run needs once set up; built by ``setup``."""

    cfg: Config
    plan: BatchPlan
    accelerator: Accelerator
    claim: Claim
    fast: FastPath
    model: torch.nn.Module
    run_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # train_step, or the recorded whole step
    optimizer: torch.optim.Optimizer
    splits: CifarSplits
    train_loader: DataLoader
    eval_loader: DataLoader
    input_name: str
    eval_input_name: str
    run_log: RunLog
    schedule: SaveSchedule
    position: dict
    steps_per_epoch: int
    total_steps: int
    startup: StartUp
    writer: BackgroundWriter | None  # --async-checkpoints: writes the checkpoints while training goes on
    data_fingerprint: str  # of the training set (data.fingerprint), recorded in each checkpoint
    weights_sha256: str | None  # of the --weights file the run started from (model.weights_sha256), likewise
    step: int = 0
    per_class_acc: list = field(default_factory=list)
    checkpoint_s: float = 0.0  # this launch's pauses for checkpoints: every save, and the wait for the last one
    trained_s: float = 0.0  # this launch's training and evaluation, for its closing line
    evaluated_s: float = 0.0

    @property
    def output_dir(self) -> Path:
        return self.claim.output_dir


def run(cfg: Config, dtype: torch.dtype = torch.float32, imports_s: float = 0.0) -> list[dict]:
    """Train and evaluate as ``cfg`` says; returns the per-epoch records written to metrics.jsonl.

    ``dtype`` is the parameters' dtype; tests use float64 to compare runs far below float32 rounding.
    ``imports_s``: the start-up's "imports" phase (StartUp).
    Raises TrainingStopped when a signal or a non-finite loss ends the run early.
    """
    # Cheap checks first: nothing is loaded or built until the batch plan, tracker and output dir are good.
    # With no accelerator, several launched processes run on the CPU over gloo (accelerate would otherwise
    # treat each as a lone process, since its GPU launcher does not pass the config's use_cpu on).
    startup = StartUp(imports_s)
    state = PartialState(cpu=not torch.accelerator.is_available())
    plan = plan_batches(cfg.train, state.num_processes)
    state.print(preflight(state.num_processes, int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))))
    log_with = tracker_backend(cfg.tracking)
    claim = claim_on_main(state, cfg)
    startup.lap("preflight")
    stop = StopSignals()  # from here on a first Ctrl-C or SIGTERM waits for the next step boundary
    writer = BackgroundWriter() if cfg.train.async_checkpoints else None
    try:
        with out_of_memory_stops("setting up", claim.output_dir):
            r = setup(cfg, plan, claim, log_with, dtype, startup, writer)
        if stop.received:  # setup's end is the first boundary; there is nothing to save yet
            raise stopped(r, stop, "before training began", None)
        for epoch in range(r.position["epoch"], cfg.train.num_epochs + 1):
            if r.step >= r.total_steps:
                break
            train_one_epoch(r, epoch, stop)
        finish(r)
    except AlreadyFinished as done:
        state.print(done)
        return done.records
    except BaseException as exc:
        finish_writing(writer)  # a checkpoint still being written completes first, and with it maybe the start
        # Looked for before the undo below, which puts back the checkpoints of a run --overwrite replaced.
        latest = find_latest(claim.output_dir / CHECKPOINTS) if no_space(exc) else None
        claim.abandon()  # a new run that never reached its first checkpoint leaves the dir as it found it
        if no_space(exc):
            raise TrainingStopped(no_space_line(exc, latest, claim), EXIT_NO_SPACE) from None
        raise
    finally:
        stop.restore()
        claim.release()
    return r.run_log.records


def check_head_size(num_classes: int, splits: CifarSplits) -> None:
    """UserError for a head with fewer outputs than the data has classes: the loss would fail at the first step
    (on a GPU as a device-side assert), after the data and the model had loaded."""
    if num_classes < len(splits.class_names):
        raise UserError(f"--num-classes {num_classes}: the training data has {len(splits.class_names)} classes "
                        f"(labels 0 to {len(splits.class_names) - 1}); give at least that many")


def run_length(train: TrainConfig, steps_per_epoch: int) -> int:
    """The optimizer step the run ends at: --num-epochs epochs, or --max-steps if that comes first."""
    total = steps_per_epoch * train.num_epochs
    return total if train.max_steps is None else min(total, train.max_steps)


def nothing_left(step: int, total_steps: int, train: TrainConfig) -> str:
    limit = "--max-steps" if total_steps == train.max_steps else "--num-epochs"
    return (f"nothing left to train: the run is at step {step} and this one ends at step {total_steps}; a larger "
            f"{limit} trains on")


def report_complete(output_dir: Path, checkpoint: Path) -> bool:
    """Whether the run's report was written after ``checkpoint``, its newest: curves.png is the report's last
    file, and a run that trained on from an earlier report and stopped before its own leaves that one behind."""
    curves = output_dir / "curves.png"
    return curves.exists() and curves.stat().st_mtime_ns >= (checkpoint / STATE_FILE).stat().st_mtime_ns


def leave_if_finished(train: TrainConfig, claim: Claim, steps_per_epoch: int) -> None:
    """Raises AlreadyFinished for a finished run started again whose report is complete, before the feature
    cache, the compile, the tracker or a write: the same command again ends at once and changes nothing."""
    if claim.resume_from is None or not report_complete(claim.output_dir, claim.resume_from):
        return
    state = read_state(claim.resume_from)
    total_steps = run_length(train, steps_per_epoch)
    if state["step"] >= total_steps:
        raise AlreadyFinished(f"{nothing_left(state['step'], total_steps, train)}; its results: "
                              f"{claim.output_dir / 'results.md'}", state["records"])


def claim_on_main(state: PartialState, cfg: Config) -> Claim:
    """The main process locks the output dir and decides where to start; every process learns the outcome, or
    exits with the main process's error (which only the main process prints)."""
    claim, outcome = Claim(Path(cfg.train.output_dir)), [None, None]
    if state.is_main_process:
        try:
            claim = claim_output_dir(cfg)
            outcome[0] = claim.resume_from
        except UserError as exc:
            outcome[1] = str(exc)
    if state.num_processes > 1:
        broadcast_object_list(outcome)
    if outcome[1] is not None:
        if state.is_main_process:
            raise UserError(outcome[1])
        raise SystemExit(2)
    claim.resume_from = outcome[0]
    return claim


def setup(cfg: Config, plan: BatchPlan, claim: Claim, log_with: str | None, dtype: torch.dtype,
          startup: StartUp, writer: BackgroundWriter | None) -> Run:
    """Data, model, optimizer and loaders on the accelerator, restored from the checkpoint if resuming; the
    output dir is written to only once all of them have loaded. ``startup`` times each phase."""
    accelerator, fast = make_accelerator(cfg, plan, claim, log_with)
    startup.lap("accelerator")
    model, splits, data_fingerprint, weights_hash = main_first(
        accelerator, lambda: model_and_data(cfg, claim, dtype, startup))
    startup.lap("data")
    steps_per_epoch = len(splits.train) // plan.global_batch_size  # the sampler cuts to whole global batches
    leave_if_finished(cfg.train, claim, steps_per_epoch)  # before the costly parts
    counts = count_parameters(model)
    parts = assemble(accelerator, model, splits, plan, fast, cfg.optim, cfg.speed, cfg.train.eval_batch_size,
                     cfg.train.seed)
    startup.lap("device")  # placement, prepare and loaders, and inside them:
    startup.carve("device", "feature_cache", parts.feature_cache_s)
    startup.carve("device", "compile", parts.fast.compiled.warmup_s if parts.fast.compiled else 0.0)
    position = restore_position(accelerator, parts.optimizer, claim, startup)
    parts = record_step(parts)  # --whole-step-graph: after the resume, as the graph keeps what it loaded
    if parts.fast.whole_step_graph:
        startup.lap("graph")
    accelerator.wait_for_everyone()
    run_log = announce(cfg, plan, accelerator, claim, counts, splits, parts, position)
    startup.lap("tracker")  # with the header and config.yaml
    accelerator.print(startup.line())

    assert len(parts.train_loader) // plan.grad_accum_steps == steps_per_epoch  # what the loop will iterate
    total_steps = run_length(cfg.train, steps_per_epoch)
    if position["step"] >= total_steps:  # a rerun of a finished run whose report is missing: only the report
        accelerator.print(nothing_left(position["step"], total_steps, cfg.train))
    return Run(cfg, plan, accelerator, claim, parts.fast, parts.model, parts.run_step, parts.optimizer, splits,
               parts.train_loader, parts.eval_loader, parts.input_name, parts.eval_input_name, run_log,
               SaveSchedule(cfg.train.checkpoint_every_steps, cfg.train.checkpoint_every_minutes), position,
               steps_per_epoch, total_steps, startup, writer, data_fingerprint, weights_hash, step=position["step"])


def make_accelerator(cfg: Config, plan: BatchPlan, claim: Claim, log_with: str | None
                     ) -> tuple[Accelerator, FastPath]:
    """The accelerator, seeded, and the fast path it is built for."""
    mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision)
    fast = resolve_fast_path(cfg.speed, PartialState().device, mixed_precision, plan.num_processes,
                             plan.grad_accum_steps, cfg.train.deterministic)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any matmul
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=plan.grad_accum_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(claim.output_dir),
                                            logging_dir=str(claim.output_dir / TENSORBOARD_DIR)),
        kwargs_handlers=accelerator_kwargs(cfg.speed, fast),
        dataloader_config=loader_config(),
    )
    set_seed(cfg.train.seed, deterministic=cfg.train.deterministic)
    return accelerator, fast


def model_and_data(cfg: Config, claim: Claim, dtype: torch.dtype, startup: StartUp
                   ) -> tuple[torch.nn.Module, CifarSplits, str, str | None]:
    """The model, then the data, and the fingerprints of both: a wrong --weights file fails in seconds, not after
    the dataset's download; a resume from a checkpoint trained on other data fails before anything is built.

    Under main_first: rank 0 fetches the weights and decodes the dataset into datasets' cache, the others then
    reuse both. A resumed run takes every weight from its checkpoint (load_state sets them again, but the
    feature cache is built before that), so it needs neither the --weights file nor the network: the file's
    hash is the checkpoint's, which the start compared with a file named otherwise (check_compatible)."""
    saved = checkpoint_weights(claim.resume_from) if claim.resume_from is not None else None
    model = build_model(cfg.model, cfg.data.image_size, saved).to(dtype)
    # A fresh start hashes its file once it has loaded (a bad one has had its one line); a resume reads none.
    weights_hash = (read_state(claim.resume_from).get("weights_sha256") if claim.resume_from is not None
                     else weights_sha256(cfg.model.weights))
    startup.lap("model")
    splits = build_splits(cfg.data, seed=cfg.train.seed)
    check_head_size(cfg.model.num_classes, splits)
    data_fingerprint = fingerprint(splits.train)
    if claim.resume_from is not None:
        check_same_data(claim.resume_from, cfg.data.data_source, data_fingerprint)
    return model, splits, data_fingerprint, weights_hash


def restore_position(accelerator: Accelerator, optimizer, claim: Claim, startup: StartUp) -> dict:
    """Where training starts: a checkpoint's position, loaded into the prepared model and optimizer, or the
    beginning. The data order depends only on seed and epoch, so a position in optimizer steps means the same
    images whatever the number of processes."""
    position = {"epoch": 1, "steps_in_epoch": 0, "step": 0, "train_sums": [0.0, 0.0, 0.0], "records": []}
    if claim.resume_from is None:
        return position
    accelerator.load_state(str(claim.resume_from))
    # Checkpoints are taken between optimizer steps, but load_state restores the saved micro-batch counter,
    # which is wrong under another accumulation layout and missing on ranks the checkpoint did not have.
    accelerator.step = 0
    match_optimizer_to_run(optimizer)  # this run's Adam implementation and layouts, whatever the checkpoint's
    position.update({k: v for k, v in read_state(claim.resume_from).items() if k in position})
    startup.lap("resume")
    return position


def announce(cfg: Config, plan: BatchPlan, accelerator: Accelerator, claim: Claim, counts: dict,
             splits: CifarSplits, parts: Assembled, position: dict) -> RunLog:
    """Every input has loaded: only now is the output dir changed (config.yaml), the run's header printed and
    the tracker started."""
    if accelerator.is_main_process:
        claim.begin(cfg.train.overwrite)
        save_config(cfg, claim.output_dir / "config.yaml")
    header = describe_run(cfg, plan, accelerator, counts, len(splits.train), len(splits.test), parts.fast)
    accelerator.print(header)
    if claim.resume_from is not None:
        accelerator.print(f"resuming from {claim.resume_from} (epoch {position['epoch']}, step {position['step']})"
                          + moved_inputs(claim.resume_from, cfg))
    run_log = RunLog(accelerator, claim.output_dir, header, position["records"], plot_title(cfg, claim.output_dir),
                     compares_to_seed(cfg, len(splits.train), len(splits.test)))
    run_log.start(cfg.tracking, {**cfg.to_dict(),
                                 "run": run_facts(plan, accelerator, counts, parts.fast, parts.optimizer)})
    return run_log


def moved_inputs(checkpoint: Path, cfg: Config) -> str:
    """The resume line's note on each input this run names otherwise than ``checkpoint`` did: the start compared
    it by content and found it the same (check_same_data, check_compatible), so say where it came from before."""
    was = flat_settings(read_state(checkpoint)["config"])
    notes = []
    if was["data_source"] != cfg.data.data_source:
        notes.append(f"its data (--data-source {was['data_source']}) comes from {cfg.data.data_source} now: the same "
                     "images and labels")
    if was["weights"] != cfg.model.weights:
        notes.append(f"its weights (--weights {was['weights']}) come from {cfg.model.weights} now: the same file "
                     "content")
    return "".join(f"; {note}" for note in notes)


def train_one_epoch(r: Run, epoch: int, stop: StopSignals) -> None:
    """Train ``epoch`` from where the run stands, evaluate, log and checkpoint; raises TrainingStopped."""
    accelerator, cfg, plan = r.accelerator, r.cfg, r.plan
    done = r.position["steps_in_epoch"] if epoch == r.position["epoch"] else 0
    r.train_loader.set_epoch(epoch)  # before skip_first_batches, whose wrapper cannot pass it on
    loader = r.train_loader
    if done:  # resuming mid-epoch: skip exactly the micro-batches already trained on, in this layout's units
        loader = accelerator.skip_first_batches(r.train_loader, done * plan.grad_accum_steps)
    # The global totals of the steps before a mid-epoch checkpoint go to one process, so sums stay global.
    totals = Totals(accelerator.device, r.position["train_sums"] if done and accelerator.is_main_process else None)
    epoch_start, first_done, saving_s = time.perf_counter(), done, 0.0
    meter = StepMeter(epoch_start)
    r.model.train()
    with tqdm(total=r.steps_per_epoch, initial=done, desc=f"epoch {epoch}/{cfg.train.num_epochs}", unit="step",
              disable=no_progress_bar(accelerator), file=sys.stdout) as progress, \
            out_of_memory_stops("in a training step", r.output_dir, r.writer):
        for inputs, labels in loader:
            meter.batch_arrived()
            totals.add(r.run_step(inputs, labels))
            meter.batch_requested()
            if not accelerator.sync_gradients:
                continue
            r.step, done = r.step + 1, done + 1
            progress.update(1)
            if r.step % cfg.train.log_every_steps == 0:
                log_step(r, totals, meter, progress, epoch - 1 + done / r.steps_per_epoch)
            stopping, path, save_s = save_when_due(r, totals, stop, epoch, done)
            meter.leave_out(save_s)  # timed apart: images/s and the data wait measure training alone
            saving_s += save_s
            if stopping and r.step < r.total_steps:  # at the last step, the epoch's end below decides
                raise stopped(r, stop, f"at step {r.step}", path)
            if r.step >= r.total_steps:
                break
    stopping, _ = check_health(r, totals, stop)  # waits: the GPU's queued steps count as training
    train_time = time.perf_counter() - epoch_start - saving_s
    record = end_of_epoch_record(r, epoch, totals, train_time, (done - first_done) * plan.global_batch_size)
    record["epoch_time_s"] = round(time.perf_counter() - epoch_start, 3)
    record["checkpoint_time_s"] = round(saving_s, 3)  # the mid-epoch saves; the end-of-epoch one follows
    if done < r.steps_per_epoch:  # --max-steps ended the run here: the training figures cover these steps only
        record.update(partial=True, steps_in_epoch=done)  # (a run that completes the epoch replaces the record)
    log_epoch(r, record, (train_time + saving_s) / max(done - first_done, 1))
    path = save(r, epoch + 1, 0, None) if done == r.steps_per_epoch else save(r, epoch, done, totals)
    if stopping:
        stop_unless_done(r, stop, f"at the end of epoch {epoch}", path)


def save_when_due(r: Run, totals: Totals, stop: StopSignals, epoch: int, done: int
                  ) -> tuple[bool, Path | None, float]:
    """After an optimizer step: the health check every CHECK_EVERY_STEPS steps, and a mid-epoch checkpoint when
    the schedule (steps or minutes) says so or a stop was asked for. Returns whether to stop, the checkpoint
    and the seconds its save held training up."""
    mid_epoch = done < r.steps_per_epoch
    save_due, stopping = mid_epoch and r.schedule.due_at(r.step), False
    if save_due or r.step % CHECK_EVERY_STEPS == 0:
        stopping, time_due = check_health(r, totals, stop, wait=False)
        save_due = save_due or (mid_epoch and time_due)
    if not (save_due or stopping):
        return False, None, 0.0
    # Waits, so the GPU's queued steps count as training, not as the save; and no checkpoint follows a
    # non-finite loss.
    stopping = check_health(r, totals, stop)[0] or stopping
    save_start = time.perf_counter()
    path = save(r, epoch, done, totals)
    return stopping, path, time.perf_counter() - save_start


def log_epoch(r: Run, record: dict, seconds_per_step: float) -> None:
    """The epoch's record to metrics.jsonl and the tracker, and its line on the console."""
    r.trained_s, r.evaluated_s = r.trained_s + record["train_time_s"], r.evaluated_s + record["eval_time_s"]
    if r.claim.resume_from is not None:  # lets compare show the run as resumed
        record["resumed_from_step"] = r.position["step"]
    if record["epoch"] == r.position["epoch"]:  # the first epoch of this launch paid for its start-up
        record["startup_s"] = r.startup.figures()
    r.run_log.log_epoch(record, step=r.step)
    r.accelerator.print(
        f"epoch {record['epoch']}{partial_note(record)}: train loss {record['train_loss']:.4f} acc "
        f"{100 * record['train_acc']:.2f}% | val loss {record['val_loss']:.4f} acc {100 * record['val_acc']:.2f}% top5 "
        f"{100 * record['val_top5']:.2f}% | {record['train_images_per_s']:.0f} img/s"
        + eta(r, seconds_per_step, record["eval_time_s"]))


def eta(r: Run, seconds_per_step: float, eval_seconds: float) -> str:
    """" | ETA 12m 30s" for the steps and evaluations still to come at this epoch's pace, or "" at the end."""
    steps_left = r.total_steps - r.step
    if steps_left <= 0:
        return ""
    seconds = steps_left * seconds_per_step + -(-steps_left // r.steps_per_epoch) * eval_seconds
    minutes, secs = divmod(round(seconds), 60)
    return f" | ETA {minutes}m {secs:02d}s" if minutes else f" | ETA {secs}s"


class StepMeter:
    """Images/s and the share of time spent waiting for data, over the steps since the last log."""

    def __init__(self, start: float):
        self.window_start, self.requested, self.data_wait = start, start, 0.0

    def batch_arrived(self) -> None:
        self.data_wait += time.perf_counter() - self.requested

    def batch_requested(self) -> None:
        self.requested = time.perf_counter()

    def leave_out(self, seconds: float) -> None:
        """Take ``seconds`` spent on something else since the last batch (a checkpoint) out of both figures."""
        self.window_start += seconds
        self.requested += seconds

    def read_and_reset(self) -> tuple[float, float]:
        """(seconds, data-wait fraction) of the window since the last call."""
        elapsed = time.perf_counter() - self.window_start
        wait_frac = self.data_wait / elapsed
        self.window_start, self.data_wait = time.perf_counter(), 0.0
        return elapsed, wait_frac


def log_step(r: Run, totals: Totals, meter: StepMeter, progress, epoch_progress: float) -> None:
    """Progress bar and tracker, every --log-every-steps: the epoch's running loss and accuracy over all
    processes (a collective, and a wait for the device, which is why not every step)."""
    elapsed, wait_frac = meter.read_and_reset()
    images_per_s = r.cfg.train.log_every_steps * r.plan.global_batch_size / elapsed
    sums = totals.global_values(r.accelerator)
    progress.set_postfix(loss=f"{sums['loss_sum'] / sums['count']:.3f}", img_s=f"{images_per_s:.0f}")
    r.run_log.log_step({"train/loss": sums["loss_sum"] / sums["count"], "train/acc": sums["correct"] / sums["count"],
                        "train/images_per_s": images_per_s, "train/data_wait_frac": wait_frac,
                        "lr": r.optimizer.param_groups[0]["lr"], "epoch": epoch_progress}, step=r.step)


def end_of_epoch_record(r: Run, epoch: int, totals: Totals, train_time: float, images_trained: int) -> dict:
    """The epoch's line of metrics.jsonl: global training totals and a full evaluation."""
    sums = totals.global_values(r.accelerator)
    eval_start = time.perf_counter()
    with out_of_memory_stops("in evaluation", r.output_dir, r.writer):
        metrics, r.per_class_acc = evaluate(r.model, r.eval_loader, r.accelerator, r.splits.class_names,
                                            r.eval_input_name)
    return {"epoch": epoch, "step": r.step, "train_loss": sums["loss_sum"] / sums["count"],
            "train_acc": sums["correct"] / sums["count"], **metrics, "train_time_s": round(train_time, 3),
            "eval_time_s": round(time.perf_counter() - eval_start, 3),
            "train_images_per_s": round(images_trained / train_time, 1), **r.plan.layout()}


def save(r: Run, epoch: int, steps_in_epoch: int, totals: Totals | None) -> Path:
    """A checkpoint at the current step that resumes at (epoch, steps_in_epoch); the first makes a new run
    permanent."""
    train_sums = [0.0, 0.0, 0.0]
    if totals is not None:
        sums = totals.global_values(r.accelerator)
        train_sums = [sums["loss_sum"], sums["correct"], sums["count"]]
    state = {"epoch": epoch, "steps_in_epoch": steps_in_epoch, "step": r.step, "train_sums": train_sums,
             "records": r.run_log.records, "config": r.cfg.to_dict(),
             "num_processes": r.accelerator.num_processes, "started_from": r.claim.started_from,
             "data_fingerprint": r.data_fingerprint, "weights_sha256": r.weights_sha256}
    # The first complete checkpoint makes a new run permanent (Claim.commit), whenever the writer completes it.
    start = time.perf_counter()
    path = save_checkpoint(r.accelerator, r.output_dir, state, r.cfg.train.keep_checkpoints, r.writer,
                           on_complete=r.claim.commit, still_ours=r.claim.holds)
    r.checkpoint_s += time.perf_counter() - start
    r.schedule.saved()
    return path


def finish(r: Run) -> None:
    """Final weights and the end-of-run report (not again for a finished run that was started again), then the
    line that says where this launch's time went."""
    accelerator = r.accelerator
    waiting = time.perf_counter()
    if r.writer is not None:
        r.writer.wait()  # the last checkpoint is complete before the run reports itself done
    r.checkpoint_s += time.perf_counter() - waiting
    leave_if_taken_over(r)  # (then that checkpoint was dropped, and the report is not this run's to write)
    if accelerator.is_main_process:
        reporting = time.perf_counter()
        save_model(accelerator.unwrap_model(r.model), r.output_dir / "model.safetensors")
        records = r.run_log.records
        best = max(records, key=lambda rec: rec["val_acc"])
        summary = {"final_val_acc": records[-1]["val_acc"], "final_val_top5": records[-1]["val_top5"],
                   "best_val_acc": best["val_acc"], "best_epoch": best["epoch"], "steps": r.step,
                   "startup_s": r.startup.figures(),  # this launch's
                   "total_time_s": round(r.startup.since_launch(), 1),
                   "time_s": {k: round(v, 2) for k, v in launch_times(r).items()},
                   **compile_summary(r.fast)}
        # A launch that trained nothing has nothing new to report, unless the report is missing or older than
        # the checkpoint it resumed from.
        if r.step > r.position["step"] or not report_complete(r.output_dir, r.claim.resume_from):
            r.run_log.finish(summary, r.per_class_acc, lambda: sample_predictions(r.model, r.splits, accelerator),
                             r.output_dir / "model.safetensors" if r.cfg.tracking.log_model else None)
        accelerator.print(time_line(r.startup.since_launch(),
                                    {**launch_times(r), "report": time.perf_counter() - reporting}))
    accelerator.end_training()


def launch_times(r: Run) -> dict[str, float]:
    """Seconds of this launch by what they went to: its start-up, its epochs' training and evaluation, and its
    pauses for checkpoints."""
    return {"startup": r.startup.total(), "training": r.trained_s, "evaluation": r.evaluated_s,
            "checkpoints": r.checkpoint_s}


def time_line(total: float, times: dict[str, float]) -> str:
    """"time: 54.6 s from launch (start-up 21.2, training 27.1, ..., other 0.3)": "report" is the final weights and
    the report, "other" what no phase counts (progress, logging, each epoch's files)."""
    times = {**times, "other": total - sum(times.values())}
    parts = ", ".join(f"{'start-up' if name == 'startup' else name} {round(seconds, 1) + 0.0:.1f}"  # no "-0.0"
                      for name, seconds in times.items())
    return f"time: {total:.1f} s from launch ({parts})"


def stop_unless_done(r: Run, stop: StopSignals, where: str, checkpoint: Path) -> None:
    """Raises ``stopped`` for a stop asked for before the run's last step. After it nothing is left to resume:
    the run finishes instead (its report takes a second or two) and exits 0, so a job script does not requeue
    it; stopped there and resumed, it would have nothing to train and no report to write."""
    if r.step < r.total_steps:
        raise stopped(r, stop, where, checkpoint)
    if r.accelerator.is_main_process:
        print(f"cifar_dist.train: {stop.received or 'a signal to another process'} arrived by the last step; the "
              "run finishes instead of stopping", file=sys.stderr)


def stopped(r: Run, stop: StopSignals, where: str, checkpoint: Path | None) -> TrainingStopped:
    """The exception that ends a run stopped by a signal, once its checkpoint is complete; marks the stop."""
    if r.writer is not None:
        r.writer.wait()
    if checkpoint is not None:  # (every process is here, after a check that agreed to stop)
        leave_if_taken_over(r)  # then the stop's checkpoint was dropped: nothing to requeue on
    interrupted = stop.received == "SIGINT"
    if r.cfg.train.stop_marker and r.accelerator.is_main_process and not interrupted:
        Path(r.cfg.train.stop_marker).write_text(f"{checkpoint}\n")  # job scripts requeue on it; not on Ctrl-C
    saved = f"saved {checkpoint}" if checkpoint else "nothing to save yet"
    return TrainingStopped(f"stopped by {stop.received or 'a signal to another process'} {where}; {saved}; "
                           "run the same command to resume", EXIT_INTERRUPTED if interrupted else EXIT_STOPPED)


@contextlib.contextmanager
def out_of_memory_stops(doing: str, output_dir: Path, writer: BackgroundWriter | None = None):
    """The GPU running out of memory inside the block stops the run with one line: when, by how much, what to
    change (LESS_MEMORY[doing]) and what is saved. Its traceback is dropped, and with it the memory it held."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        finish_writing(writer)  # the checkpoint being written (host memory only) completes before it is named
        found = re.search(r"Tried to allocate ([\d.]+ \w+)\. GPU \d+ has a total capacity of ([\d.]+ \w+) of which "
                          r"([\d.]+ \w+) is free", str(exc))
        # Under torch.cuda.set_per_process_memory_fraction the process's share ran out, not the card.
        allowed = re.search(r"([\d.]+ \w+) allowed;", str(exc))
        short = (f" (another {found[1]} wanted, {found[3]} of {found[2]} free"
                 f"{f', this process limited to {allowed[1]}' if allowed else ''})" if found else "")
        latest = find_latest(output_dir / CHECKPOINTS)
        saved = (f"the newest checkpoint, {latest}, is intact: run again with that change to resume from it" if latest
                 else "nothing was saved yet: run again with that change")
        raise TrainingStopped(f"out of GPU memory {doing}{short}; {LESS_MEMORY[doing]}; {saved}",
                              EXIT_OUT_OF_MEMORY) from None


def no_space_line(exc: OSError, latest: Path | None, claim: Claim) -> str:
    """What a full disk left: the newest complete checkpoint to resume from, or, for a run that had none yet,
    nothing (a new run's start is undone, and its folder goes where the start made it)."""
    where = f"no space left on the device writing {exc.filename or 'the run'}"
    if latest is not None:
        return f"{where}; free some and run the same command to resume from the newest complete checkpoint, {latest}"
    undone = ", so its start was undone" if claim.start is not None and claim.start.rolled_back else ""
    return f"{where}; the run had no checkpoint yet{undone}: free some and run the same command to start again"


def finish_writing(writer: BackgroundWriter | None) -> None:
    """On the way out of a run that is ending for another reason: let the pending checkpoint complete, and say
    in one line if it could not (its temporary folder is gone; the checkpoints before it are intact)."""
    try:
        if writer is not None:
            writer.wait()
    except Exception as exc:
        print(f"cifar_dist.train: a checkpoint was not completed ({exc})", file=sys.stderr)


def taken_over(r: Run) -> TrainingStopped:
    """Another start judged this run gone and took the output dir over: the run leaves it to that run."""
    return TrainingStopped(f"another start took over --output-dir {r.output_dir} as if this run were gone; stopped "
                           f"at step {r.step} without saving, leaving the directory to it", EXIT_USER_ERROR)


def leave_if_taken_over(r: Run) -> None:
    """Raises ``taken_over`` where the lock file, read now by the main process, is another run's; every process
    agrees (a collective). After a checkpoint's write: one that ended after a takeover was dropped
    (checkpoint.save_checkpoint's ``still_ours``), and must be neither reported as saved nor followed by a
    report written into the other run's directory."""
    lost = not r.claim.holds()
    if r.accelerator.num_processes > 1:
        lost = bool(r.accelerator.reduce(torch.tensor(float(lost), device=r.accelerator.device), reduction="sum"))
    if lost:
        raise taken_over(r)


def check_health(r: Run, totals: Totals, stop: StopSignals, wait: bool = True) -> tuple[bool, bool]:
    """All processes agree whether the loss went non-finite or the output dir's lock was taken over (each
    raises), whether to stop (a signal arrived somewhere) and whether a time-based checkpoint is due (any
    process's clock says so).

    Agreeing means reading a collective's result, which waits for the GPU. A lone process has no one to agree
    with: its signal and clock are on the host, and with ``wait`` False it reads the loss flag one check late
    (Totals.nonfinite), so that its steady steps never wait and the GPU never runs dry behind a waiting host.
    Every checkpoint is preceded by a check that waits: none holds weights a non-finite loss produced.
    """
    lost = r.claim.lock is not None and r.claim.lock.lost.is_set()  # the main process holds the lock
    if r.accelerator.num_processes == 1:
        flags = [totals.nonfinite(wait), stop.received is not None, r.schedule.time_vote(), lost]
    else:
        flags = r.accelerator.reduce(torch.stack([
            totals.sums[3].clamp(max=1), totals.sums.new_tensor(stop.received is not None),
            totals.sums.new_tensor(r.schedule.time_vote()), totals.sums.new_tensor(lost)]), reduction="sum").tolist()
    if flags[3]:
        raise taken_over(r)
    if flags[0]:
        finish_writing(r.writer)  # written before the loss went bad: every save is preceded by a check that waits
        latest = find_latest(r.output_dir / CHECKPOINTS)
        raise TrainingStopped(f"training loss became NaN or inf by step {r.step}; nothing was saved after it "
                              f"(last good checkpoint: {latest or 'none'}); lower --lr or check the data",
                              EXIT_DIVERGED)
    return bool(flags[1]), bool(flags[2])



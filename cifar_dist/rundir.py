"""The output directory: one run at a time in it, and a start that fails leaves it as it found it.

- **Lock.** ``.lock`` names its holder (host, PID, SLURM job) and is created with O_EXCL, which NFS v3+,
  Lustre and GPFS honour. The holder refreshes its timestamp every 30 s, so a lock whose holder died is
  taken over: at once when the holder was an earlier attempt of this SLURM job (a requeue) or was on this
  host and its process is gone (never while it runs there, however old the lock); elsewhere once it has not
  been refreshed for 2 minutes. Ages are measured against a file written now in the same directory, so
  clocks that differ between nodes do not matter. A run whose lock was taken over all the same says so, leaves
  the new holder's lock alone and stops without saving (``Lock.lost``, read by the trainer's health check).
- **Provisional start.** A fresh run writes ``.starting`` first, and ``--overwrite`` moves the old run into
  ``.previous-run/`` instead of deleting it. The first complete checkpoint makes the new run permanent (the
  marker goes, then the old run). A start that fails before that, by an error, Ctrl-C or a kill noticed by
  the next start, removes what it wrote and moves the old run back.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cifar_dist.atomic import atomic_write_text, unfinished_writes
from cifar_dist.checkpoint import CHECKPOINTS, check_compatible, checkpoint_problem, find_latest, read_state
from cifar_dist.config import Config, TrainConfig, UserError
from cifar_dist.preflight import node_name

# What a run leaves in its output dir; any of them there means a fresh start would clobber a run.
RUN_FILES = ("config.yaml", "metrics.jsonl", "results.md", "model.safetensors", "curves.png", "wandb_run_id")
RUN_ENTRIES = (*RUN_FILES, CHECKPOINTS, "wandb", "tensorboard")
LOCK = ".lock"
STARTING = ".starting"
PREVIOUS = ".previous-run"
REFRESH_EVERY_S = 30.0
STALE_AFTER_S = 120.0


def writable_dir(output_dir: str) -> tuple[Path, bool]:
    """(the output dir, whether this call created it), after proving it writable; UserError otherwise."""
    path = Path(output_dir)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=path, prefix=".write-test.").close()
    except OSError as exc:
        raise UserError(f"--output-dir {output_dir} is not writable ({exc.strerror}); "
                        "choose another directory") from None
    return path, created


@dataclass
class Lock:
    """A held ``.lock``; refreshed by a daemon thread until ``release``."""

    path: Path
    token: str
    lost: threading.Event = field(default_factory=threading.Event)  # another start took it over: stop (trainer)
    _stop: threading.Event = field(default_factory=threading.Event)
    _checking: threading.Lock = field(default_factory=threading.Lock)  # the refresher and a checkpoint's writer

    def __post_init__(self):
        threading.Thread(target=self._refresh, name="cifar_dist-lock", daemon=True).start()

    def held(self) -> bool:
        """Whether the lock is still this run's, read from the file now; where another start has taken it over,
        says so (once) and sets ``lost``."""
        with self._checking:  # (one warning, whichever thread finds it first)
            if self.lost.is_set():
                return False
            holder = _read_holder(self.path)
            if holder and holder.get("token") != self.token:
                self.lost.set()
                print(f"cifar_dist: warning: another start took over the lock of {self.path.parent} (pid "
                      f"{holder.get('pid', '?')} on {holder.get('host', '?')}) as if this run were gone; two runs "
                      "now write there; this one stops at its next check", file=sys.stderr, flush=True)
                return False
            return True

    def _refresh(self):
        while not self._stop.wait(REFRESH_EVERY_S):
            if not self.held():  # never refresh another run's lock
                return
            try:
                os.utime(self.path)
            except OSError:
                pass  # a full or briefly unavailable filesystem: the next refresh may succeed

    def release(self) -> None:
        self._stop.set()
        if _read_holder(self.path).get("token") == self.token:  # never remove a lock someone took over
            self.path.unlink(missing_ok=True)


def _me() -> dict:
    return {"host": node_name(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": os.urandom(8).hex()}


def _process_start(pid) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux), to tell it from a later one that reuses
    its PID; None where /proc does not say."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19])  # field 22; the name before ")" may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _holder_alive(holder: dict) -> bool:
    """Whether the process that took the lock still runs (on this host): its PID exists and, where both starts
    are known, it is the same process, not a later one with its PID."""
    pid = holder["pid"]
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # another user's process, or an unreadable PID: assume alive
    started, now = holder.get("pid_start"), _process_start(pid)
    return started is None or now is None or started == now


def _age_s(path: Path) -> float:
    """Seconds since ``path`` was last refreshed, by the filesystem's own clock."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".clock.") as probe:
        return os.fstat(probe.fileno()).st_mtime - path.stat().st_mtime


def stale_reason(path: Path, holder: dict) -> str | None:
    """Why the lock at ``path`` held by ``holder`` is left over from a run that is gone, or None."""
    me = _me()
    if holder.get("slurm_job") and holder["slurm_job"] == me["slurm_job"] \
            and holder.get("slurm_restart") != me["slurm_restart"]:
        return f"it was an earlier attempt of this SLURM job {me['slurm_job']}"
    if holder.get("host") == me["host"] and holder.get("pid") is not None:
        if not _holder_alive(holder):
            return f"its process {holder['pid']} on {holder['host']} is gone"
        return None  # alive here, however old its lock: stopped (Ctrl-Z) or busy, it is still the run
    age = _age_s(path)
    if age > STALE_AFTER_S:
        return f"it has not been refreshed for {age:.0f} s"
    return None


def live_holder(output_dir: Path) -> dict | None:
    """The run holding ``output_dir``'s lock now (host, pid, SLURM job...), or None where there is no lock or
    it is left over from a run that is gone. For readers (compare), which must not fail on a read-only dir."""
    path = output_dir / LOCK
    holder = _read_holder(path)
    if not holder:
        return None
    try:
        return None if stale_reason(path, holder) else holder
    except OSError:  # the lock's age needs a file written beside it: where it cannot be, say nothing
        return None


def acquire_lock(output_dir: Path) -> tuple[Lock, str | None]:
    """(the held lock, a note if a stale one was taken over); UserError if another live run holds it."""
    path = output_dir / LOCK
    note = None
    for _ in range(2):
        me = _me()
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            reason = stale_reason(path, holder)
            if reason is None:
                job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
                raise UserError(
                    f"--output-dir {output_dir} is in use by another run (pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')}{job}, since {holder.get('since', '?')}); wait for it to end or "
                    f"choose another --output-dir") from None
            # Rename, then remove: of two starts that both found it stale, only one rename succeeds.
            try:
                os.replace(path, path.with_name(f"{LOCK}.stale-{me['token']}"))
            except FileNotFoundError:
                continue
            path.with_name(f"{LOCK}.stale-{me['token']}").unlink(missing_ok=True)
            note = f"took over the lock of {output_dir}: {reason}"
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        return Lock(path, me["token"]), note
    raise UserError(f"--output-dir {output_dir}: another run took the lock at the same moment; try again")


@dataclass
class FreshStart:
    """A new run in ``output_dir``: provisional (and undone on failure) until its first checkpoint."""

    output_dir: Path
    created_dir: bool = False
    committed: bool = False
    rolled_back: bool = False

    def begin(self, overwrite: bool) -> None:
        """Mark the start, and with --overwrite move the old run aside."""
        _write_marker(self.output_dir, "running")
        if overwrite:
            aside = self.output_dir / PREVIOUS
            shutil.rmtree(aside, ignore_errors=True)  # a replaced run whose successor got its checkpoint
            aside.mkdir()
            for name in RUN_ENTRIES:
                if (self.output_dir / name).exists():
                    os.replace(self.output_dir / name, aside / name)

    def commit(self) -> None:
        """The first checkpoint is complete: the new run stays, the old one goes."""
        if self.committed:
            return
        (self.output_dir / STARTING).unlink(missing_ok=True)
        shutil.rmtree(self.output_dir / PREVIOUS, ignore_errors=True)
        self.committed = True

    def rollback(self) -> None:
        """Remove what this start wrote and put the old run back."""
        if not self.committed:
            undo_start(self.output_dir)
            self.rolled_back = True


def _write_marker(output_dir: Path, phase: str) -> None:
    atomic_write_text(output_dir / STARTING, json.dumps({"phase": phase}) + "\n")


def undo_start(output_dir: Path) -> bool:
    """Undo a start that never reached its first checkpoint, if ``.starting`` says there was one.

    Idempotent, so that an undo cut short by a crash is finished by the next start: the new run's files go
    first, then the phase becomes "restoring", then the old run's files move back.
    """
    marker = output_dir / STARTING
    if not marker.exists():
        return False
    phase = _read_holder(marker).get("phase", "running")
    if phase == "running":
        for name in RUN_ENTRIES:
            target = output_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        _write_marker(output_dir, "restoring")
    aside = output_dir / PREVIOUS
    if aside.is_dir():
        for entry in aside.iterdir():
            os.replace(entry, output_dir / entry.name)
        aside.rmdir()
    marker.unlink()
    return True


def clear_leftovers(output_dir: Path) -> list[str]:
    """With the lock held: finish an interrupted start's undo; name or remove what a killed save left.

    Returns one line per thing done, for the run's log.
    """
    notes = []
    if undo_start(output_dir):
        notes.append(f"undid an earlier start in {output_dir} that stopped before its first checkpoint")
    elif (output_dir / PREVIOUS).is_dir():  # replaced by --overwrite, whose successor made its checkpoint
        shutil.rmtree(output_dir / PREVIOUS)
    for tmp in sorted((output_dir / CHECKPOINTS).glob(".tmp-*")):
        notes.append(finish_or_remove(tmp))
    # A process killed inside an atomic write leaves its temporary file (the file itself is old or new, whole).
    for tmp in unfinished_writes(output_dir, (*RUN_FILES, STARTING)):
        tmp.unlink(missing_ok=True)
    return notes


def finish_or_remove(tmp: Path) -> str:
    """A checkpoint's temporary folder left by a killed save: complete (its COMPLETE marker is written last), it
    takes its final name, in place of an older save of the same step, as the save was about to do; else it
    goes. Returns the note for the log."""
    final = tmp.with_name(tmp.name.removeprefix(".tmp-"))
    if checkpoint_problem(tmp) is None:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return f"completed the checkpoint {final}, whose save was stopped as it was being named"
    shutil.rmtree(tmp, ignore_errors=True)
    return f"removed the unfinished checkpoint {tmp}"


def check_fresh_start_allowed(output_dir: Path, cfg: TrainConfig) -> None:
    """A fresh start may not clobber a run unless --overwrite says so; UserError otherwise."""
    existing = [name for name in RUN_ENTRIES if (output_dir / name).exists()]
    if existing and not cfg.overwrite:
        why = {"auto": "and no complete checkpoint to resume", "never": "and --resume is never"}.get(
            cfg.resume, f"and --resume {cfg.resume} would start another run in it")
        fix = "choose another --output-dir" + (" or pass --overwrite" if cfg.resume in ("auto", "never") else "")
        raise UserError(f"--output-dir {cfg.output_dir} already holds a run ({', '.join(existing)}) {why}; {fix}")


def resolve_start(output_dir: Path, cfg: Config) -> tuple[Path | None, str | None]:
    """(the checkpoint to resume from or None for a fresh start, a note for the log), applying --resume and
    --overwrite. Reads only; raises UserError when the start would mix or clobber runs."""
    train = cfg.train
    if train.resume not in ("auto", "never"):
        if train.overwrite:
            raise UserError("--overwrite starts a new run and --resume PATH continues one; pass only one of them")
        return resume_from_path(output_dir, cfg)
    if train.resume == "auto" and not train.overwrite:
        latest = find_latest(output_dir / CHECKPOINTS)
        if latest is not None:
            check_compatible(latest, cfg)
            return latest, None
    check_fresh_start_allowed(output_dir, train)
    return None, None


def resume_from_path(output_dir: Path, cfg: Config) -> tuple[Path, str | None]:
    """--resume PATH: a run's first start continues from PATH; once the output dir holds checkpoints of the run
    started from it, the same command continues from the newest of them, as a SLURM requeue or a rerun after a
    stop expects (PATH again would throw their progress away). Another run in the output dir, or a newer
    checkpoint of the run PATH belongs to, is refused: resuming there would overwrite it."""
    resume = cfg.train.resume
    path, latest = Path(resume), find_latest(output_dir / CHECKPOINTS)
    if latest is not None and os.path.realpath(path) != os.path.realpath(latest):
        if os.path.realpath(path.parent) == os.path.realpath(output_dir / CHECKPOINTS):
            raise UserError(f"--resume {resume}: {output_dir} holds a newer checkpoint of that run ({latest.name}), "
                            f"which going back would overwrite; resume {path.name} into another --output-dir")
        if read_state(latest).get("started_from") != os.path.realpath(path):
            raise UserError(f"--output-dir {cfg.train.output_dir} already holds another run (newest checkpoint "
                            f"{latest.name}); resume {resume} into another --output-dir, or leave --resume out to "
                            "continue the run there")
        check_compatible(latest, cfg)
        return latest, f"--resume {resume}: this run went on from it; resuming from its newest checkpoint"
    problem = checkpoint_problem(path)
    if problem:
        raise UserError(f"--resume {resume}: {problem}")
    if latest is None:
        check_fresh_start_allowed(output_dir, cfg.train)
    # The output dir holds nothing of this run yet: what differs is the checkpoint to start from.
    check_compatible(path, cfg, "start from it with the same value, or from another checkpoint")
    return path, None


def started_from(output_dir: Path, resume_from: Path | None) -> str | None:
    """The checkpoint outside ``output_dir`` that its run was first started from (--resume PATH), kept in every
    checkpoint's state so that the same command later continues the run instead of starting it again."""
    if resume_from is None:
        return None
    if os.path.realpath(resume_from.parent) != os.path.realpath(output_dir / CHECKPOINTS):
        return os.path.realpath(resume_from)
    return read_state(resume_from).get("started_from")


@dataclass
class Claim:
    """The output dir as this process holds it: where to resume from, and on the main process the lock and,
    for a new run, its provisional start."""

    output_dir: Path
    resume_from: Path | None = None
    lock: Lock | None = None
    start: FreshStart | None = None
    started_from: str | None = None  # the main process's: where --resume PATH first started the run

    def begin(self, overwrite: bool) -> None:
        if self.start is not None:
            self.start.begin(overwrite)

    def commit(self) -> None:
        if self.start is not None and not self._lost():
            self.start.commit()

    def holds(self) -> bool:
        """Whether this run may still name files in the output dir: not once another start took its lock."""
        return self.lock is None or self.lock.held()

    def abandon(self) -> None:
        if self.start is not None and not self._lost():  # a taken-over dir's start files are the other run's
            self.start.rollback()

    def _lost(self) -> bool:
        return self.lock is not None and self.lock.lost.is_set()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
        if self.start is not None and self.start.rolled_back and self.start.created_dir:
            try:
                self.output_dir.rmdir()  # made by this start: it goes too, unless something else is in it
            except OSError:
                pass


def check_stop_marker(stop_marker: str | None) -> None:
    """The marker is written only after a stop has saved its checkpoint: a path that cannot take it would then
    crash the stop (exit 1, not 75, and the job is not requeued), so it is refused now."""
    if stop_marker is None:
        return
    path = Path(stop_marker)
    if path.is_dir():
        raise UserError(f"--stop-marker {stop_marker} is a folder; give the path of a file to create")
    if not path.parent.is_dir():
        raise UserError(f"--stop-marker {stop_marker}: its folder {path.parent} does not exist or is not a folder; "
                        "create it or choose another path")


def claim_output_dir(cfg: Config) -> Claim:
    """Main process only: lock the output dir, clean up after a start that died, decide where to start."""
    check_stop_marker(cfg.train.stop_marker)  # only the main process writes the marker
    output_dir, created = writable_dir(cfg.train.output_dir)
    lock, note = acquire_lock(output_dir)
    try:
        for line in ([note] if note else []) + clear_leftovers(output_dir):
            print(line, flush=True)
        resume_from, note = resolve_start(output_dir, cfg)
        if note:
            print(note, flush=True)
    except BaseException:
        lock.release()
        if created:
            output_dir.rmdir()  # made a moment ago for the lock, now empty again
        raise
    # A run is new (and undone if it fails before its first checkpoint) unless it continues this dir's own run.
    new = resume_from is None or not any((output_dir / name).exists() for name in RUN_ENTRIES)
    return Claim(output_dir, resume_from, lock, FreshStart(output_dir, created) if new else None,
                 started_from(output_dir, resume_from))

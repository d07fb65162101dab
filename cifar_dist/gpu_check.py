"""The GPU acceptance run: GPU tests, the trainer on full-size synthetic data with default flags (on a GPU
where it fits, the feature cache) and from images, the benchmark at reduced steps, a profile of a step (host or
device: which sets the pace), and the one-graph steps beside the compiled ones; one JSON and one markdown table
of what was measured.

    scripts/gpu_check.sh                                   # on a GPU machine: installs carried wheels, runs this
    python -m cifar_dist.gpu_check --out DIR               # the same, wheels already importable
    python -m cifar_dist.gpu_check --out DIR --image-size 32 --train-images 256 --eval-images 64 --max-steps 4 \\
        --checkpoint-every-steps 2 --bench-args="--image-size 32 --steps 2 --warmup 1 --workers 0" \\
        --profile-args="--image-size 32 --steps 2 --warmup 1 --variants eager --profile eager" \\
        --skip graphed   # CPU smoke

Each step runs in its own process under a time limit, within an overall budget. A step that fails (exit code,
time limit, a figure it should have produced missing) is recorded with the end of its output, the next step
runs, and the exit status is 1 if any failed. In DIR: ``gpu_check.json`` (everything measured, per step),
``gpu_check.md`` (the tables, with card, torch version and command) and ``gpu_check.log`` (every step's output).
Scratch files (the dataset, run outputs, checkpoints, compiled-kernel cache) go to a temporary folder that is
removed at the end.

The trainer runs are the real CLI (``python -m cifar_dist.train``) inside a thin wrapper (``train`` below) that
times each ``save_checkpoint`` and the first steps, and reads the peak device memory and what the compiled step
did at the end. The compiled-kernel cache starts empty, so the first step that compiles (the end-to-end run from
images with --end-to-end, else the trainer run from images) does so as a first run does on that machine; later
steps reuse what it compiled, as a user's second run would.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Steps and their own time limits (seconds); each also stops where the overall budget ends.
STEP_LIMITS = {"environment": 60, "data": 120, "train_default": 150, "train_images": 180, "gpu_tests": 300,
               "bench": 200, "profile": 90, "graphed": 150,
               # With --end-to-end: 83 to 97 s per --e2e-runs entry on the H200 of 2026-11-26 (two by default);
               # a call that skips the other steps can give it four or more within --budget-s.
               "end_to_end": 570}
FIRST_STEPS = 20  # "time to the first steps": launch until this many optimizer steps have run
TAIL_LINES = 25
PRINTED_LINES = 60  # of what the GPU tests printed, in the report
# A step out of time is interrupted, then killed this much later: the overall budget's only overrun.
INTERRUPT_GRACE_S = 15
FACTS_ENV = "CIFAR_DIST_GPU_CHECK_FACTS"
LAUNCHED_ENV = "CIFAR_DIST_GPU_CHECK_LAUNCHED"
COMMAND_ENV = "CIFAR_DIST_GPU_CHECK_COMMAND"  # how the check was started, for the report (scripts/gpu_check.sh)


# -- the instrumented trainer (``python -m cifar_dist.gpu_check train -- FLAGS``)


def train(argv: list[str]) -> int:
    """Run cifar_dist.train's main with ``argv``, timing checkpoints and the first steps; write the facts file."""
    import cifar_dist.trainer as trainer
    from cifar_dist.train import main

    probe = TrainerProbe(float(os.environ.get(LAUNCHED_ENV, time.time())))
    for name, wrap in (("save_checkpoint", probe.timed_save), ("record_step", probe.kept_fast)):
        if hasattr(trainer, name):
            setattr(trainer, name, wrap(getattr(trainer, name)))
        else:  # the trainer changed shape: the figure is reported missing, the run still runs
            probe.facts["missing"].append(f"cifar_dist.trainer.{name}")
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        facts = json.dumps(probe.final_facts(code), indent=1)
        if os.environ.get(FACTS_ENV):
            Path(os.environ[FACTS_ENV]).write_text(facts)
        else:
            print(facts)
    return code


class TrainerProbe:
    """Wrappers around the trainer's functions that time its checkpoints and first steps, and what it measured
    at the end: the peak memory and what the step turned out to be."""

    def __init__(self, launched: float):
        import torch

        self.launched, self.cuda = launched, torch.cuda.is_available()
        self.facts: dict = {"checkpoint_s": [], "missing": []}
        self.steps, self.fast, self.checkpoint = 0, None, None

    def sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def timed_save(self, save):  # the pause training sees: with --async-checkpoints the write goes on after it
        def inner(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            self.checkpoint = save(*args, **kwargs)
            self.facts["checkpoint_s"].append(round(time.perf_counter() - start, 3))
            return self.checkpoint
        return inner

    def timed_step(self, step):
        def inner(*args, **kwargs):
            if self.steps == 0:
                self.facts["launch_to_first_step_s"] = round(time.time() - self.launched, 2)
            out = step(*args, **kwargs)
            self.steps += 1
            if self.steps == FIRST_STEPS:
                self.sync()
                self.facts[f"launch_to_step_{FIRST_STEPS}_s"] = round(time.time() - self.launched, 2)
            return out
        return inner

    def kept_fast(self, record_step):  # the trainer's last word on its step, whichever step it is
        def inner(*args, **kwargs):
            parts = record_step(*args, **kwargs)
            self.fast = parts.fast  # the fast path as it turned out: what was compiled, and how
            return dataclasses.replace(parts, run_step=self.timed_step(parts.run_step))
        return inner

    def final_facts(self, exit_code: int) -> dict:
        import torch

        from cifar_dist import speed

        facts = {**self.facts, "micro_batches": self.steps}
        if self.checkpoint is not None and self.checkpoint.is_dir():  # complete once the run has ended
            facts["checkpoint_mb"] = round(sum(f.stat().st_size for f in self.checkpoint.rglob("*")
                                               if f.is_file()) / 1e6, 1)
        if self.cuda:
            facts["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            facts["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        facts["peak_host_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        if self.fast is not None:
            facts["step"] = {**self.fast.facts(), **speed.compile_summary(self.fast)}
        facts["exit_code"] = exit_code
        return facts


# -- the orchestration


class Check:
    """Runs the steps, records each, writes the report."""

    def __init__(self, out: Path, scratch: Path, budget_s: float, header: dict, python: str = sys.executable):
        self.out, self.scratch, self.python, self.header = out, scratch, python, header
        self.deadline = time.monotonic() + budget_s
        self.steps: dict[str, dict] = {}
        self.log = (out / "gpu_check.log").open("w")
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "WANDB_MODE": "disabled",
                    "HF_DATASETS_CACHE": str(scratch / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                    "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor"), "TRITON_CACHE_DIR": str(scratch / "triton"),
                    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}

    def run(self, name: str, cmd: list[str], parse=None, env: dict | None = None) -> dict:
        """Run one step; ``parse(result)`` adds its figures and raises (AssertionError, KeyError...) if one is
        missing. Never raises: what went wrong is in the step's record."""
        limit = min(STEP_LIMITS[name], self.deadline - time.monotonic())
        record: dict = {"command": shlex.join(cmd), "ok": False}
        self.steps[name] = record
        if limit < 5:
            record["error"] = "not run: the overall time budget was spent"
            return record
        self.log.write(f"\n===== {name}: {record['command']}\n")
        self.log.flush()
        start = time.monotonic()
        # A session of its own, so that a step out of time goes with everything it started (compile workers,
        # DataLoader workers), which would otherwise keep its output open. SIGINT at its default: a check started
        # in the background (`&`, nohup) passes it on ignored, and the step could then not be interrupted.
        proc = subprocess.Popen(cmd, cwd=REPO, env={**self.env, **(env or {}), LAUNCHED_ENV: str(time.time())},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True, preexec_fn=_default_sigint)
        try:
            output, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            record["error"] = f"timed out after {limit:.0f} s"
            output = _interrupt(proc)
        record["exit_code"] = proc.returncode
        record["seconds"] = round(time.monotonic() - start, 1)
        self.log.write(output)
        self.log.flush()
        record["output_tail"] = output.splitlines()[-TAIL_LINES:]
        if "error" not in record and record["exit_code"] != 0:
            record["error"] = f"exit code {record['exit_code']}"
        if parse is not None:  # a step that failed may still have said much (the tests that passed, say)
            try:
                parse(record, output)
            except Exception as exc:  # noqa: BLE001 - a figure missing or malformed: the step failed its job
                record.setdefault("error", f"could not read its results: {type(exc).__name__}: {exc}")
        record["ok"] = "error" not in record
        self.write_report()
        return record

    def write_report(self) -> dict:
        """gpu_check.json and .md as they stand: rewritten after every step, so that a check cut short (the
        machine taken back, the shell's own time limit) still leaves the steps it finished."""
        failed = [name for name, record in self.steps.items() if not record["ok"]]
        report = {**self.header, "ok": not failed, "failed_steps": failed, "steps": self.steps}
        (self.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        (self.out / "gpu_check.md").write_text(render(report))
        return report

    def finish(self) -> int:
        self.log.close()
        return 1 if self.write_report()["failed_steps"] else 0


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # (in the child, before exec: Python then raises KeyboardInterrupt)


def _interrupt(proc: subprocess.Popen) -> str:
    """Stop a step out of time as Ctrl-C would, so that it can still write what it has (pytest its junit file,
    the trainer its checkpoint); after INTERRUPT_GRACE_S, kill it and everything it started. Its output."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.communicate(timeout=INTERRUPT_GRACE_S)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()[0]


def parse_environment(record: dict, output: str) -> None:
    record.update(json.loads(output.strip().splitlines()[-1]))
    if record["datasets"].startswith("missing"):
        raise AssertionError(f"datasets does not import ({record['datasets']}); carry its wheels, see "
                             f"scripts/gpu_check.sh")


# Synthetic data of CIFAR-100's size and format, saved once so that both trainer runs load it as they would the
# real dataset (as the benchmark's --end-to-end does).
MAKE_DATA = ("import sys; from cifar_dist.config import DataConfig; from cifar_dist.data import load_cifar100; "
             "load_cifar100(DataConfig(data_source='synthetic', synthetic_train_samples=int(sys.argv[1]), "
             "synthetic_eval_samples=int(sys.argv[2]))).save_to_disk(sys.argv[3])")
# Versions and the card, and whether the packages the package needs import (the trainer needs datasets).
# Each import is timed in the order the trainer meets them, and CUDA's start: the trainer's start-up line counted
# them with the interpreter's start as "launch", 7.9 to 11.2 s on the H100 of 2026-11-27 against 2.6 s on a 2-core
# CPU (now "launch" and "imports" apart, where cifar_dist.train's main imports the trainer: the end-to-end runs).
ENVIRONMENT = """
import importlib, json, os, platform, time
import_s, missing = {}, {}
for name in ("torch", "torchvision", "accelerate", "datasets", "cifar_dist.trainer"):
    start = time.perf_counter()
    try:
        importlib.import_module(name)
    except Exception as exc:  # datasets, which the trainer needs too, may not be there: said below
        if name in ("torch", "torchvision", "accelerate"):
            raise
        missing[name] = f"missing: {type(exc).__name__}: {exc}"
    import_s[name] = round(time.perf_counter() - start, 2)
import torch, torchvision, accelerate, safetensors
datasets_version = missing.get("datasets") or importlib.import_module("datasets").__version__
start = time.perf_counter()
cuda = torch.cuda.is_available()
if cuda:
    torch.zeros(1, device="cuda")
import_s["cuda_init"] = round(time.perf_counter() - start, 2)
try:  # the host's CPU: at batch 32 a step's host work matters beside the card
    host_cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
except (OSError, StopIteration):
    host_cpu = platform.processor() or None
print(json.dumps({"host_cpu": host_cpu, "host_cores": os.cpu_count(),
                  "card": torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu"),
                  "cuda": torch.version.cuda if cuda else None, "torch": torch.__version__,
                  "torchvision": torchvision.__version__, "accelerate": accelerate.__version__,
                  "safetensors": safetensors.__version__,
                  "datasets": datasets_version, "python": platform.python_version(),
                  "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda
                  else None, "import_s": import_s}))
"""


def parse_train(facts_path: Path, output_dir: Path):
    def parse(record: dict, output: str) -> None:
        facts = json.loads(facts_path.read_text())
        epochs = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
        header = [line for line in output.splitlines() if line.startswith("- step: ")]
        record.update({
            "step_line": header[0].removeprefix("- step: ") if header else None,
            "optimizer_steps": epochs[-1]["step"],
            "train_images_per_s": epochs[0]["train_images_per_s"],
            "train_s": epochs[0]["train_time_s"],
            "eval_s": epochs[0]["eval_time_s"],
            "eval_images_per_s": round(epochs[0]["val_num_samples"] / epochs[0]["eval_time_s"], 1),
            "val_acc": epochs[-1]["val_acc"],
            **{k: v for k, v in facts.items() if k != "exit_code"},
        })
        for key, start in (("feature_cache_line", "feature cache: "), ("startup_line", "start-up: "),
                           ("time_line", "time: ")):
            found = [line for line in output.splitlines() if line.startswith(start)]
            if found:
                record[key] = found[0]
        record["startup_s"] = epochs[0].get("startup_s")
        checkpoints = facts["checkpoint_s"]
        record["checkpoints"] = len(checkpoints)
        record["checkpoint_mean_s"] = round(sum(checkpoints) / len(checkpoints), 3) if checkpoints else None
        missing = facts["missing"] + [k for k in ("launch_to_first_step_s", "checkpoint_mean_s")
                                      if record.get(k) is None]
        if missing:
            raise KeyError(f"not measured: {', '.join(missing)}")
    return parse


def parse_tests(junit: Path):
    def parse(record: dict, output: str) -> None:
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        cases = []
        for case in suite.iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                found = case.find(tag)
                if found is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                                  "message": (found.get("message") or "").splitlines()[0][:300]
                                  if found.get("message") else ""})
                    break
            else:
                cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0))})
        counts = {f"{k}s" if k == "error" else k: sum(c["outcome"] == k for c in cases)
                  for k in ("passed", "failed", "error", "skipped")}
        record.update({"tests": cases, **counts, "printed": captured_stdout(output)[:PRINTED_LINES]})
        if counts["passed"] == 0:
            reason = cases[0].get("message", "") if cases else "no tests collected"
            raise AssertionError(f"no GPU test ran ({counts['skipped']} skipped: {reason})")
    return parse


def captured_stdout(output: str) -> list[str]:
    """What the tests printed (their measured differences, agreements, one-line errors), from pytest's -rA
    report: the lines of each "Captured stdout" section, passed and failed tests alike."""
    lines, inside = [], False
    for line in output.splitlines():
        if re.fullmatch(r"[-=_]+ .* [-=_]+", line):  # a section's or a test's title, or the junit file's line
            inside = " Captured stdout " in line
        elif inside and line.strip():
            lines.append(line)
    return lines


def parse_bench(path: Path, needs: str = "results"):
    def parse(record: dict, output: str) -> None:
        record["report"] = json.loads(path.read_text())
        if not record["report"].get(needs):
            raise AssertionError(f"the benchmark reported no {needs}")
    return parse


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        return train(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    args = _parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="cifar-dist-gpu-check-"))
    header = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "skipped_steps": args.skip,
              "command": os.environ.get(COMMAND_ENV) or shlex.join(["python", "-m", "cifar_dist.gpu_check", *argv]),
              "sizes": {"image_size": args.image_size, "train_images": args.train_images,
                        "eval_images": args.eval_images, "max_steps": args.max_steps,
                        "checkpoint_every_steps": args.checkpoint_every_steps, "bench_args": args.bench_args}}
    check = Check(out, scratch, args.budget_s, header)
    try:
        env = check.run("environment", [check.python, "-c", ENVIRONMENT], parse_environment)
        # The check's own header, completed: every report written from here on names the card and versions.
        header.update({k: env.get(k) for k in ("card", "host_cpu", "host_cores", "cuda", "torch", "torchvision",
                                               "accelerate", "safetensors", "datasets", "python", "gpu_memory_gib",
                                               "import_s")})
        run_steps(check, args, scratch)
        return check.finish()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_steps(check: Check, args, scratch: Path) -> None:
    """Every step after the environment's, in order, but those in --skip (and end_to_end without --end-to-end).

    The end-to-end runs come right after the data: they are the figures the targets are judged by, so a budget
    that runs short cuts the steps after them, not them. The default flags' run compiles nothing (the feature
    cache and one graph of eager kernels), so it does not matter that the compile cache is empty then; a run
    from images (--e2e-runs images) compiles as a first run on the machine does. The GPU tests come next, before
    the trainer runs, whose figures earlier checks have: they are the check's pass or fail."""
    py, data = check.python, scratch / "data"
    if "data" not in args.skip:
        check.run("data", [py, "-c", MAKE_DATA, str(args.train_images), str(args.eval_images), str(data)])

    def bench(name: str, flags: str, needs: str) -> None:  # a benchmark run, and the part of its report it must have
        if name not in args.skip:
            found = scratch / f"{name}.json"
            check.run(name, [py, "-m", "cifar_dist.bench", *shlex.split(flags), "--json", str(found)],
                      parse_bench(found, needs))

    if args.end_to_end:
        bench("end_to_end", args.e2e_args, "end_to_end")
    if "gpu_tests" not in args.skip:
        junit = scratch / "junit.xml"
        check.run("gpu_tests", [py, "-m", "pytest", *args.tests, "-m", "gpu", "-v", "-rA", "-p", "no:cacheprovider",
                                *xdist_args(args.test_workers, args.tests), f"--junitxml={junit}"],
                  parse_tests(junit))
    # Default flags (on a GPU where it fits, the feature cache and the whole step as one graph), and the step from
    # images (the compiled step, from an empty compile cache unless an end-to-end run from images came first).
    for name, extra in (("train_default", shlex.split(args.default_args)),
                        ("train_images", ["--no-cache-frozen-features"])):
        if name in args.skip:
            continue
        facts, output_dir = scratch / f"{name}.json", scratch / name
        flags = ["--data-source", str(data), "--weights", "none", "--image-size", str(args.image_size),
                 "--num-epochs", "1", "--max-steps", str(args.max_steps), "--checkpoint-every-steps",
                 str(args.checkpoint_every_steps), "--tracker", "none", "--output-dir", str(output_dir), *extra]
        check.run(name, [py, "-m", "cifar_dist.gpu_check", "train", "--", *flags],
                  parse_train(facts, output_dir), env={FACTS_ENV: str(facts)})
    bench("bench", args.bench_args, "results")
    bench("profile", args.profile_args, "profile")
    bench("graphed", args.graphed_args, "results")


def xdist_args(requested: int | None, files: list[str]) -> list[str]:
    """pytest's ``-n`` for the GPU tests: by default a pytest-xdist worker per test file, where pytest-xdist is
    installed (tests/conftest.py keeps each file's tests in one worker, and with them their module fixtures). The
    files' tests mostly wait on their own launches, compiles and small steps, which leave the card and its host's
    cores far from busy; the out-of-memory test holds itself to a part of the card (tests/test_gpu_memory.py)."""
    if requested is None:
        requested = len(files) if importlib.util.find_spec("xdist") else 0
    return ["-n", str(requested)] if requested > 0 else []


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar_dist.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check_out", help="where gpu_check.json, .md and .log go")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--train-images", type=int, default=50_000)
    parser.add_argument("--eval-images", type=int, default=10_000)
    parser.add_argument("--max-steps", type=int, default=500, help="optimizer steps of each trainer run")
    parser.add_argument("--checkpoint-every-steps", type=int, default=100)
    parser.add_argument("--default-args", default="", help="extra flags of the default-flags trainer run (one "
                        "string; the CPU smoke test gives it --cache-frozen-features, as auto does on a GPU)")
    parser.add_argument("--budget-s", type=float, default=480, help="overall time limit of the steps "
                        "(those without --end-to-end took 396 s on an H100)")
    parser.add_argument("--tests", nargs="+",
                        default=["tests/test_gpu.py", "tests/test_gpu_resume.py", "tests/test_gpu_memory.py",
                                 "tests/test_gpu_after_training.py", "tests/test_gpu_fp16.py"],
                        help="the test files pytest runs (their gpu-marked tests)")
    parser.add_argument("--test-workers", type=int, help="pytest-xdist workers for them (0: one process); default "
                        "one per file where pytest-xdist is installed, else 0")
    parser.add_argument("--bench-args", default="--steps 20 --warmup 5 --workers 8",
                        help="flags of python -m cifar_dist.bench (one string)")
    # The benchmark times at least one variant; eval compiles nothing. Profiled: the step default flags run where
    # the feature cache fits, one graph of eager kernels. The compiled step's (--profile compiled) was device-bound
    # on an H100 (device busy 2.98 ms of a 2.87 ms step unprofiled); whether this one is, no run has said.
    parser.add_argument("--profile-args", default="--variants eval --steps 20 --warmup 5 --no-floor "
                        "--no-checkpoint --profile cached_graphed_eager",
                        help="flags of the benchmark run that profiles a step (one string)")
    # The compiled steps they are to be set beside are the bench step's compiled and cached_compiled.
    parser.add_argument("--graphed-args", default="--variants graphed graphed_compiled cached_graphed "
                        "cached_graphed_eager --steps 20 "
                        "--warmup 5 --no-floor --no-checkpoint",
                        help="flags of the benchmark run of the one-graph experiments (one string)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="also time the recipe's whole workload, launch to final report, with default flags "
                        "and from images (the benchmark's --end-to-end: about 3 minutes on an H200), right after "
                        "the data: the run from images compiles from an empty compile cache, as a first run does")
    parser.add_argument("--e2e-args", default="--variants eval_cached --steps 5 --warmup 2 --no-floor "
                        "--no-checkpoint --end-to-end", help="flags of that benchmark run (one string)")
    parser.add_argument("--skip", nargs="*", default=[], choices=[s for s in STEP_LIMITS if s != "environment"])
    return parser


# -- the report


def _fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def _warmup(step: dict) -> str:
    # The compiled step's warm-up, or the whole-step graph's warm-up and recording in brackets.
    if step.get("graph_record_s") is not None and step.get("compile_warmup_s") is None:
        return f"({step['graph_record_s']})"
    return _fmt(step.get("compile_warmup_s"))


def render(report: dict) -> str:
    """gpu_check.md: card, versions, command, the steps' results, then a section per part that ran."""
    steps = report["steps"]
    lines = _render_header(report)
    lines += _render_trainer([(name, steps[name]) for name in ("train_default", "train_images") if name in steps])
    lines += _render_tests(steps.get("gpu_tests", {}))
    for name, title in (("bench", "Benchmark"),
                        ("graphed", "The whole step as one CUDA graph, --whole-step-graph"),
                        # First after the data, in the check's own compile cache, which starts empty.
                        ("end_to_end", "End to end, compile cache empty at its start")):
        if steps.get(name, {}).get("report"):
            from cifar_dist.bench import format_table

            lines += ["", f"## {title} (`{steps[name]['command']}`)", "", format_table(steps[name]["report"])]
        if name == "bench":  # the profile's section follows the benchmark's
            lines += _render_profile(steps.get("profile", {}))
    return "\n".join(lines) + "\n"


def _render_header(report: dict) -> list[str]:
    verdict = "passed" if report["ok"] else f"FAILED ({', '.join(report['failed_steps'])})"
    if report.get("skipped_steps"):
        verdict += f", not run by request: {', '.join(report['skipped_steps'])}"
    sizes = report["sizes"]
    lines = [f"# cifar_dist GPU check: {verdict}", "",
             (f"- card: {report.get('card')} ({_fmt(report.get('gpu_memory_gib'))} GiB), CUDA "
              f"{_fmt(report.get('cuda'))}; host: {_fmt(report.get('host_cpu'))}, {_fmt(report.get('host_cores'))} "
              "cores"),
             (f"- torch {report.get('torch')}, torchvision {report.get('torchvision')}, accelerate "
              f"{report.get('accelerate')}, safetensors {report.get('safetensors')}, datasets "
              f"{report.get('datasets')}, Python {report.get('python')}"),
             *([f"- imports and CUDA's start, s: {', '.join(f'{k} {v}' for k, v in report['import_s'].items())}"]
               if report.get("import_s") else []),
             f"- command: `{report['command']}` ({report['started']})",
             (f"- sizes: {sizes['image_size']} px, synthetic {sizes['train_images']:,} + {sizes['eval_images']:,} "
              f"images, {sizes['max_steps']} steps per trainer run, checkpoint every "
              f"{sizes['checkpoint_every_steps']} steps"),
             "", "| step | result | seconds |", "| --- | --- | ---: |"]
    for name, record in report["steps"].items():
        lines.append(f"| {name} | {'ok' if record['ok'] else 'FAILED: ' + record.get('error', '')} | "
                     f"{_fmt(record.get('seconds'))} |")
    return lines


def _render_trainer(runs: list[tuple[str, dict]]) -> list[str]:
    runs = [(name.removeprefix("train_"), r) for name, r in runs if "train_images_per_s" in r]
    if not runs:
        return []
    lines = ["", "## Trainer (`python -m cifar_dist.train`, batch 32)", "",
             ("| run | train images/s | eval images/s | launch to first step s | "
              f"compile warm-up (graph recording) s | launch to step {FIRST_STEPS} s | "
              "checkpoint pause s (mean x count, MB) | peak GPU memory GiB (reserved) | "
              "after warm-up: recompiles / graph breaks / CUDA-graph skips |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in runs:
        step = r.get("step") or {}
        after = "/".join(_fmt(step.get(f"{k}_after_warmup")) for k in ("recompiles", "graph_breaks",
                                                                       "cudagraph_skips"))
        lines.append(
            f"| {name} | {r['train_images_per_s']:,.0f} | {r['eval_images_per_s']:,.0f} | "
            f"{_fmt(r.get('launch_to_first_step_s'))} | {_warmup(step)} | "
            f"{_fmt(r.get(f'launch_to_step_{FIRST_STEPS}_s'))} | {_fmt(r.get('checkpoint_mean_s'))} x "
            f"{r.get('checkpoints')}, {_fmt(r.get('checkpoint_mb'))} | {_fmt(r.get('peak_gpu_memory_gib'))} "
            f"({_fmt(r.get('peak_gpu_reserved_gib'))}) | {after} |")
    for name, r in runs:
        if r.get("step_line"):
            lines.append(f"\n{name}: `{r['step_line']}`")
        lines += [f"\n{name}: {r[key]}" for key in ("startup_line", "feature_cache_line", "time_line") if r.get(key)]
    return lines


def _render_tests(tests: dict) -> list[str]:
    if not tests.get("tests"):
        return []
    lines = ["", f"## GPU tests (`{tests['command']}`)", "",
             (f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
              f"{tests['skipped']} skipped in {tests['seconds']} s"), "", "| test | outcome | seconds |",
             "| --- | --- | ---: |"]
    lines += [f"| {c['test']} | {c['outcome']}{': ' + c['message'] if c.get('message') else ''} | "
              f"{c['seconds']:.1f} |" for c in tests["tests"]]
    if tests.get("printed"):
        lines += ["", "```", *tests["printed"], "```"]
    return lines


def _render_profile(profile: dict) -> list[str]:
    found = profile.get("report", {}).get("profile")
    if not found:
        return []
    from cifar_dist.step_profile import format_profile

    return ["", f"## Where a step's time goes (`{profile['command']}`)", "", format_profile(found["variant"], found)]


if __name__ == "__main__":
    raise SystemExit(main())

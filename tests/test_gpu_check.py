"""The GPU acceptance run's machinery, on the CPU with the CPU's own figures: every step runs for real at a tiny
size, so only what needs a GPU (the GPU tests themselves, CUDA figures) is left unchecked here."""

import json
import signal
import sys
import time

import pytest

from cifar_dist import gpu_check
from cifar_dist.gpu_check import Check, parse_tests, render, xdist_args

TINY_CHECK = ["--image-size", "32", "--train-images", "256", "--eval-images", "64", "--max-steps", "4",
              "--checkpoint-every-steps", "2", "--budget-s", "900", "--default-args=--cache-frozen-features",
              ("--bench-args=--image-size 32 --steps 2 --warmup 1 --workers 0 --eval-batch-size 64 --no-floor "
               "--variants straight_port eager"),
              ("--profile-args=--image-size 32 --steps 2 --warmup 1 --eval-batch-size 64 --no-floor --no-checkpoint "
               "--variants eager --profile eager"),
              # on the CPU the whole step runs over the graph's buffers, unrecorded
              "--graphed-args=--image-size 32 --steps 1 --warmup 1 --variants graphed --no-floor --no-checkpoint",
              "--end-to-end", ("--e2e-args=--image-size 32 --steps 1 --warmup 1 --eval-batch-size 16 --variants eval "
                               "--no-floor --no-checkpoint --end-to-end --e2e-epochs 1 --e2e-train-samples 64 "
                               "--e2e-eval-samples 16")]


@pytest.mark.slow
def test_the_whole_check_on_the_cpu_reports_every_step_and_fails_for_want_of_a_gpu(test_env, tmp_path):
    import subprocess

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "cifar_dist.gpu_check", "--out", str(out), *TINY_CHECK],
                          env=test_env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the GPU tests were all skipped: that is a failure here
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    # The end-to-end runs, which the targets are judged by, come before anything a short budget could cut.
    # Then the GPU tests, the check's pass or fail, before the trainer runs, whose figures earlier checks have.
    assert list(steps) == ["environment", "data", "end_to_end", "gpu_tests", "train_default", "train_images", "bench",
                           "profile", "graphed"]
    assert report["failed_steps"] == ["gpu_tests"] and not report["ok"]
    graphed = steps["graphed"]["report"]["results"]
    assert [r["variant"] for r in graphed] == ["graphed"] and graphed[0]["images_per_s"] > 0
    assert steps["gpu_tests"]["error"].startswith("could not read its results: AssertionError: no GPU test ran (")
    assert steps["gpu_tests"]["skipped"] > 0 and steps["gpu_tests"]["passed"] == steps["gpu_tests"]["errors"] == 0
    # Every GPU test file collected, side by side: a pytest-xdist worker per file (installed with the tests).
    assert " -n 5 " in steps["gpu_tests"]["command"]
    assert {t["test"] for t in steps["gpu_tests"]["tests"]} >= {
        "test_a_deterministic_gpu_run_resumes_bit_for_bit", "test_compiled_step_matches_eager_at_224px",
        "test_running_out_of_gpu_memory_stops_with_one_line_and_leaves_nothing",
        "test_evaluate_reproduces_the_trainers_last_epoch_exactly", "test_predict_names_the_classes_evaluate_names",
        "test_fp16_trains_under_the_loss_scaler_with_default_flags_and_from_images"}
    assert report["torch"] and report["datasets"] and report["card"] and report["cuda"] is None
    # The checkpoint figures depend on it: before 0.8 safetensors held the GIL through the weights' write.
    assert report["safetensors"] and f", safetensors {report['safetensors']}, " in (out / "gpu_check.md").read_text()
    assert report["host_cpu"] and report["host_cores"] >= 1
    imports = report["import_s"]  # the trainer's "launch" phase, taken apart
    assert list(imports) == ["torch", "torchvision", "accelerate", "datasets", "cifar_dist.trainer", "cuda_init"]
    assert imports["torch"] > 0 and all(seconds >= 0 for seconds in imports.values())
    assert f"- imports and CUDA's start, s: torch {imports['torch']}, torchvision" in (out / "gpu_check.md").read_text()

    # The default run with the feature cache (--default-args), as auto does on a GPU where it fits.
    for name, cached in (("train_default", "; frozen-stage features cached"), ("train_images", "")):
        run = steps[name]
        assert run["ok"] and run["optimizer_steps"] == 4 and run["train_images_per_s"] > 0
        # Checkpoints at steps 2 and 4 (mid-epoch), then the epoch end: each timed, with its size.
        assert run["checkpoints"] == 3 and run["checkpoint_mean_s"] > 0 and run["checkpoint_mb"] > 200
        assert 0 < run["launch_to_first_step_s"] < run["seconds"] and run["peak_host_rss_gib"] > 0
        assert "peak_gpu_memory_gib" not in run and run["missing"] == []
        assert run["step"]["fast_path"] == "plain eager step" + cached and run["step"]["compiled_step"] is False
        assert run["step"]["features_cached"] == (["train", "test"] if cached else [])
        assert run["startup_s"]["data"] > 0 and run["startup_line"].startswith("start-up: ")
        assert run["time_line"].startswith("time: ") and ", checkpoints " in run["time_line"]
    assert steps["train_default"]["feature_cache_line"].startswith("feature cache: 256 train + 64 test images")
    bench = steps["bench"]["report"]
    assert [r["variant"] for r in bench["results"]] == ["straight_port", "eager"] and bench["checkpoint"]["seconds"] > 0
    profile = steps["profile"]["report"]["profile"]
    assert profile["variant"] == "eager" and profile["wall_ms_per_step"] > 0 and profile["top_host_ops"]

    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# cifar_dist GPU check: FAILED (gpu_tests)")
    assert "## The whole step as one CUDA graph, --whole-step-graph (`" in md
    assert f"; host: {report['host_cpu']}, {report['host_cores']} cores" in md
    assert "| gpu_tests | FAILED: could not read its results: AssertionError: no GPU test ran" in md
    assert "| default | " in md and "| images | " in md and "| straight_port |" in md
    assert "\ndefault: start-up: " in md and "\nimages: start-up: " in md and ", feature cache " in md
    assert "\ndefault: time: " in md and "\nimages: time: " in md
    assert "checkpoint (the trainer's save_checkpoint" in md
    assert "## Where a step's time goes (" in md and "profile of eager, per step over 2 steps: wall " in md
    e2e = {r["variant"]: r for r in steps["end_to_end"]["report"]["end_to_end"]}
    assert set(e2e) == {"end_to_end", "end_to_end_images"} and all(r["epochs"] == 1 for r in e2e.values())
    assert "## End to end, compile cache empty at its start (" in md and "\nend_to_end_images: " in md
    assert "0 passed, 0 failed, 0 errors, " in md
    assert "===== train_default: " in (out / "gpu_check.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]


HEADER = {"command": "test", "started": "now", "sizes": {
    "image_size": 224, "train_images": 50_000, "eval_images": 10_000, "max_steps": 500, "checkpoint_every_steps": 100,
    "bench_args": ""}}


@pytest.mark.slow
def test_a_failing_step_is_recorded_with_what_it_said_and_the_next_one_runs(tmp_path):
    check = Check(tmp_path, tmp_path, budget_s=60, header=HEADER)
    failed = check.run("data", [sys.executable, "-c", "print('{\"done\": 1}'); raise SystemExit(3)"],
                       parse=lambda record, output: record.update(json.loads(output)))
    # Written after each step: a check cut short leaves what it finished.
    assert json.loads((tmp_path / "gpu_check.json").read_text())["failed_steps"] == ["data"]
    unreadable = check.run("bench", [sys.executable, "-c", "print('no figures')"],
                           parse=lambda record, output: record.update(figure=json.loads(output)))
    fine = check.run("train_default", [sys.executable, "-c", "print('{\"x\": 1}')"],
                     parse=lambda record, output: record.update(json.loads(output)))
    # The failure stays the exit code; what the step said before it is read all the same.
    assert failed["error"] == "exit code 3" and failed["done"] == 1 and not failed["ok"]
    assert failed["output_tail"] == ['{"done": 1}']
    assert unreadable["error"].startswith("could not read its results: JSONDecodeError")
    assert fine["ok"] and fine["x"] == 1
    assert check.finish() == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed_steps"] == ["data", "bench"] and report["command"] == "test"
    assert (tmp_path / "gpu_check.md").read_text().startswith("# cifar_dist GPU check: FAILED (data, bench)")


# A step that, told to stop (SIGINT, as Ctrl-C), still writes what it has, as pytest writes its junit file.
WRITES_ON_INTERRUPT = """
import sys, time
try:
    print('started', flush=True)
    time.sleep(60)
except KeyboardInterrupt:
    open(sys.argv[1], 'w').write('{"partial": 2}')
    raise SystemExit(2)
"""


@pytest.mark.slow
def test_a_step_out_of_time_is_interrupted_and_what_it_wrote_is_read(tmp_path):
    # 15 s: on a loaded machine the child's interpreter must be up, in its try, before the interrupt comes.
    check = Check(tmp_path, tmp_path, budget_s=15, header=HEADER)
    found = tmp_path / "found.json"
    # As from a shell's background job (`&`, nohup): SIGINT ignored here, which children inherit unless reset.
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        slow = check.run("data", [sys.executable, "-c", WRITES_ON_INTERRUPT, str(found)],
                         parse=lambda record, output: record.update(json.loads(found.read_text())))
    finally:
        signal.signal(signal.SIGINT, before)
    assert slow["error"] == "timed out after 15 s" and slow["output_tail"] == ["started"], slow
    assert slow["partial"] == 2 and slow["exit_code"] == 2 and slow["seconds"] < 15 + gpu_check.INTERRUPT_GRACE_S
    later = check.run("bench", [sys.executable, "-c", "pass"])
    assert later["error"] == "not run: the overall time budget was spent"


@pytest.mark.slow
def test_a_step_deaf_to_the_interrupt_is_killed_with_what_it_started(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "INTERRUPT_GRACE_S", 2)
    check = Check(tmp_path, tmp_path, budget_s=6, header=HEADER)
    # A child that ignores SIGINT too, and would keep the output open were it left running.
    deaf = ("import signal, subprocess, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGINT, "
            "signal.SIG_IGN); time.sleep(60)']); print('started', flush=True); time.sleep(60)")
    start = time.monotonic()
    slow = check.run("data", [sys.executable, "-c", deaf])
    assert slow["error"] == "timed out after 6 s" and slow["exit_code"] == -9 and slow["output_tail"] == ["started"]
    assert time.monotonic() - start < 6 + 2 + 5


# Two tests, one passing and one failing, each printing a figure: the GPU tests' report reads both, and counts.
SMALL_SUITE = """
def test_passes():
    print("passing: difference 1e-3")

def test_fails():
    print("failing: agreement 50%")
    assert False, "agreement too low"
"""


@pytest.mark.slow
def test_the_gpu_tests_report_reads_each_outcome_and_what_each_test_printed(tmp_path):
    (tmp_path / "test_small.py").write_text(SMALL_SUITE)
    junit = tmp_path / "junit.xml"
    check = Check(tmp_path, tmp_path, budget_s=120, header=HEADER)
    record = check.run("gpu_tests", [sys.executable, "-m", "pytest", str(tmp_path / "test_small.py"), "-v", "-rA",
                                     "-p", "no:cacheprovider", "-n", "2", f"--junitxml={junit}"],
                       parse_tests(junit))
    assert record["error"] == "exit code 1" and record["passed"] == 1 and record["failed"] == 1
    assert {t["test"]: t["outcome"] for t in record["tests"]} == {"test_passes": "passed", "test_fails": "failed"}
    assert sorted(record["printed"]) == ["failing: agreement 50%", "passing: difference 1e-3"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "1 passed, 1 failed, 0 errors, 0 skipped in " in md and "| test_fails | failed: " in md


def test_the_gpu_tests_run_a_worker_per_file_unless_told_otherwise():
    files = ["tests/test_gpu.py", "tests/test_gpu_resume.py", "tests/test_gpu_memory.py"]
    assert xdist_args(None, files) == ["-n", "3"]  # pytest-xdist comes with the tests' extras
    assert xdist_args(0, files) == [] and xdist_args(2, files) == ["-n", "2"]


def test_the_report_table_of_a_gpu_run():
    # The shape a GPU run's figures take in gpu_check.md (the numbers here are made up for the layout only).
    report = {"ok": True, "failed_steps": [], "command": "scripts/gpu_check.sh", "started": "2026-01-01",
              "card": "NVIDIA H100 80GB HBM3", "gpu_memory_gib": 79.2, "cuda": "13.0", "torch": "2.11.0",
              "torchvision": "0.26.0", "accelerate": "1.15.0", "datasets": "5.2.0", "python": "3.12.3",
              "sizes": HEADER["sizes"],
              "steps": {"train_default": {"ok": True, "seconds": 60.0, "train_images_per_s": 12000.0,
                                          "eval_images_per_s": 15000.0, "launch_to_first_step_s": 40.0,
                                          "launch_to_step_20_s": 41.0, "checkpoint_mean_s": 0.5, "checkpoints": 6,
                                          "checkpoint_mb": 240.0, "peak_gpu_memory_gib": 5.0,
                                          "peak_gpu_reserved_gib": 6.0, "step_line": "compiled step (...)",
                                          "step": {"compile_warmup_s": 30.0, "recompiles_after_warmup": 0,
                                                   "graph_breaks_after_warmup": 0,
                                                   "cudagraph_skips_after_warmup": 0}}}}
    md = render(report)
    assert md.startswith("# cifar_dist GPU check: passed\n")
    assert "- card: NVIDIA H100 80GB HBM3 (79.2 GiB), CUDA 13.0" in md
    assert "| default | 12,000 | 15,000 | 40.0 | 30.0 | 41.0 | 0.5 x 6, 240.0 | 5.0 (6.0) | 0/0/0 |" in md
    # The whole-step graph of eager kernels compiles nothing: its recording goes in the column, in brackets.
    graphed = {**report["steps"]["train_default"], "step": {"graph_record_s": 1.04}}
    md = render({**report, "steps": {"train_images": graphed}})
    assert "| images | 12,000 | 15,000 | 40.0 | (1.04) | 41.0 | 0.5 x 6, 240.0 | 5.0 (6.0) | -/-/- |" in md

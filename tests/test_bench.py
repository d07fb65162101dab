"""The benchmark runs on the CPU at a tiny size; it asserts nothing about speed, only that every part reports."""

import json
import subprocess
import sys
from collections import Counter

import pytest

from conftest import REPO, _free_port

pytestmark = pytest.mark.slow

TINY_BENCH = ["--image-size", "32", "--steps", "2", "--warmup", "1", "--workers", "0", "--eval-batch-size", "64"]


def bench(args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "cifar_dist.bench", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=env)


def test_bench_reports_every_cpu_variant_the_floor_and_the_end_to_end_runs(tmp_path, test_env):
    out = tmp_path / "bench.json"
    proc = bench([*TINY_BENCH, "--json", str(out), "--end-to-end", "--e2e-epochs", "2", "--e2e-train-samples", "64",
                  "--e2e-eval-samples", "32", "--e2e-runs", "default", "cached", "graphed"], env=test_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["results"]] == ["straight_port", "eager", "channels_last", "cached_trunk",
                                                          "cache_build", "eval", "eval_cached", "host"]
    assert all(r["images_per_s"] > 0 for r in report["results"])
    assert report["results"][0]["vs_straight_port"] == 1.0
    assert report["device"] and report["torch"] and report["precision"] == "fp32"
    assert "| straight_port |" in proc.stdout and "| eval |" in proc.stdout and "| eval_cached |" in proc.stdout
    # The cached variant's two builds of its feature cache, the first with its one-off costs, both reported.
    builds = {r["variant"]: r.get("cache_builds_s") for r in report["results"]}
    assert builds["eager"] is None and all(t > 0 for t in builds["cached_trunk"])
    assert (f"cached_trunk: the feature cache of {report['cached_images']:,} images built in "
            f"{builds['cached_trunk'][0]} s, again in {builds['cached_trunk'][1]} s") in proc.stdout
    # The build alone, as the trainer builds it (no cuDNN here, so not also autotuned): images/s of the second.
    assert len(builds["cache_build"]) == 2 and all(t > 0 for t in builds["cache_build"])
    assert (f"cache_build: the feature cache of {report['cached_images']:,} images built in "
            f"{builds['cache_build'][0]} s, again in {builds['cache_build'][1]} s (the images/s") in proc.stdout

    floor = report["compute_floor"]
    # At 32 px the trunk (conv1..layer3) is ~80% of a forward pass, as at 224 px; training layer4 + head adds
    # its backward. The cached workload runs the trunk once instead of ten times.
    assert 0 < floor["trunk_gflop_per_image"] < floor["train_step_gflop_per_image"]
    assert floor["workload_cached_pflop"] < floor["workload_eval_cached_pflop"] < floor["workload_pflop"]
    assert floor["floor_s"] > floor["floor_eval_cached_s"] > floor["floor_cached_s"] > 0
    assert floor["matmul_tflop_per_s"] > 0  # a CPU's rate too, so that the floor can be recomputed from it
    assert "compute floor of 10 epochs x (50,000 + 10,000) images" in proc.stdout

    # One checkpoint of the recipe's model: ~103 MB of weights + ~137 MB of Adam moments (layer4 + head).
    assert report["checkpoint"]["seconds"] > 0 and 200 < report["checkpoint"]["megabytes"] < 300
    # In the background the pause is the copy to host memory: part of the write, which still happens whole.
    assert 0 < report["checkpoint"]["background_pause_s"] < report["checkpoint"]["background_total_s"]
    # And what the write leaves of host work's rate meanwhile (the figure itself is the benchmark's to report).
    assert report["checkpoint"]["background_host_rate"] > 0
    assert f"host work beside the write keeps {report['checkpoint']['background_host_rate']:.0%} of its rate" \
        in proc.stdout
    assert "checkpoint (the trainer's save_checkpoint: model + Adam state" in proc.stdout

    e2e = {r["variant"]: r for r in report["end_to_end"]}
    assert set(e2e) == {"end_to_end", "end_to_end_cached", "end_to_end_graphed"}
    assert "graph" in e2e["end_to_end_graphed"]["startup_s"]  # the trainer ran with --whole-step-graph yes
    assert all(r["epochs"] == 2 and r["wall_s"] > 0 and r["train_images_per_s"] > 0 for r in e2e.values())
    # The trainer's own split of its start-up; with the cache, the cache is one of its phases.
    assert all(0 < r["startup_s"]["total"] <= r["outside_epochs_s"] + 0.1 for r in e2e.values())
    assert "feature_cache" in e2e["end_to_end_cached"]["startup_s"] and "\n  start-up: launch " in proc.stdout
    # The trainer's own account of all of its time, and the exit after its closing line: the wall time.
    for r in e2e.values():
        assert list(r["time_s"]) == ["start-up", "training", "evaluation", "checkpoints", "report", "other"]
        assert r["time_s"]["training"] == pytest.approx(r["train_s"], abs=0.15)
        assert sum(r["time_s"].values()) + r["exit_s"] == pytest.approx(r["wall_s"], abs=0.5) and r["exit_s"] >= 0
    assert "\n  all of it: start-up " in proc.stdout and ", exit " in proc.stdout
    for r in e2e.values():  # each epoch's accuracy, so that a late fall shows
        assert len(r["val_acc_per_epoch"]) == 2 and r["val_acc_per_epoch"][-1] == pytest.approx(r["final_val_acc"],
                                                                                                abs=1e-4)
        assert f"(per epoch: {r['val_acc_per_epoch'][0]:.3f} " in proc.stdout


def test_the_cache_builds_line_adds_the_autotuned_builds_where_there_were_any():
    from cifar_dist.bench import format_table

    report = {"device": "a GPU", "torch": "2", "precision": "bf16", "image_size": 224, "batch_size": 32,
              "eval_batch_size": 256, "cached_images": 1056,
              "results": [{"variant": "cache_build", "images_per_s": 9000.0, "vs_straight_port": None, "compile_s": 0,
                           "cache_builds_s": [1.5, 0.12, 2.9, 0.11]}]}
    assert ("cache_build: the feature cache of 1,056 images built in 1.5 s, again in 0.12 s; with cuDNN's autotuning "
            "in 2.9 s, again in 0.11 s (the images/s above count the second)") in format_table(report)


def test_bench_times_the_trainers_own_step_optimizer_cache_and_evaluate(monkeypatch):
    """In-process, counting calls: every variant but the straight port is built by trainer_parts (the trainer's
    optimizer builder, feature cache and compile path) and driven through the trainer's train_step and evaluate
    (cifar_dist.steps); nothing in the benchmark steps a model itself."""
    from cifar_dist import bench, feature_cache, steps, trainer, trainer_parts
    from cifar_dist.graphed_step import WARMUP_STEPS, GraphedStep

    assert trainer_parts.train_step is steps.train_step and trainer.assemble is trainer_parts.assemble
    assert bench.evaluate is steps.evaluate is trainer.evaluate
    calls = Counter()

    def counted(module, name):
        original = getattr(module, name)

        def inner(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, inner)

    for name in ("train_step", "build_optimizer", "compile_for_training", "prepare_model_layout"):
        counted(trainer_parts, name)
    counted(feature_cache, "build_feature_cache")
    counted(bench, "evaluate")
    counted(GraphedStep, "_step")
    try:
        bench.main([*TINY_BENCH, "--variants", "eager", "cached_trunk", "graphed", "eval", "eval_cached",
                    "--no-floor", "--no-checkpoint"])
    finally:
        trainer_parts.reset()
    # eager and cached_trunk: 1 warm-up + 2 timed steps each; graphed: the same through the trainer's
    # --whole-step-graph step (run unrecorded on a CPU), after its own 3 warm-up steps; eval and eval_cached: a
    # warm-up pass and the timed pass each; the cache is built for cached_trunk (both splits) and eval_cached
    # (the test split).
    assert calls == {"train_step": 6, "_step": WARMUP_STEPS + 3, "build_optimizer": 5, "build_feature_cache": 2,
                     "compile_for_training": 4, "prepare_model_layout": 5, "evaluate": 4}


def test_bench_measures_communication_under_torchrun(tmp_path, test_env):
    out = tmp_path / "ddp.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), "-m", "cifar_dist.bench", "--variants", "ddp", "--no-floor",
                           *TINY_BENCH, "--json", str(out)], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env={**test_env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    assert [r["variant"] for r in report["results"]] == ["no_communication (x2)", "ddp_torch_defaults (x2)",
                                                          "ddp_cifar_dist (x2)"]
    assert report["communication_share"] < 1
    assert proc.stdout.count("communication share of a step with 2 processes") == 1  # printed by rank 0 only


def test_the_host_variant_times_the_trainers_loop_around_a_stand_in_of_negligible_compute(monkeypatch, tmp_path):
    from cifar_dist import bench as bench_module
    from cifar_dist import trainer_parts

    models = []
    assemble = trainer_parts.assemble

    def kept(accelerator, model, *args, **kwargs):
        models.append(type(model).__name__)
        return assemble(accelerator, model, *args, **kwargs)
    monkeypatch.setattr(trainer_parts, "assemble", kept)
    out = tmp_path / "bench.json"
    try:
        bench_module.main(["--image-size", "32", "--steps", "20", "--warmup", "2", "--variants", "channels_last",
                           "host", "--no-floor", "--no-checkpoint", "--profile", "host", "--json", str(out)])
    finally:
        trainer_parts.reset()
    # The same loop, optimizer and loaders; another model (its profile too).
    assert models == ["ResNet50Classifier", "StandIn", "StandIn"]
    report = json.loads(out.read_text())
    speed = {r["variant"]: r["images_per_s"] for r in report["results"]}
    assert speed["host"] > 10 * speed["channels_last"]  # what is left is the host's work around the model
    assert not any("conv" in op["name"] for op in report["profile"]["top_host_ops"])


def test_the_profile_splits_a_steps_time_and_names_the_costliest_host_operations(tmp_path, capsys):
    from cifar_dist import bench as bench_module

    out, trace = tmp_path / "bench.json", tmp_path / "trace.json"
    bench_module.main([*TINY_BENCH, "--variants", "eager", "--no-floor", "--no-checkpoint", "--profile", "eager",
                       "--profile-trace", str(trace), "--json", str(out)])
    profile = json.loads(out.read_text())["profile"]
    assert profile["variant"] == "eager" and profile["steps"] == 2
    assert 0 < profile["host_queue_ms_per_step"] <= profile["wall_ms_per_step"]
    assert profile["device_busy_ms_per_step"] is None  # a CPU has no device timeline
    ops = {op["name"]: op for op in profile["top_host_ops"]}
    # The recipe's step is convolutions forward and backward: 53 in ResNet50's forward, layer4's 10 backward.
    assert {"aten::convolution_backward"} <= set(ops) and ops["aten::convolution_backward"]["calls_per_step"] == 10
    assert "traceEvents" in json.loads(trace.read_text())
    assert "profile of eager, per step over 2 steps" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be positive"),
    (["--e2e-epochs", "0"], "--e2e-epochs must be positive"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    # Where the report goes is checked before the timing, which takes minutes on a GPU, not after it.
    (["--checkpoint-dir", "/no/such/dir"], "--checkpoint-dir /no/such/dir: no such folder"),
    (["--json", "/no/such/dir/b.json"], "--json /no/such/dir/b.json: no such folder /no/such/dir"),
    (["--profile", "eager", "--profile-trace", "/no/such/t.json"], "--profile-trace /no/such/t.json: no such folder"),
])
def test_bench_refuses_bad_sizes_and_folders(args, message):
    proc = bench(args, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]
    assert "straight_port" not in proc.stdout  # nothing was timed


def test_a_graphed_variant_whose_graph_was_turned_off_is_refused_not_timed(monkeypatch):
    # Under torchrun or fp16 the trainer turns --whole-step-graph off; timing the plain step under the graphed
    # variant's name would report the wrong thing (and its missing recording time crashed the report).
    from types import SimpleNamespace

    from cifar_dist import bench
    from cifar_dist.config import UserError

    off = SimpleNamespace(fast=SimpleNamespace(graph_record_s=None, notes=["--whole-step-graph yes: off with several "
                                                                           "processes"]))
    monkeypatch.setattr(bench, "_variant_parts", lambda *args: off)
    with pytest.raises(UserError, match=r"^graphed: the step could not run as one graph \(--whole-step-graph yes: "
                                        r"off with several processes\)$"):
        bench.bench_trainer_step("graphed", None, None, "no")



def test_help_gives_the_defaults_a_short_run_needs_to_lower():
    from cifar_dist.bench import build_parser

    text = " ".join(build_parser().format_help().split())
    for said in ("--image-size IMAGE_SIZE default: 224", "per variant (default: 50)", "(default: 10)",
                 "straight port (default: 8)"):
        assert said in text, said

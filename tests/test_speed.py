"""The fast path and the frozen-feature cache compute what the plain path computes.

Each speed option trains the real trainer for one epoch (8 steps at the recipe's lr) and is compared with the
plain path. The comparisons run with float64 parameters (tests/run_float64.py), where float32's rounding, which
Adam amplifies at this learning rate (see test_multiprocess.py), cannot hide a real difference: any change of
the function shows up far above 1e-9. A float32 run with every option on is compared as well, on its losses
and accuracy, to the tolerance float32 allows.
"""

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch.utils._python_dispatch import TorchDispatchMode

import conftest
from cifar_dist import feature_cache, trainer_parts
from cifar_dist.config import ModelConfig, SpeedConfig, UserError
from cifar_dist.feature_cache import (
    DEVICE_HEADROOM_BYTES,
    DEVICE_IF_FITS,
    DoesNotFit,
    _features,
    build_feature_cache,
    cache_for_run,
    cache_layout,
    check_cacheable,
    choose_location,
)
from cifar_dist.model import ResNet50Classifier
from cifar_dist.speed import (
    adam_implementation,
    apply_backends,
    compile_for_training,
    match_optimizer_to_run,
    mixed_precision_note,
    resolve_fast_path,
    resolve_mixed_precision,
)
from cifar_dist.steps import evaluate, train_step
from conftest import FLOAT64, TINY, records, run_train, run_trains_at_once

STEPS = [*TINY, "--num-epochs", "1", "--eval-batch-size", "48"]
OPTIONS = {
    "channels_last": ["--channels-last", "yes"],
    "fused_adam": ["--fused-adam", "yes"],
    "compiled": ["--compile-step", "yes"],
    "cache": ["--cache-frozen-features"],
    "eval_cache": ["--cache-eval-features", "yes"],
    "whole_step_graph": ["--whole-step-graph", "yes"],
}
GiB = 2**30


def update_difference(a: Path, b: Path, initial: dict) -> float:
    return conftest.update_difference(a, b, initial, prefixes=("layer4.", "fc."))  # layer4 and the head


@pytest.fixture(scope="module")
def float64_runs(test_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("speed64")
    runs = {"plain": [], **OPTIONS}
    procs = run_trains_at_once(test_env, [[*STEPS, *args, "--output-dir", str(root / name)]
                                          for name, args in runs.items()], script=FLOAT64)
    return root, dict(zip(runs, procs))


@pytest.mark.slow
@pytest.mark.parametrize("option", OPTIONS)
def test_each_speed_option_trains_the_same_weights(float64_runs, initial_weights, option):
    root, procs = float64_runs
    assert update_difference(root / "plain", root / option, initial_weights) < 1e-9
    plain, fast = records(root / "plain")[-1], records(root / option)[-1]
    assert fast["step"] == plain["step"] == 8
    for key in ("train_loss", "val_loss", "val_top5"):
        assert fast[key] == pytest.approx(plain[key], rel=1e-9)
    assert fast["val_acc"] == plain["val_acc"]


@pytest.mark.slow
def test_the_run_header_says_what_the_step_uses(float64_runs):
    _, procs = float64_runs
    assert ("- step: plain eager step; --compile-step, --channels-last, --fused-adam, --cache-frozen-features, "
            "--cache-eval-features auto: off on cpu") in procs["plain"].stdout
    # Compiled before training, by a warm-up whose effects are undone (the weights still match the plain path's).
    assert re.search(r"- step: compiled step \(torch.compile reduce-overhead; compiled in \d+\.\d s: 1 graph, 0 graph "
                     r"breaks, no CUDA graphs on cpu\); ", procs["compiled"].stdout), procs["compiled"].stdout
    assert "- step: plain eager step; frozen-stage features cached" in procs["cache"].stdout
    # 256 train + 100 test images, layer3's output at 32 px (1024 x 2 x 2) in float64.
    assert "feature cache: 256 train + 100 test images -> 1024x2x2 float64 per image" in procs["cache"].stdout
    # Evaluation alone from cached features: the test split's, once, before training.
    assert ("- step: plain eager step; evaluation from the test images' cached frozen-stage features"
            in procs["eval_cache"].stdout)
    assert "feature cache: 100 test images -> 1024x2x2 float64 per image" in procs["eval_cache"].stdout
    # On a CPU the whole step runs over the graph's static buffers, unrecorded, with the graph's fused Adam.
    assert ("- step: whole step over static buffers (eager kernels; not recorded as a graph: CUDA graphs need a CUDA "
            "GPU), fused Adam; --compile-step, --channels-last, --cache-frozen-features, --cache-eval-features auto: "
            "off on cpu"
            in procs["whole_step_graph"].stdout)
    assert re.search(r"start-up: .*, graph \d+\.\d, ", procs["whole_step_graph"].stdout)


@pytest.mark.slow
def test_cache_with_two_processes_trains_what_one_process_trains(float64_runs, initial_weights, test_env):
    # Each process computes half the features and the all-gather completes both copies; the data order is the
    # plain path's, so the result matches one process without the cache.
    root, _ = float64_runs
    run_train(test_env, [*STEPS, "--cache-frozen-features", "--output-dir", str(root / "cache_2proc")],
              num_processes=2, script=FLOAT64)
    assert update_difference(root / "plain", root / "cache_2proc", initial_weights) < 1e-9
    plain, two = records(root / "plain")[-1], records(root / "cache_2proc")[-1]
    assert two["val_num_samples"] == 100
    assert two["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-9)


@pytest.mark.slow
def test_float32_with_every_option_matches_the_plain_path(test_env, tmp_path, initial_weights):
    # float32 at lr 1e-5: at the recipe's 1e-3, Adam turns rounding (other conv kernels for channels_last,
    # another batch size for the trunk) into lr-sized steps, and runs that differ only in thread count end 16%
    # apart (test_multiprocess.py); at 1e-5 that noise is about 1e-4.
    plain, fast = tmp_path / "plain", tmp_path / "fast"
    run_train(test_env, [*STEPS, "--lr", "1e-5", "--output-dir", str(plain)])
    run_train(test_env, [*STEPS, "--lr", "1e-5", "--channels-last", "yes", "--fused-adam", "yes",
                         "--cache-frozen-features", "--output-dir", str(fast)])
    a, b = records(plain)[-1], records(fast)[-1]
    difference = update_difference(plain, fast, initial_weights)
    print(f"float32, every option vs plain: update difference {difference:.2e}, val_loss {a['val_loss']:.6f} vs "
          f"{b['val_loss']:.6f}")
    assert difference < 1e-3
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    assert abs(b["val_acc"] - a["val_acc"]) <= 0.01 + 1e-9  # at most one image on the decision boundary


@pytest.mark.slow
def test_compiled_step_with_two_processes_trains_what_one_plain_process_trains(float64_runs, initial_weights,
                                                                               test_env):
    # The default multi-GPU step: compiled, inside DDP, with SyncBatchNorm's collectives in the graph.
    root, _ = float64_runs
    proc = run_train(test_env, [*STEPS, "--compile-step", "yes", "--output-dir", str(root / "compiled_2proc")],
                     num_processes=2, script=FLOAT64)
    assert update_difference(root / "plain", root / "compiled_2proc", initial_weights) < 1e-9
    assert "Grad strides do not match" not in proc.stderr


@pytest.mark.slow
def test_bf16_gradient_all_reduce_moves_the_result_by_less_than_float32_rounding(initial_weights, test_env, tmp_path):
    # The one option that changes the numbers: gradients are averaged in bf16 (8 significant bits). It is what
    # --grad-reduce-dtype auto picks when training in bf16, whose matmuls round to that precision anyway.
    # Parameters in float64 and lr 1e-5, so that only the reduction's rounding shows: far above float64's 1e-9
    # (the hook is in effect), below the ~1e-4 that float32 rounding alone causes at this lr (see above).
    plain, bf16 = tmp_path / "plain", tmp_path / "bf16"
    run_train(test_env, [*STEPS, "--lr", "1e-5", "--output-dir", str(plain)], script=FLOAT64)
    run_train(test_env, [*STEPS, "--lr", "1e-5", "--grad-reduce-dtype", "bf16", "--output-dir", str(bf16)],
              num_processes=2, script=FLOAT64)
    difference = update_difference(plain, bf16, initial_weights)
    a, b = records(plain)[-1], records(bf16)[-1]
    print(f"bf16 gradient all-reduce vs plain, 8 steps at lr 1e-5: update difference {difference:.2e}, val_loss "
          f"{a['val_loss']:.6f} vs {b['val_loss']:.6f}")
    assert 1e-7 < difference < 1e-4
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    assert abs(b["val_acc"] - a["val_acc"]) <= 0.01 + 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("saved, resumed", [("yes", "no"), ("no", "yes")])
def test_a_checkpoint_resumes_exactly_under_the_other_memory_format(float64_runs, initial_weights, test_env, tmp_path,
                                                                     saved, resumed):
    # Adam's moments are saved in the layout of their parameters; fused Adam pairs elements by memory position,
    # so without re-laying them out a channels_last checkpoint resumed contiguous (or the reverse) would mix
    # elements: about one learning-rate step of error, far above float64's 1e-9.
    root, _ = float64_runs
    out = tmp_path / "out"
    run_train(test_env, [*STEPS, "--max-steps", "4", "--checkpoint-every-steps", "4", "--fused-adam", "yes",
                         "--channels-last", saved, "--output-dir", str(out)], script=FLOAT64)
    proc = run_train(test_env, [*STEPS, "--fused-adam", "yes", "--channels-last", resumed, "--output-dir", str(out)],
                     script=FLOAT64)
    assert "resuming from" in proc.stdout and "step-00000004" in proc.stdout
    assert records(out)[-1]["step"] == 8
    assert update_difference(root / "plain", out, initial_weights) < 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("saved, resumed", [("yes", "yes"), ("no", "yes"), ("yes", "no")])
def test_a_checkpoint_resumes_exactly_into_and_out_of_the_whole_step_graph(float64_runs, initial_weights, test_env,
                                                                            tmp_path, saved, resumed):
    # The graph is recorded after the resume, around the loaded weights and Adam state; its warm-up's steps are
    # undone to the loaded values, not to a fresh Adam's zeros (which would be about a learning-rate step off).
    root, _ = float64_runs
    out = tmp_path / "out"
    run_train(test_env, [*STEPS, "--max-steps", "4", "--checkpoint-every-steps", "4", "--fused-adam", "yes",
                         "--whole-step-graph", saved, "--output-dir", str(out)], script=FLOAT64)
    proc = run_train(test_env, [*STEPS, "--fused-adam", "yes", "--whole-step-graph", resumed, "--output-dir",
                                str(out)], script=FLOAT64)
    assert "resuming from" in proc.stdout and "step-00000004" in proc.stdout
    assert records(out)[-1]["step"] == 8
    assert update_difference(root / "plain", out, initial_weights) < 1e-9


@pytest.mark.parametrize("saved, resumed", [(("yes", "no"), ("no", "yes")), (("no", "yes"), ("yes", "no"))])
def test_a_resumed_optimizer_runs_this_runs_adam_in_this_runs_layout(tmp_path, saved, resumed):
    # (channels_last, fused_adam) of the run that saved and of the run that resumes, through accelerate's real
    # save_state / load_state.
    splits = trainer_parts.synthetic_splits(96, 8)
    parts = trainer_parts.build(splits, 32, speed=SpeedConfig(channels_last=saved[0], fused_adam=saved[1]))
    trainer_parts.train(parts, 2)
    parts.accelerator.save_state(str(tmp_path / "checkpoint"))
    trainer_parts.reset()
    parts = trainer_parts.build(splits, 32, speed=SpeedConfig(channels_last=resumed[0], fused_adam=resumed[1]))
    parts.accelerator.load_state(str(tmp_path / "checkpoint"))
    adam = parts.optimizer.optimizer
    assert adam.param_groups[0]["fused"] == (saved[1] == "yes" or None)  # what load_state_dict leaves
    match_optimizer_to_run(parts.optimizer)
    assert adam.param_groups[0]["fused"] == (resumed[1] == "yes" or None)
    assert adam_implementation(parts.optimizer) == ("fused" if resumed[1] == "yes" else "for-loop")
    for param in adam.param_groups[0]["params"]:
        state = adam.state[param]
        assert state["exp_avg"].stride() == state["exp_avg_sq"].stride() == param.stride()
        assert state["step"].item() == 2 and state["step"].dtype == torch.float32
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) != p.is_contiguous()
               for p in adam.param_groups[0]["params"])  # the layouts really differ
    trainer_parts.train(parts, 1, epoch=2)  # and the step runs
    trainer_parts.reset()


@pytest.mark.slow
def test_a_checkpoint_resumes_under_other_speed_options(test_env, tmp_path):
    # The options change how the step runs, not what it computes, so they are not part of a checkpoint's meaning.
    out = tmp_path / "out"
    run_train(test_env, [*STEPS, "--max-steps", "4", "--checkpoint-every-steps", "4", "--output-dir", str(out)])
    proc = run_train(test_env, [*STEPS, "--cache-frozen-features", "--fused-adam", "yes", "--output-dir", str(out)])
    assert "resuming from" in proc.stdout and "step-00000004" in proc.stdout
    assert records(out)[-1]["step"] == 8


# -- the refusals and decisions, in process


@pytest.mark.slow
def test_cache_refuses_when_nothing_is_frozen(test_env, tmp_path):
    proc = run_train(test_env, [*STEPS, "--freeze-until", "none", "--cache-frozen-features",
                                "--output-dir", str(tmp_path / "o")], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "cifar_dist.train: error: --cache-frozen-features: nothing is frozen (--freeze-until none), so there is "
        "nothing to cache; freeze some stages or use --cache-frozen-features auto")


def _model(freeze_until="layer4"):
    return ResNet50Classifier(ModelConfig(weights="none", freeze_until=freeze_until), 32).train()


def test_cache_refuses_a_frozen_stage_in_training_mode():
    model = _model()
    check_cacheable(model)  # the trainer's configuration: frozen stages in eval mode
    model.layer2[1].bn2.train()
    with pytest.raises(UserError, match="frozen module layer2.1.bn2 is in training mode"):
        check_cacheable(model)


def test_cache_refuses_a_trainable_parameter_in_a_frozen_stage():
    model = _model()
    model.bn1.weight.requires_grad_(True)
    with pytest.raises(UserError, match="bn1.weight belongs to a frozen stage but is trainable"):
        check_cacheable(model)


@pytest.mark.parametrize("freeze_until", ["layer1", "layer3", "layer4", "fc"])
def test_trunk_then_head_is_the_forward(freeze_until):
    torch.manual_seed(0)
    model = _model(freeze_until).eval()
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model(features=model.trunk(images)), model(images))


@pytest.mark.parametrize("choice, nbytes, device_free, host_free, expected", [
    ("auto", 20 * GiB, 70 * GiB, 100 * GiB, "device"),
    ("auto", 20 * GiB, 20 * GiB, 100 * GiB, "host"),  # fits, but leaves no room to train
    ("host", 1 * GiB, 70 * GiB, 100 * GiB, "host"),
    ("device", 20 * GiB, 70 * GiB, 1 * GiB, "device"),
])
def test_cache_location(choice, nbytes, device_free, host_free, expected):
    assert choose_location(choice, nbytes, torch.device("cuda"), device_free, host_free) == expected


def test_cache_location_on_cpu_is_host_memory():
    assert choose_location("device", GiB, torch.device("cpu"), None, 2 * GiB) == "host"


def test_a_cache_worth_having_only_in_device_memory():
    assert choose_location(DEVICE_IF_FITS, 4 * GiB, torch.device("cuda"), 11 * GiB, 100 * GiB) == "device"


@pytest.mark.parametrize("device, device_free, figures", [
    # Fits, but leaves less than the headroom to train: not cached, and the figures say why (auto's note).
    ("cuda:0", 9 * GiB, "4.0 GiB, more than the 9.0 GiB free on cuda:0 less 6 GiB for training"),
    ("cpu", None, "4.0 GiB of device memory, which cpu does not have"),
])
def test_a_cache_worth_having_only_in_device_memory_says_why_it_is_not_built(device, device_free, figures):
    with pytest.raises(DoesNotFit) as info:
        choose_location(DEVICE_IF_FITS, 4 * GiB, torch.device(device), device_free, 100 * GiB)
    assert str(info.value) == figures


def test_evaluation_cache_under_auto_is_skipped_with_a_note_where_device_memory_cannot_hold_it():
    # On the CPU no device memory holds it; the same path as a GPU too full for it.
    splits = trainer_parts.synthetic_splits(4, 8)
    model = _model("layer4").train()
    wanted = dataclasses.replace(resolve_fast_path(SpeedConfig(), torch.device("cpu"), "no", 1), eval_cache=True)
    accelerator = Accelerator(cpu=True)
    data, fast = cache_for_run(model, splits, accelerator, 4, SpeedConfig(), wanted)
    assert data is splits and fast.features_cached == ()
    assert fast.notes[-1] == ("--cache-eval-features auto: off, the test images' frozen-stage features need 0.1 MiB "
                              "of device memory, which cpu does not have (in host memory with 'yes')")
    # With 'yes' it goes to host memory; the training images stay images.
    data, fast = cache_for_run(model, splits, accelerator, 4, SpeedConfig(cache_eval_features="yes"), wanted)
    assert fast.features_cached == ("test",) and data.train is splits.train
    with torch.no_grad():  # computed in batches of 4, compared with one batch of 8: float32 rounding apart (the
        # convolutions' summation order follows the batch size), so a tolerance above float32's default
        torch.testing.assert_close(model.eval()(features=data.test.features), model(splits.test.images),
                                   rtol=1e-4, atol=1e-4)
    # Nothing frozen, nothing to cache.
    data, fast = cache_for_run(_model("none"), splits, accelerator, 4, SpeedConfig(), wanted)
    assert data is splits and fast.features_cached == () and fast.notes == wanted.notes
    trainer_parts.reset()


def test_the_feature_cache_under_auto_falls_back_to_the_step_from_images_where_it_does_not_fit(monkeypatch):
    # What resolve_fast_path decides by default on a GPU, then a device without room (a CPU has no device memory):
    # the step from images as resolve_fast_path decides it without the cache, and a note for each cache.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    wanted = resolve_fast_path(SpeedConfig(), torch.device("cuda"), "bf16", 1)
    # --cache-eval-features no keeps the test images' features out of any cache: auto then caches none.
    no_eval = resolve_fast_path(SpeedConfig(cache_eval_features="no"), torch.device("cuda"), "bf16", 1)
    assert not (no_eval.train_cache or no_eval.eval_cache or no_eval.whole_step_graph) and no_eval.compile_step
    images = resolve_fast_path(SpeedConfig(cache_frozen_features="no"), torch.device("cuda"), "bf16", 1)
    assert wanted.train_cache and wanted.whole_step_graph and not wanted.compile_step
    splits, accelerator = trainer_parts.synthetic_splits(4, 8), Accelerator(cpu=True)
    data, fast = cache_for_run(_model("layer4"), splits, accelerator, 4, SpeedConfig(), wanted)
    assert data is splits and fast.features_cached == ()
    assert dataclasses.replace(fast, notes=[]) == dataclasses.replace(images, notes=[])
    assert fast.notes == [
        "--cache-frozen-features auto: off, the frozen-stage features need 0.2 MiB of device memory, which cpu does "
        "not have (in host memory with 'yes')",
        "--cache-eval-features auto: off, the test images' frozen-stage features need 0.1 MiB of device memory, "
        "which cpu does not have (in host memory with 'yes')"]
    # Nothing frozen: nothing to cache, nothing to say.
    data, fast = cache_for_run(_model("none"), splits, accelerator, 4, SpeedConfig(), wanted)
    assert data is splits and fast == images
    # Where it fits (stood in for by host memory), both splits are cached and the decisions stand.
    monkeypatch.setattr(feature_cache, "choose_location", lambda *args: "host")
    data, fast = cache_for_run(_model("layer4"), splits, accelerator, 4, SpeedConfig(), wanted)
    assert fast == dataclasses.replace(wanted, features_cached=("train", "test"))
    assert len(data.train) == 4 and len(data.test) == 8 and data.train.features.shape[1:] == (1024, 2, 2)
    trainer_parts.reset()


@pytest.mark.parametrize("choice, device_free, message", [
    ("device", 10 * GiB, "the feature cache needs 20.0 GiB, more than the 10.0 GiB free on cuda less 6 GiB for "
                         "training; use --feature-cache-location host"),
    ("auto", 10 * GiB, "the feature cache needs 20.0 GiB, more than the 8.0 GiB of host memory available to this "
                       "process; lower --image-size or use --no-cache-frozen-features"),
])
def test_cache_that_fits_nowhere_is_refused(choice, device_free, message):
    with pytest.raises(UserError) as info:
        choose_location(choice, 20 * GiB, torch.device("cuda"), device_free, 8 * GiB)
    assert str(info.value) == message
    assert 6 * GiB == DEVICE_HEADROOM_BYTES


def test_fast_path_is_on_for_cuda_and_off_on_cpu_by_default(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    # On a GPU: the feature cache (if it fits: cache_for_run), its step as one graph, channels_last, fused Adam.
    cuda = resolve_fast_path(SpeedConfig(), torch.device("cuda"), "bf16", 1)
    assert cuda.train_cache and cuda.eval_cache and cuda.whole_step_graph and cuda.channels_last and cuda.fused_adam
    assert not cuda.compile_step and cuda.for_the_cache == ("graph", "no compile")
    images = resolve_fast_path(SpeedConfig(cache_frozen_features="no"), torch.device("cuda"), "bf16", 1)
    assert images.compile_step and images.channels_last and images.fused_adam and images.eval_cache
    assert not (images.train_cache or images.whole_step_graph or images.notes)
    cpu = resolve_fast_path(SpeedConfig(), torch.device("cpu"), "no", 1)
    assert not (cpu.compile_step or cpu.channels_last or cpu.fused_adam or cpu.bf16_grad_reduce or cpu.train_cache)
    assert cpu.notes == ["--compile-step, --channels-last, --fused-adam, --cache-frozen-features, "
                         "--cache-eval-features auto: off on cpu (on with 'yes')"]
    assert not cpu.eval_cache and resolve_fast_path(SpeedConfig(cache_eval_features="yes"), torch.device("cpu"), "no",
                                                    1).eval_cache
    # --cache-frozen-features caches the test split too, whatever the device.
    both = resolve_fast_path(SpeedConfig(cache_frozen_features="yes"), torch.device("cpu"), "no", 1)
    assert both.eval_cache and both.notes == ["--compile-step, --channels-last, --fused-adam auto: off on cpu (on "
                                              "with 'yes')"]
    forced = resolve_fast_path(SpeedConfig(compile_step="yes", channels_last="yes", fused_adam="yes",
                                           cache_frozen_features="no", cache_eval_features="yes"),
                               torch.device("cpu"), "no", 1)
    assert forced.compile_step and forced.channels_last and forced.fused_adam and forced.eval_cache
    assert not forced.notes


def test_compile_auto_is_off_with_several_processes_or_gradient_accumulation(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda, images = torch.device("cuda"), SpeedConfig(cache_frozen_features="no")
    assert resolve_fast_path(images, cuda, "bf16", 1).compile_step
    several = resolve_fast_path(images, cuda, "bf16", 2)
    assert not several.compile_step and several.channels_last and several.fused_adam
    assert several.notes == [("--compile-step auto: off with several processes (DDP + SyncBatchNorm keep CUDA graphs "
                              "from recording, PyTorch #139207; not yet measured against eager); on with 'yes'")]
    accumulating = resolve_fast_path(images, cuda, "bf16", 1, grad_accum_steps=2)
    assert not accumulating.compile_step
    assert accumulating.notes == [("--compile-step auto: off with gradient accumulation (each micro-batch's graph "
                                   "replay would reuse the memory of the gradients being accumulated); on with "
                                   "'yes', which keeps them apart")]
    forced = resolve_fast_path(SpeedConfig(compile_step="yes", cache_frozen_features="no"), cuda, "bf16", 2,
                               grad_accum_steps=2)
    assert forced.compile_step and not forced.notes and forced.grad_accum_steps == 2


@pytest.mark.parametrize("capability, auto", [((7, 0), "no"), ((7, 5), "no"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_mixed_precision_auto_is_bf16_only_where_the_gpu_computes_it(monkeypatch, capability, auto):
    # A V100 (7.0) or T4 (7.5) only emulates bf16, though torch.cuda.is_bf16_supported() says yes by default.
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_mixed_precision("auto") == auto
    note = mixed_precision_note("auto", auto)
    if auto == "no":
        assert note == (f" (auto: this GPU, compute capability {capability[0]}.{capability[1]}, has no native bf16; "
                        "--mixed-precision fp16 runs on its tensor cores)")
    else:
        assert note == ""
    assert resolve_mixed_precision("fp16") == "fp16" and mixed_precision_note("no", "no") == ""  # asked for
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # the accelerate config's choice wins over auto's
    assert resolve_mixed_precision("auto") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert resolve_mixed_precision("auto") == "no" and mixed_precision_note("auto", "no") == ""  # the CPU: no note


@pytest.fixture
def failing_compiler(monkeypatch):
    # A real compile failure: inductor's CPU code generation finds no working C++ compiler (caches off, so that
    # nothing compiled earlier is reused).
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/bin/false",))
    monkeypatch.setattr(inductor_config, "force_disable_caches", True)
    yield
    torch._dynamo.reset()


def test_a_failed_compile_under_auto_runs_the_eager_step_and_says_why(failing_compiler):
    parts = trainer_parts.build(trainer_parts.synthetic_splits(64, 8), 32)
    model, before = parts.model, {k: v.clone() for k, v in parts.model.state_dict().items()}
    fast = dataclasses.replace(parts.fast, compile_step=True, compile_choice="auto")
    step_model, fast = compile_for_training(model, fast, parts.train_loader.dataset, 32, parts.accelerator)
    trainer_parts.reset()
    assert step_model is model and not fast.compile_step and fast.compiled is None
    assert fast.notes[-1].startswith("--compile-step auto: off, torch.compile failed (InductorError: "
                                     "InvalidCxxCompiler: No working C++ compiler found")
    assert fast.notes[-1].endswith("; the eager step runs instead")
    assert fast.describe() == "plain eager step"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_a_failed_compile_under_yes_stops_the_run_with_one_line(test_env, tmp_path):
    env = {**test_env, "CXX": "/bin/false", "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    proc = run_train(env, [*STEPS, "--compile-step", "yes", "--output-dir", str(tmp_path / "o")], check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cifar_dist.train: error: --compile-step yes: torch.compile failed (InductorError: "
                           "InvalidCxxCompiler: No working C++ compiler found")
    assert last.endswith("; use --compile-step no")


def test_compile_falls_back_on_a_gpu_too_old_for_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    fast = resolve_fast_path(SpeedConfig(cache_frozen_features="no"), torch.device("cuda"), "fp16", 1)
    assert not fast.compile_step and fast.channels_last and fast.fused_adam
    assert fast.notes == ["--compile-step auto: off, this GPU has compute capability 6.0; torch.compile needs 7.0+"]


def test_the_whole_step_graph_runs_where_it_can_and_says_why_not(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    graph = SpeedConfig(whole_step_graph="yes", cache_frozen_features="no")
    assert not resolve_fast_path(SpeedConfig(cache_frozen_features="no"), cuda, "bf16", 1).whole_step_graph  # auto:
    # off from images
    on = resolve_fast_path(graph, cuda, "bf16", 1)
    assert on.whole_step_graph and on.compile_step and on.fused_adam and not on.notes
    assert on.describe().startswith("whole step as one CUDA graph (forward, loss, backward and fused Adam; "
                                    "inductor's kernels), channels_last, fused Adam")
    recorded = dataclasses.replace(on, graph_record_s=4.25)
    assert "inductor's kernels; recorded in 4.2 s)" in recorded.describe()
    assert recorded.facts()["graph_record_s"] == 4.25 and recorded.facts()["whole_step_graph"] is True
    eager_kernels = resolve_fast_path(dataclasses.replace(graph, compile_step="no"), cuda, "bf16", 1)
    assert "(forward, loss, backward and fused Adam; eager kernels)" in eager_kernels.describe()
    for processes, accumulation, precision, why in [
            (2, 1, "bf16", "with several processes (DDP's all-reduce is not recorded)"),
            (1, 2, "bf16", "with gradient accumulation (one replay is one optimizer step)"),
            (1, 1, "fp16", "under fp16 (the loss scaler reads the device every step)")]:
        off = resolve_fast_path(graph, cuda, precision, processes, accumulation)
        assert not off.whole_step_graph
        assert f"--whole-step-graph yes: off {why}; the step runs as without it" in off.notes
    # A CPU runs the same step unrecorded, with the fused Adam the graph would record.
    on_cpu = resolve_fast_path(graph, cpu, "no", 1)
    assert on_cpu.whole_step_graph and on_cpu.fused_adam and not on_cpu.compile_step
    assert on_cpu.notes == ["--compile-step, --channels-last, --cache-eval-features auto: off on cpu (on with 'yes')"]
    # Asked for, the graph does not depend on the cache: nothing for FastPath.without_train_cache to undo.
    with_cache = resolve_fast_path(dataclasses.replace(graph, cache_frozen_features="auto"), cuda, "bf16", 1)
    assert with_cache.train_cache and with_cache.for_the_cache == () and with_cache.compile_step
    assert with_cache.without_train_cache() == dataclasses.replace(with_cache, train_cache=False)


def test_auto_records_the_whole_step_of_eager_kernels_when_training_from_the_feature_cache(monkeypatch):
    # Measured on an H100: 54.6 s end to end against the compiled step's 78.8 s, with nothing compiled.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda, cached = torch.device("cuda"), SpeedConfig(cache_frozen_features="yes")
    on = resolve_fast_path(cached, cuda, "bf16", 1)
    assert on.whole_step_graph and not on.compile_step and on.fused_adam and on.channels_last
    assert on.notes == ["--compile-step auto: off inside the whole-step graph from the feature cache (eager "
                        "kernels, measured faster end to end: nothing to compile at start-up); inductor's kernels "
                        "with 'yes'"]
    assert "(forward, loss, backward and fused Adam; eager kernels)" in on.describe()
    inductor = resolve_fast_path(dataclasses.replace(cached, compile_step="yes"), cuda, "bf16", 1)
    assert inductor.whole_step_graph and inductor.compile_step and not inductor.notes
    # Where the graph cannot run, 'auto' says so and the compiled step runs as before.
    for processes, accumulation, speed, why in [
            (2, 1, cached, "with several processes (DDP's all-reduce is not recorded)"),
            (1, 2, cached, "with gradient accumulation (one replay is one optimizer step)"),
            (1, 1, dataclasses.replace(cached, fused_adam="no"),
             "with --fused-adam no (the graph records fused Adam's step)")]:
        off = resolve_fast_path(speed, cuda, "bf16", processes, accumulation)
        assert not off.whole_step_graph
        assert f"--whole-step-graph auto: off {why}; the step runs as without it" in off.notes
    assert resolve_fast_path(dataclasses.replace(cached, fused_adam="no"), cuda, "bf16", 1).compile_step
    assert not resolve_fast_path(dataclasses.replace(cached, whole_step_graph="no"), cuda, "bf16", 1).whole_step_graph
    on_cpu = resolve_fast_path(cached, torch.device("cpu"), "no", 1)  # no CUDA graphs to record
    assert not on_cpu.whole_step_graph and not on_cpu.fused_adam


def test_the_whole_step_graph_starts_where_the_plain_step_starts_and_steps_as_it_does():
    # Its warm-up steps (Adam's state made, BatchNorm statistics moved, weights updated) are undone before it
    # records; then each replay is the plain step with fused Adam, to the bit on a CPU.
    splits = trainer_parts.synthetic_splits(96, 8)
    built = {}
    for name, graph in (("plain", "no"), ("graph", "yes")):
        parts = trainer_parts.build(splits, 32, speed=SpeedConfig(fused_adam="yes", whole_step_graph=graph))
        adam = parts.optimizer.optimizer
        assert adam_implementation(parts.optimizer) == "fused"
        assert adam.param_groups[0]["capturable"] == (graph == "yes")
        # Under the graph, autocast keeps no weight-cast cache (CUDA graphs must not read a cast cached outside).
        handler = parts.accelerator.autocast_handler
        assert (handler is not None and handler.cache_enabled is False) == (graph == "yes")
        start = {k: v.clone() for k, v in parts.model.state_dict().items()}
        adam_start = [v.clone() for state in adam.state.values() for v in state.values()]
        built[name] = (start, adam_start, trainer_parts.losses(trainer_parts.train(parts, 2)), parts.model.state_dict())
        trainer_parts.reset()
    (plain_start, _, plain_losses, plain_end), (start, adam_start, graph_losses, end) = built["plain"], built["graph"]
    assert all(torch.equal(start[k], plain_start[k]) for k in start)
    assert all(not v.any() for v in adam_start)  # a fresh Adam's zeros, as the plain step starts from nothing
    assert graph_losses == plain_losses
    assert all(torch.equal(end[k], plain_end[k]) for k in end)


def test_cudnn_autotuning_is_on_for_cuda_unless_deterministic(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    on = resolve_fast_path(SpeedConfig(cache_frozen_features="no"), cuda, "bf16", 1)
    assert on.cudnn_benchmark and not on.notes and "cuDNN-autotuned convolutions" in on.describe()
    assert on.facts()["cudnn_benchmark"] is True
    deterministic = resolve_fast_path(SpeedConfig(cache_frozen_features="no"), cuda, "bf16", 1, deterministic=True)
    assert not deterministic.cudnn_benchmark and "cuDNN" not in deterministic.describe()
    assert deterministic.notes == ["--cudnn-benchmark auto: off with --deterministic (its timed choice of algorithm "
                                   "can differ between a run and its resumption)"]
    assert not resolve_fast_path(SpeedConfig(cudnn_benchmark="no"), cuda, "bf16", 1).cudnn_benchmark
    # There is no cuDNN on a CPU: nothing to say under auto, one line under yes.
    assert not resolve_fast_path(SpeedConfig(), cpu, "no", 1).cudnn_benchmark
    asked = resolve_fast_path(SpeedConfig(cudnn_benchmark="yes"), cpu, "no", 1)
    assert not asked.cudnn_benchmark and "--cudnn-benchmark yes: off, cuDNN runs on CUDA GPUs only" in asked.notes


def test_the_backend_switch_follows_the_fast_path_both_ways(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored afterwards
    base = resolve_fast_path(SpeedConfig(), torch.device("cpu"), "no", 1)
    for wanted in (True, False, True):
        apply_backends(dataclasses.replace(base, cudnn_benchmark=wanted))
        assert torch.backends.cudnn.benchmark is wanted


def test_evaluation_leaves_the_algorithms_to_cudnns_heuristics_and_restores_the_runs_setting(monkeypatch):
    # A timed choice can differ between the trainer's process and cifar_dist.evaluate's, and so the rounding.
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # the run's --cudnn-benchmark; restored afterwards
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, images):
            seen.append(torch.backends.cudnn.benchmark)
            return torch.zeros(len(images), 3)

    batches = [(torch.zeros(2, 1), torch.tensor([0, 1])), (torch.zeros(1, 1), torch.tensor([2]))]
    metrics, _ = evaluate(Probe(), batches, Accelerator(cpu=True), ["a", "b", "c"])
    assert seen == [False, False] and torch.backends.cudnn.benchmark is True
    assert metrics["val_num_samples"] == 3


@pytest.mark.parametrize("choice, precision, processes, expected", [
    ("auto", "bf16", 2, True), ("auto", "no", 2, False), ("auto", "bf16", 1, False), ("bf16", "no", 4, True),
    ("fp32", "bf16", 2, False),
])
def test_bf16_gradient_all_reduce(choice, precision, processes, expected):
    fast = resolve_fast_path(SpeedConfig(grad_reduce_dtype=choice), torch.device("cpu"), precision, processes)
    assert fast.bf16_grad_reduce is expected


# -- a step that never waits for the device


class HostWaits(TorchDispatchMode):
    """Records the operations that, on a GPU, make the host wait for the device: reading a value back (item,
    tolist, bool), copying to the host, a tensor made from host data (a blocking copy from pageable memory), and
    operations whose output size depends on the data (bincount, nonzero, boolean indexing...). On the CPU
    nothing waits, but the same operations run, so a step that shows none here shows none on a GPU;
    tests/test_gpu.py checks that with torch.cuda.set_sync_debug_mode."""

    WAITING = frozenset({"_local_scalar_dense", "lift_fresh", "lift_fresh_copy", "bincount", "nonzero",
                         "nonzero_static", "masked_select", "unique_dim", "_unique", "_unique2", "unique_consecutive",
                         "histc", "equal", "is_nonzero", "argwhere", "masked_scatter"})

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if (name in self.WAITING or (name == "_to_copy" and str(kwargs.get("device", "")) == "cpu")
                or (name == "repeat_interleave" and kwargs.get("output_size") is None)
                or (name in ("index", "index_put", "index_put_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None))):
            self.found.append(str(func))
        return func(*args, **kwargs)


def test_a_steady_training_step_and_the_evaluation_loop_never_wait_for_the_device():
    # The GPU's fast path (channels_last, fused Adam), eager: the compiled graph is checked on a GPU.
    parts = trainer_parts.build(trainer_parts.synthetic_splits(160, 40), 32, eval_batch_size=16,
                                speed=SpeedConfig(channels_last="yes", fused_adam="yes"))
    parts.model.train()
    batches = [batch for batch, _ in zip(parts.train_loader, range(4))]  # the loader is checked on a GPU
    train_step(parts.model, parts.step_model, *batches[0], parts.optimizer, parts.accelerator)  # creates Adam's state
    with HostWaits() as waits:
        sums = sum(train_step(parts.model, parts.step_model, *batch, parts.optimizer, parts.accelerator)
                   for batch in batches[1:])
    assert waits.found == []
    assert sums[2].item() == 3 * 32 and sums[3].item() == 0  # [loss sum, correct, count, non-finite]

    batches = list(parts.eval_loader)
    assert len(batches) == 3
    with HostWaits() as waits:
        metrics, per_class = evaluate(parts.model, batches, parts.accelerator, parts.class_names)
    assert waits.found == []  # its final .tolist() dispatches nothing on the CPU; on a GPU it is the one wait
    assert metrics["val_num_samples"] == 40
    # The per-class accuracies (counted with index_add_) agree with counting on the host.
    predicted = torch.cat([parts.model(images).argmax(1) for images, _ in batches])
    labels = torch.cat([labels for _, labels in batches])
    for k, (name, accuracy) in enumerate(per_class):
        assert name == parts.class_names[k]
        hits = (predicted[labels == k] == k).double()
        assert accuracy == pytest.approx(hits.mean().item() if len(hits) else 0.0)
    trainer_parts.reset()


def test_the_feature_cache_is_built_in_slices_that_never_wait_for_the_device():
    # 37 images in batches of 16: two whole batches and one of 5 images padded to 16, each written to its rows.
    model = _model()
    images = trainer_parts.synthetic_splits(37, 1).train.images
    accelerator = Accelerator(cpu=True)
    probe = model.trunk(images[:1])
    with torch.no_grad(), HostWaits() as waits:
        cached = _features(model, images, accelerator, 16, probe, torch.device("cpu"))
    assert waits.found == []
    with torch.no_grad():
        expected = torch.cat([model.trunk(images[k:k + 16]) for k in range(0, 37, 16)])
    assert cached.shape == expected.shape and torch.allclose(cached, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("autotune, run_setting, expected", [
    (False, True, False),  # the trainer's build: the trunk's shapes at the eval batch run in this pass only
    (True, True, True),  # the benchmark's cache_build, its autotuned builds
    (True, False, False),  # never against the run's setting (--deterministic, --cudnn-benchmark no)
])
def test_the_feature_cache_is_built_without_cudnn_autotuning_unless_asked(monkeypatch, autotune, run_setting,
                                                                           expected):
    # cuDNN's autotuning times each new input shape: the one-image probe is never timed, the batches only on request.
    model, seen = _model(), []
    trunk = model.trunk

    def recording(images):
        seen.append((len(images), torch.backends.cudnn.benchmark))
        return trunk(images)

    monkeypatch.setattr(model, "trunk", recording)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", run_setting)
    splits = trainer_parts.synthetic_splits(40, 8)
    cached = build_feature_cache(model, splits, Accelerator(cpu=True), 16, "host", autotune=autotune)
    assert seen == [(1, False), *[(16, expected)] * 4]  # 40 = 16 + 16 + 8 padded; 8 padded
    assert torch.backends.cudnn.benchmark == run_setting  # the run's setting is back for training
    assert len(cached["train"]) == 40 and len(cached["test"]) == 8


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_the_feature_cache_is_kept_in_the_weights_layout(channels_last):
    # A convolution computes in channels_last when its input or its weight is: features in the weights' layout
    # are read by layer4 as they are. The batches the loaders serve, and so the graph's input, keep it.
    fast = resolve_fast_path(SpeedConfig(channels_last="yes" if channels_last else "no"), torch.device("cpu"), "no", 1)
    model = _model().to(memory_format=cache_layout(fast))
    splits = trainer_parts.synthetic_splits(20, 4)
    cached = build_feature_cache(model, splits, Accelerator(cpu=True), 8, "host", layout=cache_layout(fast))
    batch, _ = cached["train"].__getitems__([3, 0, 7])
    for features in (cached["train"].features, cached["test"].features, batch):
        assert features.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert features.is_contiguous() == (not channels_last)
    with torch.no_grad():  # batches of 8 against one of 3: float32 rounding apart
        torch.testing.assert_close(batch, model.trunk(splits.train.images[[3, 0, 7]]), rtol=1e-4, atol=1e-4)


def test_cache_for_run_keeps_the_features_in_the_runs_layout(monkeypatch):
    monkeypatch.setattr(feature_cache, "choose_location", lambda *args: "host")  # stands in for device memory
    splits, accelerator = trainer_parts.synthetic_splits(4, 8), Accelerator(cpu=True)
    for choice, expected in (("yes", torch.channels_last), ("no", torch.contiguous_format)):
        speed = SpeedConfig(channels_last=choice, cache_frozen_features="yes")
        fast = dataclasses.replace(resolve_fast_path(speed, torch.device("cpu"), "no", 1), train_cache=True)
        data, fast = cache_for_run(_model("layer4"), splits, accelerator, 4, speed, fast)
        assert fast.features_cached == ("train", "test")
        assert data.train.features.is_contiguous(memory_format=expected)
        assert data.test.features.is_contiguous(memory_format=expected)
    trainer_parts.reset()


SHARDED_FEATURES = """
import sys, torch
from accelerate import Accelerator
from cifar_dist import trainer_parts
from cifar_dist.config import ModelConfig
from cifar_dist.feature_cache import _features
from cifar_dist.model import ResNet50Classifier

torch.manual_seed(0)
model = ResNet50Classifier(ModelConfig(weights="none"), 32).train()
images = trainer_parts.synthetic_splits(37, 1).train.images
accelerator = Accelerator(cpu=True)
with torch.no_grad():
    cached = _features(model, images, accelerator, 8, model.trunk(images[:1]), torch.device("cpu"))
    alone = torch.cat([model.trunk(images[k:k + 8]) for k in range(0, 37, 8)])
torch.save(cached, f"{sys.argv[1]}/rank{accelerator.process_index}.pt")
torch.save(alone, f"{sys.argv[1]}/alone.pt")
"""


@pytest.mark.slow
def test_the_feature_cache_of_an_uneven_split_over_two_processes(test_env, tmp_path):
    # 37 images over 2 processes: shards of 19 and 18 in batches of 8, the last of each padded (with the images
    # after the shard, or repeats of the last image), each process ends with every image's features in order.
    script = tmp_path / "sharded_features.py"
    script.write_text(SHARDED_FEATURES)
    run_train(test_env, [str(tmp_path)], num_processes=2, script=str(script))
    alone = torch.load(tmp_path / "alone.pt")
    for rank in (0, 1):
        assert torch.allclose(torch.load(tmp_path / f"rank{rank}.pt"), alone, rtol=0, atol=1e-5)


def test_host_waits_are_seen():
    # The detector itself: what the step used to do (a host scalar into a device tensor, bincount) is caught.
    x = torch.zeros(4)
    with HostWaits() as waits:
        x.new_tensor(4)
        torch.bincount(torch.zeros(3, dtype=torch.long), minlength=5)
        x.sum().item()
        x[x > 0]
        torch.full_like(x[0], 4)
        torch.zeros(5).index_add_(0, torch.zeros(4, dtype=torch.long), x)
    assert [op.split(".")[1] for op in waits.found] == ["lift_fresh", "bincount", "_local_scalar_dense", "index"]

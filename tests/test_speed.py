"""The fast path and the frozen-feature cache compute what the plain path computes.

Each speed option trains the real trainer for one epoch (8 steps at the recipe's lr) and is compared with the
plain path. The comparisons run with float64 parameters (tests/run_float64.py), where float32's rounding, which
Adam amplifies at this learning rate (see test_multiprocess.py), cannot hide a real difference: any change of
the function shows up far above 1e-9. A float32 run with every option on is compared as well, on its losses
and accuracy, to the tolerance float32 allows.
"""

from pathlib import Path

import pytest
import torch

import conftest
from cifar_dist.config import ModelConfig, SpeedConfig, UserError
from cifar_dist.feature_cache import DEVICE_HEADROOM_BYTES, check_cacheable, choose_location
from cifar_dist.model import ResNet50Classifier
from cifar_dist.speed import resolve_fast_path
from conftest import FLOAT64, TINY, records, run_train

STEPS = [*TINY, "--num-epochs", "1", "--eval-batch-size", "48"]
OPTIONS = {
    "channels_last": ["--channels-last", "yes"],
    "fused_adam": ["--fused-adam", "yes"],
    "compiled": ["--compile-step", "yes"],
    "cache": ["--cache-frozen-features"],
}
GiB = 2**30


def update_difference(a: Path, b: Path, initial: dict) -> float:
    return conftest.update_difference(a, b, initial, prefixes=("layer4.", "fc."))  # layer4 and the head


@pytest.fixture(scope="module")
def float64_runs(test_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("speed64")
    procs = {name: run_train(test_env, [*STEPS, *args, "--output-dir", str(root / name)], script=FLOAT64)
             for name, args in {"plain": [], **OPTIONS}.items()}
    return root, procs


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
    assert "- step: plain eager step; --compile-step, --channels-last, --fused-adam auto: off on cpu" \
        in procs["plain"].stdout
    assert "- step: compiled step (torch.compile reduce-overhead)" in procs["compiled"].stdout
    assert "- step: plain eager step; frozen-stage features cached" in procs["cache"].stdout
    # 256 train + 100 test images, layer3's output at 32 px (1024 x 2 x 2) in float64.
    assert "feature cache: 256 train + 100 test images -> 1024x2x2 float64 per image" in procs["cache"].stdout


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
        "nothing to cache; freeze some stages or drop --cache-frozen-features")


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


@pytest.mark.parametrize("choice, device_free, message", [
    ("device", 10 * GiB, "the feature cache needs 20.0 GiB, more than the 10.0 GiB free on cuda less 6 GiB for "
                         "training; use --feature-cache-location host"),
    ("auto", 10 * GiB, "the feature cache needs 20.0 GiB, more than the 8.0 GiB of host memory available to this "
                       "process; lower --image-size or drop --cache-frozen-features"),
])
def test_cache_that_fits_nowhere_is_refused(choice, device_free, message):
    with pytest.raises(UserError) as info:
        choose_location(choice, 20 * GiB, torch.device("cuda"), device_free, 8 * GiB)
    assert str(info.value) == message
    assert 6 * GiB == DEVICE_HEADROOM_BYTES


def test_fast_path_is_on_for_cuda_and_off_on_cpu_by_default():
    cuda = resolve_fast_path(SpeedConfig(), torch.device("cuda"), "bf16", 1) if torch.cuda.is_available() else None
    if cuda is not None:
        assert cuda.compile_step and cuda.channels_last and cuda.fused_adam
    cpu = resolve_fast_path(SpeedConfig(), torch.device("cpu"), "no", 1)
    assert not (cpu.compile_step or cpu.channels_last or cpu.fused_adam or cpu.bf16_grad_reduce)
    assert cpu.notes == ["--compile-step, --channels-last, --fused-adam auto: off on cpu (on with 'yes')"]
    forced = resolve_fast_path(SpeedConfig(compile_step="yes", channels_last="yes", fused_adam="yes"),
                               torch.device("cpu"), "no", 1)
    assert forced.compile_step and forced.channels_last and forced.fused_adam and not forced.notes


def test_compile_falls_back_on_a_gpu_too_old_for_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    fast = resolve_fast_path(SpeedConfig(), torch.device("cuda"), "fp16", 1)
    assert not fast.compile_step and fast.channels_last and fast.fused_adam
    assert fast.notes == ["--compile-step auto: off, this GPU has compute capability 6.0; torch.compile needs 7.0+"]


@pytest.mark.parametrize("choice, precision, processes, expected", [
    ("auto", "bf16", 2, True), ("auto", "no", 2, False), ("auto", "bf16", 1, False), ("bf16", "no", 4, True),
    ("fp32", "bf16", 2, False),
])
def test_bf16_gradient_all_reduce(choice, precision, processes, expected):
    fast = resolve_fast_path(SpeedConfig(grad_reduce_dtype=choice), torch.device("cpu"), precision, processes)
    assert fast.bf16_grad_reduce is expected

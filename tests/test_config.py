import shutil

import pytest
import torch
import yaml

import conftest
from cifar_dist.cli import build_parser, parse_config
from cifar_dist.config import Config, TrainConfig, UserError, make_config, plan_batches, save_config
from cifar_dist.train import main as train_main


def refused_file(tmp_path, text: str) -> str:
    """The message with which a --config file holding ``text`` is refused, less the "--config PATH: " prefix."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        parse_config(["--config", str(path)])
    prefix = f"--config {path}: "
    assert str(info.value).startswith(prefix)
    return str(info.value).removeprefix(prefix)


def test_defaults_are_the_seed_recipe():
    cfg = parse_config([])
    assert cfg.data.data_source == "uoft-cs/cifar100"
    assert cfg.data.image_size == 224
    assert cfg.model.weights == "IMAGENET1K_V1" and cfg.model.freeze_until == "layer4"
    assert (cfg.model.head_hidden_dim, cfg.model.num_classes) == (1024, 100)
    assert cfg.optim.lr == 1e-3 and cfg.optim.adam_eps == 1e-7  # Keras Adam defaults
    assert (cfg.train.global_batch_size, cfg.train.num_epochs) == (32, 10)
    assert cfg.model.bn_momentum == 0.01  # Keras BatchNormalization momentum 0.99


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("num_epochs: 3\ntrain: {seed: 7}\nlr: 0.01\nimage_size: 64\n")
    cfg = parse_config(["--config", str(path), "--num-epochs", "5", "--lr", "2e-4"])
    assert cfg.train.num_epochs == 5  # flag beats file
    assert cfg.optim.lr == 2e-4
    assert cfg.train.seed == 7  # file beats default (section form)
    assert cfg.data.image_size == 64  # file beats default (flat form)
    assert cfg.train.global_batch_size == 32  # untouched default


def test_yes_and_no_in_yaml_are_the_choices_not_booleans(tmp_path):
    # YAML 1.1 (PyYAML) reads unquoted yes/no/on/off as booleans; for an auto/yes/no setting they mean the words.
    path = tmp_path / "run.yaml"
    path.write_text("speed: {compile_step: yes, channels_last: no, fused_adam: off}\ncache_eval_features: on\n")
    speed = parse_config(["--config", str(path)]).speed
    assert (speed.compile_step, speed.channels_last, speed.fused_adam, speed.cache_eval_features) == \
        ("yes", "no", "no", "yes")
    path.write_text("log_model: yes\n")  # a real boolean setting stays one
    assert parse_config(["--config", str(path)]).tracking.log_model is True
    path.write_text("mixed_precision: no\n")  # no among other words: the word too
    assert parse_config(["--config", str(path)]).train.mixed_precision == "no"


def test_an_unquoted_yes_or_no_where_the_word_is_no_choice_says_to_quote_it(tmp_path):
    assert refused_file(tmp_path, "resume: no\n") == ("resume must be text, got False (YAML reads yes/no/on/off "
                                                      "unquoted as true/false: quote the value)")


@pytest.mark.parametrize("argv, expected", [
    ([], "auto"), (["--cache-frozen-features"], "yes"), (["--no-cache-frozen-features"], "no"),
    (["--cache-frozen-features", "no"], "no"), (["--cache-frozen-features", "--lr", "0.01"], "yes"),
    (["--cache-frozen-features", "--no-cache-frozen-features"], "no"),  # the last one given
])
def test_an_auto_yes_no_flag_also_takes_a_boolean_flags_forms(argv, expected):
    # --cache-frozen-features was a boolean flag: its bare and --no- forms still mean yes and no.
    assert parse_config(argv).speed.cache_frozen_features == expected
    assert parse_config([a.replace("cache-frozen-features", "compile-step") for a in argv]).speed.compile_step == \
        expected


def test_a_boolean_from_an_older_config_file_is_yes_or_no(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("speed: {cache_frozen_features: false}\n")  # as every config.yaml before 'auto' has it
    assert parse_config(["--config", str(path)]).speed.cache_frozen_features == "no"
    path.write_text("speed: {cache_frozen_features: true}\n")
    assert parse_config(["--config", str(path)]).speed.cache_frozen_features == "yes"


def test_written_config_reloads_to_the_same_config(tmp_path):
    cfg = parse_config(["--num-epochs", "2", "--max-steps", "7", "--weights", "none", "--lr", "2e-4",
                        "--compile-step", "yes", "--cache-eval-features", "no"])
    save_config(cfg, tmp_path / "config.yaml")
    assert parse_config(["--config", str(tmp_path / "config.yaml")]) == cfg
    assert set(yaml.safe_load((tmp_path / "config.yaml").read_text())) == {"data", "model", "optim", "train",
                                                                           "tracking", "speed"}


def test_overwrite_and_the_stop_marker_belong_to_one_launch_and_are_never_saved(tmp_path, capsys):
    cfg = parse_config(["--overwrite", "--stop-marker", "/tmp/job-7-stopped", "--num-epochs", "2"])
    assert cfg.train.overwrite and cfg.train.stop_marker  # the flags still work for this start
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "overwrite" not in text and "stop_marker" not in text and "job-7" not in text
    replayed = parse_config(["--config", str(tmp_path / "config.yaml")])
    assert not replayed.train.overwrite and replayed.train.stop_marker is None and replayed.train.num_epochs == 2
    # An older SLURM job's config.yaml still carries its marker: replayed, it is dropped with a note.
    older = tmp_path / "older.yaml"
    older.write_text("train: {stop_marker: /tmp/cifar_dist-stopped-7, num_epochs: 2}\n")
    capsys.readouterr()
    assert parse_config(["--config", str(older)]).train.stop_marker is None
    assert capsys.readouterr().err == (f"cifar_dist: warning: --config {older}: ignoring 'stop_marker' (a job "
                                       "script passes its own on the command line)\n")
    assert parse_config(["--config", str(older), "--stop-marker", "/tmp/m"]).train.stop_marker == "/tmp/m"


@pytest.mark.parametrize("text", ["overwrite: false\n", "train: {overwrite: false, num_epochs: 2}\n"])
def test_overwrite_false_from_older_config_files_is_ignored_with_a_warning(tmp_path, capsys, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert not parse_config(["--config", str(path)]).train.overwrite
    err = capsys.readouterr().err
    assert err == (f"cifar_dist: warning: --config {path}: ignoring 'overwrite: false' (not a setting; pass "
                   f"--overwrite on the command line to start over)\n")


@pytest.mark.parametrize("text", ["overwrite: true\n", "train: {overwrite: true}\n", "overwrite: 1\n"])
def test_overwrite_true_in_a_config_file_is_refused(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        parse_config(["--config", str(path), "--overwrite"])  # even with the flag: the file must not carry it
    assert str(info.value) == (f"--config {path}: overwrite is not read from a config file (replaying the file "
                               f"would delete the run again); remove it and pass --overwrite on the command line")


@pytest.mark.parametrize("text, lr, eps", [
    ("lr: 1e-3\n", 1e-3, 1e-7),  # PyYAML reads 1e-3 (no dot) as the string '1e-3'
    ("optim: {lr: 5E-4, adam_eps: 1e-8}\n", 5e-4, 1e-8),
    ("lr: '2.5e-4'\n", 2.5e-4, 1e-7),
    ("lr: 1\n", 1.0, 1e-7),
])
def test_float_settings_accept_exponent_strings(tmp_path, text, lr, eps):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    cfg = parse_config(["--config", str(path)])
    assert (cfg.optim.lr, cfg.optim.adam_eps) == (lr, eps)
    assert type(cfg.optim.lr) is float


@pytest.mark.parametrize("text, message", [
    ("num_epochs: 1e3\n", "num_epochs must be int, got '1e3'"),  # only float settings take float strings
    ("seed: '7'\n", "seed must be int, got '7'"),
    ("log_model: 'yes'\n", "log_model must be bool, got 'yes'"),
    ("lr: fast\n", "lr must be float, got 'fast'"),
])
def test_strings_are_not_numbers_elsewhere(tmp_path, text, message):
    assert refused_file(tmp_path, text) == message


@pytest.mark.parametrize("argv, text, message", [
    (["--lr", "nan"], None, "--lr must be a finite number, got nan"),
    (["--lr", "inf"], None, "--lr must be a finite number, got inf"),
    (["--adam-eps=-inf"], None, "--adam-eps must be a finite number, got -inf"),
    (["--adam-beta1", "nan"], None, "--adam-beta1 must be a finite number, got nan"),
    (["--adam-beta2", "NaN"], None, "--adam-beta2 must be a finite number, got nan"),
    ([], "lr: .nan\n", "--lr must be a finite number, got nan"),
    ([], "optim: {adam_eps: .inf}\n", "--adam-eps must be a finite number, got inf"),
    ([], "lr: nan\n", "--lr must be a finite number, got nan"),  # a string, read as a float
    ([], "lr: -Infinity\n", "--lr must be a finite number, got -inf"),
])
def test_float_settings_must_be_finite(tmp_path, argv, text, message):
    if text is not None:
        (tmp_path / "run.yaml").write_text(text)
        argv = [*argv, "--config", str(tmp_path / "run.yaml")]
    with pytest.raises(UserError) as info:
        parse_config(argv)
    assert str(info.value) == message


def test_every_float_setting_is_checked_for_finite_values():
    import dataclasses
    import typing

    from cifar_dist.config import _SECTION_TYPES

    floats = [(cls, f.name) for cls in _SECTION_TYPES.values() for f in dataclasses.fields(cls)
              if float in (typing.get_type_hints(cls)[f.name], *typing.get_args(typing.get_type_hints(cls)[f.name]))]
    assert floats  # lr, adam_* today; a new float setting is covered without a change here
    for cls, name in floats:
        with pytest.raises(UserError, match=f"--{name.replace('_', '-')} must be a finite number"):
            cls(**{name: float("nan")})


@pytest.mark.parametrize("text, message", [
    ("lr: 0.1\nnum_epochs: 2\nlr: 0.2\n", "duplicate key 'lr' on line 3 (first on line 1); keep one"),
    ("train:\n  seed: 1\n  seed: 2\n", "duplicate key 'seed' on line 3 (first on line 2); keep one"),
    ("train: {}\ntrain: {}\n", "duplicate key 'train' on line 2 (first on line 1); keep one"),
    # The same setting flat and under its section, either way round: the second silently won.
    ("lr: 0.1\noptim: {lr: 0.2}\n", "lr is given twice, flat and under optim; keep one"),
    ("train: {seed: 1}\nseed: 2\n", "seed is given twice, flat and under train; keep one"),
])
def test_duplicate_yaml_keys_are_refused_with_their_line(tmp_path, text, message):
    assert refused_file(tmp_path, text) == message


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim: {<<: {lr: 0.1, adam_eps: 1.0e-6}, lr: 0.2}\n")
    cfg = parse_config(["--config", str(path)])
    assert (cfg.optim.lr, cfg.optim.adam_eps) == (0.2, 1e-6)


@pytest.mark.parametrize("text, message", [
    ("num_epoch: 3\n", "unknown key 'num_epoch'; did you mean 'num_epochs'?"),
    ("train: {lr: 0.1}\n", "unknown key train.lr: lr belongs under optim"),
    ("optim: {learning_rate: 0.1}\n", "unknown key optim.learning_rate (see --help"),
    ("num_epochs: three\n", "num_epochs must be int, got 'three'"),
    ("lr: [1]\n", "lr must be float"),
    ("log_model: 1\n", "log_model must be bool"),
    ("freeze_until: layer9\n", "--freeze-until 'layer9': expected one of"),
    ("speed: {compile_step: maybe}\n", "--compile-step 'maybe': expected one of auto, yes, no"),
    ("ddp_bucket_mb: 0\n", "--ddp-bucket-mb must be positive, got 0"),
    ("cache_frozen_features: true\nfreeze_until: none\n", "--cache-frozen-features: nothing is frozen"),
    ("cache_eval_features: yes\nfreeze_until: none\n", "--cache-eval-features yes: nothing is frozen"),
    ("cache_eval_features: no\ncache_frozen_features: true\n", "--cache-eval-features no contradicts "
                                                                "--cache-frozen-features"),
    ("cache_eval_features: maybe\n", "--cache-eval-features 'maybe': expected one of auto, yes, no"),
    ("cudnn_benchmark: yes\ndeterministic: true\n", "--cudnn-benchmark yes contradicts --deterministic"),
    ("whole_step_graph: yes\nfused_adam: no\n", "--whole-step-graph yes records fused Adam's step in the graph; "
                                                 "drop --fused-adam no"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("num_epochs: [\n", "not valid YAML (expected the node content, but found '<stream end>' on line 2)"),
])
def test_bad_yaml_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=None) as info:
        parse_config(["--config", str(path)])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        parse_config(["--config", str(tmp_path / "nope.yaml")])


def test_a_folder_given_as_config_file_is_called_a_folder(tmp_path):
    with pytest.raises(UserError) as info:
        parse_config(["--config", str(tmp_path)])
    assert str(info.value) == f"--config {tmp_path} is a folder; give the YAML file of settings"


def test_a_config_file_that_is_not_utf8_is_one_line_naming_it(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("num_epochs: 1\n# résumé\n".encode("latin-1"))
    message = f"--config {path}: must be UTF-8 text (byte 0xe9 on line 2 is not); save it as UTF-8"
    with pytest.raises(UserError) as info:
        parse_config(["--config", str(path)])
    assert str(info.value) == message
    from cifar_dist.runs import load_config  # (imports torch) how evaluate and compare read a run's config.yaml

    with pytest.raises(UserError) as info:
        load_config(path)
    assert str(info.value) == message
    assert conftest.refused(capsys, train_main, ["--config", str(path)]) == f"cifar_dist.train: error: {message}"


@pytest.mark.parametrize("argv, message", [
    (["--num-epochs", "0"], "--num-epochs must be positive, got 0"),
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
    (["--global-batch-size", "0"], "--global-batch-size must be positive"),
    (["--per-device-batch-size", "-4"], "--per-device-batch-size must be positive"),
    (["--image-size", "0"], "--image-size must be positive"),
    (["--adam-beta1", "1.0"], "--adam-beta1 must be in [0, 1)"),
    (["--weights", "IMAGENET1K_V3"], "--weights 'IMAGENET1K_V3' is not one of"),
    (["--bn-momentum", "0"], "--bn-momentum must be in (0, 1], got 0.0"),
    (["--checkpoint-every-minutes", "-1"], "--checkpoint-every-minutes must be >= 0, got -1.0"),
])
def test_bad_values_are_user_errors(argv, message):
    with pytest.raises(UserError) as info:
        parse_config(argv)
    assert message in str(info.value)


@pytest.mark.parametrize("argv, message", [
    (["--num-epoch", "3"], "unrecognized arguments: --num-epoch 3"),  # no abbreviations
    (["--num-epochs", "x"], "argument --num-epochs: invalid int value: 'x'"),
    (["--tracker", "mlflow"], "argument --tracker: invalid choice: 'mlflow'"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
])
def test_unknown_flag_and_wrong_type_exit_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        parse_config(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_help_documents_every_setting():
    text = build_parser().format_help()
    for flag in ("--data-source", "--image-size", "--num-epochs", "--global-batch-size", "--per-device-batch-size",
                 "--lr", "--weights", "--freeze-until", "--seed", "--output-dir", "--max-train-samples",
                 "--max-eval-samples", "--max-steps", "--tracker", "--config", "--mixed-precision"):
        assert flag in text
    # Each default said once: a help that gives its own is not followed by the field's value ("(default: None)").
    words = " ".join(text.split())
    assert "W&B project (default: $WANDB_PROJECT, else cifar_dist) --wandb-entity" in words
    assert "(default: global batch / processes) --eval-batch-size" in words
    assert "Adam learning rate (Keras default) (default: 0.001)" in words
    # A setting without a value says what that means ("all of them"), not "None".
    assert "None" not in text and "first N training images (debugging; default: all of them)" in words


def test_make_config_rejects_unknown_names():
    with pytest.raises(UserError, match="unknown setting 'epochs'"):
        make_config(epochs=3)
    assert isinstance(make_config(), Config)


@pytest.mark.parametrize("processes, per_device, expected", [
    (1, None, (32, 1)), (2, None, (16, 1)), (4, None, (8, 1)), (32, None, (1, 1)),
    (1, 16, (16, 2)), (2, 8, (8, 2)), (2, 4, (4, 4)), (8, 1, (1, 4)),
])
def test_batch_plan_keeps_the_global_batch(processes, per_device, expected):
    plan = plan_batches(TrainConfig(per_device_batch_size=per_device), processes)
    assert (plan.per_device_batch_size, plan.grad_accum_steps) == expected
    assert plan.per_device_batch_size * plan.num_processes * plan.grad_accum_steps == 32


@pytest.mark.parametrize("processes, per_device, message", [
    (3, None, "global batch 32 cannot be split over 3 processes"),
    (64, None, "global batch 32 cannot be split over 64 processes"),
    (2, 32, "--per-device-batch-size 32 is larger than global batch 32 / 2 processes = 16"),
    (1, 12, "global batch 32 is not divisible by 1 processes x per-device batch 12"),
])
def test_impossible_batch_plans_are_refused(processes, per_device, message):
    with pytest.raises(UserError) as info:
        plan_batches(TrainConfig(per_device_batch_size=per_device), processes)
    assert message in str(info.value)


def test_a_checkpoint_from_before_bn_momentum_existed_resumes_only_with_what_it_used(tmp_path):
    """Older checkpoints trained with torch's BatchNorm momentum 0.1 and do not record it."""
    import json

    from cifar_dist.checkpoint import STATE_FILE, check_compatible

    saved = parse_config([]).to_dict()
    del saved["model"]["bn_momentum"]
    (tmp_path / STATE_FILE).write_text(json.dumps({"config": saved}))
    with pytest.raises(UserError, match="was made with --bn-momentum 0.1, this run has 0.01"):
        check_compatible(tmp_path, parse_config([]))
    check_compatible(tmp_path, parse_config(["--bn-momentum", "0.1"]))


def weights_checkpoint(folder, weights: str, sha256: str | None):
    """A checkpoint's state made from ``--weights weights`` whose file hashed to ``sha256`` (None: a checkpoint
    from before the hash was recorded)."""
    import json

    from cifar_dist.checkpoint import STATE_FILE

    folder.mkdir()
    state = {"config": parse_config(["--weights", weights]).to_dict()}
    if sha256 is not None:
        state["weights_sha256"] = sha256
    (folder / STATE_FILE).write_text(json.dumps(state))
    return folder


@pytest.fixture()
def weights_file(tmp_path, monkeypatch):
    """A small state dict as a file, named relative to the working directory."""
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    save_file({"conv1.weight": torch.arange(12.0)}, "w.safetensors")
    return "w.safetensors"


def test_a_weights_file_named_by_another_path_resumes_by_its_content_and_other_content_is_refused(
        tmp_path, weights_file):
    from cifar_dist.checkpoint import check_compatible
    from cifar_dist.model import weights_sha256

    ckpt = weights_checkpoint(tmp_path / "ckpt", weights_file, weights_sha256(weights_file))
    (tmp_path / "shared").mkdir()
    copy = shutil.copy(weights_file, tmp_path / "shared" / "resnet.safetensors")
    for same in (tmp_path / weights_file, copy, "./shared/../w.safetensors"):
        check_compatible(ckpt, parse_config(["--weights", str(same)]))
    other = tmp_path / "other.safetensors"
    other.write_bytes((tmp_path / weights_file).read_bytes()[:-1] + b"!")  # one byte differs
    with pytest.raises(UserError) as info:
        check_compatible(ckpt, parse_config(["--weights", str(other)]))
    assert str(info.value) == (
        f"checkpoint {ckpt} was made with --weights w.safetensors; this run's --weights {other} holds other weights "
        "(not the same file content); resume with the same value or use another --output-dir")
    for gone, why in ((tmp_path / "gone.pt", "No such file or directory"), (tmp_path / "shared", "Is a directory")):
        with pytest.raises(UserError) as info:
            check_compatible(ckpt, parse_config(["--weights", str(gone)]))
        assert str(info.value) == (
            f"checkpoint {ckpt} was made with --weights w.safetensors; this run's --weights {gone} cannot be read to "
            f"compare with it ({why}); resume with the same value or use another --output-dir")
    # A torchvision name is no file to compare: its name differs, as before.
    with pytest.raises(UserError, match="was made with --weights w.safetensors, this run has IMAGENET1K_V1; "):
        check_compatible(ckpt, parse_config([]))


def test_a_weights_file_named_as_before_is_not_read_on_resume(tmp_path, weights_file):
    """A resume takes every weight from its checkpoint: the file it started from may be gone."""
    from cifar_dist.checkpoint import check_compatible
    from cifar_dist.model import weights_sha256

    ckpt = weights_checkpoint(tmp_path / "ckpt", weights_file, weights_sha256(weights_file))
    (tmp_path / weights_file).unlink()
    check_compatible(ckpt, parse_config(["--weights", weights_file]))


def test_a_checkpoint_from_before_weights_hashes_is_held_to_the_files_name(tmp_path, weights_file):
    from cifar_dist.checkpoint import check_compatible

    ckpt = weights_checkpoint(tmp_path / "ckpt", weights_file, None)
    with pytest.raises(UserError, match=f"was made with --weights w.safetensors, this run has {tmp_path}/w.safet"):
        check_compatible(ckpt, parse_config(["--weights", str(tmp_path / weights_file)]))
    check_compatible(ckpt, parse_config(["--weights", weights_file]))


def test_weights_are_hashed_only_when_they_are_a_file(tmp_path, weights_file):
    import hashlib

    from cifar_dist.model import weights_sha256

    assert weights_sha256(weights_file) == hashlib.sha256((tmp_path / weights_file).read_bytes()).hexdigest()
    assert weights_sha256("IMAGENET1K_V1") is None and weights_sha256("none") is None


def test_a_resume_from_or_to_generated_data_names_the_data_source_and_elsewhere_ignores_its_settings(tmp_path):
    """A run on synthetic data resumed on a folder was refused as made with another --synthetic-train-samples."""
    import json

    from cifar_dist.checkpoint import STATE_FILE, check_compatible

    def made_with(*flags):
        (tmp_path / STATE_FILE).write_text(json.dumps({"config": parse_config(list(flags)).to_dict(),
                                                       "data_fingerprint": "abc"}))

    made_with("--data-source", "synthetic", "--synthetic-train-samples", "128")
    folder = ["--data-source", "/data/cifar"]
    for flags in (folder, [*folder, "--synthetic-train-samples", "128"]):
        with pytest.raises(UserError, match="was made with --data-source synthetic, this run has /data/cifar; "):
            check_compatible(tmp_path, parse_config(flags))
    with pytest.raises(UserError, match="was made with --synthetic-train-samples 128, this run has 5000"):
        check_compatible(tmp_path, parse_config(["--data-source", "synthetic"]))
    made_with("--data-source", "/data/cifar")
    with pytest.raises(UserError, match="was made with --data-source /data/cifar, this run has synthetic"):
        check_compatible(tmp_path, parse_config(["--data-source", "synthetic"]))
    # A setting of generated data does not change what a run on a folder computes; the folder's content is
    # compared once loaded (check_same_data).
    check_compatible(tmp_path, parse_config(["--data-source", "/moved/cifar", "--synthetic-train-samples", "64"]))


def test_the_settings_a_resume_must_keep_are_marked_on_the_fields():
    from cifar_dist.config import meaning_keys

    assert set(meaning_keys()) == {
        "data_source", "image_size", "max_train_samples", "synthetic_train_samples", "weights", "freeze_until",
        "num_classes", "head_hidden_dim", "bn_momentum", "lr", "adam_beta1", "adam_beta2", "adam_eps",
        "global_batch_size", "seed"}


def test_help_and_flag_errors_answer_before_torch_is_imported():
    """The CLI parses before it imports the training stack: --help and a typo answer at once."""
    import subprocess
    import sys

    code = ("import sys\nfrom cifar_dist.train import main\nfor argv in (['--help'], ['--num-epoch', '3']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'accelerate', 'datasets', 'wandb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: cifar_dist.train" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_ctrl_c_while_the_flags_are_parsed_is_one_line(monkeypatch, capsys):
    """A Ctrl-C in the first moments (parsing; on a busy machine that can take a second) is the same one line and
    exit code as one during the imports, not a traceback and death by SIGINT."""
    from cifar_dist import train

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "parse_config", interrupted)
    with pytest.raises(SystemExit) as info:
        train.main(["--num-epochs", "1"])
    assert info.value.code == train.EXIT_INTERRUPTED
    assert capsys.readouterr().err.startswith("cifar_dist.train: interrupted; nothing was saved")


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "cpu_2proc"])
def test_the_shipped_accelerate_configs_load_and_leave_the_recipe_to_the_flags(name):
    """accelerate reads each file; its process count makes the global batch of 32, and it sets no precision,
    so that --mixed-precision auto keeps a V100 or T4 in fp32 rather than emulating bf16."""
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).parents[1] / "accelerate_configs" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert 32 % config.num_processes == 0
    assert str(config.mixed_precision) == "no"

import urllib.error

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torchvision.models import resnet50

from cifar_dist.config import ModelConfig, UserError
from cifar_dist.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    ResNet50Classifier,
    build_model,
    count_parameters,
    frozen_stages,
)


def tiny_model(**kw) -> ResNet50Classifier:
    return ResNet50Classifier(ModelConfig(weights="none", **kw), image_size=32)


def test_parameter_counts_match_the_seed_model():
    # Keras reports 25,788,388 because its convolutions carry biases; torchvision's are bias-free.
    counts = count_parameters(tiny_model())
    assert counts == {"total": 25_708_708, "trainable": 17_165_412, "frozen": 8_543_296, "bn_running_stats": 53_120}


@pytest.mark.parametrize("freeze_until, trainable_prefixes", [
    ("layer4", ("layer4.", "fc.")),
    ("fc", ("fc.",)),
    ("layer2", ("layer2.", "layer3.", "layer4.", "fc.")),
    ("none", ("",)),
])
def test_freeze_policy(freeze_until, trainable_prefixes):
    model = tiny_model(freeze_until=freeze_until)
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith(trainable_prefixes), name


def test_frozen_stages_names():
    assert frozen_stages("layer4") == ("conv1", "layer1", "layer2", "layer3")
    assert frozen_stages("none") == ()
    with pytest.raises(UserError, match="--freeze-until 'layer5': expected one of none, layer1"):
        ModelConfig(freeze_until="layer5")  # checked once, by the config; YAML values included


def test_frozen_batchnorm_stays_in_eval_mode_under_train():
    model = tiny_model().train()
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.training == name.startswith("layer4"), name
    assert model.fc.training


def test_training_steps_leave_frozen_weights_and_bn_stats_untouched():
    torch.manual_seed(0)
    model = tiny_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
        loss = F.cross_entropy(model(images), torch.randint(0, 100, (8,)))
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        trainable_part = key.startswith(("layer4.", "fc."))
        if key.endswith("num_batches_tracked"):
            continue
        assert changed == trainable_part, key  # layer4 BN running stats move too: that BN is trained


@pytest.mark.parametrize("momentum", [0.01, 0.1])
def test_trainable_batchnorm_keeps_running_stats_with_the_keras_momentum(momentum):
    """Keras's BatchNormalization(momentum=0.99) keeps 99% of the old statistic per step: torch's 0.01."""
    model = tiny_model(bn_momentum=momentum).train()
    bn = model.layer4[2].bn3
    before = bn.running_mean.clone()
    seen = {}
    bn.register_forward_pre_hook(lambda m, inputs: seen.update(mean=inputs[0].mean((0, 2, 3))))
    with torch.no_grad():
        model(torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8))
    torch.testing.assert_close(bn.running_mean, (1 - momentum) * before + momentum * seen["mean"])


def test_preprocess_matches_reference_resize_and_normalise():
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    out = Preprocess(224)(images)
    x = images.permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    ref = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert out.shape == (2, 3, 224, 224)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_imagenet_weights_load_from_torch_home(torch_home):
    model = build_model(ModelConfig(weights="IMAGENET1K_V1"), image_size=32)
    planted = torch.load(torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth", weights_only=True)
    assert torch.equal(model.layer3[0].conv1.weight, planted["layer3.0.conv1.weight"])
    assert torch.equal(model.bn1.running_var, planted["bn1.running_var"])
    assert model.fc[2].out_features == 100  # the planted 1000-way fc is not taken


def test_missing_imagenet_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    # The download fails as it does without network (also where the network is up: nothing is fetched), and the
    # error names the file and the folder it is read from.
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(f"<urlopen error [Errno -3] Temporary failure in name resolution> ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as info:
        build_model(ModelConfig(weights="IMAGENET1K_V2"), image_size=32)
    assert "resnet50-11ad3fa6.pth" in str(info.value) and str(tmp_path / "empty") in str(info.value)


def test_local_state_dict_files(tmp_path):
    reference = resnet50().state_dict()
    save_file({k: v.contiguous() for k, v in reference.items()}, str(tmp_path / "w.safetensors"))
    torch.save(reference, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        model = build_model(ModelConfig(weights=str(tmp_path / name)), image_size=32)
        assert torch.equal(model.layer4[2].conv3.weight, reference["layer4.2.conv3.weight"])


def test_own_model_file_reloads_with_its_head(tmp_path):
    trained = tiny_model()
    nn.init.normal_(trained.fc[2].weight)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "model.safetensors"))
    model = build_model(ModelConfig(weights=str(tmp_path / "model.safetensors")), image_size=32)
    assert torch.equal(model.fc[2].weight, trained.fc[2].weight)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b"\x80\x02garbage"), "not a readable state dict"),
    (lambda p: torch.save({"conv1.weight": torch.zeros(1)}, p), "not a ResNet50 state dict"),
    (lambda p: torch.save({**resnet50().state_dict(), "conv1.weight": torch.zeros(3)}, p), "shape mismatch"),
    (lambda p: torch.save({"model": resnet50().state_dict()}, p), "expected a state dict of tensors"),
])
def test_bad_weights_files(tmp_path, make, message):
    path = tmp_path / "weights.pth"
    make(path)
    with pytest.raises(UserError) as info:
        build_model(ModelConfig(weights=str(path)), image_size=32)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_weights_files_are_loaded_without_running_pickled_code(tmp_path):
    import pickle

    class Exploit:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": Exploit()}))
    with pytest.raises(UserError, match="not a readable state dict"):
        build_model(ModelConfig(weights=str(path)), image_size=32)
    assert not (tmp_path / "pwned").exists()

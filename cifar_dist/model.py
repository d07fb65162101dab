"""The seed's network: ImageNet ResNet50 -> global average pool -> Dense 1024 ReLU -> Dense 100.

The model takes the raw uint8 32x32 batches the data pipeline ships and does the resize to ``image_size`` and
the ImageNet normalisation itself, so that work runs on the accelerator inside the training step, and a saved
model needs no separate preprocessing recipe. Parameter names are torchvision's (``layer4.0.conv1.weight``,
head under ``fc``), so torchvision state dicts load directly.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet50_Weights
from torchvision.models.resnet import Bottleneck, ResNet

from cifar_dist.config import STAGES, WEIGHTS_CHOICES, ModelConfig, UserError

# torchvision's ImageNet weights were all trained with these statistics (weights.transforms()).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Parameters of each stage, in forward order; "conv1" is the stem (conv1 + bn1).
_STAGE_MODULES = {"conv1": ("conv1", "bn1"), "layer1": ("layer1",), "layer2": ("layer2",),
                  "layer3": ("layer3",), "layer4": ("layer4",), "fc": ("fc",)}


class Preprocess(nn.Module):
    """uint8 NHWC batch -> float NCHW at ``image_size``, normalised with the backbone's statistics."""

    def __init__(self, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.image_size = image_size
        # Folds /255 into the affine normalisation; non-persistent so saved weights stay torchvision-shaped.
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Normalising commutes with bilinear resizing (both linear), so do it at 32x32 where it is 49x cheaper.
        x = images.permute(0, 3, 1, 2).float() * self.scale - self.shift
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            # Half-pixel centres without antialiasing: what tf.image.resize(..., "bilinear") does when upsampling.
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x


class ResNet50Classifier(ResNet):
    """torchvision ResNet50 with the seed's head; stages before ``freeze_until`` are frozen, BN included."""

    def __init__(self, cfg: ModelConfig, image_size: int):
        super().__init__(Bottleneck, [3, 4, 6, 3])
        self.preprocess = Preprocess(image_size)
        self.fc = nn.Sequential(
            nn.Linear(2048, cfg.head_hidden_dim), nn.ReLU(inplace=True), nn.Linear(cfg.head_hidden_dim, cfg.num_classes)
        )
        for layer in (self.fc[0], self.fc[2]):  # Keras Dense defaults: glorot-uniform kernel, zero bias
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = cfg.bn_momentum  # only trainable stages update running stats; frozen ones are eval
        self.frozen_stages = frozen_stages(cfg.freeze_until)
        for module in self._frozen_modules():
            module.requires_grad_(False)

    def frozen_module_names(self) -> list[str]:
        """Names of the top-level modules of the frozen stages ('conv1', 'bn1', 'layer1', ...)."""
        return [name for stage in self.frozen_stages for name in _STAGE_MODULES[stage]]

    def _frozen_modules(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.frozen_module_names()]

    def train(self, mode: bool = True):
        # Keras runs non-trainable BatchNorm in inference mode; PyTorch's train() would switch it back to batch
        # statistics and keep updating running stats. Frozen stages stay in eval mode.
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessing and the frozen stages: with no augmentation and frozen BN in eval mode, a fixed
        function of each image, which ``--cache-frozen-features`` computes once."""
        x = self.preprocess(images)
        for stage in self.frozen_stages:
            x = self._stage(stage, x)
        return x

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """The trainable stages, from the trunk's output to the logits."""
        for stage in STAGES[len(self.frozen_stages):]:
            features = self._stage(stage, features)
        return features

    def _stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name == "conv1":
            return self.maxpool(self.relu(self.bn1(self.conv1(x))))
        if name == "fc":
            return self.fc(torch.flatten(self.avgpool(x), 1))
        return getattr(self, name)(x)

    def forward(self, images: torch.Tensor | None = None, *, features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for uint8 NHWC ``images``, or for ``features`` already computed by ``trunk``."""
        return self.head(self.trunk(images) if features is None else features)


def frozen_stages(freeze_until: str) -> tuple[str, ...]:
    """Names of the stages before ``freeze_until`` ('none': no stage is frozen)."""
    if freeze_until == "none":
        return ()
    return STAGES[: STAGES.index(freeze_until)]


def build_model(cfg: ModelConfig, image_size: int, saved: dict[str, torch.Tensor] | None = None
                ) -> ResNet50Classifier:
    """The classifier with its backbone weights loaded (head freshly initialised unless the file has one), or
    with every weight from ``saved``, a checkpoint's state dict: a resumed run needs neither the --weights file
    nor the network."""
    model = ResNet50Classifier(cfg, image_size)
    if saved is not None:
        model.load_state_dict(saved)
    elif (state := load_weights(cfg.weights)) is not None:
        _load_backbone(model, state, cfg.weights)
    return model


def load_weights(weights: str) -> dict[str, torch.Tensor] | None:
    """A state dict for ``weights`` (a torchvision weights name, 'none', or a file), never unpickling code."""
    if weights == "none":
        return None
    if weights in ResNet50_Weights.__members__:
        enum = ResNet50_Weights[weights]
        cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
        try:
            # torchvision's own mechanism: a file already in $TORCH_HOME/hub/checkpoints is used without network.
            return enum.get_state_dict(progress=False, check_hash=True, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - download and unpickling errors have many types
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"could not load ResNet50 weights {weights} ({reason}); on a machine without internet put "
                f"{os.path.basename(enum.url)} in {cache.parent} or pass --weights PATH"
            ) from None
    return _load_file(Path(weights))


def weights_sha256(weights: str) -> str | None:
    """The sha256 of a --weights file's bytes, or None for a torchvision weights name or 'none'. Checkpoints
    record it so that a resume tells the same file named by another path (absolute after relative, moved, copied
    to a shared folder) from other weights. For ResNet50's 98 MB file, in the page cache: 0.11 s on a 2-core CPU
    with SHA instructions, 0.35 to 0.41 s without them."""
    if weights in WEIGHTS_CHOICES:
        return None
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file (expected {', '.join(ResNet50_Weights.__members__)}, "
                        "none, or a path to a ResNet50 state dict)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt files raise anything from pickle, zip or safetensors
        raise UserError(f"--weights {path}: not a readable state dict ({type(exc).__name__}); "
                        "is the file complete?") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights {path}: expected a state dict of tensors")
    return state


def _load_backbone(model: ResNet50Classifier, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    # ImageNet files carry a 1000-way fc; our head's keys differ (fc.0.*, fc.2.*), so it is simply not taken.
    state = {k: v for k, v in state.items() if k not in ("fc.weight", "fc.bias")}
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and not k.startswith("fc."))
    if unexpected or missing:
        example = (unexpected or missing)[0]
        raise UserError(f"--weights {source}: not a ResNet50 state dict ({len(missing)} missing and "
                        f"{len(unexpected)} unexpected keys, e.g. {example!r})")
    wrong = [k for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise UserError(f"--weights {source}: shape mismatch for {wrong[0]} "
                        f"({tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)})")
    model.load_state_dict(state, strict=False)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total / trainable / frozen parameters and BatchNorm running-statistic values."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bn_stats = sum(m.running_mean.numel() + m.running_var.numel()
                   for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    return {"total": total, "trainable": trainable, "frozen": total - trainable, "bn_running_stats": bn_stats}


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose batch statistics cover the whole global batch across processes.

    torch.nn.SyncBatchNorm only runs on GPUs; this does the same maths on any device and backend (gloo
    included). Like torch's, each process computes its own mean and sum of squared deviations, one
    differentiable all-gather shares them, and they are combined with Chan's parallel formula: no
    E[x^2] - E[x]^2 cancellation, which in fp32 visibly changes results for channels whose mean is large
    against their spread.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        import torch.distributed._functional_collectives as funcol

        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in fp32 at least
        local_mean = xf.mean((0, 2, 3))
        local_m2 = (xf - local_mean.view(1, -1, 1, 1)).square().sum((0, 2, 3))
        count = torch.full((1,), x.numel() / x.shape[1], device=x.device, dtype=xf.dtype)
        local = torch.cat([count, local_mean, local_m2]).view(1, -1)
        stats = funcol.all_gather_tensor_autograd(local, gather_dim=0, group=dist.group.WORLD)
        counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + x.shape[1]], stats[:, 1 + x.shape[1] :]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var = (m2s.sum(0) + (counts * (means - mean).square()).sum(0)) / n
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        y = (xf - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + self.eps)
        return (y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)).to(x.dtype)


def convert_sync_batchnorm(model: ResNet50Classifier) -> ResNet50Classifier:
    """Swap the trainable stages' BatchNorm for SyncBatchNorm2d (frozen BN runs in eval mode: nothing to sync)."""
    frozen = {id(m) for module in model._frozen_modules() for m in module.modules()}

    def swap(parent: nn.Module):
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d) and id(child) not in frozen:
                sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats).to(child.weight.device, child.weight.dtype)
                sync.load_state_dict(child.state_dict())
                sync.requires_grad_(child.weight.requires_grad)
                sync.train(child.training)
                setattr(parent, name, sync)
            else:
                swap(child)

    swap(model)
    return model

"""Models: a registry and one factory, ``create_model(name, num_classes=..., in_channels=...)``."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import L2BError
from .registry import MODELS

__all__ = ["create_model", "register_model", "list_models"]

try:
    import torchvision

    has_torchvision = True
except ImportError:
    has_torchvision = False


def register_model(name: str):
    """Decorator: make a model builder ``fn(num_classes, in_channels, **kw)`` available by name."""
    return MODELS.register(name)


def list_models() -> list[str]:
    return MODELS.names()


def create_model(name: str, *, num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a registered model; ``None`` keyword values are dropped so unset flags keep defaults.

    Examples
    --------
    >>> create_model("small-cnn", num_classes=10, in_channels=1)  # doctest: +ELLIPSIS
    SmallCNN(...)
    """
    builder = MODELS.get(name)
    if num_classes < 2:
        raise L2BError(f"a classifier needs at least 2 classes, got num_classes={num_classes}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    accepted = inspect.signature(builder).parameters
    for k in kwargs:
        if k not in accepted:
            raise L2BError(f"model {name!r} has no option {k!r}")
    return builder(num_classes=num_classes, in_channels=in_channels, **kwargs)


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Four 3x3 conv + BatchNorm blocks, two 2x2 poolings, global average pooling, a linear head.

    Sized for CPU runs: ``width=16`` costs about 5 MFLOP per 28x28 image forward. Any input size >= 4.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(in_channels, w),
            _conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            _conv_bn(2 * w, 4 * w),
            nn.MaxPool2d(2),
            _conv_bn(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.head(self.features(x))  # (B, K)


@register_model("small-cnn")
def small_cnn(num_classes: int, in_channels: int = 3, width: int = 16) -> nn.Module:
    return SmallCNN(num_classes, in_channels, width)


class MLP(nn.Module):
    """A two-hidden-layer perceptron for feature vectors (N, D) (images are flattened)."""

    def __init__(self, num_classes: int, in_features: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.LazyLinear(hidden) if in_features <= 0 else nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.net(x)


@register_model("mlp")
def mlp(num_classes: int, in_channels: int = 1, in_features: int = 0, hidden: int = 256) -> nn.Module:
    """``in_features`` = D of the flattened input (0: inferred on the first forward)."""
    return MLP(num_classes, in_features, hidden)


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016, "Identity mappings in deep residual networks")."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)
        self.relu = nn.ReLU()  # a module, not F.relu: l2b.fastnorm gives modules a lean tangent rule

    def forward(self, x):
        out = self.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    """CIFAR-style PreActResNet-18 (3x3 stem, no max-pool), the paper's CIFAR model."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        layers, c_in = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            for j in range(2):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(PreActBlock(c_in, c_out, stride))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU()
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x):
        out = self.layers(self.stem(x))
        out = F.adaptive_avg_pool2d(self.relu(self.bn(out)), 1).flatten(1)
        return self.head(out)  # (B, K)


@register_model("preact-resnet18")
def preact_resnet18(num_classes: int, in_channels: int = 3, width: int = 64) -> nn.Module:
    return PreActResNet18(num_classes, in_channels, width)


# ---------------------------------------------------------------- torchvision ResNets (optional)

def _hub_weights(weights_enum) -> Path:
    """The ImageNet checkpoint in the local torch hub cache; never downloads."""
    url = weights_enum.IMAGENET1K_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        raise L2BError(f"ImageNet weights not found at {path}; put {url.rsplit('/', 1)[-1]} there "
                       "(torch hub cache) or train without --pretrained")
    return path


def _torchvision_resnet(arch: str, num_classes: int, in_channels: int, pretrained: bool) -> nn.Module:
    """A torchvision ResNet with its first convolution adapted to ``in_channels`` and a new K-way head.

    With ``pretrained``, ImageNet weights come from the local torch hub cache; a grey (1-channel) stem
    takes the sum of the RGB filters, other channel counts their mean repeated.
    """
    if not has_torchvision:
        raise L2BError(f"model {arch!r} needs torchvision, which is not installed: pip install torchvision")
    builder = getattr(torchvision.models, arch)
    net = builder(weights=None)
    if pretrained:
        enum = {"resnet18": torchvision.models.ResNet18_Weights, "resnet50": torchvision.models.ResNet50_Weights}[arch]
        net.load_state_dict(torch.load(_hub_weights(enum), map_location="cpu", weights_only=True))
    if in_channels != 3:
        old = net.conv1
        net.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        if pretrained:
            with torch.no_grad():
                w = old.weight.sum(1, keepdim=True) if in_channels == 1 else old.weight.mean(1, keepdim=True).repeat(
                    1, in_channels, 1, 1)
                net.conv1.weight.copy_(w)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int = 3, pretrained: bool = False) -> nn.Module:
    """torchvision ResNet-18 (the paper's Clothing1M model, with ImageNet weights); needs torchvision."""
    return _torchvision_resnet("resnet18", num_classes, in_channels, pretrained)


@register_model("resnet50")
def resnet50(num_classes: int, in_channels: int = 3, pretrained: bool = False) -> nn.Module:
    """torchvision ResNet-50 (the paper's ISIC2019 model, with ImageNet weights); needs torchvision."""
    return _torchvision_resnet("resnet50", num_classes, in_channels, pretrained)


@torch.no_grad()
def predict_logits(model: nn.Module, images, batch_size: int) -> torch.Tensor:
    """Logits (N, K) of every image, in float32 and eval mode; restores the mode after.

    ``images`` is anything with ``len()``, ``.device`` and ``.batch(idx)`` returning the normalised
    float batch (``l2b.data.arrays.DeviceImages``, ``StreamingImages``).
    """
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(images)), device=images.device)
        out.append(model(images.batch(idx)).float())
    model.train(was_training)
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


def predict_probs(model: nn.Module, images, batch_size: int) -> torch.Tensor:
    """Softmax probabilities (N, K) of every image (:func:`predict_logits`, then a softmax per row)."""
    logits = predict_logits(model, images, batch_size)
    return torch.softmax(logits, 1) if len(logits) else logits

"""Classifier architectures shared by methods (surrogates, authorized networks) and evaluation.

All take (B, 3, H, W) float images in [0, 1], normalise them internally, and work from 32×32
upwards. ResNet-18 and MobileNetV2 come from torchvision; on small images their stems are
adapted (no early downsampling beyond what the resolution affords) so they stay fast on a CPU.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class Normalized(nn.Module):
    """Wraps a network so it takes [0, 1] images and normalises them itself."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(num_classes: int, width: int = 32) -> nn.Module:
    """Four conv-BN-ReLU layers, two max-pools, global average pooling, a linear head."""
    w = width
    return nn.Sequential(
        *_conv_bn(3, w), *_conv_bn(w, w), nn.MaxPool2d(2),
        *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
        *_conv_bn(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes),
    )


def resnet18(num_classes: int) -> nn.Module:
    """torchvision ResNet-18 with the stock stem (7×7 stride 2 + max-pool).

    On 32×32 this trains an order of magnitude faster on a CPU than with the CIFAR stem
    (:func:`resnet18_cifar`; speeds in docs/eval.md).
    """
    from torchvision.models import resnet18 as tv_resnet18

    return tv_resnet18(num_classes=num_classes)


def resnet18_cifar(num_classes: int) -> nn.Module:
    """ResNet-18 with the CIFAR stem (3×3 stride 1, no max-pool), as in the papers; slow on CPU."""
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def mobilenet_v2(num_classes: int) -> nn.Module:
    """torchvision MobileNetV2 (width 0.5) with a stride-1 first convolution for small images."""
    from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

    net = tv_mobilenet_v2(num_classes=num_classes, width_mult=0.5)
    first = net.features[0][0]
    net.features[0][0] = nn.Conv2d(3, first.out_channels, 3, stride=1, padding=1, bias=False)
    return net


def mlp(num_classes: int, hidden: int = 512) -> nn.Module:
    """A three-layer perceptron on the flattened image, adaptively average-pooled to 32×32
    (larger images are averaged down, smaller ones repeated up).

    No convolution and no weight sharing across positions: the inductive bias furthest from a
    CNN's."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(32), nn.Flatten(),
        nn.Linear(3 * 32 * 32, hidden), nn.LayerNorm(hidden), nn.GELU(),
        nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(),
        nn.Linear(hidden, num_classes),
    )


class _Block(nn.Module):
    """A pre-norm transformer encoder block (multi-head self-attention, then a GELU MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A small vision transformer: ``patch``×``patch`` patches of the image resized
    (antialiased) to ``side``×``side``, learned position embeddings, ``depth`` pre-norm blocks, a mean-pooled
    token head (no class token)."""

    def __init__(self, num_classes: int, dim: int = 128, depth: int = 4, heads: int = 4, patch: int = 4,
                 side: int = 32):
        super().__init__()
        self.side = side
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (side // patch) ** 2, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*(_Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.side or x.shape[-2] != self.side:
            x = nn.functional.interpolate(x, size=(self.side, self.side), mode="bilinear", align_corners=False,
                                          antialias=True)
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(tokens)).mean(1))


def vit_tiny(num_classes: int) -> nn.Module:
    """:class:`TinyViT` with its defaults (dim 128, depth 4, 4 heads, 4×4 patches)."""
    return TinyViT(num_classes)


class _Basic(nn.Module):
    """A pre-activation-free basic residual block (two 3×3 conv-BN, identity or 1×1 shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


def resnet_cifar(num_classes: int, width: int = 16, blocks: int = 2) -> nn.Module:
    """A CIFAR-style residual network (He et al. 2016, §4.2): 3×3 stem at full resolution,
    three stages of ``blocks`` basic blocks (widths w, 2w, 4w; strides 1, 2, 2), global pooling.
    With the defaults it is ResNet-14 at width 16: the CIFAR stem without ResNet-18's CPU cost."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for b in range(blocks):
            layers.append(_Basic(cin, cout, 2 if stage > 0 and b == 0 else 1))
            cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def vgg11(num_classes: int) -> nn.Module:
    """A narrow VGG-11-style network (batch norm, 5 pooling stages → global pooling)."""
    cfg = [32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256]
    layers: list[nn.Module] = []
    cin = 3
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += _conv_bn(cin, int(item))
            cin = int(item)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "mlp": mlp,
    "vit_tiny": vit_tiny,
    "small_cnn": small_cnn,
    "resnet_cifar": resnet_cifar,
    "resnet18": resnet18,
    "resnet18_cifar": resnet18_cifar,
    "mobilenet_v2": mobilenet_v2,
    "vgg11": vgg11,
}


#: The least image side an architecture takes (VGG-11's four poolings need 16 pixels).
MIN_SIDE: dict[str, int] = {"vgg11": 16}


def build_classifier(name: str, num_classes: int, seed: int | None = None) -> nn.Module:
    """Build architecture ``name`` (normalising [0, 1] inputs); ``seed`` fixes its initial weights."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    if seed is None:
        return Normalized(ARCHITECTURES[name](num_classes))
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return Normalized(ARCHITECTURES[name](num_classes))
    finally:
        torch.random.set_rng_state(state)


def set_frozen(model: nn.Module | Iterable[nn.Parameter], frozen: bool) -> None:
    """Switch gradients of every parameter of ``model`` (a module or parameters) off (``frozen``) or on."""
    for p in model.parameters() if isinstance(model, nn.Module) else model:
        p.requires_grad_(not frozen)

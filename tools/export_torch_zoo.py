"""Export a zoo of small PyTorch ReLU networks to ONNX with both torch exporters.

What it writes (default ``--out tests/data/torch_zoo``):

* ``<arch>__dynamo.onnx`` -- ``torch.onnx.export(..., dynamo=True)`` (torch's default exporter
  since 2.9) and ``<arch>__legacy.onnx`` -- ``dynamo=False`` (TorchScript exporter), each at
  the exporter's default opset; a few architectures also as ``<arch>__<exporter>_opset13.onnx``
  and ``..._opset17.onnx``. Networks that neurodeploy must refuse go to ``refused/``.
* ``fixtures.npz`` -- for every written file stem ``S``: ``S.x`` (8 inputs, float32, exactly as
  fed to torch) and ``S.logits`` (torch's float32 logits on them, shape (8, 10)).
* ``manifest.json`` -- one entry per written file (architecture, exporter, opset, shapes, input
  range, supported or refused, what torch pattern it exercises, ONNX op types, onnxruntime's
  error against torch) and one entry per failed export (the exporter's message).

Every network is a ReLU network ending in a Linear layer (logits), in eval mode, float32,
exported with batch size 2 (so the dynamo exporter writes a literal 2 into its Reshapes; that
is one of the patterns the importer must handle). Weights are self-contained in each file
(``external_data=False``; the dynamo exporter's default would write a ``.onnx.data`` beside it).

Data: scikit-learn's 8x8 digits (pixel values 0..16), split as ``neurodeploy.datasets.digits``
does (stratified, 30 % test, ``random_state=0``). Every network is trained briefly (Adam, a few
epochs, CPU, seeded, single thread) on the train split; CIFAR- and ImageNet-layout networks see
the digits upsampled by nearest-neighbour repetition and tiled to 3 channels (values still
0..16). Fixture inputs are 8 test-split digits chosen with a fixed seed, in the same layout.

Every file the manifest calls supported is run in onnxruntime (when importable) and must
reproduce torch's logits to 1e-5 relative (max abs difference / max abs logit); the tool exits
with status 1 otherwise.

``--full-resnet18 DIR`` additionally writes a ResNet-18 in the standard torchvision layout and
widths at 3x224x224 (random weights, BatchNorm with non-trivial running statistics, eval mode)
with both exporters into DIR (about 45 MB each, so it is not committed), with its own
``manifest.json`` and ``fixtures.npz`` (2 inputs). ``--skip-zoo`` writes only that.

Torch lives in its own venv, outside the repository (see ``tools/requirements-torch.txt``; the
project's own venv has no torch). From the repository root::

    /root/.pyenv/versions/3.11.7/bin/python3.11 -m venv /work/torchvenv
    /work/torchvenv/bin/pip install -r tools/requirements-torch.txt
    /work/torchvenv/bin/python tools/export_torch_zoo.py [--out DIR]
        [--full-resnet18 DIR [--skip-zoo]]

A full run takes a few minutes on two cores; re-running rewrites the whole output directory's
ONNX files, ``fixtures.npz`` and ``manifest.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

SEED = 0
EXPORT_BATCH = 2  # batch size of the example input at export time
FIXTURE_SAMPLES = 8
DIGITS_RANGE = (0.0, 16.0)  # pixel values of scikit-learn's digits
ORT_RELATIVE_TOLERANCE = 1e-5
EXTRA_OPSETS = (13, 17)
CLASSES = 10


# ----------------------------------------------------------------------------- data


def digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits split of ``neurodeploy.datasets.digits``: x (N, 1, 8, 8) float32 in [0, 16]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    # reshape, not [:, None]: numpy gives a size-1 axis an odd stride, which torch reads as
    # channels-last, and then conv outputs are channels-last and x.view(N, -1) fails in training
    x = data.images.astype(np.float32).reshape(-1, 1, 8, 8)
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    return {"train": (x_tr, y_tr), "test": (x_te, y_te)}


def _upsampled(x: np.ndarray, factor: int) -> np.ndarray:
    """(N, 1, 8, 8) -> (N, 3, 8*factor, 8*factor): nearest-neighbour repeat, 3 equal channels."""
    big = np.repeat(np.repeat(x, factor, axis=2), factor, axis=3)
    return np.ascontiguousarray(np.repeat(big, 3, axis=1))


# layout name -> (per-sample shape, transform from (N, 1, 8, 8) digits, description)
LAYOUTS: dict[str, tuple[tuple[int, ...], Callable[[np.ndarray], np.ndarray], str]] = {
    "flat64": ((64,), lambda x: x.reshape(len(x), 64), "digits flattened row-major to 64"),
    "1x8x8": ((1, 8, 8), lambda x: x, "digits as (1, 8, 8)"),
    "3x32x32": (
        (3, 32, 32),
        lambda x: _upsampled(x, 4),
        "digits, each pixel repeated 4x4 (nearest), tiled to 3 equal channels",
    ),
    "3x64x64": (
        (3, 64, 64),
        lambda x: _upsampled(x, 8),
        "digits, each pixel repeated 8x8 (nearest), tiled to 3 equal channels",
    ),
    "3x224x224": (
        (3, 224, 224),
        lambda x: _upsampled(x, 28),
        "digits, each pixel repeated 28x28 (nearest), tiled to 3 equal channels",
    ),
}


# ----------------------------------------------------------------------------- building blocks


class Lambda(nn.Module):
    """Wraps a function of the input, so a torch expression (view, flatten, clamp) can sit in a
    Sequential exactly as a user writes it in ``forward``."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str):
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class BasicBlock(nn.Module):
    """ResNet BasicBlock (He et al. 2016): two 3x3 conv+BN, identity shortcut or, when the stride
    or width changes, a 1x1-conv+BN projection shortcut; ReLU after the Add."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet Bottleneck: 1x1 reduce, 3x3, 1x1 expand (x4), each with BN; projection shortcut
    when the shape changes; ReLU after the Add."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 3x32x32 (He et al. 2016, sec. 4.2): 3x3 stem, three stages of n
    BasicBlocks (strides 1, 2, 2), global average pooling, fc. ``widths`` narrower than the
    paper's (16, 32, 64) keep the files small."""

    def __init__(self, blocks_per_stage: int, widths: tuple[int, int, int]):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(cin, width, stride))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, CLASSES)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class ImageNetResNet18(nn.Module):
    """ResNet-18 in torchvision's ImageNet layout: 7x7 stride-2 stem conv + BN + ReLU, padded
    max pool ``MaxPool2d(3, 2, 1)``, four stages of two BasicBlocks (widths base, 2, 4, 8 x base;
    strides 1, 2, 2, 2), ``AdaptiveAvgPool2d(1)``, flatten, fc. ``base=64`` is the standard
    network."""

    def __init__(self, base: int, classes: int = CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], base
        for stage in range(4):
            width = base * 2**stage
            stride = 1 if stage == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width)))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MatMulLinear(nn.Module):
    """A fully connected layer written as ``x @ W.t() + b`` (exports as MatMul + Add, not Gemm)."""

    def __init__(self, fan_in: int, fan_out: int):
        super().__init__()
        reference = nn.Linear(fan_in, fan_out)  # torch's default initialisation
        self.weight = nn.Parameter(reference.weight.detach().clone())
        self.bias = nn.Parameter(reference.bias.detach().clone())

    def forward(self, x):
        return x @ self.weight.t() + self.bias


class Normalised(nn.Module):
    """Input normalisation inside ``forward`` followed by a network: ``(x - mean) / std`` or
    ``x * scale + shift`` with constant buffers (scalars or per-channel (1, C, 1, 1))."""

    def __init__(self, kind: str, net: nn.Module, a, b):
        super().__init__()
        self.kind = kind
        self.register_buffer("a", torch.as_tensor(a, dtype=torch.float32))
        self.register_buffer("b", torch.as_tensor(b, dtype=torch.float32))
        self.net = net

    def forward(self, x):
        if self.kind == "sub_div":
            x = (x - self.a) / self.b
        else:
            x = x * self.a + self.b
        return self.net(x)


class TinySelfAttention(nn.Module):
    """One head of scaled dot-product self-attention over the 8 image rows as tokens (8 pixels
    each), then a ReLU MLP head. Attention multiplies two activations: must be refused."""

    def __init__(self, dim: int = 8, hidden: int = 16):
        super().__init__()
        self.q = nn.Linear(8, dim)
        self.k = nn.Linear(8, dim)
        self.v = nn.Linear(8, dim)
        self.fc1 = nn.Linear(8 * dim, hidden)
        self.fc2 = nn.Linear(hidden, CLASSES)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, x):
        tokens = x.view(x.size(0), 8, 8)
        weights = torch.softmax(self.q(tokens) @ self.k(tokens).transpose(1, 2) * self.scale, -1)
        mixed = weights @ self.v(tokens)
        return self.fc2(F.relu(self.fc1(mixed.reshape(x.size(0), -1))))


# ----------------------------------------------------------------------------- the zoo


def small_cnn(flatten: nn.Module, width: int = 8, hidden: int = 32) -> nn.Sequential:
    """conv 3x3 (width, pad 1) -> ReLU -> 2x2 max pool -> ``flatten`` -> fc hidden -> ReLU -> fc."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        flatten,
        nn.Linear(width * 16, hidden),
        nn.ReLU(),
        nn.Linear(hidden, CLASSES),
    )


def view_flatten() -> Lambda:
    return Lambda(lambda x: x.view(x.size(0), -1), "x.view(x.size(0), -1)")


def torch_flatten() -> Lambda:
    return Lambda(lambda x: torch.flatten(x, 1), "torch.flatten(x, 1)")


def cnn_with(activation: nn.Module, width: int = 8) -> nn.Sequential:
    """conv -> activation -> conv -> activation -> 2x2 max pool -> flatten -> fc -> ReLU -> fc."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        activation,
        nn.Conv2d(width, width, 3, padding=1),
        activation,
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(width * 16, 32),
        nn.ReLU(),
        nn.Linear(32, CLASSES),
    )


def cnn_pool(pool: nn.Module, spatial: int, width: int = 8) -> nn.Sequential:
    """conv + BN + ReLU -> ``pool`` (output spatial x spatial) -> flatten -> fc -> ReLU -> fc."""
    return nn.Sequential(
        *conv_bn(1, width),
        nn.ReLU(),
        pool,
        nn.Flatten(),
        nn.Linear(width * spatial * spatial, 32),
        nn.ReLU(),
        nn.Linear(32, CLASSES),
    )


def cnn_gap(pool: nn.Module, flatten: bool, width: int = 16) -> nn.Sequential:
    """two conv + BN + ReLU -> ``pool`` to (N, C, 1, 1) -> flatten (or ``pool`` to (N, C)) -> fc."""
    return nn.Sequential(
        *conv_bn(1, width),
        nn.ReLU(),
        *conv_bn(width, width),
        nn.ReLU(),
        pool,
        *([nn.Flatten()] if flatten else []),
        nn.Linear(width, CLASSES),
    )


def small_cnn_32(width: int = 8) -> nn.Sequential:
    """3x32x32: conv+BN+ReLU, max pool, conv+BN+ReLU, max pool, conv+BN+ReLU, GAP, fc."""
    return nn.Sequential(
        *conv_bn(3, width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        *conv_bn(width, 2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        *conv_bn(2 * width, 4 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, CLASSES),
    )


def vgg_cifar(config=(8, 8, "M", 16, 16, "M", 32, 32, "M"), hidden: int = 64) -> nn.Sequential:
    """CIFAR-style VGG (Simonyan & Zisserman 2015 layout, narrow): 3x3 conv+BN+ReLU blocks,
    2x2 max pools, flatten (C x 4 x 4), fc -> ReLU -> Dropout -> fc."""
    layers, cin = [], 3
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [*conv_bn(cin, item), nn.ReLU()]
            cin = item
    return nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(cin * 16, hidden),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(hidden, CLASSES),
    )


def mobilenet_like(widths=(8, 16, 32, 32), strides=(1, 2, 2, 1)) -> nn.Sequential:
    """MobileNet-v1-like (Howard et al. 2017) at 3x32x32: 3x3 stem conv stride 2 + BN + ReLU6,
    then depthwise 3x3 (groups = channels) + BN + ReLU6 and pointwise 1x1 + BN + ReLU6 blocks,
    global average pooling, fc."""
    layers, cin = [*conv_bn(3, widths[0], stride=2), nn.ReLU6()], widths[0]
    for width, stride in zip(widths, strides, strict=True):
        layers += [*conv_bn(cin, cin, 3, stride, groups=cin), nn.ReLU6()]
        layers += [*conv_bn(cin, width, 1), nn.ReLU6()]
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, CLASSES))


def depthwise_separable(width: int = 8) -> nn.Sequential:
    """1x8x8: conv -> depthwise 3x3 (groups = channels) -> pointwise 1x1, ReLU after each."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 16, CLASSES),
    )


def grouped_conv(width: int = 8) -> nn.Sequential:
    """1x8x8: conv -> conv with groups=2 -> ReLU -> pool -> fc."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 16, CLASSES),
    )


def residual_net(block: nn.Module, cout: int, stem: int = 8) -> nn.Sequential:
    """1x8x8: conv + BN + ReLU stem -> ``block`` -> AdaptiveAvgPool2d(1) -> flatten -> fc."""
    return nn.Sequential(
        *conv_bn(1, stem),
        nn.ReLU(),
        block,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(cout, CLASSES),
    )


def mlp(hidden=(64, 32)) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, hidden[0]),
        nn.ReLU(),
        nn.Linear(hidden[0], hidden[1]),
        nn.ReLU(),
        nn.Linear(hidden[1], CLASSES),
    )


@dataclass(frozen=True)
class Arch:
    """One architecture of the zoo.

    layout: key of LAYOUTS (the input's per-sample shape and how digits map to it).
    epochs: training epochs on the digits train split (0: random weights, BN randomised).
    supported: whether neurodeploy must convert it (False: must refuse it, naming one node
        whose op type is in ``refused_ops``).
    dynamic_batch: export with a symbolic batch axis (dynamic_axes / dynamic_shapes).
    opsets: extra opsets exported besides each exporter's default.
    unfolded: also export without the exporters' graph clean-up (dynamo ``optimize=False``,
        legacy ``do_constant_folding=False``): BatchNormalization, Identity and constant
        Shape/Expand/CastLike/Concat subgraphs stay in the file.
    """

    name: str
    build: Callable[[], nn.Module]
    layout: str
    pattern: str
    epochs: int = 12
    supported: bool = True
    refused_ops: tuple[str, ...] = ()
    dynamic_batch: bool = False
    opsets: tuple[int, ...] = ()
    unfolded: bool = False


ZOO: tuple[Arch, ...] = (
    # --- fully connected
    Arch("mlp", mlp, "flat64", "MLP 64-64-32-10: nn.Linear as Gemm, ReLU"),
    Arch(
        "mlp_bn1d_dropout",
        lambda: nn.Sequential(
            nn.Linear(64, 64),
            nn.BatchNorm1d(64),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(32, CLASSES),
        ),
        "flat64",
        "MLP with nn.BatchNorm1d after a Linear and nn.Dropout (eval: identity)",
    ),
    Arch(
        "mlp_matmul",
        lambda: nn.Sequential(
            MatMulLinear(64, 48), nn.ReLU(), MatMulLinear(48, 32), nn.ReLU(), nn.Linear(32, 10)
        ),
        "flat64",
        "Linear written as x @ W.t() + b: MatMul + Add instead of Gemm",
    ),
    # --- flatten variants
    Arch("cnn_flatten", lambda: small_cnn(nn.Flatten()), "1x8x8", "plain small CNN, nn.Flatten"),
    Arch(
        "cnn_view",
        lambda: small_cnn(view_flatten()),
        "1x8x8",
        "plain small CNN, x.view(x.size(0), -1)",
        opsets=EXTRA_OPSETS,
        unfolded=True,
    ),
    Arch(
        "cnn_torch_flatten",
        lambda: small_cnn(torch_flatten()),
        "1x8x8",
        "plain small CNN, torch.flatten(x, 1)",
    ),
    Arch(
        "cnn_view_dynamic",
        lambda: small_cnn(view_flatten()),
        "1x8x8",
        "x.view(x.size(0), -1) with a dynamic batch axis: Shape->Gather->Unsqueeze->Concat->"
        "Reshape",
        dynamic_batch=True,
        unfolded=True,
    ),
    Arch(
        "cnn_flatten_dynamic",
        lambda: small_cnn(nn.Flatten()),
        "1x8x8",
        "nn.Flatten with a dynamic batch axis",
        dynamic_batch=True,
    ),
    Arch(
        "cnn_torch_flatten_dynamic",
        lambda: small_cnn(torch_flatten()),
        "1x8x8",
        "torch.flatten(x, 1) with a dynamic batch axis",
        dynamic_batch=True,
    ),
    Arch(
        "cnn_bn",
        lambda: nn.Sequential(
            *conv_bn(1, 8),
            nn.ReLU(),
            *conv_bn(8, 16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(256, 32),
            nn.ReLU(),
            nn.Linear(32, CLASSES),
        ),
        "1x8x8",
        "plain small CNN with Conv + BatchNorm2d (folded into Conv by both exporters by "
        "default; kept as BatchNormalization in the unfolded files), 2x2 max pool",
        opsets=EXTRA_OPSETS,
        unfolded=True,
    ),
    # --- pooling
    Arch(
        "cnn_gap_adaptive",
        lambda: cnn_gap(nn.AdaptiveAvgPool2d(1), flatten=True),
        "1x8x8",
        "nn.AdaptiveAvgPool2d(1) global pooling (ReduceMean or GlobalAveragePool)",
    ),
    Arch(
        "cnn_gap_mean",
        lambda: cnn_gap(Lambda(lambda x: x.mean((2, 3)), "x.mean((2, 3))"), flatten=False),
        "1x8x8",
        "global pooling as x.mean((2, 3)): ReduceMean keepdims=0",
    ),
    Arch(
        "cnn_avgpool_pad_incl",
        lambda: cnn_pool(nn.AvgPool2d(3, 2, 1, count_include_pad=True), 4),
        "1x8x8",
        "nn.AvgPool2d(3, 2, 1, count_include_pad=True): padded average pool, pads count",
    ),
    Arch(
        "cnn_avgpool_pad_excl",
        lambda: cnn_pool(nn.AvgPool2d(3, 2, 1, count_include_pad=False), 4),
        "1x8x8",
        "nn.AvgPool2d(3, 2, 1, count_include_pad=False): padded average pool, pads excluded",
    ),
    Arch(
        "cnn_maxpool_pad",
        lambda: cnn_pool(nn.MaxPool2d(3, 2, 1), 4),
        "1x8x8",
        "nn.MaxPool2d(3, 2, 1) after a ReLU: padded max pool (ResNet stem)",
    ),
    # --- input normalisation inside forward
    Arch(
        "cnn_norm_sub_div",
        lambda: Normalised("sub_div", small_cnn(nn.Flatten()), 4.88, 6.02),
        "1x8x8",
        "(x - mean) / std with scalar constants in forward: Sub, Div before the first conv",
    ),
    Arch(
        "cnn_norm_mul_add",
        lambda: Normalised("mul_add", small_cnn(nn.Flatten()), 0.0625, -0.5),
        "1x8x8",
        "x * c + d with scalar constants in forward: Mul, Add before the first conv",
    ),
    Arch(
        "cnn32_norm_per_channel",
        lambda: Normalised(
            "sub_div",
            small_cnn_32(),
            np.array([4.9, 5.1, 4.7], np.float32).reshape(1, 3, 1, 1),
            np.array([6.0, 5.8, 6.2], np.float32).reshape(1, 3, 1, 1),
        ),
        "3x32x32",
        "torchvision-style (x - mean[c]) / std[c] with (1, 3, 1, 1) buffers, then a 32x32 CNN",
        epochs=8,
    ),
    # --- clipped ReLU
    Arch("cnn_relu6", lambda: cnn_with(nn.ReLU6()), "1x8x8", "nn.ReLU6: Clip(0, 6)"),
    Arch(
        "cnn_hardtanh",
        lambda: cnn_with(nn.Hardtanh(0.0, 4.0)),
        "1x8x8",
        "nn.Hardtanh(0, 4): Clip(0, 4)",
    ),
    Arch(
        "cnn_clamp",
        lambda: cnn_with(Lambda(lambda x: torch.clamp(x, 0.0, 3.0), "torch.clamp(x, 0, 3)")),
        "1x8x8",
        "torch.clamp(x, 0, 3) in forward: Clip(0, 3)",
    ),
    # --- residual
    Arch(
        "resblock_identity",
        lambda: residual_net(BasicBlock(16, 16), 16, stem=16),
        "1x8x8",
        "ResNet BasicBlock with identity shortcut: Add of two activations, ReLU after",
    ),
    Arch(
        "resblock_projection",
        lambda: residual_net(BasicBlock(8, 16, stride=2), 16),
        "1x8x8",
        "ResNet BasicBlock, stride 2, with 1x1-conv+BN projection shortcut",
        unfolded=True,
    ),
    Arch(
        "bottleneck",
        lambda: residual_net(nn.Sequential(Bottleneck(8, 8), Bottleneck(32, 8)), 32),
        "1x8x8",
        "two ResNet Bottleneck blocks (1x1-3x3-1x1, x4): projection then identity shortcut",
    ),
    Arch(
        "resnet8_cifar",
        lambda: CifarResNet(1, (8, 16, 32)),
        "3x32x32",
        "ResNet-8, CIFAR layout (3x3 stem, 3 stages x 1 BasicBlock, widths 8/16/32), GAP, fc",
        epochs=6,
    ),
    Arch(
        "resnet20_cifar",
        lambda: CifarResNet(3, (8, 16, 32)),
        "3x32x32",
        "ResNet-20, CIFAR layout (3 stages x 3 BasicBlocks, widths 8/16/32), GAP, fc",
        epochs=6,
    ),
    Arch(
        "resnet18_imagenet",
        lambda: ImageNetResNet18(8),
        "3x64x64",
        "ResNet-18, ImageNet layout (7x7/2 stem, MaxPool2d(3, 2, 1), 4 x 2 BasicBlocks, "
        "AdaptiveAvgPool2d(1), fc), base width 8, 3x64x64",
        epochs=3,
    ),
    # --- grouped and depthwise
    Arch(
        "depthwise_separable",
        depthwise_separable,
        "1x8x8",
        "depthwise 3x3 conv (groups = channels) + pointwise 1x1",
    ),
    Arch("grouped_conv", grouped_conv, "1x8x8", "Conv2d with groups=2"),
    Arch(
        "mobilenet_like",
        mobilenet_like,
        "3x32x32",
        "MobileNet-v1-like: stride-2 stem, depthwise (groups = channels) + pointwise blocks with "
        "BN and ReLU6, GAP, fc",
        epochs=10,
    ),
    # --- VGG
    Arch(
        "vgg_cifar",
        vgg_cifar,
        "3x32x32",
        "CIFAR-style VGG: 3x3 conv+BN+ReLU pairs (8, 16, 32), 2x2 max pools, flatten, fc, "
        "Dropout, fc",
        epochs=4,
    ),
    # --- must be refused
    Arch(
        "sigmoid_inside",
        lambda: nn.Sequential(nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, CLASSES)),
        "flat64",
        "nn.Sigmoid between two Linear layers",
        supported=False,
        refused_ops=("Sigmoid",),
    ),
    Arch(
        "softmax_inside",
        lambda: nn.Sequential(
            nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.Softmax(dim=1), nn.Linear(16, 10)
        ),
        "flat64",
        "nn.Softmax inside the network, followed by a Linear",
        supported=False,
        refused_ops=("Softmax",),
    ),
    Arch(
        "layernorm",
        lambda: nn.Sequential(
            nn.Linear(64, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, CLASSES)
        ),
        "flat64",
        "nn.LayerNorm after a Linear (a per-sample normalisation, not affine)",
        supported=False,
        refused_ops=("LayerNormalization",),
    ),
    Arch(
        "self_attention",
        TinySelfAttention,
        "1x8x8",
        "one-head self-attention over image rows: MatMul of two activations, Softmax",
        supported=False,
        # the token Reshape to (2, 8, 8) may be the first node refused
        refused_ops=("Reshape", "MatMul", "Transpose", "Softmax"),
    ),
    Arch(
        "dilated_conv",
        lambda: nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 64, CLASSES),
        ),
        "1x8x8",
        "Conv2d with dilation=2",
        supported=False,
        refused_ops=("Conv",),
    ),
)


# ----------------------------------------------------------------------------- training


def seed_of(name: str) -> int:
    """A per-architecture seed, stable across runs and independent of the zoo's order."""
    return (SEED * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> None:
    """Adam (lr 3e-3), batch 64, cross-entropy, ``epochs`` passes over (x, y) in seeded order."""
    generator = torch.Generator().manual_seed(seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), 64):
            batch = order[start : start + 64]
            if len(batch) < 2:  # BatchNorm needs two samples in train mode
                continue
            optimiser.zero_grad()
            F.cross_entropy(model(xs[batch]), ys[batch]).backward()
            optimiser.step()
    model.eval()


def randomise_batchnorm(model: nn.Module, x_calibration: torch.Tensor, seed: int) -> None:
    """Give every BatchNorm non-trivial inference statistics: running mean and variance measured
    on ``x_calibration`` (so activations keep a sane scale in a random deep net), then jittered
    (mean += N(0, 0.2 std), var *= U(0.6, 1.6)); gamma ~ U(0.5, 1.5), beta ~ N(0, 0.2)."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration pass
    model.train()
    with torch.no_grad():
        model(x_calibration)
        for norm in norms:
            shape = norm.running_mean.shape
            std = norm.running_var.sqrt()
            norm.running_mean += 0.2 * std * torch.randn(shape, generator=generator)
            norm.running_var *= 0.6 + torch.rand(shape, generator=generator)
            norm.weight.copy_(0.5 + torch.rand(shape, generator=generator))
            norm.bias.copy_(0.2 * torch.randn(shape, generator=generator))
            norm.momentum = 0.1
    model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(x[i : i + 128])) for i in range(0, len(x), 128)])
    return float((logits.argmax(1).numpy() == y).mean())


# ----------------------------------------------------------------------------- export


def export(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    exporter: str,
    opset: int | None,
    dynamic_batch: bool,
    fold: bool,
) -> None:
    """Export with ``dynamo=True`` ("dynamo") or ``dynamo=False`` ("legacy"); opset None means
    the exporter's default; ``fold`` False turns off the exporter's graph optimisation
    (``optimize`` / ``do_constant_folding``). Input named "input", output "logits"."""
    kwargs: dict = {"input_names": ["input"], "output_names": ["logits"]}
    if opset is not None:
        kwargs["opset_version"] = opset
    if exporter == "dynamo":
        if dynamic_batch:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            optimize=fold,
            verbose=False,
            **kwargs,
        )
    else:
        if dynamic_batch:
            kwargs["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, do_constant_folding=fold, **kwargs
        )


def export_call(exporter: str, opset: int | None, dynamic_batch: bool, fold: bool) -> str:
    """The torch.onnx.export call :func:`export` makes, as a user would write it."""
    args = ["model", "(x,)", "f", "dynamo=True" if exporter == "dynamo" else "dynamo=False"]
    if exporter == "dynamo":
        args.append("external_data=False")
        if not fold:
            args.append("optimize=False")
        if dynamic_batch:
            args.append('dynamic_shapes=({0: Dim("batch")},)')
    else:
        if not fold:
            args.append("do_constant_folding=False")
        if dynamic_batch:
            args.append('dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}')
    if opset is not None:
        args.append(f"opset_version={opset}")
    args += ['input_names=["input"]', 'output_names=["logits"]']
    return f"torch.onnx.export({', '.join(args)})"


def onnx_facts(path: Path) -> dict:
    """Opset, op types, input/output names and shapes (symbolic dims as names) of a file."""
    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)

    def dims(value_info):
        return [
            d.dim_param if d.HasField("dim_param") else d.dim_value
            for d in value_info.type.tensor_type.shape.dim
        ]

    initialisers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initialisers]
    return {
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "ir_version": proto.ir_version,
        "ops": sorted({n.op_type for n in proto.graph.node}),
        "input_name": inputs[0].name,
        "input_dims": dims(inputs[0]),
        "output_name": proto.graph.output[0].name,
        "output_dims": dims(proto.graph.output[0]),
    }


def ort_relative_error(path: Path, x: np.ndarray, logits: np.ndarray, batch: int | None):
    """max |ort - torch| / max |torch| over the fixtures, feeding ``batch`` samples at a time
    (all at once when None); None when onnxruntime is not importable."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    step = batch or len(x)
    out = np.concatenate(
        [session.run(None, {name: x[i : i + step]})[0] for i in range(0, len(x), step)]
    )
    return float(np.max(np.abs(out - logits)) / max(float(np.max(np.abs(logits))), 1e-30))


def exports_of(arch: Arch) -> list[tuple[str, int | None, bool, str]]:
    """(exporter, opset or None for default, fold, file-name suffix) for an architecture."""
    jobs = [("dynamo", None, True, "dynamo"), ("legacy", None, True, "legacy")]
    for opset in arch.opsets:
        jobs.append(("dynamo", opset, True, f"dynamo_opset{opset}"))
        jobs.append(("legacy", opset, True, f"legacy_opset{opset}"))
    if arch.unfolded:
        jobs += [("dynamo", None, False, "dynamo_noopt"), ("legacy", None, False, "legacy_nofold")]
    return jobs


def opset_note(exporter: str, requested: int | None, written: int) -> str | None:
    """Says so when the file's opset is not the one asked for (the dynamo exporter implements
    opset 18 and up and converts down with onnx's version converter, which may fail)."""
    if requested is None or requested == written:
        return None
    return (
        f"{exporter} exporter asked for opset {requested} wrote opset {written} (it builds at "
        f"opset 18 and its down-conversion to {requested} failed; torch only warns)"
    )


def build_and_export(
    arch: Arch,
    model: nn.Module,
    fixture_x: np.ndarray,
    out: Path,
    subdir: str,
    test_accuracy: float | None,
    epochs: int,
    fixtures: dict[str, np.ndarray],
    files: dict[str, dict],
    failures: list[dict],
) -> bool:
    """Export ``model`` with every job of ``arch``; fill ``fixtures``, ``files`` and ``failures``.
    Returns False when a supported file misses the onnxruntime tolerance."""
    ok = True
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(fixture_x)).numpy().astype(np.float32)
    example = torch.from_numpy(fixture_x[:EXPORT_BATCH].copy())
    (out / subdir).mkdir(parents=True, exist_ok=True)
    for exporter, opset, fold, suffix in exports_of(arch):
        stem = f"{arch.name}__{suffix}"
        relative = f"{subdir}/{stem}.onnx" if subdir else f"{stem}.onnx"
        path = out / relative
        path.unlink(missing_ok=True)
        started = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export(model, example, path, exporter, opset, arch.dynamic_batch, fold)
            facts = onnx_facts(path)
        except Exception as exc:  # noqa: BLE001 -- any exporter failure is recorded, not fatal
            path.unlink(missing_ok=True)
            message = f"{type(exc).__name__}: {exc}".strip().splitlines()
            failures.append(
                {
                    "architecture": arch.name,
                    "exporter": exporter,
                    "requested_opset": opset,
                    "exporter_optimisation": fold,
                    "file": relative,
                    "error": " | ".join(line for line in message[:6] if line.strip())[:600],
                }
            )
            print(f"  {relative}: EXPORT FAILED {message[0][:160]}", flush=True)
            continue
        batch = None if arch.dynamic_batch else EXPORT_BATCH
        error = ort_relative_error(path, fixture_x, logits, batch)
        sample_shape = list(LAYOUTS[arch.layout][0])
        files[relative] = {
            "architecture": arch.name,
            "exporter": exporter,
            "opset": facts["opset"],
            "requested_opset": opset,
            "exporter_optimisation": fold,
            "export_call": export_call(exporter, opset, arch.dynamic_batch, fold),
            "note": opset_note(exporter, opset, facts["opset"]),
            "ir_version": facts["ir_version"],
            "input_name": facts["input_name"],
            "output_name": facts["output_name"],
            "input_shape": [EXPORT_BATCH, *sample_shape],
            "onnx_input_dims": facts["input_dims"],
            "onnx_output_dims": facts["output_dims"],
            "dynamic_batch": arch.dynamic_batch,
            "layout": arch.layout,
            "input_range": list(DIGITS_RANGE),
            "expected": "supported" if arch.supported else "refused",
            "refused_ops": list(arch.refused_ops),
            "description": arch.pattern,
            "ops": facts["ops"],
            "fixture": stem,
            "trained_epochs": epochs,
            "torch_test_accuracy": test_accuracy,
            "ort_max_relative_error": error,
            "bytes": path.stat().st_size,
        }
        fixtures[f"{stem}.x"] = fixture_x
        fixtures[f"{stem}.logits"] = logits
        verdict = "" if error is None else f"ort rel err {error:.1e}"
        if arch.supported and error is not None and error > ORT_RELATIVE_TOLERANCE:
            verdict += " OVER TOLERANCE"
            ok = False
        print(
            f"  {relative}: opset {facts['opset']}, {len(facts['ops'])} op types, "
            f"{path.stat().st_size / 1024:.0f} KiB, {time.perf_counter() - started:.1f} s, "
            f"{verdict}",
            flush=True,
        )
    return ok


def versions() -> dict[str, str]:
    import onnx
    import onnxscript
    import sklearn

    try:
        import onnxruntime

        runtime = onnxruntime.__version__
    except ImportError:
        runtime = None
    return {
        "onnxruntime": runtime,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }


def write_outputs(out: Path, header: dict, files, failures, fixtures) -> None:
    manifest = {**header, "files": files, "export_failures": failures}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    np.savez_compressed(out / "fixtures.npz", **fixtures)


def fixture_inputs(layout: str, x_test: np.ndarray, count: int) -> np.ndarray:
    """``count`` test-split digits chosen with SEED, in ``layout``, float32."""
    rng = np.random.default_rng(SEED)
    chosen = np.sort(rng.choice(len(x_test), size=count, replace=False))
    return np.ascontiguousarray(LAYOUTS[layout][1](x_test[chosen]), dtype=np.float32)


def export_zoo(out: Path) -> bool:
    split = digits_split()
    (x_train, y_train), (x_test, y_test) = split["train"], split["test"]
    for stale in [*out.glob("*.onnx"), *out.glob("refused/*.onnx")]:
        stale.unlink()
    files: dict[str, dict] = {}
    failures: list[dict] = []
    fixtures: dict[str, np.ndarray] = {}
    ok = True
    for arch in ZOO:
        started = time.perf_counter()
        seed = seed_of(arch.name)
        torch.manual_seed(seed)
        model = arch.build()
        transform = LAYOUTS[arch.layout][1]
        test_accuracy = None
        if arch.epochs > 0:
            train(model, transform(x_train), y_train, arch.epochs, seed)
            test_accuracy = accuracy(model, transform(x_test), y_test)
        else:
            randomise_batchnorm(model, torch.from_numpy(transform(x_train[:256])), seed)
        print(
            f"{arch.name}: trained {arch.epochs} epochs in {time.perf_counter() - started:.1f} s, "
            f"test accuracy {test_accuracy}",
            flush=True,
        )
        fixture_x = fixture_inputs(arch.layout, x_test, FIXTURE_SAMPLES)
        subdir = "" if arch.supported else "refused"
        ok &= build_and_export(
            arch,
            model,
            fixture_x,
            out,
            subdir,
            test_accuracy,
            arch.epochs,
            fixtures,
            files,
            failures,
        )
    header = {
        "format": "neurodeploy torch zoo manifest v1",
        "generator": "tools/export_torch_zoo.py",
        "versions": versions(),
        "seed": SEED,
        "export_batch": EXPORT_BATCH,
        "fixtures": "fixtures.npz",
        "fixture_samples": FIXTURE_SAMPLES,
        "fixture_keys": "<file stem>.x (float32 inputs as fed to torch), <file stem>.logits "
        "(torch float32 logits); the stem is the file name without .onnx",
        "data": "scikit-learn digits, split as neurodeploy.datasets.digits (stratified, 30 % "
        "test, random_state=0); fixture inputs are 8 test-split samples chosen with "
        "numpy default_rng(seed), in the file's layout",
        "layouts": {
            k: {"sample_shape": list(v[0]), "from_digits": v[2]} for k, v in LAYOUTS.items()
        },
        "ort_relative_tolerance": ORT_RELATIVE_TOLERANCE,
    }
    write_outputs(out, header, files, failures, fixtures)
    return ok


def export_full_resnet18(out: Path) -> bool:
    """Standard ResNet-18 (base 64, 1000 classes) at 3x224x224, random weights, randomised BN."""
    out.mkdir(parents=True, exist_ok=True)
    split = digits_split()
    seed = seed_of("resnet18_224")
    torch.manual_seed(seed)
    model = ImageNetResNet18(64, classes=1000)
    transform = LAYOUTS["3x224x224"][1]
    randomise_batchnorm(model, torch.from_numpy(transform(split["train"][0][:16])), seed)
    arch = Arch(
        "resnet18_224",
        lambda: model,
        "3x224x224",
        "torchvision-layout ResNet-18, standard widths, 1000 classes, 3x224x224, random weights, "
        "BatchNorm with non-trivial running statistics",
        epochs=0,
    )
    files: dict[str, dict] = {}
    failures: list[dict] = []
    fixtures: dict[str, np.ndarray] = {}
    fixture_x = fixture_inputs("3x224x224", split["test"][0], EXPORT_BATCH)
    ok = build_and_export(arch, model, fixture_x, out, "", None, 0, fixtures, files, failures)
    header = {
        "format": "neurodeploy torch zoo manifest v1",
        "generator": "tools/export_torch_zoo.py --full-resnet18",
        "versions": versions(),
        "seed": SEED,
        "export_batch": EXPORT_BATCH,
        "fixtures": "fixtures.npz",
        "fixture_samples": EXPORT_BATCH,
        "layouts": {
            "3x224x224": {"sample_shape": [3, 224, 224], "from_digits": LAYOUTS["3x224x224"][2]}
        },
        "ort_relative_tolerance": ORT_RELATIVE_TOLERANCE,
    }
    write_outputs(out, header, files, failures, fixtures)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tests/data/torch_zoo"))
    parser.add_argument(
        "--full-resnet18",
        type=Path,
        metavar="DIR",
        help="also export a standard ResNet-18 at 3x224x224 into DIR (large; not committed)",
    )
    parser.add_argument("--skip-zoo", action="store_true", help="export only --full-resnet18")
    args = parser.parse_args(argv)
    if args.skip_zoo and args.full_resnet18 is None:
        parser.error("--skip-zoo needs --full-resnet18 DIR")
    torch.set_num_threads(1)  # same bits on every run; the machine's cores are shared
    torch.use_deterministic_algorithms(True)
    ok = True
    if not args.skip_zoo:
        args.out.mkdir(parents=True, exist_ok=True)
        ok &= export_zoo(args.out)
    if args.full_resnet18 is not None:
        ok &= export_full_resnet18(args.full_resnet18)
    if not ok:
        print("some supported file misses onnxruntime's tolerance (see above)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

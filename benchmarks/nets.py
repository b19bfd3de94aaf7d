"""Network builders shared by the benchmarks: VGG-16 (ImageNet, 224x224) and a CIFAR VGG.

VGG-16 follows Simonyan & Zisserman, "Very deep convolutional networks for large-scale
image recognition", ICLR 2015, Table 1 configuration D: thirteen 3x3 convs (padding 1)
of widths 64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M, 512 x3, M (M: 2x2 max pool,
stride 2), then fully connected 4096, 4096, 1000: 138.4 M parameters. Weights are
random He-scaled (float32, as trained networks ship), biases small.
"""

from __future__ import annotations

import numpy as np

import neurodeploy as nd

# Simonyan & Zisserman 2015, Table 1, configuration D ("M": 2x2 max pool).
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")
# A CIFAR-sized VGG (32x32 input): the VGG-11 conv stack (configuration A) at half width.
CIFAR_VGG_CONFIG = (32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256, "M")


def vgg(
    config=VGG16_CONFIG,
    size: int = 224,
    hidden: int = 4096,
    classes: int = 1000,
    seed: int = 0,
    dtype=np.float32,
    name: str = "vgg16",
) -> nd.Network:
    """A VGG of the given conv ``config`` for ``size`` x ``size`` RGB inputs in [0, 1]."""
    rng = np.random.default_rng(seed)
    layers, c, s = [], 3, size
    for i, item in enumerate(config):
        if item == "M":
            layers.append(nd.MaxPool2d(f"pool{i}", 2, 2))
            s //= 2
            continue
        w = rng.standard_normal((item, c, 3, 3), dtype=np.float32) * np.float32(
            np.sqrt(2.0 / (9 * c))
        )
        b = (rng.standard_normal(item, dtype=np.float32) * np.float32(0.01)).astype(dtype)
        layers += [nd.Conv2d(f"conv{i}", w.astype(dtype), b, 1, 1), nd.ReLU(f"relu{i}")]
        c = item
    layers.append(nd.Flatten("flatten"))
    features = c * s * s
    for j, width in enumerate((hidden, hidden, classes)):
        w = rng.standard_normal((width, features), dtype=np.float32) * np.float32(
            np.sqrt(2.0 / features)
        )
        b = (rng.standard_normal(width, dtype=np.float32) * np.float32(0.01)).astype(dtype)
        layers.append(nd.Dense(f"fc{j}", w.astype(dtype), b))
        if j < 2:
            layers.append(nd.ReLU(f"fc_relu{j}"))
        features = width
    return nd.Network(name, (3, size, size), (0.0, 1.0), tuple(layers))


def cifar_vgg(seed: int = 0) -> nd.Network:
    """A CIFAR-10-sized VGG (32x32x3, 10 classes; see CIFAR_VGG_CONFIG)."""
    return vgg(CIFAR_VGG_CONFIG, size=32, hidden=256, classes=10, seed=seed, name="cifar_vgg")

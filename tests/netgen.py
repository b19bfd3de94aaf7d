"""Seeded random ReLU networks covering every layer type the converter folds."""

from __future__ import annotations

import numpy as np

import neurodeploy as nd


def _bn(name: str, rng: np.random.Generator, channels: int) -> nd.BatchNorm:
    # gamma of either sign: a negative scale in front of a max pool makes it a min pool.
    return nd.BatchNorm(
        name,
        gamma=rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels),
        beta=rng.normal(0, 0.3, channels),
        mean=rng.normal(0, 0.3, channels),
        var=rng.uniform(0.5, 2.0, channels),
        eps=1e-5,
    )


def random_network(
    seed: int, hidden_conv: int = 3, hidden_dense: int = 2, modern: bool = False
) -> nd.Network:
    """A conv net with ``hidden_conv`` conv blocks and ``hidden_dense`` dense blocks.

    Conv blocks draw stride 1 or 2 and padding 0 or 1; batch norm before or
    after the ReLU (or none); max or average pooling where the map is large
    enough. Weights are He-scaled so activations neither vanish nor explode.
    Input: (2, 10, 10) with raw range [-1, 3].

    modern: also draw grouped and depthwise convolutions (a per-channel batch norm
    after the previous ReLU then folds into each group's own input slice), clipped
    ReLUs (clip low enough to bite) and padded 3x3 pools, max or average with
    count_include_pad either way. Without it the random stream, hence every network,
    is the same as before these existed.
    """
    rng = np.random.default_rng(seed)
    layers: list = []
    shape = (2, 10, 10)
    for i in range(hidden_conv):
        c_in, h = shape[0], shape[1]
        c_out = int(rng.integers(3, 7))
        k = 3
        padding = int(rng.integers(0, 2))
        stride = int(rng.integers(1, 3)) if h >= 6 else 1
        if (h + 2 * padding - k) // stride + 1 < 2:
            padding, stride = 1, 1
        groups = 1
        if modern:
            groups, c_out = _draw_groups(rng, c_in, c_out)
        w = rng.normal(0, np.sqrt(2.0 / (c_in // groups * k * k)), (c_out, c_in // groups, k, k))
        layers.append(
            nd.Conv2d(f"conv{i}", w, rng.normal(0, 0.1, c_out), stride, padding, groups=groups)
        )
        bn_where = rng.choice(["before", "after", "none"])
        if bn_where == "before":
            layers.append(_bn(f"bn{i}", rng, c_out))
        clip = float(rng.uniform(0.4, 1.2)) if modern and rng.random() < 0.5 else None
        layers.append(nd.ReLU(f"relu{i}", clip=clip))
        if bn_where == "after":
            layers.append(_bn(f"bn{i}", rng, c_out))
        shape = _shape(layers, (2, 10, 10))
        if shape[1] >= 4:
            pool = rng.choice(["max", "avg", "none"])
            if modern and pool != "none" and rng.random() < 0.6:
                layers.append(_padded_pool(rng, f"pool{i}", str(pool)))
            elif pool == "max":
                layers.append(nd.MaxPool2d(f"pool{i}", 2, 2))
            elif pool == "avg":
                layers.append(nd.AvgPool2d(f"pool{i}", 2, int(rng.integers(1, 3))))
            shape = _shape(layers, (2, 10, 10))
        if bn_where == "after" and rng.random() < 0.5:
            layers.append(_bn(f"bnpost{i}", rng, shape[0]))
    layers.append(nd.Flatten("flat"))
    features = int(np.prod(shape))
    for i in range(hidden_dense):
        out = int(rng.integers(8, 20))
        w = rng.normal(0, np.sqrt(2.0 / features), (out, features))
        layers.append(nd.Dense(f"fc{i}", w, rng.normal(0, 0.1, out)))
        if rng.random() < 0.5:
            layers.append(_bn(f"fcbn{i}", rng, out))
        layers.append(nd.ReLU(f"fcrelu{i}"))
        features = out
    layers.append(
        nd.Dense(
            "out", rng.normal(0, np.sqrt(1.0 / features), (4, features)), rng.normal(0, 0.1, 4)
        )
    )
    return nd.Network(f"random{seed}", (2, 10, 10), (-1.0, 3.0), tuple(layers))


def _draw_groups(rng: np.random.Generator, c_in: int, c_out: int) -> tuple[int, int]:
    """(groups, out channels): dense, depthwise (multiplier 1 or 2) or two groups."""
    kind = rng.choice(["dense", "depthwise", "two"])
    if kind == "depthwise":
        return c_in, c_in * int(rng.integers(1, 3))
    if kind == "two" and c_in % 2 == 0:
        return 2, 2 * max(2, c_out // 2)
    return 1, c_out


def _padded_pool(rng: np.random.Generator, name: str, kind: str) -> nd.Layer:
    stride = int(rng.integers(1, 3))
    if kind == "max":
        return nd.MaxPool2d(name, 3, stride, padding=1)
    include = bool(rng.random() < 0.5)
    return nd.AvgPool2d(name, 3, stride, padding=1, count_include_pad=include)


def _shape(layers, shape):
    for layer in layers:
        shape = layer.output_shape(shape)
    return shape


def random_inputs(net: nd.Network, n: int, seed: int) -> np.ndarray:
    p, q = net.input_range
    return np.random.default_rng(seed).uniform(p, q, (n, *net.input_shape))


def _conv(name, rng, c_in, c_out, k, stride=1, padding=0, inputs=()):
    w = rng.normal(0, np.sqrt(2.0 / (c_in * k * k)), (c_out, c_in, k, k))
    return nd.Conv2d(name, w, rng.normal(0, 0.1, c_out), stride, padding, inputs=inputs)


def residual_block(
    rng: np.random.Generator,
    prefix: str,
    source: str,
    c_in: int,
    c_out: int,
    stride: int,
    kind: str,
    bn_where: str,
    shortcut_first: bool,
) -> tuple[list, str]:
    """One ResNet block reading the layer ``source`` (C_in channels); returns its layers
    and the name of the layer giving its output.

    kind: "basic" (two 3x3 convs) or "bottleneck" (1x1, 3x3, 1x1 with a narrower
    middle). The shortcut is the identity when shapes allow (c_in == c_out, stride 1),
    else a 1x1 conv + batch norm projection. bn_where: "before" (conv-bn-relu, the
    residual branch's last bn before the add), "sum" (a batch norm on the sum, before
    its ReLU) or "after" (after the block's ReLU, folding forward into the next block's
    branch and shortcut). shortcut_first: list the projection's layers before the branch.
    """
    if kind == "basic":
        convs = [(c_out, 3, stride, 1), (c_out, 3, 1, 1)]
    else:
        mid = max(2, c_out // 2)
        convs = [(mid, 1, 1, 0), (mid, 3, stride, 1), (c_out, 1, 1, 0)]
    branch: list = []
    c, prev = c_in, source
    for i, (co, k, s, pad) in enumerate(convs):
        branch.append(
            _conv(f"{prefix}_conv{i}", rng, c, co, k, s, pad, inputs=(prev,) if i == 0 else ())
        )
        last = i == len(convs) - 1
        if not last or bn_where == "before":
            branch.append(_bn(f"{prefix}_bn{i}", rng, co))
        if not last:
            branch.append(nd.ReLU(f"{prefix}_relu{i}"))
        prev, c = branch[-1].name, co
    shortcut: list = []
    if c_in != c_out or stride != 1:
        shortcut = [
            _conv(f"{prefix}_proj", rng, c_in, c_out, 1, stride, inputs=(source,)),
            _bn(f"{prefix}_projbn", rng, c_out),
        ]
        skip = shortcut[-1].name
    else:
        skip = source
    layers = shortcut + branch if shortcut_first else branch + shortcut
    order = (prev, skip) if rng.random() < 0.5 else (skip, prev)
    layers.append(nd.Add(f"{prefix}_add", inputs=order))
    if bn_where == "sum":
        layers.append(_bn(f"{prefix}_sumbn", rng, c_out))
    layers.append(nd.ReLU(f"{prefix}_out"))
    if bn_where == "after":
        layers.append(_bn(f"{prefix}_postbn", rng, c_out))
    return layers, layers[-1].name


def random_residual_network(seed: int, blocks: int = 3) -> nd.Network:
    """A small ResNet: an optional stem, ``blocks`` residual blocks, a head.

    Draws per block: basic or bottleneck, identity or projection shortcut (stride 2
    or a width change force a projection), batch norm before the add, on the sum or
    after the ReLU, layer listing order. The stem (conv-bn-relu, then a batch norm of
    either sign and a max pool, so the first identity shortcut reads a min/max pool
    under a folded scale) or none, so the first shortcut reads the network input (its
    rescaling folds into the shortcut). The head: global average pooling or flattening,
    then a dense residual block (identity shortcut on vectors) and the output layer.
    Input: (3, 12, 12) with raw range [-1, 3].
    """
    rng = np.random.default_rng(seed)
    shape = (3, 12, 12)
    layers: list = []
    source, c = "input", 3
    if rng.random() < 0.7:
        c = int(rng.integers(3, 6))
        layers += [_conv("stem", rng, 3, c, 3, 1, 1), _bn("stem_bn", rng, c), nd.ReLU("stem_relu")]
        if rng.random() < 0.6:
            layers += [_bn("stem_postbn", rng, c), nd.MaxPool2d("stem_pool", 2, 2)]
        source = layers[-1].name
    for b in range(blocks):
        h = _shape_dag(layers, shape)[1]
        stride = 2 if h >= 6 and rng.random() < 0.4 else 1
        c_out = c if rng.random() < 0.5 else int(rng.integers(3, 7))
        if source == "input" and rng.random() < 0.5:
            stride, c_out = 1, c  # an identity shortcut from the network input itself
        block, source = residual_block(
            rng,
            f"b{b}",
            source,
            c,
            c_out,
            stride,
            kind=str(rng.choice(["basic", "bottleneck"])),
            bn_where=str(rng.choice(["before", "sum", "after"])),
            shortcut_first=bool(rng.random() < 0.5),
        )
        layers += block
        c = c_out
    h = _shape_dag(layers, shape)[1]
    if rng.random() < 0.5 and h > 1:
        layers.append(nd.AvgPool2d("gap", h, h))
    layers.append(nd.Flatten("flat"))
    features = int(np.prod(_shape_dag(layers, shape)))
    hidden = int(rng.integers(6, 12))
    layers += [
        nd.Dense(
            "fc0",
            rng.normal(0, np.sqrt(2.0 / features), (hidden, features)),
            rng.normal(0, 0.1, hidden),
        ),
        nd.ReLU("fc0_relu"),
        nd.Dense(
            "fc1",
            rng.normal(0, np.sqrt(1.0 / hidden), (hidden, hidden)),
            rng.normal(0, 0.1, hidden),
        ),
        nd.Add("fc_add", inputs=("fc1", "fc0_relu")),
        nd.ReLU("fc_relu"),
        nd.Dense("out", rng.normal(0, np.sqrt(1.0 / hidden), (4, hidden)), rng.normal(0, 0.1, 4)),
    ]
    x = rng.uniform(-1.0, 3.0, (64, *shape))
    return nd.Network(f"residual{seed}", shape, (-1.0, 3.0), with_bn_statistics(layers, x))


def with_bn_statistics(layers: list, x: np.ndarray) -> tuple:
    """The layers with every batch norm's mean and var set to the batch statistics of its
    input on x (N, *input_shape), in order (as a trained network's running statistics
    would be), so that random weights neither vanish nor explode through deep nets."""
    values = {"input": x}
    prev = "input"
    out = []
    for layer in layers:
        srcs = layer.inputs or (prev,)
        if isinstance(layer, nd.BatchNorm):
            v = values[srcs[0]]
            axes = (0,) if v.ndim == 2 else (0, 2, 3)
            layer = nd.BatchNorm(
                layer.name,
                gamma=layer.gamma,
                beta=layer.beta,
                mean=v.mean(axis=axes),
                var=v.var(axis=axes),
                eps=layer.eps,
                inputs=layer.inputs,
            )
        if isinstance(layer, nd.Add):
            values[layer.name] = layer.forward_many([values[s] for s in srcs])
        else:
            values[layer.name] = layer.forward(values[srcs[0]])
        out.append(layer)
        prev = layer.name
    return tuple(out)


def _shape_dag(layers, input_shape):
    """Output shape of the last of ``layers`` (a DAG prefix) for one sample."""
    if not layers:
        return input_shape
    shapes = {"input": input_shape}
    prev = "input"
    for layer in layers:
        srcs = layer.inputs or (prev,)
        if isinstance(layer, nd.Add):
            shapes[layer.name] = shapes[srcs[0]]
        else:
            shapes[layer.name] = layer.output_shape(shapes[srcs[0]])
        prev = layer.name
    return shapes[prev]


# CIFAR-sized VGG: 3x32x32 inputs, two 3x3 convs (padding 1) with batch norm before each
# ReLU per stage, a 2x2 max pool after each of three stages (Simonyan & Zisserman, "Very
# deep convolutional networks", ICLR 2015, layout; widths of its first three stages).
VGG_WIDTHS = (64, 128, 256)


def cifar_vgg(seed: int = 0, widths: tuple[int, ...] = VGG_WIDTHS, classes: int = 10):
    """A random He-scaled CIFAR-sized VGG (six 3x3 convs with BN, three max pools, a
    hidden dense layer of 256 and the output), input range [0, 1]; batch norms get the
    batch statistics of their inputs on random images (:func:`with_bn_statistics`); about
    one gamma in ten is negative (folded into its conv before the ReLU)."""
    rng = np.random.default_rng(seed)
    layers: list = []
    c_in = 3
    for stage, width in enumerate(widths):
        for j in range(2):
            name = f"conv{stage}{j}"
            w = rng.normal(0.0, np.sqrt(2.0 / (c_in * 9)), (width, c_in, 3, 3))
            layers.append(nd.Conv2d(name, w, np.zeros(width), 1, 1))
            gamma = rng.uniform(0.5, 1.5, width) * rng.choice([-1.0, 1.0], width, p=[0.1, 0.9])
            layers.append(
                nd.BatchNorm(f"bn{stage}{j}", gamma, rng.normal(0.0, 0.2, width),
                             np.zeros(width), np.ones(width))
            )
            layers.append(nd.ReLU(f"relu{stage}{j}"))
            c_in = width
        layers.append(nd.MaxPool2d(f"pool{stage}", 2, 2))
    side = 32 // 2 ** len(widths)
    features = c_in * side * side
    layers += [
        nd.Flatten("flat"),
        nd.Dense("fc", rng.normal(0.0, np.sqrt(2.0 / features), (256, features)), np.zeros(256)),
        nd.ReLU("fcrelu"),
        nd.Dense("out", rng.normal(0.0, np.sqrt(1.0 / 256), (classes, 256)), np.zeros(classes)),
    ]
    x = rng.uniform(0.0, 1.0, (16, 3, 32, 32))
    return nd.Network(f"cifar_vgg{seed}", (3, 32, 32), (0.0, 1.0), with_bn_statistics(layers, x))

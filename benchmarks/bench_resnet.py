"""ResNet-18 or -50 (ImageNet layout, 224x224) converts and simulates exactly; time per image.

Builds a ResNet-18 (``--arch resnet18``, the default) with our IR directly (He
et al., "Deep residual learning for image recognition", CVPR 2016, Table 1: a
7x7 stride-2 stem of 64 channels, a 3x3 stride-2 max pool, four stages of two
basic blocks of widths 64, 128, 256, 512, the last three downsampling by a
stride-2 conv with a 1x1 conv + batch-norm projection, global average pooling,
1000 classes). Random He-scaled weights; every batch norm gets random gamma/beta
and the batch statistics of its input on random images, as a trained network's
running statistics would be. The stem's max pool is padded as torchvision's
(3x3, stride 2, padding 1): the maps are 112, 56, 28, 14, 7.
``--arch resnet50``: the same stem and stages with 3, 4, 6, 3 bottleneck
blocks (1x1 reduce, 3x3 carrying the stride as torchvision's ResNet v1.5, 1x1
expand to 4x the width; a projection shortcut on every stage's first block).

With ``--onnx FILE --input-range P,Q`` the network is a PyTorch export instead
(``tools/export_torch_zoo.py --full-resnet18 DIR`` writes torchvision's
ResNet-18 layout at 224x224 with both exporters, and torch's logits on fixed
inputs in DIR/fixtures.npz: ``--fixtures`` checks the import against them).

Checks that the b1 SNN's logits and every hidden layer equal the ReLU network to
1e-9 relative with no early (saturated) spikes, then times ``simulate`` against
``net.forward`` per image: interleaved runs (forward, simulate, forward, ...), so
both see the same machine load, and the medians.

    .venv/bin/python benchmarks/bench_resnet.py [--arch resnet50] [--images 2] [--repeats 5]
    .venv/bin/python benchmarks/bench_resnet.py --onnx DIR/resnet18_224__dynamo.onnx \
        --input-range 0,16 --fixtures DIR/fixtures.npz
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported by path
from netgen import with_bn_statistics  # noqa: E402
from timing import interleaved_medians  # noqa: E402

import neurodeploy as nd  # noqa: E402

RELATIVE_TOLERANCE = 1e-9
WIDTHS = (64, 128, 256, 512)  # ResNet-18 stage widths (He et al. 2016, Table 1)
BOTTLENECK_EXPANSION = 4  # output width / bottleneck width (He et al. 2016, Table 1)


def _conv(rng, name, c_in, c_out, k, stride, padding, inputs=()):
    w = rng.normal(0.0, np.sqrt(2.0 / (c_in * k * k)), (c_out, c_in, k, k))
    return nd.Conv2d(name, w, np.zeros(c_out), stride, padding, inputs=inputs)


def _bn(rng, name, channels):
    # statistics are replaced by measured ones (with_bn_statistics)
    return nd.BatchNorm(
        name,
        gamma=rng.uniform(0.5, 1.5, channels),
        beta=rng.normal(0.0, 0.2, channels),
        mean=np.zeros(channels),
        var=np.ones(channels),
    )


def _basic_block(rng, p, source, c, width, stride):
    """Two 3x3 convs (ResNet-18/34); returns the layers and the output width."""
    layers = [
        _conv(rng, f"{p}.conv1", c, width, 3, stride, 1, inputs=(source,)),
        _bn(rng, f"{p}.bn1", width),
        nd.ReLU(f"{p}.relu1"),
        _conv(rng, f"{p}.conv2", width, width, 3, 1, 1),
        _bn(rng, f"{p}.bn2", width),
    ]
    return layers, f"{p}.bn2", width


def _bottleneck_block(rng, p, source, c, width, stride):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's ResNet v1.5), 1x1 expand
    by BOTTLENECK_EXPANSION (ResNet-50/101/152); returns the layers and output width."""
    out = width * BOTTLENECK_EXPANSION
    layers = [
        _conv(rng, f"{p}.conv1", c, width, 1, 1, 0, inputs=(source,)),
        _bn(rng, f"{p}.bn1", width),
        nd.ReLU(f"{p}.relu1"),
        _conv(rng, f"{p}.conv2", width, width, 3, stride, 1),
        _bn(rng, f"{p}.bn2", width),
        nd.ReLU(f"{p}.relu2"),
        _conv(rng, f"{p}.conv3", width, out, 1, 1, 0),
        _bn(rng, f"{p}.bn3", out),
    ]
    return layers, f"{p}.bn3", out


def resnet(
    name: str, blocks: tuple, bottleneck: bool, seed: int = 0, size: int = 224, classes: int = 1000
) -> nd.Network:
    """A ResNet in ImageNet layout (see the module docstring): ``blocks`` per stage of
    widths WIDTHS, basic or bottleneck blocks."""
    rng = np.random.default_rng(seed)
    layers = [
        _conv(rng, "conv1", 3, 64, 7, 2, 3),
        _bn(rng, "bn1", 64),
        nd.ReLU("relu"),
        nd.MaxPool2d("maxpool", 3, 2, 1),
    ]
    make_block = _bottleneck_block if bottleneck else _basic_block
    source, c = "maxpool", 64
    for stage, (width, count) in enumerate(zip(WIDTHS, blocks, strict=True), start=1):
        for block in range(count):
            p = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            body, last, out = make_block(rng, p, source, c, width, stride)
            layers += body
            skip = source
            if stride != 1 or c != out:
                layers += [
                    _conv(rng, f"{p}.downsample.0", c, out, 1, stride, 0, inputs=(source,)),
                    _bn(rng, f"{p}.downsample.1", out),
                ]
                skip = f"{p}.downsample.1"
            layers += [nd.Add(f"{p}.add", inputs=(last, skip)), nd.ReLU(f"{p}.relu_out")]
            source, c = f"{p}.relu_out", out
    final = size // 2  # stem conv
    final = (final + 2 - 3) // 2 + 1  # 3x3 stride-2 max pool, padding 1
    for _ in WIDTHS[1:]:
        final = (final + 2 - 3) // 2 + 1
    layers += [
        nd.AvgPool2d("avgpool", final, final),
        nd.Flatten("flatten"),
        nd.Dense(
            "fc", rng.normal(0.0, np.sqrt(1.0 / c), (classes, c)), rng.normal(0, 0.01, classes)
        ),
    ]
    x = rng.uniform(0.0, 1.0, (2, 3, size, size))
    return nd.Network(name, (3, size, size), (0.0, 1.0), with_bn_statistics(layers, x))


def resnet18(seed: int = 0, size: int = 224, classes: int = 1000) -> nd.Network:
    """ResNet-18: two basic blocks per stage (He et al. 2016, Table 1)."""
    return resnet("resnet18", (2, 2, 2, 2), False, seed, size, classes)


def resnet50(seed: int = 0, size: int = 224, classes: int = 1000) -> nd.Network:
    """ResNet-50: 3, 4, 6, 3 bottleneck blocks per stage (He et al. 2016, Table 1)."""
    return resnet("resnet50", (3, 4, 6, 3), True, seed, size, classes)


ARCHITECTURES = {"resnet18": resnet18, "resnet50": resnet50}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="resnet18")
    parser.add_argument("--onnx", type=Path, help="a PyTorch export to use instead")
    parser.add_argument("--input-range", default="0,1", help="P,Q of the --onnx input")
    parser.add_argument("--fixtures", type=Path, help="torch's inputs and logits (npz)")
    args = parser.parse_args()
    start = time.perf_counter()
    p, q = (float(v) for v in args.input_range.split(","))
    if args.onnx is None:
        net = ARCHITECTURES[args.arch](size=args.size)
    else:
        net = nd.load_model(args.onnx, input_range=(p, q))
    x = np.random.default_rng(1).uniform(p, q, (args.images, *net.input_shape))
    if args.fixtures is not None:
        stem = args.onnx.stem
        with np.load(args.fixtures) as fixtures:
            x = fixtures[f"{stem}.x"].astype(np.float64)[: args.images]
            torch_logits = fixtures[f"{stem}.logits"][: args.images]
        err = float(np.abs(net.forward(x) - torch_logits).max() / np.abs(torch_logits).max())
        print(f"{args.onnx.name}: forward vs torch's logits {err:.2e} relative (float32 torch)")
    snn = nd.convert(net, calibration=x)
    build = time.perf_counter() - start
    trace = nd.simulate(snn, x)
    ref = net.forward(x)
    error = float(np.abs(trace.output - ref).max() / np.abs(ref).max())
    acts = net.activations(x)
    hidden = 0.0
    for stage in snn.spiking_layers:
        relu = next(
            layer.name
            for layer in net.layers[[lay.name for lay in net.layers].index(stage.name) :]
            if isinstance(layer, nd.ReLU)
        )
        got, want = stage.decode(trace.spike_times[stage.name]), acts[relu]
        hidden = max(hidden, float(np.abs(got - want).max() / max(want.max(), 1e-300)))
    joins = sum(1 for s in snn.spiking_layers if s.shortcuts)
    print(
        f"{net.name} {'x'.join(map(str, net.input_shape))}: "
        f"{len(snn.spiking_layers)} spiking layers "
        f"({joins} residual joins), {snn.neuron_count / 1e6:.2f} M neurons, latency "
        f"{snn.latency:.1f} time units; built + converted in {build:.1f} s"
    )
    print(
        f"exactness: logits {error:.2e}, hidden layers {hidden:.2e} relative "
        f"(tolerance {RELATIVE_TOLERANCE:g}); saturated spikes {trace.saturated}"
    )
    if error > RELATIVE_TOLERANCE or hidden > RELATIVE_TOLERANCE or trace.saturated:
        raise SystemExit("NOT EXACT")
    medians = interleaved_medians(
        {"forward": lambda: net.forward(x), "simulate": lambda: nd.simulate(snn, x)},
        args.repeats,
    )
    per = {name: t / args.images for name, t in medians.items()}
    print(
        f"per image: ReLU forward {per['forward'] * 1e3:.0f} ms, b1 simulate "
        f"{per['simulate'] * 1e3:.0f} ms, ratio {per['simulate'] / per['forward']:.2f}x "
        f"({args.images} images, float64, medians of {args.repeats} interleaved runs)"
    )


if __name__ == "__main__":
    main()

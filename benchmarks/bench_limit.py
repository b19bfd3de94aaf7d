"""Forward and b1 simulate against the machine's limit: the same layer GEMMs alone.

For each network the products the forward pass (and the b1 simulation) really runs are
recorded (shapes M x K @ K x O and dtype, one per ungrouped conv or dense layer), then
timed alone on random matrices of those shapes, interleaved with ``net.forward`` and
``simulate`` round by round (after a warm-up round), so all see the same machine load;
medians are printed, with each time over its GEMM time. Also: model save + load time,
the crossbar backend (pcm) against a bare numpy float forward of the same net (and its
float32 run's error), and the float32 error against float64.

    .venv/bin/python benchmarks/bench_limit.py                 # digits_mlp, digits_cnn, CIFAR VGG
    .venv/bin/python benchmarks/bench_limit.py --imagenet      # + VGG-16, ResNet-18/50 at 224^2
    .venv/bin/python benchmarks/bench_limit.py --layers --images 1 --repeats 3  # per conv
    .venv/bin/python benchmarks/bench_limit.py --peak vgg16 --images 64 --budget 2G
    .venv/bin/python benchmarks/bench_limit.py --crossbar --repeats 50  # crossbar vs bare only
    .venv/bin/python benchmarks/bench_limit.py --peak vgg16 --images 64 --what simulate --keep ""
"""

from __future__ import annotations

import argparse
import mmap
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from nets import cifar_vgg, vgg
from timing import interleaved_medians

import neurodeploy as nd
from neurodeploy import ops
from neurodeploy.deploy import deploy


def recorded_gemms(run) -> list[tuple[int, int, int, np.dtype]]:
    """(M, K, O, dtype) of every GEMM ``run()`` makes through ops.conv2d and ops.dense."""
    shapes = []
    conv, dense = ops._conv2d_gemm, ops.dense

    def conv_spy(x, weight, stride, padding, *fused):
        out = conv(x, weight, stride, padding, *fused)
        n, o, ho, wo = out.shape
        shapes.append((n * ho * wo, weight[0].size, o, out.dtype))
        return out

    def dense_spy(x, weight):
        out = dense(x, weight)
        shapes.append((x.shape[0], weight.shape[1], weight.shape[0], out.dtype))
        return out

    ops._conv2d_gemm, ops.dense = conv_spy, dense_spy
    try:
        run()
    finally:
        ops._conv2d_gemm, ops.dense = conv, dense
    return shapes


def outside_the_heap(shape, dtype) -> np.ndarray:
    """An uninitialised array in an anonymous memory map of its own, outside the C heap:
    the runner's buffers leave malloc's state (where freed memory goes, what it hands
    out next) as a process that never made them would have it."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer(mmap.mmap(-1, max(size, 1)), dtype, int(np.prod(shape))).reshape(shape)


def gemm_runner(shapes, seed: int = 0, own_weights: bool = True):
    """A function timing the GEMMs alone (s): one product per shape. Each product has a
    weight matrix of its own (the layers' weights are distinct memory, as in the
    network); own_weights=False: the weights are slices of the left operands' buffer
    instead (every layer's "weights" then stay in cache, which no run of the network's
    own weights can: printed beside, for comparison with earlier figures). The left
    operands are slices of one random buffer (the network's im2col blocks are reused
    cache-sized buffers too); the outputs are made and touched beforehand. Every buffer
    lies outside the C heap (:func:`outside_the_heap`), so the runner neither times nor
    disturbs the allocator of the runs it alternates with."""
    rng = np.random.default_rng(seed)
    biggest = max(max(m * k, k * (o if not own_weights else 0)) for m, k, o, _ in shapes)
    pool = {}
    for dt in {s[3] for s in shapes}:
        pool[dt] = outside_the_heap(biggest, dt)
        pool[dt][:] = rng.uniform(-1, 1, biggest)
    products = []
    for m, k, o, dt in shapes:
        if own_weights:
            b = outside_the_heap((k, o), dt)
            b[:] = rng.uniform(-1, 1, (k, o))
        else:
            b = pool[dt][: k * o].reshape(k, o)
        out = outside_the_heap((m, o), dt)
        out.fill(0)
        products.append((pool[dt][: m * k].reshape(m, k), b, out))

    def run() -> float:
        total = 0.0
        for a, b, out in products:
            start = time.perf_counter()
            np.matmul(a, b, out=out)
            total += time.perf_counter() - start
        return total

    return run


def limit_rows(name: str, net: nd.Network, x: np.ndarray, repeats: int, dtypes) -> None:
    snn = nd.convert(net, calibration=x)
    net.forward(x)  # compiles what it needs; the second call is timed
    start = time.perf_counter()
    net.forward(x)
    # Long calls start on an idle process (no BLAS thread spinning from the GEMM runner);
    # short ones back to back, as an idle pause slows this VM's next millisecond.
    settle = time.perf_counter() - start > 0.05
    for dtype in dtypes:
        fwd = recorded_gemms(lambda dtype=dtype: net.forward(x, dtype=dtype))
        sim = recorded_gemms(lambda dtype=dtype: nd.simulate(snn, x, dtype=dtype))
        med = interleaved_medians(
            {
                "gemm_fwd": gemm_runner(fwd),
                "forward": lambda dtype=dtype: net.forward(x, dtype=dtype),
                "gemm_sim": gemm_runner(sim),
                "simulate": lambda dtype=dtype: nd.simulate(snn, x, dtype=dtype),
                "cached_fwd": gemm_runner(fwd, own_weights=False),
                "cached_sim": gemm_runner(sim, own_weights=False),
            },
            repeats,
            settle=settle,
        )
        print(
            f"{name:<11} {dtype:<8} N={len(x):<4} forward {med['forward'] * 1e3:9.1f} ms = "
            f"{med['forward'] / med['gemm_fwd']:5.2f}x GEMMs ({med['gemm_fwd'] * 1e3:.1f} ms)   "
            f"simulate {med['simulate'] * 1e3:9.1f} ms = "
            f"{med['simulate'] / med['gemm_sim']:5.2f}x GEMMs ({med['gemm_sim'] * 1e3:.1f} ms)\n"
            f"{'':<11} {'':<8} {'':<6} with every weight from one cached buffer the GEMMs take "
            f"{med['cached_fwd'] * 1e3:.1f} / {med['cached_sim'] * 1e3:.1f} ms: forward "
            f"{med['forward'] / med['cached_fwd']:.2f}x, simulate "
            f"{med['simulate'] / med['cached_sim']:.2f}x",
            flush=True,
        )
    ref = net.forward(x)
    f32 = net.forward(x, dtype="float32")
    s32 = nd.simulate(snn, x, dtype="float32").output
    scale = np.abs(ref).max()
    print(
        f"{name:<11} float32 error / max|logit|: forward {np.abs(f32 - ref).max() / scale:.2e}, "
        f"simulate {np.abs(s32 - ref).max() / scale:.2e}",
        flush=True,
    )


def save_load(name: str, net: nd.Network, repeats: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench_limit."))
    try:
        saves, loads = [], []
        for r in range(repeats):
            start = time.perf_counter()
            nd.save_model(net, root / f"m{r}")
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            nd.load_model(root / f"m{r}")
            loads.append(time.perf_counter() - start)
        size = (root / "m0" / "weights.npz").stat().st_size
        params = sum(a.size for layer in net.layers for a in layer.params().values())
        print(
            f"{name:<11} save {np.median(saves):.2f} s, load {np.median(loads):.2f} s "
            f"(medians of {repeats}; {params / 1e6:.1f} M parameters, {size / 1e6:.0f} MB)",
            flush=True,
        )
    finally:
        shutil.rmtree(root)


def crossbar_row(repeats: int) -> None:
    net = nd.load_model("digits_mlp")
    x = nd.datasets.digits("test")[0].reshape(-1, 64)
    snn = nd.convert(net, calibration=nd.datasets.digits("train")[0].reshape(-1, 64))
    dep = deploy(snn, "pcm", backend="crossbar")
    dense = [(layer.weight, layer.bias) for layer in net.layers if isinstance(layer, nd.Dense)]

    def bare():
        h = x
        for i, (w, b) in enumerate(dense):
            h = h @ w.T
            h += b
            if i < len(dense) - 1:
                np.maximum(h, 0.0, out=h)
        return h

    med = interleaved_medians(
        {"bare": bare, "forward": lambda: net.forward(x), "crossbar": lambda: dep.run(x)},
        repeats,
    )
    print(
        f"digits_mlp  N={len(x)}: bare numpy {med['bare'] * 1e3:.3f} ms, forward "
        f"{med['forward'] * 1e3:.3f} ms = {med['forward'] / med['bare']:.2f}x, crossbar (pcm) "
        f"{med['crossbar'] * 1e3:.3f} ms = {med['crossbar'] / med['bare']:.2f}x bare",
        flush=True,
    )
    off = {"converter.adc_bits": None, "converter.dac_bits": None}
    for label, d in (("pcm", dep), ("pcm, converters off", deploy(snn, nd.load_profile(
            "pcm").with_overrides(off), backend="crossbar"))):
        a, b = d.run(x), d.run(x, dtype="float32")
        err = np.abs(b.output - a.output) / np.abs(a.output).max()
        agree = np.mean(a.predictions == b.predictions)
        print(
            f"digits_mlp  crossbar ({label}) float32 error / max|logit|: max {err.max():.2e}, "
            f"mean {err.mean():.2e}; predictions equal {agree:.3f}",
            flush=True,
        )


def peak(name: str, images: int, budget: str | None, what: str, dtype: str, keep) -> None:
    """Peak resident memory of one forward or simulate of ``images`` inputs (this process);
    keep: the stages whose spike times simulate keeps (None: all)."""
    if name.startswith("resnet"):
        from bench_resnet import ARCHITECTURES

        net = ARCHITECTURES[name]()
    else:
        net = {"vgg16": vgg, "cifar_vgg": cifar_vgg}[name]()
    x = np.random.default_rng(1).uniform(0.0, 1.0, (images, *net.input_shape))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if what == "forward":
        net.forward(x, dtype=dtype, memory_budget=budget)
    else:
        snn = nd.convert(net, calibration=x[:2])
        nd.simulate(snn, x, dtype=dtype, memory_budget=budget, keep=keep)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kept = "" if what == "forward" else f" keep={'all' if keep is None else list(keep)}"
    print(
        f"{name} {what} {dtype} N={images} budget={budget or 'default'}{kept}: "
        f"{time.perf_counter() - start:.1f} s, peak RSS {after / 2**20:.2f} GiB "
        f"(before the call {before / 2**20:.2f} GiB)"
    )


def layer_rows(net: nd.Network, x: np.ndarray, repeats: int, dtype: str) -> None:
    """Each conv layer's kernel (ops.conv2d) against its own GEMMs alone, interleaved:
    short rounds, so a load change on a shared machine skews one layer, not the total."""
    names = [layer.name for layer in net.layers]
    acts = net.activations(x)
    total = {"gemm": 0.0, "kernel": 0.0}
    for i, layer in enumerate(net.layers):
        if not isinstance(layer, nd.Conv2d):
            continue
        xin = (acts[names[i - 1]] if i else x).astype(dtype)  # keeps the memory layout
        shapes = recorded_gemms(lambda layer=layer, xin=xin: layer.linear(xin))
        med = interleaved_medians(
            {"gemm": gemm_runner(shapes), "kernel": lambda layer=layer, xin=xin: layer.linear(xin)},
            repeats,
        )
        total["gemm"] += med["gemm"]
        total["kernel"] += med["kernel"]
        print(
            f"  {layer.name:<8} in {xin.shape[1:]}: kernel {med['kernel'] * 1e3:7.1f} ms, "
            f"GEMMs {med['gemm'] * 1e3:7.1f} ms = {med['kernel'] / med['gemm']:.2f}x",
            flush=True,
        )
    print(f"  all convs: kernel / GEMMs = {total['kernel'] / total['gemm']:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--imagenet", action="store_true", help="add VGG-16, ResNet-18, ResNet-50")
    parser.add_argument(
        "--only", choices=["vgg16", "resnet18", "resnet50"], help="only this ImageNet net"
    )
    parser.add_argument("--images", type=int, default=2, help="batch of the 224^2 nets")
    parser.add_argument("--peak", choices=["vgg16", "cifar_vgg", "resnet18", "resnet50"])
    parser.add_argument("--what", choices=["forward", "simulate"], default="forward")
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--budget", help="memory budget for --peak, e.g. 2G")
    parser.add_argument(
        "--keep",
        help="--what simulate: comma-separated stages whose spike times the trace keeps "
        "('' for none; default all)",
    )
    parser.add_argument("--layers", action="store_true", help="VGG-16 conv layers one by one")
    parser.add_argument("--crossbar", action="store_true", help="only the crossbar row")
    args = parser.parse_args()
    if args.crossbar:
        crossbar_row(max(args.repeats, 20))
        return
    if args.layers:
        net = vgg()
        x = np.random.default_rng(1).uniform(0.0, 1.0, (args.images, *net.input_shape))
        for dtype in ("float64", "float32"):
            print(f"VGG-16 conv layers, {dtype}, N={args.images}", flush=True)
            layer_rows(net, x, args.repeats, dtype)
        return
    if args.peak:
        keep = None if args.keep is None else tuple(k for k in args.keep.split(",") if k)
        peak(args.peak, args.images, args.budget, args.what, args.dtype, keep)
        return
    dtypes = ("float64", "float32")
    if not args.only:
        crossbar_row(max(args.repeats, 20))
        digits = nd.datasets.digits("all")[0]
        for model in ("digits_mlp", "digits_cnn"):
            net = nd.load_model(model)
            limit_rows(model, net, digits.reshape(-1, *net.input_shape), args.repeats, dtypes)
        net = cifar_vgg()
        x = np.random.default_rng(1).uniform(0.0, 1.0, (64, *net.input_shape))
        limit_rows("cifar_vgg", net, x, args.repeats, dtypes)
        save_load("cifar_vgg", net, 3)
    if args.imagenet or args.only:
        x = np.random.default_rng(1).uniform(0.0, 1.0, (args.images, 3, 224, 224))
        if args.only in (None, "vgg16"):
            net = vgg()
            save_load("vgg16", net, 2)
            limit_rows("vgg16", net, x, max(1, args.repeats // 2), dtypes)
        if args.only in (None, "resnet18"):
            from bench_resnet import resnet18

            limit_rows("resnet18", resnet18(), x, max(1, args.repeats // 2), dtypes)
        if args.only in (None, "resnet50"):
            from bench_resnet import resnet50

            limit_rows("resnet50", resnet50(), x, max(1, args.repeats // 2), dtypes)


if __name__ == "__main__":
    main()

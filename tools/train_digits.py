"""Train the two shipped digits models with numpy only and save them.

Trains, from scratch and with a numpy-only forward/backward pass and Adam:

* ``digits_mlp``: 64 -> fc1 128 -> relu -> fc2 64 -> relu -> out 10;
* ``digits_cnn``: conv1 3x3 (8 channels, padding 1) -> bn1 -> relu -> 2x2 max
  pool -> flatten (128) -> fc1 64 -> relu -> out 10.

Data: :func:`neurodeploy.datasets.digits` -- scikit-learn's 8x8 digits, split
once, stratified, 30 % test, ``random_state=0``. Only the "train" split
(1257 samples) is trained on; the "test" split (540 samples) is used once, to
report accuracy. There is no early stopping: every model trains for a fixed
number of epochs, so the test split never selects anything.

Inputs are scaled by 1/16 during training; the scale is folded back into the
first layer's weight (a power of two, so exactly), and the saved networks take
raw pixels in [0, 16]. Batch norm trains on batch statistics and is saved in
inference mode with its running mean and variance. All randomness comes from
``np.random.default_rng(SEED)`` (one fresh generator per model), so a run gives
the same bits every time, with or without ``--only``.

Each model is saved with :func:`neurodeploy.modelio.save_model`, reloaded with
``load_model``, and its test accuracy is measured on the reloaded network. The
script exits with status 1 if a model misses its accuracy target (the model is
still written).

Run from the repository root::

    .venv/bin/python tools/train_digits.py [--out neurodeploy/models] [--only mlp|cnn]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neurodeploy.datasets import DIGITS_RANGE, digits
from neurodeploy.modelio import load_model, save_model
from neurodeploy.network import (
    BatchNorm,
    Conv2d,
    Dense,
    Flatten,
    Layer,
    MaxPool2d,
    Network,
    ReLU,
)

SEED = 20240607
# 1e-5, the frameworks' default, rounded to float32 so that ONNX's float32
# attribute carries it exactly.
BATCHNORM_EPS = float(np.float32(1e-5))
INPUT_SCALE = 1.0 / 16.0  # raw pixels 0..16 -> 0..1 for training; folded into layer 1
CLASSES = tuple(str(digit) for digit in range(10))
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "neurodeploy" / "models"  # package data


# --------------------------------------------------------------------------- parameters


@dataclass(eq=False)
class Param:
    """A trainable array with its gradient and Adam moments (all of one shape)."""

    value: np.ndarray
    decay: bool = True  # apply weight decay (weights yes; biases and bn affine no)
    grad: np.ndarray = field(init=False, repr=False)
    first_moment: np.ndarray = field(init=False, repr=False)
    second_moment: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.grad = np.zeros_like(self.value)
        self.first_moment = np.zeros_like(self.value)
        self.second_moment = np.zeros_like(self.value)


class Adam:
    """Adam with decoupled weight decay (AdamW) over a list of :class:`Param`."""

    def __init__(
        self,
        params: list[Param],
        weight_decay: float,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
    ):
        self.params = params
        self.weight_decay = weight_decay
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.steps = 0

    def step(self, learning_rate: float) -> None:
        """Update every parameter from its current ``grad``."""
        self.steps += 1
        bias_fix1 = 1.0 - self.beta1**self.steps
        bias_fix2 = 1.0 - self.beta2**self.steps
        for p in self.params:
            p.first_moment *= self.beta1
            p.first_moment += (1.0 - self.beta1) * p.grad
            p.second_moment *= self.beta2
            p.second_moment += (1.0 - self.beta2) * p.grad**2
            if p.decay and self.weight_decay:
                p.value -= learning_rate * self.weight_decay * p.value
            update = (p.first_moment / bias_fix1) / (
                np.sqrt(p.second_moment / bias_fix2) + self.eps
            )
            p.value -= learning_rate * update


# --------------------------------------------------------------------------- layers
#
# Training-side layers: forward(x, training) caches what backward needs;
# backward(grad_out) fills the parameters' .grad and returns the input gradient;
# export() gives the neurodeploy.network record with the trained arrays.


class TrainLayer:
    """Base class of the training-side layers."""

    def __init__(self, name: str):
        self.name = name
        self.params: list[Param] = []

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        raise NotImplementedError

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def export(self) -> Layer:
        raise NotImplementedError


def he_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """Normal weights with std sqrt(2 / fan_in), suited to ReLU layers."""
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)


class TrainDense(TrainLayer):
    """y = x W^T + b. x (N, in_features) -> y (N, out_features); W (out, in), b (out,)."""

    def __init__(self, name: str, in_features: int, out_features: int, rng: np.random.Generator):
        super().__init__(name)
        self.weight = Param(he_normal(rng, (out_features, in_features), in_features))
        self.bias = Param(np.zeros(out_features), decay=False)
        self.params = [self.weight, self.bias]

    def forward(self, x, training):
        self.inputs = x
        return x @ self.weight.value.T + self.bias.value

    def backward(self, grad_out):
        self.weight.grad = grad_out.T @ self.inputs
        self.bias.grad = grad_out.sum(axis=0)
        return grad_out @ self.weight.value

    def export(self):
        return Dense(name=self.name, weight=self.weight.value.copy(), bias=self.bias.value.copy())


class TrainConv2d(TrainLayer):
    """Stride-1 zero-padded cross-correlation via im2col.

    x (N, C, H, W) -> y (N, O, Ho, Wo); weight (O, C, k, k), bias (O,). With
    ``with_bias=False`` the bias stays zero and untrained (a following batch
    norm subtracts it again, so its gradient is zero up to rounding, which Adam
    would amplify into a random walk).
    """

    def __init__(
        self,
        name: str,
        in_channels: int,
        out_channels: int,
        kernel: int,
        padding: int,
        rng: np.random.Generator,
        with_bias: bool = True,
    ):
        super().__init__(name)
        fan_in = in_channels * kernel * kernel
        self.kernel, self.padding = kernel, padding
        self.weight = Param(he_normal(rng, (out_channels, in_channels, kernel, kernel), fan_in))
        self.bias = Param(np.zeros(out_channels), decay=False)
        self.params = [self.weight, self.bias] if with_bias else [self.weight]
        self.needs_input_grad = True

    def forward(self, x, training):
        p, k = self.padding, self.kernel
        padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(2, 3))
        n, c, ho, wo = windows.shape[:4]
        # cols (N*Ho*Wo, C*k*k): one row per output position, in (C, k, k) order.
        self.cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * k * k)
        self.input_shape = x.shape
        out_channels = self.weight.value.shape[0]
        out = self.cols @ self.weight.value.reshape(out_channels, -1).T + self.bias.value
        return out.reshape(n, ho, wo, out_channels).transpose(0, 3, 1, 2)

    def backward(self, grad_out):
        n, out_channels, ho, wo = grad_out.shape
        grad_rows = grad_out.transpose(0, 2, 3, 1).reshape(n * ho * wo, out_channels)
        self.weight.grad = (grad_rows.T @ self.cols).reshape(self.weight.value.shape)
        self.bias.grad = grad_rows.sum(axis=0)
        if not self.needs_input_grad:
            return None
        # col2im: scatter-add every kernel offset's column gradient back onto the input.
        _, c, h, w = self.input_shape
        p, k = self.padding, self.kernel
        grad_cols = (grad_rows @ self.weight.value.reshape(out_channels, -1)).reshape(
            n, ho, wo, c, k, k
        )
        grad_padded = np.zeros((n, c, h + 2 * p, w + 2 * p))
        for i in range(k):
            for j in range(k):
                grad_padded[:, :, i : i + ho, j : j + wo] += grad_cols[..., i, j].transpose(
                    0, 3, 1, 2
                )
        return grad_padded[:, :, p : p + h, p : p + w]

    def export(self):
        return Conv2d(
            name=self.name,
            weight=self.weight.value.copy(),
            bias=self.bias.value.copy(),
            stride=1,
            padding=self.padding,
        )


class TrainBatchNorm(TrainLayer):
    """Per-channel batch norm of x (N, C, H, W).

    Training mode normalises with the batch mean and (biased) variance over
    (N, H, W) and updates the running statistics with ``momentum``, the
    running variance from the unbiased batch variance (PyTorch's convention).
    Inference mode uses the running statistics, as the exported record does.
    """

    def __init__(self, name: str, channels: int, momentum: float = 0.1, eps: float = BATCHNORM_EPS):
        super().__init__(name)
        self.momentum, self.eps = momentum, eps
        self.gamma = Param(np.ones(channels), decay=False)
        self.beta = Param(np.zeros(channels), decay=False)
        self.running_mean = np.zeros(channels)
        self.running_var = np.ones(channels)
        self.params = [self.gamma, self.beta]

    def forward(self, x, training):
        if not training:
            scale = self.gamma.value / np.sqrt(self.running_var + self.eps)
            shift = self.beta.value - self.running_mean * scale
            return x * scale[None, :, None, None] + shift[None, :, None, None]
        axes = (0, 2, 3)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)
        self.inv_std = 1.0 / np.sqrt(var + self.eps)
        self.normalized = (x - mean[None, :, None, None]) * self.inv_std[None, :, None, None]
        self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * mean
        unbiased_var = var * count / max(count - 1, 1)
        self.running_var = (1 - self.momentum) * self.running_var + self.momentum * unbiased_var
        return (
            self.gamma.value[None, :, None, None] * self.normalized
            + self.beta.value[None, :, None, None]
        )

    def backward(self, grad_out):
        axes = (0, 2, 3)
        self.gamma.grad = (grad_out * self.normalized).sum(axis=axes)
        self.beta.grad = grad_out.sum(axis=axes)
        grad_norm = grad_out * self.gamma.value[None, :, None, None]
        mean_grad = grad_norm.mean(axis=axes, keepdims=True)
        mean_grad_dot = (grad_norm * self.normalized).mean(axis=axes, keepdims=True)
        inv_std = self.inv_std[None, :, None, None]
        return inv_std * (grad_norm - mean_grad - self.normalized * mean_grad_dot)

    def export(self):
        return BatchNorm(
            name=self.name,
            gamma=self.gamma.value.copy(),
            beta=self.beta.value.copy(),
            mean=self.running_mean.copy(),
            var=self.running_var.copy(),
            eps=self.eps,
        )


class TrainReLU(TrainLayer):
    """max(x, 0), any shape."""

    def forward(self, x, training):
        self.active = x > 0
        return np.where(self.active, x, 0.0)

    def backward(self, grad_out):
        return np.where(self.active, grad_out, 0.0)

    def export(self):
        return ReLU(name=self.name)


class TrainMaxPool2d(TrainLayer):
    """Non-overlapping k x k max pool: x (N, C, H, W) -> (N, C, H/k, W/k), H and W
    divisible by k. The gradient goes to one argmax per window (the first on ties)."""

    def __init__(self, name: str, kernel: int):
        super().__init__(name)
        self.kernel = kernel

    def _window_rows(self, x: np.ndarray) -> np.ndarray:
        """(N, C, H, W) -> (N, C, H/k, W/k, k*k), one row per window."""
        n, c, h, w = x.shape
        k = self.kernel
        blocks = x.reshape(n, c, h // k, k, w // k, k).transpose(0, 1, 2, 4, 3, 5)
        return blocks.reshape(n, c, h // k, w // k, k * k)

    def forward(self, x, training):
        rows = self._window_rows(x)
        self.input_shape = x.shape
        self.argmax = rows.argmax(axis=-1)
        return np.take_along_axis(rows, self.argmax[..., None], axis=-1)[..., 0]

    def backward(self, grad_out):
        n, c, h, w = self.input_shape
        k = self.kernel
        grad_rows = np.zeros((n, c, h // k, w // k, k * k))
        np.put_along_axis(grad_rows, self.argmax[..., None], grad_out[..., None], axis=-1)
        blocks = grad_rows.reshape(n, c, h // k, w // k, k, k).transpose(0, 1, 2, 4, 3, 5)
        return blocks.reshape(n, c, h, w)

    def export(self):
        return MaxPool2d(name=self.name, kernel=self.kernel, stride=self.kernel)


class TrainFlatten(TrainLayer):
    """(N, C, H, W) -> (N, C*H*W) in C, H, W order (as network.Flatten)."""

    def forward(self, x, training):
        self.input_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad_out):
        return grad_out.reshape(self.input_shape)

    def export(self):
        return Flatten(name=self.name)


class Sequential:
    """Training-side layers applied in order; the last one gives the logits."""

    def __init__(self, layers: list[TrainLayer]):
        self.layers = layers
        first = layers[0]
        if isinstance(first, TrainConv2d):
            first.needs_input_grad = False  # the input gradient is never used

    @property
    def params(self) -> list[Param]:
        return [p for layer in self.layers for p in layer.params]

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        """x (N, *input_shape) scaled to [0, 1] -> logits (N, classes)."""
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    def backward(self, grad_logits: np.ndarray) -> None:
        """Back-propagate dLoss/dlogits (N, classes), filling every Param.grad."""
        grad = grad_logits
        for layer in reversed(self.layers):
            grad = layer.backward(grad)

    def to_network(self, name: str, input_shape: tuple[int, ...]) -> Network:
        """The inference network on raw pixels: INPUT_SCALE folded into layer 1's weight.

        Every parameter is rounded to float32, as a framework's would be, so that the
        ONNX export (float32, what ONNX runtimes execute) carries the model exactly.
        """
        layers = [layer.export() for layer in self.layers]
        first = layers[0]
        layers[0] = dataclasses.replace(first, weight=first.weight * INPUT_SCALE)
        layers = [
            dataclasses.replace(layer, **{k: _float32(v) for k, v in layer.params().items()})
            for layer in layers
        ]
        return Network(
            name=name,
            input_shape=input_shape,
            input_range=DIGITS_RANGE,
            layers=tuple(layers),
            classes=CLASSES,
            dataset="digits",
        )


def _float32(values: np.ndarray) -> np.ndarray:
    """The nearest float32 values, held in float64."""
    return values.astype(np.float32).astype(np.float64)


# --------------------------------------------------------------------------- training


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of logits (N, classes) against int labels (N,).

    Returns (loss, dLoss/dlogits of shape (N, classes)).
    """
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    loss = -log_probs[rows, labels].mean()
    grad = np.exp(log_probs)
    grad[rows, labels] -= 1.0
    return float(loss), grad / len(labels)


def random_shifts(images: np.ndarray, rng: np.random.Generator, probability: float) -> np.ndarray:
    """Shift each image (N, C, H, W) by -1, 0 or +1 pixel along each axis, zero-filled.

    Each image is shifted with ``probability`` (offsets uniform over the eight
    non-zero moves), else left as is.
    """
    n, _, h, w = images.shape
    moves = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    shifted = rng.random(n) < probability
    choice = rng.integers(len(moves), size=n)
    padded = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = images.copy()
    for index, (dy, dx) in enumerate(moves):
        picked = shifted & (choice == index)
        out[picked] = padded[picked, :, 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
    return out


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (fixed epochs, cosine learning-rate decay)."""

    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    shift_probability: float


def cosine_learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate at ``step`` of ``total_steps``: cosine from the peak down to 1 % of it."""
    progress = step / max(total_steps - 1, 1)
    return config.learning_rate * (0.01 + 0.99 * 0.5 * (1.0 + np.cos(np.pi * progress)))


def train(
    model: Sequential,
    images: np.ndarray,
    labels: np.ndarray,
    input_shape: tuple[int, ...],
    config: TrainConfig,
    rng: np.random.Generator,
) -> None:
    """Train ``model`` in place on raw images (N, 1, 8, 8) in [0, 16] and labels (N,).

    Each mini-batch is shifted (augmentation), scaled by INPUT_SCALE and
    reshaped to (B, *input_shape).
    """
    n = len(images)
    steps_per_epoch = -(-n // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    optimizer = Adam(model.params, weight_decay=config.weight_decay)
    step = 0
    for _ in range(config.epochs):
        order = rng.permutation(n)
        for start in range(0, n, config.batch_size):
            batch = order[start : start + config.batch_size]
            x = random_shifts(images[batch], rng, config.shift_probability)
            x = (x * INPUT_SCALE).reshape((len(batch), *input_shape))
            logits = model.forward(x, training=True)
            _, grad_logits = softmax_cross_entropy(logits, labels[batch])
            model.backward(grad_logits)
            optimizer.step(cosine_learning_rate(config, step, total_steps))
            step += 1


# --------------------------------------------------------------------------- models


def build_mlp(rng: np.random.Generator) -> Sequential:
    """64 -> fc1 128 -> relu1 -> fc2 64 -> relu2 -> out 10."""
    return Sequential(
        [
            TrainDense("fc1", 64, 128, rng),
            TrainReLU("relu1"),
            TrainDense("fc2", 128, 64, rng),
            TrainReLU("relu2"),
            TrainDense("out", 64, 10, rng),
        ]
    )


CNN_CHANNELS = 8


def build_cnn(rng: np.random.Generator) -> Sequential:
    """(1, 8, 8) -> conv1 3x3 pad 1 -> bn1 -> relu1 -> pool1 2x2 -> flat -> fc1 64 -> relu2
    -> out 10."""
    return Sequential(
        [
            TrainConv2d("conv1", 1, CNN_CHANNELS, kernel=3, padding=1, rng=rng, with_bias=False),
            TrainBatchNorm("bn1", CNN_CHANNELS, momentum=0.1, eps=1e-5),
            TrainReLU("relu1"),
            TrainMaxPool2d("pool1", kernel=2),
            TrainFlatten("flat"),
            TrainDense("fc1", CNN_CHANNELS * 4 * 4, 64, rng),
            TrainReLU("relu2"),
            TrainDense("out", 64, 10, rng),
        ]
    )


@dataclass(frozen=True)
class ModelSpec:
    """What to train, how, and the test accuracy it must reach."""

    name: str
    input_shape: tuple[int, ...]
    build: Callable[[np.random.Generator], Sequential]
    config: TrainConfig
    target_accuracy: float


# Chosen by 3-fold cross-validation inside the train split (never on the test split).
TRAIN_CONFIG = TrainConfig(
    epochs=120, batch_size=32, learning_rate=2e-3, weight_decay=1e-4, shift_probability=0.25
)

MODELS = {
    "mlp": ModelSpec(
        name="digits_mlp",
        input_shape=(64,),
        build=build_mlp,
        config=TRAIN_CONFIG,
        target_accuracy=0.96,
    ),
    "cnn": ModelSpec(
        name="digits_cnn",
        input_shape=(1, 8, 8),
        build=build_cnn,
        config=TRAIN_CONFIG,
        target_accuracy=0.97,
    ),
}


def accuracy(net: Network, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of raw images (N, 1, 8, 8) that ``net.forward`` classifies correctly."""
    x = images.reshape((len(images), *net.input_shape))
    return float((net.forward(x).argmax(axis=1) == labels).mean())


def run(spec: ModelSpec, out_dir: Path) -> bool:
    """Train, save and reload one model; print its accuracies. True if it meets its target."""
    started = time.perf_counter()
    rng = np.random.default_rng(SEED)
    train_x, train_y = digits("train")
    test_x, test_y = digits("test")
    model = spec.build(rng)
    train(model, train_x, train_y, spec.input_shape, spec.config, rng)
    net = model.to_network(spec.name, spec.input_shape)

    path = save_model(net, out_dir / spec.name)
    reloaded = load_model(path)
    test_inputs = test_x.reshape((len(test_x), *spec.input_shape))
    same = np.array_equal(net.forward(test_inputs), reloaded.forward(test_inputs))
    train_acc = accuracy(reloaded, train_x, train_y)
    test_acc = accuracy(reloaded, test_x, test_y)
    seconds = time.perf_counter() - started

    passed = test_acc >= spec.target_accuracy and same
    verdict = "ok" if passed else "MISSED"
    print(
        f"{spec.name}: train accuracy {train_acc:.2%}, test accuracy {test_acc:.2%} "
        f"(target {spec.target_accuracy:.0%}: {verdict}), {seconds:.1f} s -> {path}"
    )
    if not same:
        print(f"{spec.name}: the reloaded model's logits differ from the trained one's")
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"models folder (default: {DEFAULT_OUT})"
    )
    parser.add_argument("--only", choices=sorted(MODELS), help="train just this model")
    args = parser.parse_args(argv)
    keys = [args.only] if args.only else list(MODELS)
    results = [run(MODELS[key], args.out) for key in keys]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())

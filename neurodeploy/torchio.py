"""PyTorch import: ``from_torch(module, example_input, input_range)`` via ONNX.

The module is exported with torch's own ONNX exporter into a temporary file that
is always removed, and read back by :func:`neurodeploy.onnxio.load_onnx`, so a
PyTorch network converts exactly as its ONNX export would. torch is an optional
dependency (``pip install neurodeploy[torch]``) and is imported only inside
:func:`from_torch`; nothing else in neurodeploy imports it.

The exporter is the TorchScript one (``dynamo=False``), on purpose: it folds
constant shape arithmetic (``x.view(x.size(0), -1)`` becomes one Reshape),
writes ``nn.Flatten`` as a Flatten node and needs no extra package, whereas the
dynamo exporter (torch >= 2.5, the default from 2.9) needs onnxscript, writes
the example's batch size as a literal into every Reshape and lowers adaptive
average pooling to ReduceMean. The graph is exported for one sample of the
example (batch 1, no dynamic axes): it is an intermediate file, static shapes
let the exporter fold everything that is not a layer, and a batch literal of 1
in a Reshape (``view(x.size(0), -1)``) reads as a flatten. The whole example is
then used to check the imported network against the module.
"""

from __future__ import annotations

import inspect
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .errors import ModelError, UsageError
from .network import Network

# Largest |torch - imported| difference accepted on the example, relative to the
# largest |logit| (at least 1): float32 accumulation in torch against float64 here
# differs by ~1e-6 relative on the nets we tried; a wrong import differs by O(1).
_FORWARD_TOLERANCE = 1e-4


def from_torch(
    module,
    example_input,
    input_range,
    name: str | None = None,
    opset: int | None = None,
) -> Network:
    """Convert a PyTorch ReLU network into a :class:`Network` through ONNX.

    module: a ``torch.nn.Module`` (exported in eval mode; its training mode is
    restored afterwards). example_input: a tensor or array of shape
    (N, *input_shape), e.g. (1, 1, 8, 8), with values the network expects.
    input_range: (p, q), the range of the raw input. name: the network's name
    (default: the module's class name). opset: the ONNX opset to export with
    (default: torch's).

    The imported network's forward pass on example_input is checked against the
    module's output. Raises :class:`UsageError` when torch is not installed or
    an argument is wrong, :class:`ModelError` when the export cannot be read
    (naming the ONNX node and operator) or does not reproduce the module.
    """
    try:
        import torch
    except ImportError:
        raise UsageError(
            "from_torch needs PyTorch, which is not installed: pip install neurodeploy[torch]"
        ) from None
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"from_torch: module must be a torch.nn.Module, got {type(module)!r}")
    try:
        p, q = (float(v) for v in input_range)
    except (TypeError, ValueError):
        raise UsageError(f"from_torch: input_range must be (p, q), got {input_range!r}") from None
    if not (np.isfinite(p) and np.isfinite(q) and p < q):
        raise UsageError(f"from_torch: input_range needs finite p < q, got {input_range!r}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)):
        raise UsageError(f"from_torch: opset must be an integer, got {opset!r}")
    if name is None:
        name = type(module).__name__
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)) or "torch_model"

    if isinstance(example_input, torch.Tensor):
        example = example_input.detach().to(torch.float32)
    else:
        example = torch.as_tensor(np.asarray(example_input, dtype=np.float32))
    if example.ndim < 2:
        raise UsageError(
            f"from_torch: example_input must be (N, *input_shape) with a batch axis, "
            f"got shape {tuple(example.shape)}"
        )
    parameter = next(iter(module.parameters()), None)
    if parameter is not None:
        example = example.to(parameter.device)

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            expected = module(example).detach().cpu().numpy().astype(np.float64)
        with tempfile.TemporaryDirectory(prefix="neurodeploy-torch-") as tmp:
            path = Path(tmp) / f"{name}.onnx"
            _export(torch, module, example[:1], path, opset)
            net = _load_named(path, name, (p, q))
    finally:
        module.train(was_training)

    got = net.forward(example.cpu().numpy().astype(np.float64))
    if got.shape != expected.shape:
        raise ModelError(
            f"from_torch: the imported network gives shape {got.shape}, the module {expected.shape}"
        )
    error = float(np.max(np.abs(got - expected))) if got.size else 0.0
    scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    if not error <= _FORWARD_TOLERANCE * scale:
        raise ModelError(
            f"from_torch: the imported network differs from the module by {error:.3g} "
            f"(largest |output| {scale:.3g}) on example_input"
        )
    return net


def _export(torch, module, example, path: Path, opset: int | None) -> None:
    kwargs = {"input_names": ["input"], "output_names": ["output"]}
    if opset is not None:
        kwargs["opset_version"] = opset
    # torch < 2.5 has only the TorchScript exporter and no `dynamo` argument.
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch >= 2.9 warns that the TorchScript exporter is deprecated: using it is
            # this module's documented choice, not something the caller can act on.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(module, (example,), str(path), **kwargs)
    except Exception as exc:  # torch raises assorted errors for unexportable modules
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"from_torch: torch.onnx.export failed ({first})") from None


def _load_named(path: Path, name: str, input_range: tuple[float, float]) -> Network:
    """load_onnx on ``path`` with the graph renamed to ``name`` (torch calls every
    graph "main_graph", which load_onnx would use as the network's name)."""
    import onnx

    from .onnxio import load_onnx

    model = onnx.load(str(path))
    model.graph.name = name
    onnx.save(model, str(path))
    try:
        return load_onnx(path, input_range=input_range)
    except ModelError as exc:  # the temporary file's name means nothing to the caller
        raise ModelError(str(exc).replace(str(path), f"from_torch({name})")) from None

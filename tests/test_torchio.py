"""nd.from_torch without PyTorch: nothing imports torch, and the call says what to install.

(With torch installed, from_torch goes through the ONNX import; the ONNX files torch writes
are tested without torch.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import neurodeploy as nd


def test_importing_neurodeploy_does_not_import_torch():
    code = (
        "import sys, neurodeploy, neurodeploy.cli, neurodeploy.torchio; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "False\n"


def test_without_torch_from_torch_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    with pytest.raises(nd.UsageError) as info:
        nd.from_torch(object(), [[0.0]], input_range=(0.0, 1.0))
    assert str(info.value) == (
        "from_torch needs PyTorch, which is not installed: pip install neurodeploy[torch]"
    )

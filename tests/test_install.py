"""The package as a user installs it: the built wheel in a fresh venv, used from
outside the checkout.

The wheel is built from a copy of the sources (pyproject.toml, README.md,
neurodeploy/) and installed with --no-deps into a new venv that cannot see the
editable install of the development venv. Its dependencies (numpy, lava, onnx,
...) come from the development venv's site-packages, listed in a .pth file of
the new venv: a plain path line is appended to sys.path, while the .pth files
inside that directory (among them the editable install's finder) are not run,
and the new venv's own site-packages comes first, so the wheel's copy is the
one imported. The test asserts that it is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import neurodeploy as nd

SOURCE = Path(__file__).resolve().parent.parent

# Run inside the new venv, from a directory outside the checkout: shipped profile
# and model by name, conversion and simulation of a few test digits.
USER_SCRIPT = textwrap.dedent(
    """
    import importlib.metadata, json, sys
    import numpy as np
    import neurodeploy as nd

    profile = nd.load_profile("pcm")
    net = nd.load_model("digits_cnn")
    x_train, _ = nd.datasets.digits("train")
    x_test, y_test = nd.datasets.digits("test")
    snn = nd.convert(net, calibration=x_train[:200])
    trace = nd.simulate(snn, x_test[:20])
    relu = net.forward(x_test[:20])
    try:
        nd.load_model("no_such_model")
        unknown = None
    except nd.ModelError as exc:
        unknown = str(exc)
    modules = [m for name, m in sys.modules.items() if name.split(".")[0] == "neurodeploy"]
    print(json.dumps({
        "file": nd.__file__,
        "modules": sorted({m.__file__ for m in modules if getattr(m, "__file__", None)}),
        "version": nd.__version__,
        "metadata_version": importlib.metadata.version("neurodeploy"),
        "profile": [profile.name, profile.source],
        "model": [net.name, list(net.input_shape)],
        "relative_error": float(np.max(np.abs(trace.output - relu)) / np.max(np.abs(relu))),
        "agreement": float(np.mean(trace.predictions == relu.argmax(axis=1))),
        "unknown": unknown,
    }))
    """
)


def _clean_env() -> dict:
    """The environment without PYTHONPATH (the suite runs with the checkout on it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_NO_INPUT"] = "1"
    return env


def _run(argv, cwd, timeout=120) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv directory, its site-packages, a working directory outside the checkout)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(SOURCE / name, source / name)
    shutil.copytree(
        SOURCE / "neurodeploy",
        source / "neurodeploy",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )

    # Without build isolation when the backend's requirements (setuptools, wheel)
    # are installed, as `make test` installs them; otherwise pip fetches them.
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", root / "dist", source]
    if importlib.util.find_spec("wheel") is not None:
        build.insert(4, "--no-build-isolation")
    _run(build, cwd=root)
    wheels = list((root / "dist").glob("neurodeploy-*.whl"))
    assert len(wheels) == 1, wheels

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    python = venv / "bin" / "python"
    purelib = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root
        ).stdout.strip()
    )
    dependencies = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "_neurodeploy_test_dependencies.pth").write_text("\n".join(dependencies) + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         wheels[0]],
        cwd=root,
    )
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return venv, purelib, elsewhere


def test_wheel_ships_profiles_and_models_and_they_load_by_name(installed):
    venv, purelib, elsewhere = installed
    out = _run([venv / "bin" / "python", "-c", USER_SCRIPT], cwd=elsewhere).stdout
    report = json.loads(out.strip().splitlines()[-1])

    package = purelib / "neurodeploy"
    assert Path(report["file"]) == package / "__init__.py"
    outside = [f for f in report["modules"] if not Path(f).is_relative_to(package)]
    assert outside == []
    assert report["version"] == report["metadata_version"] == nd.__version__
    assert report["profile"] == ["pcm", str(package / "profiles" / "pcm.yaml")]
    assert report["model"] == ["digits_cnn", [1, 8, 8]]
    assert report["relative_error"] < 1e-9
    assert report["agreement"] == 1.0
    assert report["unknown"].startswith("no_such_model: model path does not exist")
    assert "digits_cnn, digits_mlp, fileclass" in report["unknown"]


def test_console_script_runs_from_anywhere(installed):
    venv, purelib, elsewhere = installed
    script = venv / "bin" / "neurodeploy"
    assert _run([script, "--version"], cwd=elsewhere).stdout == f"neurodeploy {nd.__version__}\n"
    shown = _run([script, "profile", "pcm"], cwd=elsewhere).stdout
    assert shown.startswith(f"# {purelib / 'neurodeploy' / 'profiles' / 'pcm.yaml'}\n")
    assert "\nname: pcm\n" in shown

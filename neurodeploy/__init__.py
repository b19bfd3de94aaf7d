"""neurodeploy: exact ReLU-to-TTFS conversion and deployment onto neuromorphic hardware models.

Pipeline (one direction): load_model -> convert -> simulate (reference) ->
deploy/run on hardware -> crosscheck -> sweep/report.
"""

from . import datasets
from .errors import (
    ConversionError,
    DataError,
    ModelError,
    NeurodeployError,
    UsageError,
)
from .modelio import from_sklearn, load_model, resolve_model_path, save_model
from .network import (
    Add,
    AvgPool2d,
    BatchNorm,
    Conv2d,
    Dense,
    Flatten,
    MaxPool2d,
    Network,
    ReLU,
)

# The one place the version is written: pyproject.toml reads it (dynamic version).
__version__ = "0.1.0"

__all__ = [
    "Add",
    "AvgPool2d",
    "BatchNorm",
    "ConversionError",
    "Conv2d",
    "DataError",
    "Dense",
    "Flatten",
    "MaxPool2d",
    "ModelError",
    "Network",
    "NeurodeployError",
    "ReLU",
    "UsageError",
    "datasets",
    "from_sklearn",
    "load_model",
    "resolve_model_path",
    "save_model",
]

from .convert import convert  # noqa: E402
from .simulate import simulate  # noqa: E402
from .trace import Trace  # noqa: E402
from .ttfs import OutputLayer, Shortcut, SpikingLayer, TimePool, TTFSNetwork  # noqa: E402

__all__ += [
    "OutputLayer",
    "Shortcut",
    "SpikingLayer",
    "TTFSNetwork",
    "TimePool",
    "Trace",
    "convert",
    "simulate",
]

from .errors import DeployError, ProfileError  # noqa: E402
from .profile import HardwareProfile, load_profile  # noqa: E402

__all__ += ["DeployError", "HardwareProfile", "ProfileError", "load_profile"]

from .deploy import BACKENDS, Deployment, deploy  # noqa: E402

__all__ += ["BACKENDS", "Deployment", "deploy"]

from .convert import retime  # noqa: E402
from .crosscheck import CrossCheckReport, crosscheck  # noqa: E402

__all__ += ["CrossCheckReport", "crosscheck", "retime"]

from .finetune import FinetuneResult, finetune  # noqa: E402
from .torchio import from_torch  # noqa: E402  (imports torch only when called)

__all__ += ["FinetuneResult", "finetune", "from_torch"]

from .metrics import neurobench_metrics  # noqa: E402

__all__ += ["neurobench_metrics"]

"""One exception hierarchy for every error a user can cause.

The CLI turns any :class:`NeurodeployError` into one line on stderr and exit
code 2; anything else is a bug and keeps its traceback.
"""


class NeurodeployError(Exception):
    """Base class: a problem with the user's input, named precisely."""


class ModelError(NeurodeployError):
    """A model directory, file or network definition is missing or malformed."""


class ConversionError(NeurodeployError):
    """A network cannot be converted (unsupported structure, bad calibration data)."""


class DataError(NeurodeployError):
    """Input samples or labels are of the wrong shape, type or content."""


class UsageError(NeurodeployError):
    """A command-line argument or API argument is invalid."""


class ProfileError(NeurodeployError):
    """A hardware profile is missing, malformed or out of range (names file and dotted key)."""


class DeployError(NeurodeployError):
    """A network cannot be deployed with the given profile and backend."""

"""Stand-in ``torchvision.transforms.v2``."""

from ..._stub import InterpolationMode, missing  # noqa: F401
from . import functional  # noqa: F401


def __getattr__(name):
    return missing("torchvision.transforms.v2", name)

"""Stand-in ``torchvision.transforms.v2.functional``."""

from ..._stub import InterpolationMode, missing  # noqa: F401


def __getattr__(name):
    return missing("torchvision.transforms.v2.functional", name)

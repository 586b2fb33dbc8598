"""Stand-in ``torchvision.transforms.functional``."""

from .._stub import InterpolationMode, missing  # noqa: F401


def __getattr__(name):
    return missing("torchvision.transforms.functional", name)

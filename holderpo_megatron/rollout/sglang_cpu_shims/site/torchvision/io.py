"""Stand-in ``torchvision.io``."""

import enum

from ._stub import missing


class ImageReadMode(enum.Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4


def __getattr__(name):
    return missing("torchvision.io", name)

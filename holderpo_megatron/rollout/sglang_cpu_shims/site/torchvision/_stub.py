"""Shared pieces of the torchvision stand-in (see holderpo_megatron/rollout/sglang_cpu_shims)."""

import enum


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def missing(module: str, name: str):
    """A module-level ``__getattr__`` result: a callable that explains itself when called."""
    if name.startswith("_"):
        raise AttributeError(name)

    def unavailable(*args, **kwargs):
        raise NotImplementedError(
            f"{module}.{name}: torchvision is a stand-in on this CPU install "
            "(holderpo_megatron/rollout/sglang_cpu_shims); image/video processing is not available"
        )

    unavailable.__name__ = name
    unavailable.__qualname__ = name
    return unavailable

"""CPU stand-in for torchvision (see holderpo_megatron/rollout/sglang_cpu_shims): import-time
names only; every function raises NotImplementedError when called."""

from . import io, transforms  # noqa: F401
from ._stub import missing

__version__ = "0.0.0+holderpo.cpu.shim"
HOLDERPO_CPU_SHIM = True


def __getattr__(name):
    return missing("torchvision", name)

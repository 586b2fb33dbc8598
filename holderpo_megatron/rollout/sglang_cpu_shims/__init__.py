"""Stand-ins for the two modules SGLang imports that a CPU-only machine cannot install.

* ``torchvision``: imported at module level by SGLang's (and, once importable, transformers')
  image code; PyPI's torchvision does not load beside the CPU torch. The stand-in provides the
  names those modules read at import time (``InterpolationMode``, ``transforms.functional``,
  ``transforms.v2.functional``, ``io``); any function called on it raises NotImplementedError.
  Text-only rollouts never call one.
* ``sgl_kernel``: SGLang's compiled kernels. On CPU, SGLang imports it to probe for Intel AMX
  kernels (the probe looks for ``torch.ops.sgl_kernel.convert_weight_packed``; the stand-in
  registers no ops, so SGLang takes its plain-torch paths) and calls exactly one function,
  ``assign_req_to_token_pool_cpu``, implemented here in torch.

Why on sys.path at run time rather than installed into site-packages: the stand-ins then exist
only in processes that start a CPU SGLang engine (:func:`activate`, called by our launcher before
``import sglang``; server subprocesses get it through ``PYTHONPATH``, and ``multiprocessing``
spawn children inherit ``sys.path``). Elsewhere in the venv, transformers and every other library
see torchvision as absent, exactly as installed. A real torchvision / sgl_kernel, if present, wins:
:func:`activate` only adds the folder for modules that do not import.
"""

from __future__ import annotations

import importlib.util
import os
import sys

__all__ = ["SITE", "activate", "needed"]

# Holds only the stand-in packages (torchvision/, sgl_kernel/), so it shadows nothing else.
SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "site")
_SHIMMED = ("torchvision", "sgl_kernel")


def needed() -> list[str]:
    """The shimmed modules that no real install provides here."""
    out = []
    for name in _SHIMMED:
        spec = importlib.util.find_spec(name)
        if spec is None or (spec.origin or "").startswith(SITE):
            out.append(name)
    return out


def activate() -> bool:
    """Put the stand-ins on ``sys.path`` (and ``PYTHONPATH`` for child processes) when a real
    torchvision or sgl_kernel is missing. Returns whether the stand-ins are in use."""
    if not needed():
        return False
    if SITE not in sys.path:
        sys.path.insert(0, SITE)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if SITE not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([SITE] + parts)
    return True

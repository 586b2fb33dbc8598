"""GPU memory and utilisation of this process's device through NVML (package ``nvidia-ml-py``).

Without a GPU (or without the NVML library / driver) :class:`GpuMonitor` says so once in the log
and reports nothing afterwards; it never fails a run.
"""

from __future__ import annotations

import logging
import os

import torch

__all__ = ["GpuMonitor"]

log = logging.getLogger(__name__)
_GIB = 1024**3


class GpuMonitor:
    """``sample()`` -> ``{"gpu/memory_used_gib", "gpu/memory_total_gib", "gpu/utilization_pct",
    "gpu/torch_max_allocated_gib"}`` for the current CUDA device; ``{}`` where there is none."""

    def __init__(self, enabled: bool = True):
        self._handle = None
        self._nvml = None
        self.available = False
        self.reason = "disabled"
        if enabled:
            self._init()

    def _init(self) -> None:
        try:
            import pynvml
        except ImportError:
            self.reason = "the nvidia-ml-py package (module pynvml) is not installed"
            log.info("GPU stats off: %s", self.reason)
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:  # NVMLError_LibraryNotFound / _DriverNotLoaded on a CPU machine
            self.reason = f"NVML unavailable ({type(e).__name__}: {e}); no GPU stats will be reported"
            log.info("GPU stats off: %s", self.reason)
            return
        self._nvml = pynvml
        try:
            self._handle = self._device_handle(pynvml)
        except pynvml.NVMLError as e:
            self.reason = f"no NVML handle for this process's GPU ({type(e).__name__}: {e})"
            log.info("GPU stats off: %s", self.reason)
            self.close()
            return
        if self._handle is None:
            self.reason = "NVML found no GPU"
            log.info("GPU stats off: %s", self.reason)
            self.close()
            return
        self.available = True
        self.reason = ""

    @staticmethod
    def _device_handle(pynvml):
        if torch.cuda.is_available():
            # The UUID names the physical GPU whatever CUDA_VISIBLE_DEVICES renumbered.
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            uuid = getattr(props, "uuid", None)
            if uuid is not None:
                text = str(uuid)
                name = text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"
                try:
                    return pynvml.nvmlDeviceGetHandleByUUID(name)
                except pynvml.NVMLError as e:
                    log.info("NVML does not know CUDA device UUID %s (%s); using the device index", text, e)
        if pynvml.nvmlDeviceGetCount() == 0:
            return None
        return pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("LOCAL_RANK", "0")))

    def sample(self) -> dict[str, float]:
        if not self.available:
            return {}
        p = self._nvml
        try:
            mem = p.nvmlDeviceGetMemoryInfo(self._handle)
            util = p.nvmlDeviceGetUtilizationRates(self._handle)
        except p.NVMLError as e:
            log.warning("GPU stats off from now on: NVML query failed (%s: %s)", type(e).__name__, e)
            self.available = False
            self.reason = str(e)
            return {}
        out = {
            "gpu/memory_used_gib": mem.used / _GIB,
            "gpu/memory_total_gib": mem.total / _GIB,
            "gpu/utilization_pct": float(util.gpu),
        }
        if torch.cuda.is_available():
            out["gpu/torch_max_allocated_gib"] = torch.cuda.max_memory_allocated() / _GIB
        return out

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass  # shutting down a library that is going away anyway
            self._nvml = None
        self.available = False

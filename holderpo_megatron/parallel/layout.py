"""The parallel layout of a run and Megatron's process groups for it."""

from __future__ import annotations

import os
from datetime import timedelta
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["ParallelLayout", "init_distributed", "initialize_model_parallel", "destroy_model_parallel"]


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int | None = None  # virtual pipeline chunks per rank (interleaved 1F1B), None = off
    sequence_parallel: bool = False  # Megatron's sequence parallelism over the TP group (tp > 1)

    def __post_init__(self):
        for name in ("tp", "pp", "cp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"parallel.{name} must be an int >= 1, got {v!r}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel needs tp > 1 (it splits activations over the TP group)")
        if self.vpp is not None and (not isinstance(self.vpp, int) or self.vpp < 2 or self.pp < 2):
            raise ValueError(f"parallel.vpp must be None or an int >= 2 with pp >= 2, got vpp={self.vpp!r}, pp={self.pp}")

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp} "
                f"= {self.model_parallel_size}"
            )
        return world_size // self.model_parallel_size


def init_distributed(backend: str | None = None) -> None:
    """Join the process group torchrun (or a test) set up through the environment. Collectives time
    out after ``$HOLDERPO_COLLECTIVE_TIMEOUT_S`` (the launcher sets it from
    ``parallel.collective_timeout_s``): a rank whose peer died ends instead of waiting forever."""
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=float(os.environ.get("HOLDERPO_COLLECTIVE_TIMEOUT_S", 1800)))
    dist.init_process_group(backend, timeout=timeout)


def initialize_model_parallel(layout: ParallelLayout, seed: int = 1234) -> None:
    """Megatron's groups for ``layout`` on the already initialised world, and its RNG tracker."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    layout.data_parallel_size(dist.get_world_size())
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
    )
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()

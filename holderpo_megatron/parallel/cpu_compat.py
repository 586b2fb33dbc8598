"""Megatron-Core on CPU under gloo: the compatibility layer, switched on with one line.

    from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron
    enable_cpu_megatron()          # before building any Megatron model or optimizer

Used by the tests and the embedded CPU default, never on a GPU run: it refuses to switch on where
CUDA is available. Megatron-Core 0.16 assumes CUDA in a handful of places; this module maps each to
its CPU meaning and nothing else:

* ``torch.cuda.current_device()`` -> ``"cpu"``; tensor factories called with ``device="cuda"`` (or a
  cuda ``torch.device``) build CPU tensors (a ``TorchFunctionMode``), ``pin_memory=True`` is dropped
  (no pinned allocator without an accelerator; Megatron pins the CP RoPE index); ``Tensor.cuda()`` is the identity.
* the CUDA RNG: ``torch.cuda.{manual_seed, get_rng_state, set_rng_state}`` and Megatron's tracker
  helpers act on one dedicated CPU ``torch.Generator``. RL runs use zero dropout; the tracker's
  states are kept (and checkpointed) but ops on CPU draw from the default CPU generator.
* ``torch.cuda.{synchronize, Event, Stream, current_stream, stream, memory_*}``: no-ops / zeros.
* gradient clipping: Megatron asserts CUDA grad types there; the CPU version scales the same way.
* gradient-accumulation fusion: Megatron's linear layers add their weight gradient straight into
  DDP's ``main_grad`` through apex's CUDA extension ``fused_weight_gradient_mlp_cuda``; on CPU the
  same two calls are one in-place ``addmm_`` each (:class:`_CpuWgradAccum`), so the flag means the
  same on both (no per-microbatch weight-gradient tensor, no separate add into ``main_grad``).
* Adam: without TE or apex Megatron builds ``torch.optim.AdamW`` with its default for-loop kernel;
  :func:`fuse_cpu_adam` switches it to torch's fused CPU kernel (the same update, ~4x faster on 2
  cores for SmolLM2's 67 M parameters per stage: bench/e2e_vs_trl.py's optimizer share).
* sequence parallelism: without TE or apex the local spec's norms are torch's (``WrappedTorchNorm``),
  which refuse it; under SP each TP rank normalises its own slice of tokens, so the norm is the same
  and only its weight's gradient must be summed over TP, which ``finalize_model_grads`` does for
  parameters tagged ``sequence_parallel`` (as TE's and apex's norms tag theirs). Gloo itself has the
  all-gather and reduce-scatter SP needs.

The distributed optimizer is not supported on CPU (its buffers assume CUDA): CPU runs use Megatron's
non-distributed optimizer, said plainly in :func:`enable_cpu_megatron`'s return value.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["enable_cpu_megatron", "cpu_megatron_enabled", "fuse_cpu_adam", "CPU_NOTES"]

CPU_NOTES = (
    "Megatron-Core on CPU (gloo): local layer spec, fp32, non-distributed optimizer; "
    "the distributed optimizer and Transformer Engine need CUDA."
)

_ENABLED = False
_CUDA_GEN: torch.Generator | None = None


def cpu_megatron_enabled() -> bool:
    return _ENABLED


def _is_cuda(dev) -> bool:
    if dev is None:
        return False
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, int) and not isinstance(dev, bool):  # torch reads a bare int as a CUDA ordinal
        return True
    return False


class _CudaToCpu(TorchFunctionMode):
    """Rewrites device='cuda' (or an int ordinal) to 'cpu' on every torch call that takes one, and
    drops pin_memory=True."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if _is_cuda(dev):
            kwargs = dict(kwargs, device="cpu")
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        if func is torch.Tensor.to and len(args) > 1:
            # positional device of Tensor.to: only a str or torch.device (ints there are flags)
            args = (args[0],) + tuple(
                "cpu" if isinstance(a, (str, torch.device)) and _is_cuda(a) else a for a in args[1:]
            )
        return func(*args, **kwargs)


class _NoopEvent:
    def __init__(self, *a, **k):
        pass

    def record(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def wait(self, *a, **k):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NoopStream:
    def __init__(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _NoopEvent()


def _get_rng_state(device="cuda", *a, **k):
    return _CUDA_GEN.get_state()


def _set_rng_state(state, device="cuda", *a, **k):
    if isinstance(state, torch.Generator):
        state = state.get_state()
    _CUDA_GEN.set_state(state.cpu() if isinstance(state, torch.Tensor) else state)


def _manual_seed(seed):
    _CUDA_GEN.manual_seed(int(seed))


def _patch_torch_cuda() -> None:
    c = torch.cuda
    c.current_device = lambda: "cpu"
    c.synchronize = lambda *a, **k: None
    c.Event = _NoopEvent
    c.Stream = _NoopStream
    c.current_stream = lambda *a, **k: _NoopStream()
    c.default_stream = lambda *a, **k: _NoopStream()
    c.stream = lambda *a, **k: contextlib.nullcontext()
    c.set_device = lambda *a, **k: None
    c.device_count = lambda: 0
    c.manual_seed = _manual_seed
    c.manual_seed_all = _manual_seed
    c.get_rng_state = _get_rng_state
    c.set_rng_state = _set_rng_state
    c.memory_allocated = lambda *a, **k: 0
    c.max_memory_allocated = lambda *a, **k: 0
    c.memory_reserved = lambda *a, **k: 0
    c.max_memory_reserved = lambda *a, **k: 0
    c.reset_peak_memory_stats = lambda *a, **k: None
    c.empty_cache = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's clip_grad_by_total_norm_fp32 asserts CUDA grads; the same scaling on CPU."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for param in parameters:
            grad = getattr(param, attr, None)
            if grad is not None:
                grad.detach().mul_(clip_coeff)


class _CpuWgradAccum:
    """The two entry points of apex's ``fused_weight_gradient_mlp_cuda`` that Megatron's
    ``LinearWithGradAccumulationAndAsyncCommunication`` calls, on CPU: ``main_grad += grad_output^T
    input`` in place, for 2-D ``input [tokens, in]`` and ``grad_output [tokens, out]``."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad):
        main_grad.addmm_(grad_output.t().to(main_grad.dtype), total_input.to(main_grad.dtype))

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


def fuse_cpu_adam(optimizer) -> int:
    """Switch the torch Adam/AdamW inside a Megatron optimizer (chained or not) to torch's fused CPU
    kernel; returns how many param groups were switched. Call it after building the optimizer and
    again after loading its state (a state dict's param groups carry their own ``fused`` flag).
    A no-op off the CPU layer."""
    if not _ENABLED:
        return 0
    n = 0
    for mo in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(mo, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            inner.defaults["fused"] = True
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False
                n += 1
    return n


def _torch_norm_under_sequence_parallel(original_new):
    def new(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, *args, **kwargs)
        plain = copy.copy(config)  # the torch norm itself does not depend on SP
        plain.sequence_parallel = False
        norm = original_new(cls, plain, hidden_size, *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True  # finalize_model_grads sums these gradients over TP
        return norm

    return new


def _patch_megatron() -> None:
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.tensor_parallel import layers
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    mrandom._get_cuda_rng_state = lambda *a, **k: _CUDA_GEN.get_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: _set_rng_state(state)
    # The grad-norm itself already falls back to plain torch (megatron.core.utils.local_multi_tensor_*)
    # when apex/TE are absent; only the clipping asserts CUDA tensor types.
    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    WrappedTorchNorm.__new__ = _torch_norm_under_sequence_parallel(WrappedTorchNorm.__new__)
    layers.fused_weight_gradient_mlp_cuda = _CpuWgradAccum
    layers._grad_accum_fusion_available = True


def enable_cpu_megatron(force: bool = False) -> str:
    """Switch the layer on (idempotent). Returns :data:`CPU_NOTES`.

    Raises RuntimeError where CUDA is available (a GPU run must never see this layer) unless
    ``force=True`` (for debugging the layer itself).
    """
    global _ENABLED, _CUDA_GEN
    if _ENABLED:
        return CPU_NOTES
    if torch.cuda.is_available() and not force:
        raise RuntimeError("enable_cpu_megatron() called on a machine with CUDA: GPU runs must not use the CPU layer")
    _CUDA_GEN = torch.Generator()
    _CUDA_GEN.manual_seed(0)
    _patch_torch_cuda()
    _patch_megatron()
    _CudaToCpu().__enter__()  # process-wide, for the life of the process
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _ENABLED = True
    return CPU_NOTES

"""The Hölder (power) mean of token importance ratios, in log space.

For one sequence with valid-token log-ratios d_t = logp_t - old_logp_t (t = 1..T):

    rho_p = ((1/T) * sum_t exp(p * d_t)) ** (1/p)
    log rho_p = (logsumexp_t(p * d_t) - log T) / p           (p != 0)
    log rho_0 = mean_t(d_t)                                   (the geometric / GSPO limit)

Numerics. Write c_t = d_t - mean(d) (centred) and x_t = p * c_t. Then

    log rho_p = mean(d) + L / p,   L = log mean_t exp(x_t) >= 0.

L is evaluated in one of two *exact* forms, chosen per row by the size of s = max_t x_t:
  * s <= 1: L = log1p(mean_t expm1(x_t)). Accurate as p -> 0, where L ~ p^2 var(d) / 2, so
    L / p -> 0 continuously and p = 0 needs no special branch beyond 0/0 := 0.
  * s > 1:  L = s + log(mean_t exp(x_t - s)), which cannot overflow for any |p * d|.
Both forms are the same function; choosing between them is a numerical choice, never an
approximation, so the result is continuous in p (no jump at a threshold on |p|).

The gradient is the paper's token weight distribution:
    d log rho_p / d d_t = softmax_t(p * d_t) over valid tokens (uniform 1/T at p = 0),
implemented analytically in a custom autograd function (one saved tensor, no autograd graph of
the intermediate ops). The forward needs only per-sequence reductions (count, sum, max, sum of exp)
and the backward only each token's sequence statistics, so a ``SequenceReducer`` runs the same code on
padded, packed and context-parallel tokens.
"""

from __future__ import annotations

import math

import torch

from .reducers import PaddedReducer, SequenceReducer

__all__ = ["holder_log_ratio", "masked_mean"]

_SHIFT_THRESHOLD = 1.0


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # float32 or better: half types are upcast, float64 stays float64.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` along ``dim``; rows with no valid entry give 0."""
    mask_f = mask.to(values.dtype)
    count = mask_f.sum(dim)
    return (values * mask_f).sum(dim) / count.clamp_min(1)


class _HolderLogRatio(torch.autograd.Function):
    """Forward from per-sequence reductions only (count, sum, max, sum of exp), so the same code
    serves every layout; backward is local to each token given its sequence's statistics."""

    @staticmethod
    def forward(ctx, log_ratio: torch.Tensor, mask: torch.Tensor, p: float, reducer: SequenceReducer):
        R = reducer
        dtype = _compute_dtype(log_ratio)
        maskf = mask.to(dtype)
        # Zero padding before any arithmetic so NaN/inf at padded positions cannot leak in.
        d = torch.where(mask, log_ratio.to(dtype), torch.zeros((), dtype=dtype, device=log_ratio.device))
        count, d_sum = R.seq_sums(maskf, d)
        safe_count = count.clamp_min(1)
        mean = d_sum / safe_count
        ctx.reducer = R
        ctx.input_dtype = log_ratio.dtype
        # Below the smallest normal of the compute dtype p * c underflows; the geometric mean is then
        # exact to within |p| * var(d) / 2 < 1e-35, far below rounding, so this is no jump.
        if abs(p) < torch.finfo(dtype).tiny:
            ctx.p = 0.0
            ctx.save_for_backward(maskf, safe_count)
            return mean
        x = (d - R.broadcast(mean)) * (p * maskf)  # p * centred d, 0 at padding
        neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=x.device)
        s = R.seq_max(torch.where(mask, x, neg_inf))
        shifted = s > _SHIFT_THRESHOLD
        shift = torch.where(shifted, s, torch.zeros_like(s))
        y = x - R.broadcast(shift)
        # exp form for shifted rows (sum of exp(y) <= T, >= 1), expm1 form near zero.
        e = torch.where(R.broadcast(shifted), torch.exp(y), torch.expm1(y)) * maskf
        mean_e = R.seq_sum(e) / safe_count
        lse_mean = shift + torch.where(shifted, torch.log(mean_e), torch.log1p(mean_e))
        lse_mean = torch.where(count > 0, lse_mean, torch.zeros_like(lse_mean))
        out = mean + lse_mean / p
        ctx.p = p
        # softmax weights need x and log(sum exp x) = lse_mean + log T (per sequence).
        ctx.save_for_backward(x, maskf, lse_mean + torch.log(safe_count))
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        R = ctx.reducer
        if ctx.p == 0.0:
            maskf, safe_count = ctx.saved_tensors
            w = maskf * R.broadcast(1.0 / safe_count)  # (not maskf / ...: 0/0 at tokens of no sequence)
        else:
            x, maskf, lse = ctx.saved_tensors
            w = torch.exp(x - R.broadcast(lse)) * maskf
        grad = (w * R.broadcast(grad_out.to(w.dtype))).to(ctx.input_dtype)
        return grad, None, None, None


def holder_log_ratio(
    log_ratio: torch.Tensor, mask: torch.Tensor, p: float, reducer: SequenceReducer | None = None
) -> torch.Tensor:
    """Log of the Hölder mean of token ratios, per sequence.

    Args:
        log_ratio: ``[B, T]`` per-token log-ratios d_t = logp_t - old_logp_t (nats), any float dtype;
            with ``reducer``, token-shaped for that layout (e.g. packed ``[N]``).
        mask: bool (or 0/1) of ``log_ratio``'s shape, True at response tokens that count.
        p: the power (any finite real; 0 is the geometric mean).
        reducer: the token layout (default: padded rows, one sequence per row). Under context
            parallelism the result is the global per-sequence value on every rank, and the gradient
            reaches only this rank's tokens.

    Returns:
        ``[S]`` float32 (float64 for float64 input): log rho_p per sequence; 0 for sequences with no
        valid token (which also receive no gradient). The gradient w.r.t. ``log_ratio`` is
        softmax_t(p * d_t) over the sequence's valid tokens times the upstream gradient.
    """
    if reducer is None:
        if log_ratio.dim() != 2:
            raise ValueError(f"log_ratio must be [batch, tokens], got shape {tuple(log_ratio.shape)}")
        reducer = PaddedReducer(log_ratio.shape)
    else:
        reducer.check_tokens("log_ratio", log_ratio)
    if mask.shape != log_ratio.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match log_ratio shape {tuple(log_ratio.shape)}"
        )
    if not log_ratio.is_floating_point():
        raise ValueError(f"log_ratio must be a floating tensor, got dtype {log_ratio.dtype}")
    p = float(p)
    if not math.isfinite(p):
        raise ValueError(f"p must be finite, got {p}; use a large |p| for the max/min limits")
    member = reducer.token_member()
    mask = mask.bool() if member is None else mask.bool() & member
    return _HolderLogRatio.apply(log_ratio, mask, p, reducer)

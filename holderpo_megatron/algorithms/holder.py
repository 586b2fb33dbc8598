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


def float_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A bool mask as 0/1 of ``dtype``. Through a uint8 view: on CPU bool -> float takes a slow
    element-wise path (about 7x the time of uint8 -> float)."""
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8).to(dtype)
    return mask.to(dtype)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` along ``dim``; rows with no valid entry give 0."""
    mask_f = float_mask(mask, values.dtype)
    count = mask_f.sum(dim)
    return (values * mask_f).sum(dim) / count.clamp_min(1)


def _exp_terms(x: torch.Tensor, maskf: torch.Tensor, count: torch.Tensor, R: SequenceReducer):
    """For x = p * centred d (0 off the mask): L = log mean_t exp(x_t) per sequence, by the two
    exact forms of the module docstring, and the softmax numerators u (token-shaped, 0 off the
    mask) with their per-sequence sums Z, so that softmax_t(x) = u_t / Z.

    Only the transcendental each sequence needs is evaluated (one pass over the tokens when all
    sequences take the same form, the usual case); the choice is made from per-sequence values,
    identical on every rank of a context-parallel group, so all ranks take the same path."""
    s = R.seq_max(x)  # padding holds x = 0 <= max over valid x (centred), so it cannot move s past 1
    shifted = s > _SHIFT_THRESHOLD
    any_shifted, all_shifted = torch.stack([shifted.any(), (shifted | (count == 0)).all()]).tolist()
    if not any_shifted:
        e = torch.expm1(x)  # exactly 0 off the mask, since x is
        sum_e = R.seq_sum(e)
        # exp(x) = expm1(x) + 1 at valid tokens, 0 elsewhere; rounding of the +1 only touches
        # weights far below 1 / T, in absolute terms below eps / T.
        return torch.log1p(sum_e / count.clamp_min(1)), e.add_(maskf), sum_e + count
    if all_shifted:
        u = torch.exp(x.sub_(R.broadcast(s.masked_fill(~shifted, 0.0)))).mul_(maskf)
        z = R.seq_sum(u)
        return s + torch.log(z / count.clamp_min(1)), u, z
    # Mixed sequences: both forms over all tokens, each sequence keeps its own.
    shift = torch.where(shifted, s, torch.zeros_like(s))
    y = x.sub_(R.broadcast(shift))
    bshifted = R.broadcast(shifted)
    e = torch.where(bshifted, torch.exp(y), torch.expm1(y)).mul_(maskf)
    sum_e = R.seq_sum(e)
    mean_e = sum_e / count.clamp_min(1)
    lse = shift + torch.where(shifted, torch.log(mean_e), torch.log1p(mean_e))
    u = torch.where(bshifted, e, e + maskf)
    return lse, u, torch.where(shifted, sum_e, sum_e + count)


class _HolderLogRatio(torch.autograd.Function):
    """Forward from per-sequence reductions only (count, sum, max, sum of exp), so the same code
    serves every layout; backward is local to each token given its sequence's statistics.

    Takes ``d`` already 0 and finite off the mask and ``maskf`` 0/1 in d's compute dtype. Saves one
    token-shaped tensor: exp(x) at valid tokens (or the mask at p = 0), so the backward is a single
    multiply by per-sequence factors."""

    @staticmethod
    def forward(ctx, d: torch.Tensor, maskf: torch.Tensor, p: float, reducer: SequenceReducer):
        R = reducer
        count, d_sum = R.seq_sums(maskf, d)
        safe_count = count.clamp_min(1)
        mean = d_sum / safe_count
        ctx.reducer = R
        # Below the smallest normal of the compute dtype p * c underflows; the geometric mean is then
        # exact to within |p| * var(d) / 2 < 1e-35, far below rounding, so this is no jump.
        if abs(p) < torch.finfo(d.dtype).tiny:
            ctx.save_for_backward(maskf, 1.0 / safe_count)
            return mean
        # p * (d - mean) at valid tokens, 0 elsewhere: one fused pass and one in-place scale.
        x = torch.addcmul(d, maskf, R.broadcast(-mean)).mul_(p)
        lse_mean, u, z = _exp_terms(x, maskf, count, R)
        valid = count > 0
        out = mean + torch.where(valid, lse_mean, torch.zeros_like(lse_mean)) / p
        # softmax weights: u / Z; sequences with no token get none (and u is 0 there).
        ctx.save_for_backward(u, torch.where(valid, 1.0 / z, torch.zeros_like(z)))
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        u, inv_z = ctx.saved_tensors
        return u * ctx.reducer.broadcast(grad_out.to(inv_z.dtype) * inv_z), None, None, None


def _holder_log_ratio_masked(d: torch.Tensor, maskf: torch.Tensor, p: float, reducer: SequenceReducer) -> torch.Tensor:
    """:func:`holder_log_ratio` on inputs the caller has already cleaned: ``d`` in the compute dtype,
    0 and finite wherever ``maskf`` (0/1, same dtype) is 0; no checks. The losses call this."""
    return _HolderLogRatio.apply(d, maskf, float(p), reducer)


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
    dtype = _compute_dtype(log_ratio)
    maskf = float_mask(mask, dtype)
    d = log_ratio.to(dtype) * maskf
    # Garbage (NaN/inf) at padding survives the multiply; the total shows it, and only then is the
    # padding zeroed by the slower select (a local choice: no collective depends on it).
    if not bool(torch.isfinite(d.detach().sum())):
        d = torch.where(mask, log_ratio.to(dtype), torch.zeros((), dtype=dtype, device=d.device))
    return _holder_log_ratio_masked(d, maskf, p, reducer)

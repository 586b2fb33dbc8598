"""Independent float64 references for the algorithm tests: straightforward formulas, no tricks."""

from __future__ import annotations

import math

import torch


def ref_holder_log_ratio(d: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """Naive float64 log of the power mean, row by row. Rows with no valid token give 0."""
    out = []
    for row, m in zip(d.double(), mask.bool()):
        x = row[m]
        if x.numel() == 0:
            out.append(torch.zeros((), dtype=torch.float64))
        elif abs(p) < 1e-4:
            # cumulant series of log mean exp(p x) / p: exact p = 0 limit, no cancellation
            c = x - x.mean()
            k2, k3 = (c**2).mean(), (c**3).mean()
            k4 = (c**4).mean() - 3 * k2**2
            out.append(x.mean() + p * k2 / 2 + p**2 * k3 / 6 + p**3 * k4 / 24)
        else:
            out.append((torch.logsumexp(p * x, 0) - math.log(x.numel())) / p)
    return torch.stack(out)


def ref_seq_loss(log_rho, adv, valid, clip_low, clip_high):
    rho = torch.exp(log_rho)
    per = torch.maximum(-adv * rho, -adv * rho.clamp(1 - clip_low, 1 + clip_high))
    per = torch.where(valid, per, torch.zeros_like(per))
    return per.sum() / valid.sum().clamp_min(1)


def ref_holder_loss(logp, old, adv, mask, p, clip_low=0.2, clip_high=0.2, variant="seq"):
    """float64 HölderPO loss written from the issue's definitions."""
    d = (logp.double() - old.double()) * mask
    adv = adv.double()
    valid = mask.bool().any(-1)
    lo, hi = math.log(1 - clip_low), math.log(1 + clip_high)
    if variant == "seq":
        return ref_seq_loss(ref_holder_log_ratio(d, mask, p), adv, valid, clip_low, clip_high)
    if variant == "seq_tokclip":
        return ref_seq_loss(ref_holder_log_ratio(d.clamp(lo, hi), mask, p), adv, valid, clip_low, clip_high)
    # token: per-token sign-aware clip of r_t, then power mean
    r = torch.exp(d)
    rc = r.clamp(1 - clip_low, 1 + clip_high)
    a = adv.unsqueeze(-1)
    kept = torch.where(a > 0, torch.minimum(r, rc), torch.where(a < 0, torch.maximum(r, rc), r))
    mean_p = torch.exp(ref_holder_log_ratio(torch.log(kept), mask, p))
    per = torch.where(valid, -adv * mean_p, torch.zeros_like(mean_p))
    return per.sum() / valid.sum().clamp_min(1)


def ref_grpo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, aggregation="token-mean"):
    d = logp.double() - old.double()
    r = torch.exp(d)
    a = adv.double().unsqueeze(-1)
    per_tok = torch.maximum(-a * r, -a * r.clamp(1 - clip_low, 1 + clip_high)) * mask
    if aggregation == "token-mean":
        return per_tok.sum() / mask.sum()
    valid = mask.bool().any(-1)
    per_seq = per_tok.sum(-1) / mask.sum(-1).clamp_min(1)
    return per_seq[valid].mean()


def random_batch(b: int, t: int, seed: int = 0, spread: float = 1.0, dtype=torch.float32):
    """Ragged batch: logp, old_logp, advantages, mask (row lengths 1..t, one empty row if b > 2)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 5
    logp = old + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    if b > 2:
        lengths[1] = 0
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask

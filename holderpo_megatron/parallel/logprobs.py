"""Token log-probs and entropy from vocab-parallel logits, without a float32 copy of the logits.

Megatron's output layer leaves each tensor-parallel (TP) rank with a shard ``[..., vocab / TP]`` of
the logits (columns ``[vocab_start, vocab_start + vocab / TP)`` of the padded vocabulary). For
z = logits / temperature, per token:

    log p(target) = z_target - logZ,          logZ = m + log S,   S = sum_v exp(z_v - m)
    entropy       = logZ - E_p[z] = log S - Q / S,                Q = sum_v exp(z_v - m) (z_v - m)

Each rank computes, chunk of tokens by chunk, its local max m_r, S_r and Q_r relative to m_r, and
the target logit where it owns the target column. Then two all-reduces of O(tokens) values over the
TP group: MAX of m, and one SUM of the stacked ``[3, tokens]`` (S, Q, z_target) after rescaling each
rank's partials to the global max. Columns at or beyond ``vocab_size`` (Megatron's TP padding of the
vocabulary) are never read. The only float32 tensors of logits size are two per-chunk working
buffers (``chunk_size x vocab/TP``), reused across chunks; the input itself (e.g. bf16) is kept as is.

Backward (no communication: the loss downstream is replicated over TP, and logZ and E_p[z] are
saved from the forward), chunk by chunk, with g and h the upstream gradients of log p and entropy:

    d/d logits_v = [ g (onehot_v - p_v) - h p_v (z_v - E_p[z]) ] / temperature

returned in the logits' dtype; padding columns get 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = ["TokenLogProbs", "vocab_parallel_logprobs", "VocabParallelLogProbs"]

# Bytes of one float32 working buffer when chunk_size is not given (two are live at once).
_CHUNK_BYTES = 64 << 20


class TokenLogProbs(NamedTuple):
    logprobs: torch.Tensor  # [...] float32, nats
    entropy: torch.Tensor | None  # [...] float32, nats (None unless asked for)


def _group_size_rank(group) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class _Shard(NamedTuple):
    logits: torch.Tensor  # [N, V_local] view of the input
    target_local: torch.Tensor  # [N] int64: target column in this shard (clamped; see owned)
    owned: torch.Tensor  # [N] bool: the target column is a real column of this shard
    n_real: int  # leading real (non-padding) columns of this shard
    temperature: float
    chunk: int


def _forward(shard: _Shard, group, entropy: bool):
    """Returns (logp [N], entropy [N] or None, logZ [N], E_p[z] [N] or None), all float32."""
    x, n_real, T = shard.logits, shard.n_real, shard.temperature
    n = x.shape[0]
    dev = x.device
    m = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
    s = torch.zeros(n, dtype=torch.float32, device=dev)
    q = torch.zeros(n, dtype=torch.float32, device=dev)
    zt = torch.zeros(n, dtype=torch.float32, device=dev)
    if n_real > 0 and n > 0:
        rows = min(shard.chunk, n)
        zbuf = torch.empty(rows, n_real, dtype=torch.float32, device=dev)
        ebuf = torch.empty(rows, n_real, dtype=torch.float32, device=dev)
        for i in range(0, n, rows):
            j = min(i + rows, n)
            z, e = zbuf[: j - i], ebuf[: j - i]
            z.copy_(x[i:j, :n_real])
            if T != 1.0:
                z.div_(T)
            mc = z.amax(-1, keepdim=True)
            zt[i:j] = z.gather(1, shard.target_local[i:j, None]).squeeze(1)
            z.sub_(mc)  # z - m_r: exact entropy without cancelling two O(m) terms
            torch.exp(z, out=e)
            s[i:j] = e.sum(-1)
            if entropy:
                # row-wise dot product without a [rows, vocab] temporary
                q[i:j] = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).reshape(-1)
            m[i:j] = mc.squeeze(1)
    zt = torch.where(shard.owned, zt, torch.zeros_like(zt))
    world, _ = _group_size_rank(group)
    if world > 1:
        m_local = m
        m = m_local.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        # rescale this rank's partials from its max to the global one (0 if it has no real column)
        scale = torch.exp(m_local - m)
        stats = torch.stack([s * scale, (q + (m_local - m).nan_to_num(0.0, 0.0, 0.0) * s) * scale, zt])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        s, q, zt = stats.unbind(0)
    log_s = torch.log(s)
    logz = m + log_s
    logp = zt - logz
    if not entropy:
        return logp, None, logz, None
    q_over_s = q / s
    return logp, log_s - q_over_s, logz, m + q_over_s


def _backward(shard: _Shard, logz, ez, g_lp, g_ent, out_dtype):
    x, n_real, T = shard.logits, shard.n_real, shard.temperature
    n, v = x.shape
    grad = torch.empty((n, v), dtype=out_dtype, device=x.device)
    if n_real < v:
        grad[:, n_real:] = 0
    if n_real == 0 or n == 0:
        return grad
    g_lp = torch.zeros_like(logz) if g_lp is None else g_lp.float().reshape(-1)
    rows = min(shard.chunk, n)
    zbuf = torch.empty(rows, n_real, dtype=torch.float32, device=x.device)
    pbuf = torch.empty(rows, n_real, dtype=torch.float32, device=x.device)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        z, p = zbuf[: j - i], pbuf[: j - i]
        z.copy_(x[i:j, :n_real])
        if T != 1.0:
            z.div_(T)
        torch.sub(z, logz[i:j, None], out=p)
        p.exp_()
        if g_ent is None:
            p.mul_(-g_lp[i:j, None])  # -g p
        else:
            # -p (g + h (z - E[z])), built in z's buffer
            z.sub_(ez[i:j, None]).mul_(g_ent[i:j, None]).add_(g_lp[i:j, None])
            p.mul_(z).neg_()
        # + g at the target column; rows whose target is on another rank add 0 (no host sync)
        p.scatter_add_(1, shard.target_local[i:j, None], (g_lp[i:j] * shard.owned[i:j])[:, None])
        if T != 1.0:
            p.div_(T)
        grad[i:j, :n_real].copy_(p)
    return grad


class VocabParallelLogProbs(torch.autograd.Function):
    """Autograd function behind :func:`vocab_parallel_logprobs` (validated inputs only).

    Saves the logits (no copy), the targets and two ``[N]`` float32 vectors."""

    @staticmethod
    def forward(ctx, logits, shard: _Shard, group, entropy_mode: int):
        # the shard carries metadata only; the logits come in as a tracked argument
        logp, ent, logz, ez = _forward(shard._replace(logits=logits.reshape(-1, logits.shape[-1])), group, entropy_mode > 0)
        ctx.shard = shard
        ctx.entropy_grad = entropy_mode == 2
        ctx.out_dtype = logits.dtype
        ctx.in_shape = logits.shape
        ctx.save_for_backward(logits, logz, ez if ctx.entropy_grad else None)
        if ent is None:
            ent = logp.new_empty(0)
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        logits, logz, ez = ctx.saved_tensors
        shard = ctx.shard._replace(logits=logits.reshape(-1, logits.shape[-1]))
        g_ent = g_ent.float().reshape(-1) if (ctx.entropy_grad and g_ent is not None) else None
        grad = _backward(shard, logz, ez, g_lp, g_ent, ctx.out_dtype)
        return grad.reshape(ctx.in_shape), None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    group=None,
    entropy: bool = False,
    entropy_grad: bool = False,
    chunk_size: int | None = None,
    check_targets: bool = True,
) -> TokenLogProbs:
    """Log-probs of ``target`` (and optionally the entropy) under softmax(logits / temperature)
    over the full vocabulary, from this rank's vocab shard.

    Args:
        logits: ``[..., vocab_local]`` any float dtype (bf16 stays bf16: only per-chunk float32
            working copies are made).
        target: ``[...]`` integer token ids in ``[0, vocab_size)`` (global ids, the same on all TP ranks).
        vocab_start: global id of this shard's first column (default ``tp_rank * vocab_local``).
        vocab_size: the real vocabulary size; columns at or beyond it (Megatron's TP padding) are
            excluded (default: ``vocab_local * tp_size``, no padding).
        temperature: logits are divided by it (> 0).
        group: the tensor-parallel process group; None or size 1 means no communication.
        entropy: also return the entropy (nats); detached unless ``entropy_grad``.
        entropy_grad: make the entropy differentiable (implies ``entropy``).
        chunk_size: tokens per chunk (default: float32 working buffers of at most 64 MiB and at
            most 1/8 of the tokens each).
        check_targets: validate target ids (one host sync); disable on a hot path with trusted ids.

    Returns:
        :class:`TokenLogProbs` ``(logprobs [...] float32, entropy [...] float32 or None)``.
        Under ``torch.no_grad()`` (or for logits without grad) nothing is saved for backward.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError(f"logits must be a floating tensor [..., vocab_local], got {_describe(logits)}")
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor of token ids, got {_describe(target)}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)} "
            f"without its vocab dim {tuple(logits.shape[:-1])}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    world, rank = _group_size_rank(group)
    v_local = logits.shape[-1]
    if v_local < 1:
        raise ValueError(f"logits must have at least one vocab column, got shape {tuple(logits.shape)}")
    if vocab_start is None:
        vocab_start = rank * v_local
    if vocab_size is None:
        vocab_size = v_local * world
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0, got {vocab_start!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= v_local * world:
        raise ValueError(
            f"vocab_size must be an int in [1, vocab_local * tp_size = {v_local * world}], got {vocab_size!r}"
        )
    n_real = max(0, min(v_local, vocab_size - vocab_start))
    n_tok = target.numel()
    if chunk_size is None:
        # at most 64 MiB per float32 buffer, and at most 1/8 of the tokens so that small inputs too
        # stay well under the logits' own size
        chunk_size = max(1, min(_CHUNK_BYTES // (4 * max(n_real, 1)), -(-n_tok // 8)))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if check_targets and target.numel():
        lo, hi = (int(v) for v in torch.aminmax(target))
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"target id {bad} is out of range [0, vocab_size={vocab_size})")

    entropy = entropy or entropy_grad
    flat = logits.reshape(-1, v_local)
    t_local = target.reshape(-1).long() - vocab_start
    owned = (t_local >= 0) & (t_local < n_real)
    shard = _Shard(flat, t_local.clamp(0, max(n_real - 1, 0)), owned, n_real, float(temperature), chunk_size)
    out_shape = logits.shape[:-1]

    if not (torch.is_grad_enabled() and logits.requires_grad):
        # scoring path (old / reference policies): nothing saved
        logp, ent, _, _ = _forward(shard, group, entropy)
        return TokenLogProbs(logp.reshape(out_shape), None if ent is None else ent.reshape(out_shape))
    mode = 2 if entropy_grad else (1 if entropy else 0)
    logp, ent = VocabParallelLogProbs.apply(logits, shard._replace(logits=None), group, mode)
    return TokenLogProbs(logp.reshape(out_shape), ent.reshape(out_shape) if entropy else None)


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)} and dtype {t.dtype}"
    return type(t).__name__

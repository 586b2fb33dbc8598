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

:func:`output_layer_logprobs` fuses the output layer into the same math: from the hidden states
``[N, H]`` of the positions whose log-probs are wanted and the output weight shard ``[V/TP, H]``,
each chunk's logits ``h W^T`` are made in the float32 working buffer, used and dropped; backward
recomputes them and turns the chunk's logit gradient into ``grad_h = d W`` and ``grad_W += d^T h``.
No tensor of ``[N, V/TP]`` ever exists, in forward or backward (the cost: one more matmul), except
when all N tokens fit one chunk (a microbatch's responses, often): that chunk's buffer, already made,
is then kept for backward instead of recomputed (peak memory unchanged: backward holds it and one
more buffer, as forward held two). With
``gradient_accumulation_fusion`` the weight's gradient goes straight into Megatron's ``main_grad``
buffer, as Megatron's own linear layers do with that flag (no ``[V/TP, H]`` gradient tensor either).
:func:`output_layer_input` is the output layer's input-side communication (Megatron's mappings).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = [
    "TokenLogProbs", "VocabParallelLogProbs", "VocabParallelOutputLogProbs", "output_layer_input",
    "output_layer_logprobs", "vocab_parallel_logprobs",
]

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
    """Where the targets sit in this rank's vocab shard; the logits themselves come from a loader."""

    target_local: torch.Tensor  # [N] int64: target column in this shard (clamped; see owned)
    owned: torch.Tensor  # [N] bool: the target column is a real column of this shard
    n_real: int  # leading real (non-padding) columns of this shard
    temperature: float
    chunk: int


# load(i, j, z): write the raw logits of tokens i:j, real columns only, into float32 z [j-i, n_real]
# store(i, j, d): consume d [j-i, n_real] float32, the gradient of those raw logits (a reused buffer)


def _forward(shard: _Shard, n: int, load, group, entropy: bool, dev, keep: bool = False):
    """Returns (logp [N], entropy [N] or None, logZ [N], E_p[z] [N] or None), all float32; with
    ``keep``, a fifth: when the tokens fit one chunk, ``(z - m_r, m_r)`` (the working buffer
    ``[N, n_real]`` after the pass, and this rank's row maxima ``[N]``) for :func:`_backward`, else None."""
    n_real, T = shard.n_real, shard.temperature
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
            load(i, j, z)
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
    kept = (zbuf, m.clone()) if keep and 0 < n <= shard.chunk and n_real > 0 else None
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
        out = logp, None, logz, None
    else:
        q_over_s = q / s
        out = logp, log_s - q_over_s, logz, m + q_over_s
    return (*out, kept) if keep else out


def _backward(shard: _Shard, n: int, load, store, logz, ez, g_lp, g_ent, dev, kept=None) -> None:
    """Feeds ``store`` the gradient of the raw logits, chunk by chunk (see the module docstring).
    ``kept``: the forward's ``(z - m_r, m_r)`` of a single chunk (:func:`_forward`), used in place of
    loading the logits again (and overwritten where the entropy has a gradient); logZ and E_p[z] are
    shifted by m_r to match."""
    n_real, T = shard.n_real, shard.temperature
    if n_real == 0 or n == 0:
        return
    g_lp = torch.zeros_like(logz) if g_lp is None else g_lp.float().reshape(-1)
    rows = n if kept is not None else min(shard.chunk, n)
    if kept is not None:
        zbuf, m_local = kept
        logz = logz - m_local
        ez = None if ez is None else ez - m_local
    else:
        zbuf = torch.empty(rows, n_real, dtype=torch.float32, device=dev)
    pbuf = torch.empty(rows, n_real, dtype=torch.float32, device=dev)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        z, p = zbuf[: j - i], pbuf[: j - i]
        if kept is None:
            load(i, j, z)
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
        store(i, j, p)


def _logits_loader(x: torch.Tensor, n_real: int):
    def load(i, j, z):
        z.copy_(x[i:j, :n_real])

    return load


def _matmul_loader(h: torch.Tensor, w: torch.Tensor):
    """Logits of a chunk as the output layer makes them: ``h W^T`` in the weight's dtype (bf16
    logits are rounded as Megatron's would be), then float32."""
    def load(i, j, z):
        if h.dtype == torch.float32:
            torch.mm(h[i:j], w.t(), out=z)
        else:
            z.copy_(h[i:j] @ w.t())

    return load


def _logits_backward(shard: _Shard, logits, logz, ez, g_lp, g_ent, out_dtype):
    n, v = logits.shape
    n_real = shard.n_real
    grad = torch.empty((n, v), dtype=out_dtype, device=logits.device)
    if n_real < v:
        grad[:, n_real:] = 0

    def store(i, j, d):
        grad[i:j, :n_real].copy_(d)

    _backward(shard, n, _logits_loader(logits, n_real), store, logz, ez, g_lp, g_ent, logits.device)
    return grad


def _output_layer_backward(shard: _Shard, h, w, logz, ez, g_lp, g_ent, need_h: bool, need_w: bool,
                           main_grad: torch.Tensor | None = None, kept=None):
    """(grad_h [N, H] in h's dtype or None, grad_W [V_local, H] in W's dtype or None). grad_W is
    accumulated over chunks in float32; padding rows of W get 0. With ``main_grad`` (float32, W's
    shape) grad_W is added into it in place instead, and no grad_W tensor is made (None)."""
    n, n_real = h.shape[0], shard.n_real
    w_real = w[:n_real]
    grad_h = torch.zeros_like(h) if need_h else None
    grad_w = None
    if need_w and main_grad is not None:
        gw_real = main_grad[:n_real]
    else:
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        gw_real = grad_w[:n_real] if need_w else None

    def store(i, j, d):
        if need_h:
            if h.dtype == torch.float32:
                torch.mm(d, w_real, out=grad_h[i:j])
            else:
                grad_h[i:j] = d.to(h.dtype) @ w_real
        if need_w:
            gw_real.addmm_(d.t(), h[i:j].float())

    _backward(shard, n, _matmul_loader(h, w_real), store, logz, ez, g_lp, g_ent, h.device, kept)
    if grad_w is not None and w.dtype != torch.float32:
        grad_w = grad_w.to(w.dtype)
    return grad_h, grad_w


class VocabParallelLogProbs(torch.autograd.Function):
    """Autograd function behind :func:`vocab_parallel_logprobs` (validated inputs only).

    Saves the logits (no copy), the targets and two ``[N]`` float32 vectors."""

    @staticmethod
    def forward(ctx, logits, shard: _Shard, group, entropy_mode: int):
        flat = logits.reshape(-1, logits.shape[-1])
        logp, ent, logz, ez = _forward(shard, flat.shape[0], _logits_loader(flat, shard.n_real), group,
                                       entropy_mode > 0, flat.device)
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
        g_ent = g_ent.float().reshape(-1) if (ctx.entropy_grad and g_ent is not None) else None
        grad = _logits_backward(ctx.shard, logits.reshape(-1, logits.shape[-1]), logz, ez, g_lp, g_ent, ctx.out_dtype)
        return grad.reshape(ctx.in_shape), None, None, None


class VocabParallelOutputLogProbs(torch.autograd.Function):
    """Autograd function behind :func:`output_layer_logprobs` (validated inputs only).

    Saves the hidden states ``[N, H]`` and the weight (no copies) and two ``[N]`` float32 vectors;
    never logits."""

    @staticmethod
    def forward(ctx, hidden, weight, shard: _Shard, group, entropy_mode: int, fuse_wgrad: bool):
        logp, ent, logz, ez, kept = _forward(shard, hidden.shape[0], _matmul_loader(hidden, weight[: shard.n_real]),
                                             group, entropy_mode > 0, hidden.device, keep=True)
        ctx.shard = shard
        ctx.entropy_grad = entropy_mode == 2
        # as Megatron's fused linear layers: hold main_grad in ctx (not saved: it is written in place),
        # and the parameter object itself, whose DDP flag backward sets (a saved tensor comes back
        # from saved-tensor hooks as another object, without the parameter's attributes)
        ctx.main_grad = weight.main_grad if fuse_wgrad else None
        ctx.param = weight if fuse_wgrad else None
        # tokens that fit one chunk: its working buffer (already made, at most one: _CHUNK_BYTES by
        # default) is kept for backward instead of multiplied again; more tokens are recomputed
        ctx.save_for_backward(hidden, weight, logz, ez if ctx.entropy_grad else None, *(kept or (None, None)))
        if ent is None:
            ent = logp.new_empty(0)
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, logz, ez, kz, km = ctx.saved_tensors
        g_ent = g_ent.float().reshape(-1) if (ctx.entropy_grad and g_ent is not None) else None
        # the entropy's gradient is built in z's buffer: a copy then, so a second backward finds it intact
        kept = None if kz is None else (kz if g_ent is None else kz.clone(), km)
        grad_h, grad_w = _output_layer_backward(ctx.shard, hidden, weight, logz, ez, g_lp, g_ent,
                                                ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.main_grad, kept)
        if ctx.main_grad is not None and ctx.needs_input_grad[1] and hasattr(ctx.param, "grad_added_to_main_grad"):
            # Megatron's protocol (tensor_parallel.layers): an unread placeholder as the autograd
            # gradient, and the flag that tells DDP's hook the gradient is already in main_grad
            # (without DDP's flag, no gradient at all: main_grad already holds it). A weight tied
            # to this stage's embedding gets its placeholder from the embedding's fused backward
            # (parallel.embedding), which runs last: none here, so none is summed with it. Tied to
            # an unfused embedding (Megatron's zero_out_wgrad), the placeholder is summed with that
            # one's dense gradient, which DDP's hook adds: zeros, not garbage from torch.empty.
            if getattr(ctx.param, "wgrad_from_embedding", False):
                grad_w = None
            elif getattr(ctx.param, "zero_out_wgrad", False):
                grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
            else:
                grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
            ctx.param.grad_added_to_main_grad = True
        return grad_h, grad_w, None, None, None, None


def _prepare(target: torch.Tensor, v_local: int, *, vocab_start, vocab_size, temperature, group, chunk_size,
             default_chunk, check_targets: bool) -> _Shard:
    """Validates the options shared by both entry points; returns the shard's metadata."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    world, rank = _group_size_rank(group)
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
    if chunk_size is None:
        chunk_size = default_chunk(n_real, target.numel())
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if check_targets and target.numel():
        lo, hi = (int(v) for v in torch.aminmax(target))
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"target id {bad} is out of range [0, vocab_size={vocab_size})")
    t_local = target.reshape(-1).long() - vocab_start
    owned = (t_local >= 0) & (t_local < n_real)
    return _Shard(t_local.clamp(0, max(n_real - 1, 0)), owned, n_real, float(temperature), chunk_size)


def _check_target(target) -> None:
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor of token ids, got {_describe(target)}")


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
    _check_target(target)
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)} "
            f"without its vocab dim {tuple(logits.shape[:-1])}"
        )
    v_local = logits.shape[-1]
    if v_local < 1:
        raise ValueError(f"logits must have at least one vocab column, got shape {tuple(logits.shape)}")

    def default_chunk(n_real, n_tok):
        # at most 64 MiB per float32 buffer, and at most 1/8 of the tokens so that small inputs too
        # stay well under the logits' own size
        return max(1, min(_CHUNK_BYTES // (4 * max(n_real, 1)), -(-n_tok // 8)))

    shard = _prepare(target, v_local, vocab_start=vocab_start, vocab_size=vocab_size, temperature=temperature,
                     group=group, chunk_size=chunk_size, default_chunk=default_chunk, check_targets=check_targets)
    entropy = entropy or entropy_grad
    flat = logits.reshape(-1, v_local)
    out_shape = logits.shape[:-1]

    if not (torch.is_grad_enabled() and logits.requires_grad):
        # scoring path (old / reference policies): nothing saved
        logp, ent, _, _ = _forward(shard, flat.shape[0], _logits_loader(flat, shard.n_real), group, entropy,
                                   flat.device)
        return TokenLogProbs(logp.reshape(out_shape), None if ent is None else ent.reshape(out_shape))
    mode = 2 if entropy_grad else (1 if entropy else 0)
    logp, ent = VocabParallelLogProbs.apply(logits, shard, group, mode)
    return TokenLogProbs(logp.reshape(out_shape), ent.reshape(out_shape) if entropy else None)


def output_layer_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
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
    gradient_accumulation_fusion: bool = False,
) -> TokenLogProbs:
    """The output layer and :func:`vocab_parallel_logprobs` in one, chunked over tokens: the same
    values and gradients as ``vocab_parallel_logprobs(hidden @ weight.T, target, ...)`` without the
    logits ``[N, vocab_local]``.

    Args:
        hidden: ``[N, H]`` the final hidden states of the positions whose next token is ``target``,
            replicated over the TP group (see :func:`output_layer_input`).
        weight: ``[vocab_local, H]`` this rank's shard of the output weight (the embedding's when
            they are tied: its gradient goes to that same tensor), ``hidden``'s dtype.
        target, vocab_start, vocab_size, temperature, group, entropy, entropy_grad, check_targets:
            as for :func:`vocab_parallel_logprobs`.
        chunk_size: tokens per chunk (default: float32 working buffers of at most 64 MiB each).
        gradient_accumulation_fusion: as Megatron's config flag of that name for its linear layers:
            the weight's gradient is added in place into ``weight.main_grad`` (float32, the weight's
            shape: Megatron DDP's buffer), with no [vocab_local, H] gradient tensor made; autograd
            gets an unread placeholder, and ``weight.grad_added_to_main_grad`` is set where DDP
            defines it, so its hook does not add again.

    Returns:
        :class:`TokenLogProbs` ``(logprobs [N] float32, entropy [N] float32 or None)``; gradients
        flow to ``hidden`` and ``weight`` (in their dtype; the weight's is summed in float32).
    """
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() != 2:
        raise ValueError(f"hidden must be a floating tensor [tokens, hidden_size], got {_describe(hidden)}")
    if (not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]
            or weight.shape[0] < 1 or weight.dtype != hidden.dtype):
        raise ValueError(f"weight must be a [vocab_local >= 1, {hidden.shape[1]}] tensor of dtype {hidden.dtype} "
                         f"(hidden's), got {_describe(weight)}")
    _check_target(target)
    if target.shape != hidden.shape[:1]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match hidden's tokens ({hidden.shape[0]},)")

    def default_chunk(n_real, n_tok):  # no logits to stay under: only the 64 MiB buffer bound
        return max(1, min(_CHUNK_BYTES // (4 * max(n_real, 1)), n_tok))

    shard = _prepare(target, weight.shape[0], vocab_start=vocab_start, vocab_size=vocab_size,
                     temperature=temperature, group=group, chunk_size=chunk_size, default_chunk=default_chunk,
                     check_targets=check_targets)
    entropy = entropy or entropy_grad
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        logp, ent, _, _ = _forward(shard, hidden.shape[0], _matmul_loader(hidden, weight[: shard.n_real]), group,
                                   entropy, hidden.device)
        return TokenLogProbs(logp, ent)
    mode = 2 if entropy_grad else (1 if entropy else 0)
    fuse = gradient_accumulation_fusion and weight.requires_grad
    if fuse and (getattr(weight, "main_grad", None) is None or weight.main_grad.dtype != torch.float32
                 or weight.main_grad.shape != weight.shape):
        raise ValueError(f"gradient_accumulation_fusion needs weight.main_grad, a float32 tensor of the weight's shape "
                         f"{tuple(weight.shape)} (Megatron DDP's buffer), got {_describe(getattr(weight, 'main_grad', None))}")
    logp, ent = VocabParallelOutputLogProbs.apply(hidden, weight, shard, group, mode, fuse)
    return TokenLogProbs(logp, ent if entropy else None)


def output_layer_input(hidden: torch.Tensor, *, sequence_parallel: bool, group) -> torch.Tensor:
    """What Megatron's ``ColumnParallelLinear`` does to the output layer's input, for
    :func:`output_layer_logprobs`: ``[s, b, H]`` (``[s / TP, b, H]`` under sequence parallelism)
    -> ``[s, b, H]`` replicated over TP. Without sequence parallelism the identity whose backward
    all-reduces the gradient over TP (each rank's vocab shard gives a partial one); with it, an
    all-gather of the sequence whose backward reduce-scatters."""
    if group is None or dist.get_world_size(group) == 1:
        return hidden
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    if sequence_parallel:
        out = gather_from_sequence_parallel_region(hidden.contiguous(), tensor_parallel_output_grad=True, group=group)
    else:
        out = copy_to_tensor_model_parallel_region(hidden, group=group)
    return _ContiguousGrad.apply(out)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: Megatron's ``_reduce`` all-reduces
    ``grad.contiguous()`` and returns ``grad``, so a strided gradient (the caller transposed the
    output) would leave the mapping un-reduced."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)} and dtype {t.dtype}"
    return type(t).__name__

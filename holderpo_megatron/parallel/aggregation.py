"""Per-sequence aggregation for packed sequences and context parallelism.

The losses in ``algorithms/losses`` reduce tokens to sequences only through a
:class:`~holderpo_megatron.algorithms.reducers.SequenceReducer`. This module provides the two layouts
Megatron uses besides padded rows:

* :class:`PackedSequenceReducer`: several sequences in one row (THD, ``cu_seqlens``), tokens
  labelled by a segment id; reductions are ``index_add`` / ``scatter_reduce`` by segment.
* :class:`ContextParallelReducer`: one sequence's tokens split over the ranks of a context-parallel
  (CP) group. It wraps the local layout (packed or padded) and all-reduces the per-sequence partial
  sums and maxima: ``[S]`` (or a few ``[S]`` stacked) values, never the tokens. Every rank then holds
  the same global per-sequence statistics and computes the same, replicated per-sequence loss.

Gradients under CP. The Hölder log-ratio of sequence i is a function of global per-sequence sums
S_i = sum over ranks of the local partial sums; d S_i / d x_t = 1 for a token t on this rank. Since
the loss downstream of S_i is replicated on every rank, each rank back-propagates it into its own
tokens only: the all-reduce's backward is the identity (no second all-reduce of the gradient, which
would count each token CP times). The per-sequence loss is *reported* (value of ``loss_sum``,
``loss_count`` and metric sums) by CP rank 0 only, so sums over the DP x CP group are exact, while
its gradient flows on every rank (``SequenceReducer.total``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from holderpo_megatron.algorithms.reducers import SequenceReducer

__all__ = [
    "PackedSequenceReducer",
    "ContextParallelReducer",
    "segment_ids_from_cu_seqlens",
    "load_balanced_cp_index",
    "thd_context_parallel_reducer",
]


def _check_cu_seqlens(name: str, cu: torch.Tensor) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1 or cu.is_floating_point():
        raise ValueError(f"{name} must be a 1-d integer tensor [num_sequences + 1], got {cu!r}")
    cu = cu.long()
    if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {cu.tolist()}")
    return cu


def segment_ids_from_cu_seqlens(
    cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor | None = None, total_tokens: int | None = None
) -> torch.Tensor:
    """Segment id of every token of a packed row: ``[total_tokens]`` int64, sequence index in
    ``[0, S)`` or -1 for tokens of no sequence.

    ``cu_seqlens``: ``[S + 1]`` cumulative real lengths. ``cu_seqlens_padded`` (Megatron/TE THD with
    CP pads each sequence to a multiple of 2 * cp): ``[S + 1]`` cumulative padded lengths; sequence i
    occupies ``[cu_seqlens_padded[i], cu_seqlens_padded[i] + len_i)`` and the rest of its slot is -1.
    ``total_tokens`` (default: the last offset) may add trailing -1 tokens.
    """
    cu = _check_cu_seqlens("cu_seqlens", cu_seqlens)
    lengths = cu[1:] - cu[:-1]
    starts = cu[:-1]
    end = int(cu[-1])
    if cu_seqlens_padded is not None:
        cup = _check_cu_seqlens("cu_seqlens_padded", cu_seqlens_padded).to(cu.device)
        if cup.shape != cu.shape or bool((cup[1:] - cup[:-1] < lengths).any()):
            raise ValueError(
                f"cu_seqlens_padded {cup.tolist()} must have one slot per sequence, each at least as long as "
                f"the sequence (cu_seqlens {cu.tolist()})"
            )
        starts = cup[:-1]
        end = int(cup[-1])
    total = end if total_tokens is None else int(total_tokens)
    if total < end:
        raise ValueError(f"total_tokens {total} is smaller than the packed length {end}")
    seg = torch.full((total,), -1, dtype=torch.long, device=cu.device)
    n = lengths.numel()
    seq_of_tok = torch.repeat_interleave(torch.arange(n, device=cu.device), lengths)
    # position of each real token: its sequence's start + its offset within the sequence
    offset = torch.arange(seq_of_tok.numel(), device=cu.device) - torch.repeat_interleave(cu[:-1], lengths)
    seg[starts[seq_of_tok] + offset] = seq_of_tok
    return seg


def load_balanced_cp_index(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Token positions (into the packed, padded row) held by CP rank ``cp_rank``, in Megatron's
    load-balanced order: each sequence's padded slot is cut into ``2 * cp_size`` equal chunks and
    rank r holds chunks r and ``2 * cp_size - 1 - r`` (as Transformer Engine's
    ``thd_get_partitioned_indices`` and Megatron's ``get_batch_on_this_cp_rank`` do)."""
    cup = _check_cu_seqlens("cu_seqlens_padded", cu_seqlens_padded)
    if not (isinstance(cp_size, int) and cp_size >= 1 and isinstance(cp_rank, int) and 0 <= cp_rank < cp_size):
        raise ValueError(f"need an int cp_size >= 1 and 0 <= cp_rank < cp_size, got cp_size={cp_size!r}, cp_rank={cp_rank!r}")
    slot = cup[1:] - cup[:-1]
    if bool((slot % (2 * cp_size) != 0).any()):
        raise ValueError(
            f"each padded sequence length must be a multiple of 2 * cp_size = {2 * cp_size}, got {slot.tolist()}"
        )
    pos = torch.arange(int(cup[-1]), device=cup.device)
    seq = torch.repeat_interleave(torch.arange(slot.numel(), device=cup.device), slot)
    chunk = (pos - cup[:-1][seq]) // (slot[seq] // (2 * cp_size))
    keep = (chunk == cp_rank) | (chunk == 2 * cp_size - 1 - cp_rank)
    return pos[keep]


class PackedSequenceReducer(SequenceReducer):
    """Sequences packed into rows, tokens labelled by segment id.

    Args:
        segment_ids: token-shaped integer tensor (e.g. ``[N]`` or ``[1, N]``): the sequence index in
            ``[0, num_sequences)`` of every token, or -1 for tokens of no sequence (packing padding;
            they never count, whatever the loss mask says).
        num_sequences: S (default: max segment id + 1). Give it explicitly when some sequences may
            have no token here (a context-parallel shard).
        max_len: the generation budget for Dr. GRPO's default divisor (optional).
    """

    def __init__(self, segment_ids: torch.Tensor, num_sequences: int | None = None, max_len: int | None = None):
        if not isinstance(segment_ids, torch.Tensor) or segment_ids.is_floating_point() or segment_ids.dtype == torch.bool:
            raise ValueError(f"segment_ids must be an integer tensor, got {segment_ids!r}")
        seg = segment_ids.long()
        lo = int(seg.min()) if seg.numel() else -1
        hi = int(seg.max()) if seg.numel() else -1
        if num_sequences is None:
            num_sequences = hi + 1
        if not isinstance(num_sequences, int) or num_sequences < 0:
            raise ValueError(f"num_sequences must be an int >= 0, got {num_sequences!r}")
        if lo < -1 or hi >= num_sequences:
            raise ValueError(f"segment ids must be in [-1, {num_sequences}), got values from {lo} to {hi}")
        self.shape = seg.shape
        self.num_sequences = num_sequences
        self.default_max_len = max_len
        self._member = seg >= 0
        # -1 goes to a spare bucket S that is dropped after each reduction
        self._index = torch.where(self._member, seg, torch.full_like(seg, num_sequences)).reshape(-1)

    def check_tokens(self, name: str, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.shape != self.shape:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must have the packed layout's token shape {tuple(self.shape)}, got {got}")

    def token_member(self) -> torch.Tensor:
        return self._member

    def seq_sum(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.num_sequences + 1, dtype=x.dtype, device=x.device)
        return out.index_add(0, self._index, x.reshape(-1))[: self.num_sequences]

    def seq_max(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.full((self.num_sequences + 1,), float("-inf"), dtype=x.dtype, device=x.device)
        return out.scatter_reduce(0, self._index, x.detach().reshape(-1), reduce="amax")[: self.num_sequences]

    def broadcast(self, s: torch.Tensor) -> torch.Tensor:
        return torch.cat([s, s.new_zeros(1)])[self._index].reshape(self.shape)


class _SumOverReplicas(torch.autograd.Function):
    """All-reduce SUM whose backward is the identity: correct exactly when everything downstream
    is computed identically on every rank of the group (the replicated per-sequence loss), so each
    rank's upstream gradient is already the full gradient for its own partial sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class ContextParallelReducer(SequenceReducer):
    """A sequence layout whose tokens are split over the ranks of a context-parallel group.

    Args:
        local: the layout of this rank's tokens (:class:`PackedSequenceReducer` for THD, or a
            ``PaddedReducer`` for BSHD shards), with the same ``num_sequences`` (the same sequences,
            in the same order) on every rank; a rank may hold no token of some sequence.
        group: the CP process group; None or a group of size 1 means no communication.
        check: verify once (one 2-element all-reduce) that all ranks agree on ``num_sequences``.
        max_len: the generation budget for Dr. GRPO's default divisor (optional; a shard implies none).

    Each per-sequence reduction all-reduces ``[S]`` values (``[k, S]`` for k fused sums): O(1) bytes
    per sequence, independent of the number of tokens.
    """

    def __init__(self, local: SequenceReducer, group=None, check: bool = True, max_len: int | None = None):
        if not isinstance(local, SequenceReducer):
            raise ValueError(f"local must be a SequenceReducer, got {type(local).__name__}")
        self.local = local
        self.group = group
        self.num_sequences = local.num_sequences
        self.default_max_len = max_len
        self._active = group is not None and dist.get_world_size(group) > 1
        self._owner = (not self._active) or dist.get_rank(group) == 0
        if self._active and check:
            n = torch.tensor([self.num_sequences, -self.num_sequences], dtype=torch.float64)
            dist.all_reduce(n, op=dist.ReduceOp.MIN, group=group)
            if int(n[0]) != -int(n[1]):
                raise ValueError(
                    f"context-parallel ranks disagree on the number of sequences: this rank has "
                    f"{self.num_sequences}, the group has between {int(n[0])} and {-int(n[1])}"
                )

    def check_tokens(self, name: str, t: torch.Tensor) -> None:
        self.local.check_tokens(name, t)

    def token_member(self) -> torch.Tensor | None:
        return self.local.token_member()

    def seq_sum(self, x: torch.Tensor) -> torch.Tensor:
        s = self.local.seq_sum(x)
        return _SumOverReplicas.apply(s, self.group) if self._active else s

    def seq_sums(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = self.local.seq_sums(*xs)
        if not self._active:
            return parts
        if len({p.dtype for p in parts}) != 1:
            return tuple(_SumOverReplicas.apply(p, self.group) for p in parts)
        return tuple(_SumOverReplicas.apply(torch.stack(parts), self.group).unbind(0))

    def seq_max(self, x: torch.Tensor) -> torch.Tensor:
        m = self.local.seq_max(x)
        if self._active:
            m = m.clone()
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
        return m

    def broadcast(self, s: torch.Tensor) -> torch.Tensor:
        return self.local.broadcast(s)

    def owns_sequences(self) -> bool:
        return self._owner


def thd_context_parallel_reducer(
    cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor, group=None
) -> tuple[ContextParallelReducer, torch.Tensor]:
    """The reducer for this CP rank's share of a packed THD batch split the load-balanced way.

    Returns ``(reducer, index)``: ``index`` selects this rank's tokens from the full packed row
    (``tokens_local = tokens_full[..., index]``), the order Megatron/TE use for THD inputs.
    """
    cp_size = dist.get_world_size(group) if group is not None else 1
    cp_rank = dist.get_rank(group) if group is not None else 0
    seg = segment_ids_from_cu_seqlens(cu_seqlens, cu_seqlens_padded)
    index = load_balanced_cp_index(cu_seqlens_padded, cp_size, cp_rank)
    local = PackedSequenceReducer(seg[index], num_sequences=int(cu_seqlens.numel()) - 1)
    return ContextParallelReducer(local, group), index

"""Microbatches by token budget, padded or packed, as model-ready tensors.

A *sequence* here is prompt + response token ids; per-token quantities (log-probs, masks,
advantages' broadcast) live on the n-1 *next-token* positions t = 1..n-1 (predicting x_t from x_<t).

Two layouts:
  * padded: ``[b, S]`` rows, right padding, causal attention (the model's own mask).
  * packed: several sequences in one row of length <= budget, given to the model as THD: segment
    boundaries (``cu_seqlens``, as Megatron's ``PackedSeqParams``) keep them apart; no ``[S, S]`` mask
    is built. Each sequence may sit in a slot padded to a multiple of ``seq_multiple`` tokens (context
    parallelism splits every slot into 2 * cp equal chunks).

Context parallelism: :meth:`MicroBatch.shard` keeps the positions one CP rank holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["plan_microbatches", "plan_units", "MicroBatch", "build_microbatch"]


def plan_microbatches(lengths: list[int], token_budget: int, pack: bool = False,
                      max_sequences: int | None = None) -> list[list[int]]:
    """Group sequence indices (kept in input order) into microbatches whose token cost fits the budget.

    Cost of a microbatch: padded = n_seqs * max_len; packed = sum of lengths (one row each).
    A single sequence longer than the budget is an error (it cannot be split here).
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"max_sequences must be >= 1 or None, got {max_sequences}")
    groups: list[list[int]] = []
    cur: list[int] = []
    cur_max = cur_sum = 0
    for i, n in enumerate(lengths):
        if n < 2:
            raise ValueError(f"sequence {i} has {n} tokens; at least 2 are needed (a prompt token and a target)")
        if n > token_budget:
            raise ValueError(f"sequence {i} has {n} tokens, more than the microbatch token budget {token_budget}")
        new_cost = (cur_sum + n) if pack else (len(cur) + 1) * max(cur_max, n)
        full = max_sequences is not None and len(cur) >= max_sequences
        if cur and (new_cost > token_budget or full):
            groups.append(cur)
            cur, cur_max, cur_sum = [], 0, 0
        cur.append(i)
        cur_max, cur_sum = max(cur_max, n), cur_sum + n
    if cur:
        groups.append(cur)
    return groups


def plan_units(unit_lengths: list[list[int]], token_budget: int, pack: bool = False,
               names: list | None = None) -> list[list[int]]:
    """Like :func:`plan_microbatches`, for units of several sequences that must share a microbatch
    (a multi-turn trajectory's turns). ``unit_lengths[u]``: the lengths of unit u's sequences.
    Returns groups of unit indices. A unit that alone exceeds the budget is an error, which names
    it by ``names[u]`` (e.g. its trajectory id) when given."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if names is not None and len(names) != len(unit_lengths):
        raise ValueError(f"plan_units: {len(names)} names for {len(unit_lengths)} units")

    def cost(lengths: list[int]) -> int:
        return sum(lengths) if pack else len(lengths) * max(lengths)

    groups: list[list[int]] = []
    cur: list[int] = []
    cur_lengths: list[int] = []
    for u, lengths in enumerate(unit_lengths):
        if not lengths or min(lengths) < 2:
            raise ValueError(f"unit {u} has sequences {lengths}; each needs at least 2 tokens")
        if cost(lengths) > token_budget:
            what = f"unit {u} (a trajectory of " if names is None else f"trajectory {names[u]} ("
            raise ValueError(f"{what}{len(lengths)} turns, {sum(lengths)} tokens) costs "
                             f"{cost(lengths)} tokens ({'packed' if pack else 'padded'}), more than the microbatch "
                             f"token budget {token_budget}; raise train.token_budget or shorten the episodes")
        if cur and cost(cur_lengths + lengths) > token_budget:
            groups.append(cur)
            cur, cur_lengths = [], []
        cur.append(u)
        cur_lengths += lengths
    if cur:
        groups.append(cur)
    return groups


@dataclass
class MicroBatch:
    """Model inputs plus where each sequence's next-token positions sit.

    input_ids, position_ids: ``[rows, S]``. Packed rows (one row): ``cu_seqlens`` ``[k + 1]`` int32,
    the cumulative real lengths of the row's segments (its sequences, then one segment for the row's
    tail padding if any) and ``cu_seqlens_padded`` their offsets in the row (slots of
    ``seq_multiple`` tokens); both None for padded rows (causal). ``token_index`` ``[N]`` flat indices
    into ``[rows, S]`` of the logits that predict each sequence's tokens 1..n-1 (in sequence order),
    ``targets`` ``[N]`` the predicted ids, ``seq_id`` ``[N]`` the sequence (index into
    ``seq_indices``) of each. After :meth:`shard`, ``token_keep`` ``[N_full]`` bool marks which of the
    full microbatch's next-token positions remain (and the other per-token fields hold only those).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None
    cu_seqlens_padded: torch.Tensor | None
    token_index: torch.Tensor
    targets: torch.Tensor
    seq_id: torch.Tensor
    seq_indices: list[int]
    seq_lengths: list[int]
    token_keep: torch.Tensor | None = None
    global_length: int | None = None  # row length before :meth:`shard`

    @property
    def num_sequences(self) -> int:
        return len(self.seq_indices)

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def split_per_sequence(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``[N]`` per-token values of the full microbatch -> one tensor of n-1 values per sequence."""
        return list(flat.split([n - 1 for n in self.seq_lengths]))

    def shard(self, positions: torch.Tensor) -> "MicroBatch":
        """The microbatch restricted to the row positions ``positions`` (``[rows, L]`` indices into
        each row, in the order the model gets them): inputs gathered, next-token positions kept
        where their logit is here, ``token_index`` re-indexed into ``[rows, L]``. Segment boundaries
        stay global (the model's attention and RoPE need them so)."""
        rows, s_len = self.input_ids.shape
        positions = positions.expand(rows, -1) if positions.shape[0] == 1 else positions
        flat_pos = (positions + torch.arange(rows).unsqueeze(1) * s_len).reshape(-1)
        local_of = torch.full((rows * s_len,), -1, dtype=torch.long)
        local_of[flat_pos] = torch.arange(flat_pos.numel())
        loc = local_of[self.token_index]
        keep = loc >= 0
        return MicroBatch(
            self.input_ids.gather(1, positions), self.position_ids.gather(1, positions), self.cu_seqlens,
            self.cu_seqlens_padded, loc[keep], self.targets[keep], self.seq_id[keep], self.seq_indices,
            self.seq_lengths, token_keep=keep, global_length=s_len,
        )


def build_microbatch(sequences: list[list[int]], indices: list[int], pack: bool = False,
                     pad_id: int = 0, pad_to_multiple: int = 1, min_length: int = 0, min_rows: int = 1,
                     seq_multiple: int = 1) -> MicroBatch:
    """Tensors for ``sequences[indices]``. ``min_length``/``min_rows`` pad the row length and the
    number of rows (extra rows hold only padding), for schedules that need one shape throughout.
    Row length: a multiple of ``pad_to_multiple``; packed: each sequence in a slot of a multiple of
    ``seq_multiple`` tokens (``pad_to_multiple`` must then be a multiple of it)."""
    if pad_to_multiple % seq_multiple:
        raise ValueError(f"pad_to_multiple={pad_to_multiple} must be a multiple of seq_multiple={seq_multiple}")
    seqs = [sequences[i] for i in indices]
    lengths = [len(s) for s in seqs]
    cu = cu_padded = None
    if pack:
        slots = [-(-n // seq_multiple) * seq_multiple for n in lengths]
        total = max(sum(slots), min_length)
        s_len = -(-total // pad_to_multiple) * pad_to_multiple
        ids = torch.full((1, s_len), pad_id, dtype=torch.long)
        pos = torch.zeros((1, s_len), dtype=torch.long)
        tok_idx, off = [], 0
        real, padded = [0], [0]
        for s, n, slot in zip(seqs, lengths, slots):
            ids[0, off:off + n] = torch.tensor(s)
            pos[0, off:off + n] = torch.arange(n)
            tok_idx.append(torch.arange(off, off + n - 1))
            off += slot
            real.append(real[-1] + n)
            padded.append(off)
        if s_len > off:  # the row's tail: one more segment, which attends only to itself
            real.append(real[-1] + s_len - off)
            padded.append(s_len)
        cu = torch.tensor(real, dtype=torch.int32)
        cu_padded = torch.tensor(padded, dtype=torch.int32)
    else:
        s_len = -(-max(max(lengths), min_length) // pad_to_multiple) * pad_to_multiple
        ids = torch.full((max(len(seqs), min_rows), s_len), pad_id, dtype=torch.long)
        tok_idx = []
        for r, (s, n) in enumerate(zip(seqs, lengths)):
            ids[r, :n] = torch.tensor(s)
            tok_idx.append(r * s_len + torch.arange(n - 1))
        pos = torch.arange(s_len).unsqueeze(0).expand(ids.shape[0], -1).contiguous()
    token_index = torch.cat(tok_idx)
    flat_ids = ids.reshape(-1)
    targets = flat_ids[token_index + 1]
    seq_id = torch.cat([torch.full((n - 1,), k, dtype=torch.long) for k, n in enumerate(lengths)])
    return MicroBatch(ids, pos, cu, cu_padded, token_index, targets, seq_id, list(indices), lengths)

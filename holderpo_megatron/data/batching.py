"""Microbatches by token budget, padded or packed, as model-ready tensors.

A *sequence* here is prompt + response token ids; per-token quantities (log-probs, masks,
advantages' broadcast) live on the n-1 *next-token* positions t = 1..n-1 (predicting x_t from x_<t).

Two layouts:
  * padded: ``[b, S]`` rows, right padding, causal attention (the model's own mask).
  * packed: several sequences in one row of length <= budget, given to the model as THD: segment
    boundaries (``cu_seqlens``, as Megatron's ``PackedSeqParams``) keep them apart; no ``[S, S]`` mask
    is built. Each sequence may sit in a slot padded to a multiple of ``seq_multiple`` tokens (context
    parallelism splits every slot into 2 * cp equal chunks).

Shared prompts (packed only): consecutive sequences with the same prompt (a GRPO group) put it in
the row once. The row holds the prompt as one segment and each sequence's response (without its last
token, which is only a target) as a segment that attends to the prompt's segment and causally to
itself, at positions P, P+1, ..; the prompt's last position predicts every member's first response
token. The log-probs and gradients equal the unshared layout's; a group of k costs
P + sum(n_i - 1 - P) tokens instead of sum(n_i).

Context parallelism: :meth:`MicroBatch.shard` keeps the positions one CP rank holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["plan_microbatches", "plan_units", "MicroBatch", "build_microbatch", "shared_prompt_lengths"]


def shared_prompt_lengths(sequences: list[list[int]], prompt_lengths: list[int]) -> list[int]:
    """Per sequence, how many leading tokens it shares with the one before it: its prompt length
    where the two have the same prompt (``sequences[i][:prompt_lengths[i]]``), else 0."""
    out = [0] * len(sequences)
    for i in range(1, len(sequences)):
        p = prompt_lengths[i]
        if p == prompt_lengths[i - 1] and sequences[i][:p] == sequences[i - 1][:p]:
            out[i] = p
    return out


def plan_microbatches(lengths: list[int], token_budget: int, pack: bool = False,
                      max_sequences: int | None = None, shared: list[int] | None = None) -> list[list[int]]:
    """Group sequence indices (kept in input order) into microbatches whose token cost fits the budget.

    Cost of a microbatch: padded = n_seqs * max_len; packed = sum of lengths (one row each); with
    ``shared`` (packed; :func:`shared_prompt_lengths`) a sequence costs n - 1 tokens, n - 1 - shared
    when the one before it is in the same microbatch (its prompt is already in the row).
    A single sequence longer than the budget is an error (it cannot be split here).
    """
    if shared is not None and not pack:
        raise ValueError("shared prompts need packed rows (pack=True)")
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
        if shared is not None:
            n = n - 1 - (shared[i] if cur and cur[-1] == i - 1 else 0)
        new_cost = (cur_sum + n) if pack else (len(cur) + 1) * max(cur_max, n)
        full = max_sequences is not None and len(cur) >= max_sequences
        if cur and (new_cost > token_budget or full):
            groups.append(cur)
            cur, cur_max, cur_sum = [], 0, 0
            if shared is not None:  # it opens the new microbatch: its prompt goes in again
                n = lengths[i] - 1
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
    ``prefix_segment`` ``[k]`` (shared prompts): per segment of ``cu_seqlens``, the segment it also
    attends to in full (its group's prompt), -1 for none; ``position_ids`` then hold each token's
    position in its sequence, and ``token_index`` may name a position more than once (a prompt's
    last position predicts every member's first response token).
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
    prefix_segment: torch.Tensor | None = None

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
        if self.prefix_segment is not None:
            raise ValueError("a row with shared prompts cannot be split over context-parallel ranks")
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
                     seq_multiple: int = 1, shared: list[int] | None = None) -> MicroBatch:
    """Tensors for ``sequences[indices]``. ``min_length``/``min_rows`` pad the row length and the
    number of rows (extra rows hold only padding), for schedules that need one shape throughout.
    Row length: a multiple of ``pad_to_multiple``; packed: each sequence in a slot of a multiple of
    ``seq_multiple`` tokens (``pad_to_multiple`` must then be a multiple of it). ``shared``
    (packed, per sequence of ``sequences``: :func:`shared_prompt_lengths`): the shared-prompt layout
    (module docstring) for runs of consecutive indices."""
    if pad_to_multiple % seq_multiple:
        raise ValueError(f"pad_to_multiple={pad_to_multiple} must be a multiple of seq_multiple={seq_multiple}")
    seqs = [sequences[i] for i in indices]
    lengths = [len(s) for s in seqs]
    if shared is not None:
        if not pack or seq_multiple != 1:
            raise ValueError(f"shared prompts need packed rows without per-sequence slots (pack={pack}, "
                             f"seq_multiple={seq_multiple})")
        return _build_shared(seqs, indices, [shared[i] if k and indices[k - 1] == i - 1 else 0
                                             for k, i in enumerate(indices)],
                             pad_id, pad_to_multiple, min_length)
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


def _build_shared(seqs: list[list[int]], indices: list[int], share: list[int], pad_id: int,
                  pad_to_multiple: int, min_length: int) -> MicroBatch:
    """The shared-prompt row. ``share[k]``: the prompt length sequence k shares with sequence k-1
    (0: it opens a group). A group's opener puts its prompt in as the head segment (split where its
    successor shares it); every sequence drops its last token (only ever a target)."""
    ids, pos, bounds, prefix, tok_idx = [], [], [0], [], []
    head = None  # (segment index, offset) of the current group's prompt

    def segment(tokens: list[int], start: int, attends: int) -> int:
        ids.extend(tokens)
        pos.extend(range(start, start + len(tokens)))
        bounds.append(bounds[-1] + len(tokens))
        prefix.append(attends)
        return bounds[-2]

    for k, s in enumerate(seqs):
        n = len(s)
        p = share[k] or (share[k + 1] if k + 1 < len(seqs) else 0)
        if not share[k]:
            head = (len(prefix), segment(s[:p], 0, -1)) if p else None
        if head is None:  # alone: one segment
            tok_idx.append(torch.arange(n - 1) + segment(s[:n - 1], 0, -1))
        else:
            off = segment(s[p:n - 1], p, head[0])
            tok_idx.append(torch.cat([head[1] + torch.arange(p), off + torch.arange(n - 1 - p)]))
    used = bounds[-1]
    s_len = -(-max(used, min_length) // pad_to_multiple) * pad_to_multiple
    if s_len > used:  # the row's tail: one more segment, which attends only to itself
        segment([pad_id] * (s_len - used), 0, -1)
    cu = torch.tensor(bounds, dtype=torch.int32)
    lengths = [len(s) for s in seqs]
    seq_id = torch.cat([torch.full((n - 1,), k, dtype=torch.long) for k, n in enumerate(lengths)])
    return MicroBatch(torch.tensor([ids], dtype=torch.long), torch.tensor([pos], dtype=torch.long), cu, cu.clone(),
                      torch.cat(tok_idx), torch.tensor([t for s in seqs for t in s[1:]], dtype=torch.long), seq_id,
                      list(indices), lengths, prefix_segment=torch.tensor(prefix, dtype=torch.long))

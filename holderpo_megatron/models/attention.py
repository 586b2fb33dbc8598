"""Core attention for Megatron's local layer spec that never forms an S x S matrix, for packed rows
(THD) and for context parallelism (CP).

Megatron's local ``DotProductAttention`` materialises scores and probabilities ``[b, heads, S, S]``
and keeps the probabilities for backward (about 0.6 GB per layer for 9 heads at S = 4096 in fp32),
takes packed rows only through a dense ``[S, S]`` block-diagonal mask, and refuses CP. This module
takes the same inputs from ``SelfAttention`` and attends with torch's ``scaled_dot_product_attention``
(on CPU its flash kernel: blocks, a log-sum-exp kept for backward), one call per causal block:

* sbhd (padded rows): q ``[s, b, heads, d]``, k/v ``[s, b, groups, d]``; causal over each row;
  returns ``[s, b, heads * d]``.
* thd (``packed_seq_params.qkv_format == "thd"``, as TE takes packed rows on GPU): q ``[t, heads, d]``,
  k/v ``[t, groups, d]``; causal within each segment ``[cu[i], cu[i+1])`` of ``cu_seqlens_q_padded``
  (else ``cu_seqlens_q``); returns ``[t, heads * d]``. No token sees another segment.

Shared prompts (``SharedPrefixSeqParams``, thd, cp = 1; ``data.batching``): a segment whose
``prefix_segment`` names another attends to all of that segment's keys and then causally to its own,
at positions following it: one call per segment with the prompt's keys in front. The row's RoPE
positions come from the params (``positioned_rope`` makes the model's RotaryEmbedding read them).

Context parallelism (cp > 1, Megatron's load-balanced split as in ``get_batch_on_this_cp_rank`` and
TE's ``all_gather`` CP mode): every row (sbhd) or every segment (thd; ``cu_seqlens`` then count the
global tokens, each segment a multiple of 2 * cp) is cut into 2 * cp equal chunks and CP rank r holds
chunks r and 2 * cp - 1 - r. K and V are all-gathered over the CP group (their gradients
reduce-scattered in backward: Megatron's ``gather_from_sequence_parallel_region`` on the CP group),
put back in global order, and each local query chunk attends to the keys at global positions up to
its own. With Transformer Engine on GPU, TE's attention is used instead (``models.provider``).
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

__all__ = ["SegmentCausalAttention", "SharedPrefixSeqParams", "dense_block_causal_mask", "positioned_rope",
           "shares_prefixes"]


@dataclass
class SharedPrefixSeqParams(PackedSeqParams):
    """THD params of a row with shared prompts: ``prefix_segment`` per segment (the segment it also
    attends to in full, -1 none), ``positions`` ``[t]`` each token's RoPE position."""

    prefix_segment: list[int] | None = None
    positions: torch.Tensor | None = None


class _PositionedRotaryEmbedding(RotaryEmbedding):
    """Megatron's RotaryEmbedding that, for a row given as :class:`SharedPrefixSeqParams`, returns
    one frequency row per token (``[t, 1, 1, d]``, the row's own positions), which Megatron's THD
    RoPE applies token by token; any other input as before. ``GPTModel`` asks for the length with
    the params and then for the embedding without them: the positions are held between the two."""

    _positions: torch.Tensor | None = None

    def get_rotary_seq_len(self, inference_context, transformer, transformer_input, transformer_config,
                           packed_seq_params=None, **kw):
        self._positions = getattr(packed_seq_params, "positions", None)
        return super().get_rotary_seq_len(inference_context, transformer, transformer_input, transformer_config,
                                          packed_seq_params, **kw)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        positions, self._positions = self._positions, None
        if positions is None:
            return super().forward(max_seq_len, offset, packed_seq, cp_group)
        return super().forward(int(positions.max()) + 1, 0, True, cp_group)[positions]


def positioned_rope(model) -> bool:
    """Let ``model``'s (a ``GPTModel``) rotary embedding take per-token positions (the class is
    swapped in place: same parameters, same state dict). False where it has another kind of
    position embedding (YaRN, mRoPE, learned), which shared prompts then refuse."""
    rope = getattr(model, "rotary_pos_emb", None)
    if type(rope) is RotaryEmbedding:
        rope.__class__ = _PositionedRotaryEmbedding
    return isinstance(rope, _PositionedRotaryEmbedding)


def shares_prefixes(model) -> bool:
    """Whether ``model`` can take rows with shared prompts: this module's attention in every layer
    and a positioned RoPE (:func:`positioned_rope`)."""
    layers = [m for m in model.modules() if hasattr(m, "core_attention")]
    return isinstance(getattr(model, "rotary_pos_emb", None), _PositionedRotaryEmbedding) and all(
        isinstance(m.core_attention, SegmentCausalAttention) for m in layers)


def dense_block_causal_mask(cu_seqlens: list[int], length: int) -> torch.Tensor:
    """The ``[1, 1, length, length]`` bool mask (True = masked) that Megatron's ``DotProductAttention``
    needs for a packed row with segment boundaries ``cu_seqlens``: what this module avoids. Kept as
    the reference for the equality test and the memory bench; tokens past the last boundary attend
    to themselves only."""
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for a, e in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        allowed[a:e, a:e] = torch.ones(e - a, e - a, dtype=torch.bool).tril()
    tail = torch.arange(cu_seqlens[-1], length)
    allowed[tail, tail] = True
    return (~allowed).view(1, 1, length, length)


class SegmentCausalAttention(MegatronModule):
    """Drop-in ``core_attention`` for the local spec (the constructor and ``forward`` of Megatron's
    ``DotProductAttention``). Refuses what it does not implement: a non-causal mask type, an explicit
    dense ``attention_mask``, attention bias, sliding windows, softmax offsets, attention dropout."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.utils import divide

        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SegmentCausalAttention is causal only, got attn_mask_type={attn_mask_type}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"SegmentCausalAttention has no attention dropout, got {dropout}")
        if config.window_size is not None or config.softmax_type != "vanilla":
            raise ValueError(f"SegmentCausalAttention: window_size={config.window_size!r} / "
                             f"softmax_type={config.softmax_type!r} are not supported (None / 'vanilla')")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        tp = pg_collection.tp.size()
        self.cp_group = getattr(pg_collection, "cp", None)
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        if config.apply_query_key_layer_scaling:
            self.softmax_scale /= max(1, layer_number)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("SegmentCausalAttention takes no attention bias")
        if attention_mask is not None:
            raise ValueError("SegmentCausalAttention takes no dense attention_mask: pass packed rows as THD "
                             "(PackedSeqParams with cu_seqlens)")
        cp = self.cp_group.size() if self.cp_group is not None else 1
        prefix = getattr(packed_seq_params, "prefix_segment", None)
        if prefix is not None and cp > 1:
            raise ValueError(f"shared prompts do not combine with context parallelism (cp={cp})")
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"packed_seq_params.qkv_format={packed_seq_params.qkv_format!r}: only 'thd'")
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            bounds = [int(x) for x in cu.tolist()]
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        else:
            bounds = [0, query.shape[0] * cp]
        uneven = cp > 1 and any((e - a) % (2 * cp) for a, e in zip(bounds[:-1], bounds[1:]))
        if bounds[-1] != query.shape[0] * cp or uneven:
            raise ValueError(f"segment boundaries {bounds} do not cover the {query.shape[0]} local tokens x cp={cp}"
                             + (f" with segments of a multiple of 2 * cp = {2 * cp} tokens" if cp > 1 else ""))
        if cp > 1:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            # [cp * t, ...]: rank j's local tokens at [j * t, (j + 1) * t)
            key = gather_from_sequence_parallel_region(key, tensor_parallel_output_grad=True, group=self.cp_group)
            value = gather_from_sequence_parallel_region(value, tensor_parallel_output_grad=True, group=self.cp_group)
            key = key.view(cp, -1, *key.shape[1:])
            value = value.view(cp, -1, *value.shape[1:])
        r = self.cp_group.rank() if cp > 1 else 0
        outs = []
        for seg, (a, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            if e == a:
                continue
            if prefix is not None and prefix[seg] >= 0:  # the group's prompt, then itself causally
                ha, he = bounds[prefix[seg]], bounds[prefix[seg] + 1]
                k, v = torch.cat([key[ha:he], key[a:e]]), torch.cat([value[ha:he], value[a:e]])
                outs.append(self._attend(query[a:e], k, v, he - ha))
                continue
            if cp == 1:
                outs.append(self._attend(query[a:e], key[a:e], value[a:e], 0))
                continue
            la, le = a // cp, e // cp  # this segment's local tokens: global chunks r, 2 * cp - 1 - r
            c = (le - la) // 2
            k, v = _global_order(key[:, la:le], c), _global_order(value[:, la:le], c)
            for half, chunk in ((0, r), (1, 2 * cp - 1 - r)):
                q = query[la + half * c: la + (half + 1) * c]
                end = (chunk + 1) * c
                outs.append(self._attend(q, k[:end], v[:end], chunk * c))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        if packed_seq_params is not None:
            return out.reshape(out.shape[0], -1)
        return out.reshape(out.shape[0], out.shape[1], -1)

    def _attend(self, q, k, v, q_start: int):
        """q ``[sq, b, heads, d]`` at global positions ``q_start ..``; k, v ``[sk, b, groups, d]`` at
        positions ``0 .. sk-1``; causal. Returns ``[sq, b, heads, d]``."""
        sq, sk = q.shape[0], k.shape[0]
        qh, kh, vh = q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)
        if self.heads > self.groups:
            kh = kh.repeat_interleave(self.heads // self.groups, dim=1)
            vh = vh.repeat_interleave(self.heads // self.groups, dim=1)
        if q_start == 0 and sq == sk:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.softmax_scale)
        else:  # lower-right aligned causal block: [sq, sk] bool, not [heads, sq, sk]
            pos = torch.arange(sk, device=q.device)
            allowed = pos[None, :] <= torch.arange(q_start, q_start + sq, device=q.device)[:, None]
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3)


def _global_order(pieces: torch.Tensor, c: int) -> torch.Tensor:
    """``[cp, 2c, ...]`` (rank j's chunks j and 2cp-1-j of one segment) -> ``[2cp * c, ...]`` in
    global order: the first chunks by rank, then the second chunks in reverse rank order."""
    cp = pieces.shape[0]
    halves = pieces.reshape(cp, 2, c, *pieces.shape[2:])
    return torch.cat([halves[:, 0].reshape(cp * c, *pieces.shape[2:]),
                      halves[:, 1].flip(0).reshape(cp * c, *pieces.shape[2:])])

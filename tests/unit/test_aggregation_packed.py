"""Packed sequences (THD, several sequences per row) give the padded layout's loss, gradients and
metrics for every registered loss; the layout helpers and their bad inputs."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from holderpo_megatron.algorithms import PaddedReducer, compute_policy_loss, holder_log_ratio
from holderpo_megatron.parallel.aggregation import (
    ContextParallelReducer,
    PackedSequenceReducer,
    load_balanced_cp_index,
    segment_ids_from_cu_seqlens,
)
from tests.references import random_batch

LOSSES = (
    [("holder", {"p": p, "variant": v}) for p in (2.0, 0.0, -1.0) for v in ("seq", "token", "seq_tokclip")]
    + [("grpo", {}), ("grpo", {"aggregation": "seq-mean-token-mean"}), ("dr_grpo", {"max_len": 40}),
       ("gspo", {}), ("gmpo", {})]
)


def _packed(mask: torch.Tensor, rows: int, trailing_pad: int):
    """Pack the padded rows' in-sequence tokens into ``rows`` rows of a [rows, N] THD batch (row
    boundaries may cut through nothing: sequences are whole within a row), with -1 padding."""
    b, t = mask.shape
    in_seq = mask.clone()
    lengths = mask.sum(-1)
    per_row = [list(range(i, b, rows)) for i in range(rows)]
    width = max(int(lengths[r].sum()) for r in per_row) + trailing_pad
    seg = torch.full((rows, width), -1, dtype=torch.long)
    pos = torch.zeros(b, t, 2, dtype=torch.long)  # (row, column) of every padded position
    for r, seqs in enumerate(per_row):
        col = 0
        for i in seqs:
            n = int(lengths[i])
            seg[r, col:col + n] = i
            pos[i, :n, 0] = r
            pos[i, :n, 1] = torch.arange(col, col + n)
            col += n

    def pack(x, fill=0.0):
        out = torch.full((rows, width), fill, dtype=x.dtype)
        out[pos[in_seq][:, 0], pos[in_seq][:, 1]] = x[in_seq]
        return out

    return PackedSequenceReducer(seg, num_sequences=b), pack


@pytest.mark.parametrize("name,kw", LOSSES, ids=[f"{n}-{kw}" for n, kw in LOSSES])
def test_packed_matches_padded_loss_gradient_and_metrics(name, kw):
    logp, old, adv, mask = random_batch(9, 40, seed=21, spread=0.3)
    # loss mask with holes inside sequences: the layout (in_seq) and the loss mask differ
    g = torch.Generator().manual_seed(1)
    in_seq = mask
    loss_mask = in_seq & (torch.rand(mask.shape, generator=g) > 0.2)
    red, pack = _packed(in_seq, rows=2, trailing_pad=5)
    x = logp.clone().requires_grad_(True)
    ref = compute_policy_loss(name, x, old, adv, loss_mask, **kw)
    ref.loss.backward()
    y = pack(logp).requires_grad_(True)
    # a True loss mask at padding tokens (segment -1) must not count
    packed_mask = pack(loss_mask) | (red.token_member() == False)  # noqa: E712
    out = compute_policy_loss(name, y, pack(old), adv, packed_mask, reducer=red, **kw)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.loss_count, ref.loss_count)
    torch.testing.assert_close(y.grad, pack(x.grad), rtol=1e-5, atol=1e-8)
    assert torch.all(y.grad[~red.token_member()] == 0)
    got, want = out.metrics.to_dict(), ref.metrics.to_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert math.isclose(got[k], v, rel_tol=1e-6, abs_tol=1e-9) or (math.isnan(v) and math.isnan(got[k])), k


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=6),
    p=st.sampled_from([-4.0, -1.0, 0.0, 1e-6, 0.5, 2.0, 8.0]),
    scale=st.sampled_from([0.01, 1.0, 20.0]),
    seed=st.integers(0, 2**16),
)
def test_packed_holder_log_ratio_matches_padded(lengths, p, scale, seed):
    g = torch.Generator().manual_seed(seed)
    t = max(max(lengths), 1)
    mask = torch.arange(t) < torch.tensor(lengths).unsqueeze(1)
    d = scale * torch.randn(len(lengths), t, generator=g)
    red, pack = _packed(mask, rows=1, trailing_pad=2)
    x = d.clone().requires_grad_(True)
    ref = holder_log_ratio(x, mask, p)
    y = pack(d).requires_grad_(True)
    got = holder_log_ratio(y, pack(mask), p, red)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(len(lengths), generator=g)
    (ref * w).sum().backward()
    (got * w).sum().backward()
    torch.testing.assert_close(y.grad, pack(x.grad), rtol=1e-4, atol=1e-6)


def test_segment_ids_from_cu_seqlens_with_padded_slots():
    cu = torch.tensor([0, 3, 3, 5])
    assert segment_ids_from_cu_seqlens(cu).tolist() == [0, 0, 0, 2, 2]
    cup = torch.tensor([0, 4, 8, 12])
    assert segment_ids_from_cu_seqlens(cu, cup).tolist() == [0, 0, 0, -1, -1, -1, -1, -1, 2, 2, -1, -1]
    assert segment_ids_from_cu_seqlens(cu, total_tokens=7).tolist() == [0, 0, 0, 2, 2, -1, -1]


def test_load_balanced_cp_index_is_megatrons_chunk_order():
    # one sequence of 8 tokens, cp = 2: 4 chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    cup = torch.tensor([0, 8, 12])
    assert load_balanced_cp_index(cup, 2, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert load_balanced_cp_index(cup, 2, 1).tolist() == [2, 3, 4, 5, 9, 10]
    both = torch.cat([load_balanced_cp_index(cup, 2, r) for r in range(2)]).sort().values
    assert both.tolist() == list(range(12))


def test_cp_reducer_without_group_is_the_local_layout():
    logp, old, adv, mask = random_batch(5, 12, seed=2)
    a = compute_policy_loss("holder", logp, old, adv, mask, p=2.0)
    b = compute_policy_loss("holder", logp, old, adv, mask, p=2.0, reducer=ContextParallelReducer(PaddedReducer(mask.shape)))
    torch.testing.assert_close(a.loss, b.loss)


@pytest.mark.parametrize("call,match", [
    (lambda: segment_ids_from_cu_seqlens(torch.tensor([1, 3])), "must start at 0"),
    (lambda: segment_ids_from_cu_seqlens(torch.tensor([0, 3, 2])), "non-decreasing"),
    (lambda: segment_ids_from_cu_seqlens(torch.tensor([0, 3]), torch.tensor([0, 2])), "at least as long"),
    (lambda: segment_ids_from_cu_seqlens(torch.tensor([0, 3]), total_tokens=2), "total_tokens 2"),
    (lambda: load_balanced_cp_index(torch.tensor([0, 6]), 2, 0), "multiple of 2 \\* cp_size = 4, got \\[6\\]"),
    (lambda: load_balanced_cp_index(torch.tensor([0, 8]), 2, 2), "cp_rank=2"),
    (lambda: PackedSequenceReducer(torch.tensor([0, 1, 5]), num_sequences=3), "from 0 to 5"),
    (lambda: PackedSequenceReducer(torch.tensor([0.0, 1.0])), "integer tensor"),
    (lambda: compute_policy_loss("gspo", torch.zeros(4), torch.zeros(3), torch.zeros(2),
                                 torch.ones(4, dtype=torch.bool), reducer=PackedSequenceReducer(torch.tensor([0, 0, 1, 1]))),
     "old_logp shape"),
    (lambda: compute_policy_loss("gspo", torch.zeros(5), torch.zeros(5), torch.zeros(2),
                                 torch.ones(5, dtype=torch.bool), reducer=PackedSequenceReducer(torch.tensor([0, 0, 1, 1]))),
     "token shape \\(4,\\), got shape \\(5,\\)"),
    (lambda: compute_policy_loss("gspo", torch.zeros(4), torch.zeros(4), torch.zeros(3),
                                 torch.ones(4, dtype=torch.bool), reducer=PackedSequenceReducer(torch.tensor([0, 0, 1, 1]))),
     "advantages must have shape \\[2\\]"),
    (lambda: compute_policy_loss("dr_grpo", torch.zeros(4), torch.zeros(4), torch.zeros(2),
                                 torch.ones(4, dtype=torch.bool), reducer=PackedSequenceReducer(torch.tensor([0, 0, 1, 1]))),
     "needs max_len"),
])
def test_bad_layout_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("p", [2.0, 0.0, -1.0])
def test_packed_nonfinite_at_tokens_of_no_sequence_and_in_one_sequence(p):
    """NaN/inf at packing padding is ignored; a NaN at a valid token drops only its sequence; the
    result equals the padded layout without that sequence, with finite gradients everywhere."""
    logp, old, adv, mask = random_batch(6, 30, seed=4, spread=0.3)
    red, pack = _packed(mask, rows=2, trailing_pad=4)
    pad = ~red.token_member()
    y_val = pack(logp).masked_fill(pad, float("nan"))
    o_val = pack(old).masked_fill(pad, float("inf"))
    bad_seq = 3
    first = int((red._index == bad_seq).nonzero()[0])
    y_val.view(-1)[first] = float("nan")
    y = y_val.requires_grad_(True)
    out = compute_policy_loss("holder", y, o_val, adv, pack(mask) | pad, reducer=red, p=p)
    out.loss.backward()
    keep = torch.ones(6, dtype=torch.bool)
    keep[bad_seq] = False
    x = logp.clone().requires_grad_(True)
    ref = compute_policy_loss("holder", x, old, adv, mask & keep.unsqueeze(1), p=p)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-7)
    assert out.metrics.to_dict()["nonfinite_seqs"] == 1.0
    assert torch.isfinite(y.grad).all() and torch.all(y.grad[pad] == 0)
    torch.testing.assert_close(y.grad[~pad & (red._index.view(y.shape) != bad_seq)],
                               pack(x.grad)[~pad & (red._index.view(y.shape) != bad_seq)], rtol=1e-5, atol=1e-8)

import pytest
import torch

from holderpo_megatron.data.batching import build_microbatch, plan_microbatches


def test_plan_padded_and_packed_respect_budget():
    lengths = [5, 9, 3, 8, 2, 7]
    padded = plan_microbatches(lengths, 20)
    assert sum(padded, []) == list(range(6))
    for g in padded:
        assert len(g) * max(lengths[i] for i in g) <= 20
    packed = plan_microbatches(lengths, 20, pack=True)
    assert sum(packed, []) == list(range(6))
    for g in packed:
        assert sum(lengths[i] for i in g) <= 20
    assert len(packed) <= len(padded)
    assert plan_microbatches(lengths, 100, max_sequences=2) == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("lengths,budget,match", [
    ([5, 30], 20, "sequence 1 has 30 tokens"),
    ([1, 3], 20, "sequence 0 has 1 tokens"),
    ([3], 0, "token_budget must be"),
])
def test_plan_bad_input(lengths, budget, match):
    with pytest.raises(ValueError, match=match):
        plan_microbatches(lengths, budget)


@pytest.mark.parametrize("pack", [False, True])
def test_microbatch_targets_and_positions(pack):
    seqs = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    mb = build_microbatch(seqs, [0, 2, 1], pack=pack, pad_to_multiple=4)
    flat = mb.input_ids.reshape(-1)
    # logits at token_index predict targets: the next token of the same sequence
    assert mb.targets.tolist() == [2, 3, 4, 8, 9, 6]
    assert flat[mb.token_index].tolist() == [1, 2, 3, 7, 8, 5]
    assert mb.seq_id.tolist() == [0, 0, 0, 1, 1, 2]
    assert [t.tolist() for t in mb.split_per_sequence(mb.targets)] == [[2, 3, 4], [8, 9], [6]]
    assert mb.input_ids.shape[1] % 4 == 0
    if pack:
        m = mb.attention_mask[0, 0]
        # token 5 of the row (seq 2's 2nd token) sees seq 2's first token, not seq 0's
        assert not m[5, 4] and m[5, 3] and m[4, 5]
        assert (~m).sum(-1).min() >= 1  # no empty softmax row
        assert mb.position_ids[0, :9].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    else:
        assert mb.attention_mask is None and mb.input_ids.shape[0] == 3

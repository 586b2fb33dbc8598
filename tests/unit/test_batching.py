import pytest
import torch

from holderpo_megatron.data.batching import build_microbatch, plan_microbatches, plan_units, shared_prompt_lengths


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
        # segments, not an [S, S] mask: the three sequences, then the row's tail padding
        assert mb.cu_seqlens.tolist() == mb.cu_seqlens_padded.tolist() == [0, 4, 7, 9, 12]
        assert mb.position_ids[0, :9].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    else:
        assert mb.cu_seqlens is None and mb.input_ids.shape[0] == 3


def test_shared_prompt_row_layout():
    # two samples of prompt [1, 2, 3] (responses [4, 5] and [6]), then one of another prompt
    seqs = [[1, 2, 3, 4, 5], [1, 2, 3, 6], [1, 9, 4, 5]]
    shared = shared_prompt_lengths(seqs, [3, 3, 3])
    assert shared == [0, 3, 0]
    mb = build_microbatch(seqs, [0, 1, 2], pack=True, pad_to_multiple=4, shared=shared)
    # the prompt once, response 1 without its last token, response 2 (one token: empty), the lone
    # third sample without its last token, then the row's tail
    assert mb.input_ids[0].tolist() == [1, 2, 3, 4, 1, 9, 4, 0]
    assert mb.cu_seqlens.tolist() == [0, 3, 4, 4, 7, 8]
    assert mb.prefix_segment.tolist() == [-1, 0, 0, -1, -1]
    assert mb.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    # the same next-token positions as one row per sample: n - 1 per sequence, targets in order,
    # and the prompt's last position (2) predicts both first response tokens
    assert mb.token_index.tolist() == [0, 1, 2, 3, 0, 1, 2, 4, 5, 6]
    assert mb.targets.tolist() == [2, 3, 4, 5, 2, 3, 6, 9, 4, 5]
    assert mb.seq_id.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="context-parallel"):
        mb.shard(torch.arange(4).unsqueeze(0))
    with pytest.raises(ValueError, match="shared prompts need packed rows"):
        build_microbatch(seqs, [0, 1], pack=False, shared=shared)


def test_shared_prompt_plan_counts_a_prompt_once_per_microbatch():
    seqs = [[1, 2, 3, 4, 5]] * 4  # 4 tokens alone (the last is only a target), 1 more each after
    shared = shared_prompt_lengths(seqs, [3] * 4)
    assert plan_microbatches([5] * 4, 6, pack=True, shared=shared) == [[0, 1, 2], [3]]
    # without the prompt once, every sample costs its 5 tokens
    assert plan_microbatches([5] * 4, 6, pack=True) == [[0], [1], [2], [3]]
    # a microbatch the budget opens anew puts the prompt in again
    assert plan_microbatches([5] * 4, 5, pack=True, shared=shared) == [[0, 1], [2, 3]]


def test_packed_slots_and_context_parallel_shard():
    seqs = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    # CP2: slots of a multiple of 2 * cp = 4 tokens, the row a multiple of 8
    mb = build_microbatch(seqs, [0, 1, 2], pack=True, seq_multiple=4, pad_to_multiple=8)
    assert mb.cu_seqlens_padded.tolist() == [0, 8, 12, 16]
    assert mb.cu_seqlens.tolist() == [0, 5, 7, 10]
    assert mb.input_ids[0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0, 6, 7, 0, 0, 8, 9, 10, 0]
    assert mb.targets.tolist() == [2, 3, 4, 5, 7, 9, 10]
    with pytest.raises(ValueError, match="multiple of seq_multiple"):
        build_microbatch(seqs, [0], pack=True, seq_multiple=4, pad_to_multiple=6)
    # rank 0 of CP2 holds chunks 0 and 3 of each slot: positions 0-1, 6-7 | 8, 11 | 12, 15
    shard = mb.shard(torch.tensor([[0, 1, 6, 7, 8, 11, 12, 15]]))
    assert shard.input_ids[0].tolist() == [1, 2, 0, 0, 6, 0, 8, 0]
    assert shard.global_length == 16 and shard.token_keep.tolist() == [1, 1, 0, 0, 1, 1, 0]
    assert shard.targets.tolist() == [2, 3, 7, 9] and shard.seq_id.tolist() == [0, 0, 1, 2]
    assert shard.input_ids.reshape(-1)[shard.token_index].tolist() == [1, 2, 6, 8]
    assert shard.position_ids[0].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]


def _cost(lengths, pack):
    return sum(lengths) if pack else len(lengths) * max(lengths)


@pytest.mark.parametrize("pack", [False, True])
def test_plan_units_never_splits_a_unit_and_respects_the_budget(pack):
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        units = [torch.randint(2, 25, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(int(torch.randint(1, 12, (1,), generator=g)))]
        budget = max(_cost(u, pack) for u in units) + int(torch.randint(0, 60, (1,), generator=g))
        groups = plan_units(units, budget, pack=pack)
        assert sum(groups, []) == list(range(len(units)))  # every unit once, in order, whole
        for grp in groups:
            assert _cost([n for k in grp for n in units[k]], pack) <= budget
        for a, b in zip(groups, groups[1:]):  # greedy: the next unit did not fit
            assert _cost([n for k in a + b[:1] for n in units[k]], pack) > budget


def test_plan_units_packed_vs_padded_cost():
    units = [[10, 30], [5], [20, 20, 4]]  # padded costs 60, 5, 60; packed 40, 5, 44
    assert plan_units(units, 70) == [[0], [1], [2]]  # [1] + [2] padded: 4 rows x 20 = 80
    assert plan_units(units, 70, pack=True) == [[0, 1], [2]]  # 45; then 89 > 70
    # fits packed (40 tokens), not padded (3 rows x 30)
    assert plan_units([[30, 5, 5]], 60, pack=True) == [[0]]
    with pytest.raises(ValueError, match=r"trajectory 11 \(3 turns, 40 tokens\) costs 90 tokens \(padded\), "
                                         r"more than the microbatch token budget 60"):
        plan_units([[3], [30, 5, 5]], 60, names=[4, 11])
    with pytest.raises(ValueError, match=r"unit 0 \(a trajectory of 3 turns, 40 tokens\) costs 40 tokens \(packed\)"):
        plan_units([[30, 5, 5]], 39, pack=True)


@pytest.mark.parametrize("pack", [False, True])
def test_plan_units_of_single_sequences_is_plan_microbatches(pack):
    lengths = [5, 9, 3, 8, 2, 7, 12, 4]
    for budget in (12, 20, 33, 100):
        assert plan_units([[n] for n in lengths], budget, pack=pack) == plan_microbatches(lengths, budget, pack=pack)


@pytest.mark.parametrize("units,budget,match", [
    ([[5], []], 20, "unit 1 has sequences"),
    ([[5, 1]], 20, "each needs at least 2 tokens"),
    ([[3]], 0, "token_budget must be"),
])
def test_plan_units_bad_input(units, budget, match):
    with pytest.raises(ValueError, match=match):
        plan_units(units, budget)


def test_prompt_groups_go_to_one_rank_whole():
    from holderpo_megatron.trainer.batch import StepSamples

    prompts = [[1, 2], [3], [1, 2], [4, 5, 6]]  # the third repeats the first, apart from it
    seqs, starts = [], []
    for p in prompts:
        for r in range(3):
            seqs.append(p + [7 + r] * (r + 1))
            starts.append(len(p))
    s = StepSamples(seqs, starts, [torch.zeros(r + 1) for _ in prompts for r in range(3)], [0.0] * 12)
    assert s.units(by_prompt=True) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert s.share(1, 2, by_prompt=True).sequences == seqs[3:6] + seqs[9:12]
    assert s.share(1, 2).sequences == seqs[1::2]  # without it: every other sample
    # groups 0 and 2 share a prompt and sit side by side on rank 0: still two units (two minibatches)
    mine, units = s.share_units(0, 2, by_prompt=True)
    assert mine.sequences == seqs[0:3] + seqs[6:9] and units == [[0, 1, 2], [3, 4, 5]]
    assert mine.units(by_prompt=True) == [[0, 1, 2, 3, 4, 5]]  # what re-cutting the share would give

"""Prompt groups spread over a fleet of engines: whole groups, balanced by expected tokens."""

import pytest

from holderpo_megatron.rollout.sglang_engine import assign_groups


def test_one_engine_takes_everything():
    assert assign_groups([5, 1, 9], 1) == [0, 0, 0]


def test_groups_balance_by_expected_tokens():
    costs = [100, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 90]
    home = assign_groups(costs, 2)
    load = [sum(c for c, h in zip(costs, home) if h == e) for e in range(2)]
    assert load == [150, 140]  # the 100 and the 90 land on different engines, the 10s fill the gap
    assert home[0] != home[-1]


def test_equal_groups_alternate_and_every_engine_gets_work():
    assert assign_groups([8] * 8, 4) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert sorted(set(assign_groups([3, 2, 1], 3))) == [0, 1, 2]


def test_bad_engine_count():
    with pytest.raises(ValueError, match="n_engines must be >= 1, got 0"):
        assign_groups([1], 0)

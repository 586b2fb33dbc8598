"""Loss scaling on one process: loss normalisers, counts from masks, the Megatron outputs and bad
input. The multi-rank, multi-microbatch equivalence is in tests/distributed."""

import pytest
import torch

from holderpo_megatron.algorithms import compute_policy_loss
from holderpo_megatron.parallel.aggregation import PackedSequenceReducer
from holderpo_megatron.parallel.loss_scaling import (
    all_reduce_loss_metrics,
    global_loss_denominator,
    local_loss_count,
    megatron_loss_func_outputs,
    policy_loss_normaliser,
)
from tests.references import random_batch


@pytest.mark.parametrize("name,kw,expected", [
    ("holder", {"p": 1.0}, "sequence"), ("grpo", {}, "token"), ("grpo", {"aggregation": "seq-mean-token-mean"}, "sequence"),
    ("dr_grpo", {"max_len": 9}, "sequence"), ("gspo", {}, "sequence"), ("gmpo", {"denominator": 3.0}, "sequence"),
])
def test_normaliser_and_count_from_masks_match_the_loss(name, kw, expected):
    assert policy_loss_normaliser(name, **kw) == expected
    logp, old, adv, mask = random_batch(7, 12, seed=4)
    kw.pop("denominator", None)
    out = compute_policy_loss(name, logp, old, adv, mask, **kw)
    assert float(local_loss_count(mask, expected)) == float(out.loss_count)
    seg = torch.repeat_interleave(torch.arange(7), 12)  # the same rows, packed into one row
    assert float(local_loss_count(mask.reshape(-1), expected, PackedSequenceReducer(seg))) == float(out.loss_count)


def test_megatron_outputs_undo_schedule_and_ddp_averaging():
    s = torch.tensor(6.0, requires_grad=True)
    loss, n = megatron_loss_func_outputs(s, torch.tensor(4.0), num_microbatches=3, dp_cp_size=2, global_denominator=12.0)
    # Megatron: / max(n, 1) / num_microbatches, then DDP: / dp_cp_size -> loss_sum / global denominator
    assert n.dtype == torch.int and int(n) == 1
    assert float(loss.detach() / n / 3 / 2) == pytest.approx(6.0 / 12.0)
    loss, n = megatron_loss_func_outputs(s, torch.tensor(4.0), num_microbatches=3, dp_cp_size=2, calculate_per_token_loss=True)
    assert loss is s and n.dtype == torch.int and int(n) == 4


@pytest.mark.parametrize("call,match", [
    (lambda: megatron_loss_func_outputs(torch.tensor(1.0), torch.tensor(1.0), num_microbatches=0, dp_cp_size=1, global_denominator=1.0),
     "num_microbatches must be an int >= 1, got 0"),
    (lambda: megatron_loss_func_outputs(torch.tensor(1.0), torch.tensor(1.0), num_microbatches=1, dp_cp_size=0, global_denominator=1.0),
     "dp_cp_size must be an int >= 1, got 0"),
    (lambda: megatron_loss_func_outputs(torch.tensor(1.0), torch.tensor(1.0), num_microbatches=1, dp_cp_size=1),
     "global_denominator is required"),
    (lambda: megatron_loss_func_outputs(torch.tensor(1.0), torch.tensor(1.0), num_microbatches=1, dp_cp_size=1, global_denominator=0),
     "global_denominator must be > 0, got 0"),
    (lambda: global_loss_denominator(-1.0), "local_count must be a finite count >= 0, got -1.0"),
    (lambda: local_loss_count(torch.ones(2, 2), "tokens"), "normaliser must be one of"),
    (lambda: local_loss_count(torch.ones(4), "token"), "mask must be \\[batch, tokens\\]"),
])
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_single_rank_denominator_and_metrics_are_identity():
    assert float(global_loss_denominator(torch.tensor(5))) == 5.0
    assert float(global_loss_denominator(0)) == 1.0
    logp, old, adv, mask = random_batch(4, 6)
    m = compute_policy_loss("holder", logp, old, adv, mask, p=2.0).metrics
    assert all_reduce_loss_metrics(m, None) is m

"""Loss scaling on one process: the Megatron outputs of every loss and the metric merge. The
multi-rank, multi-microbatch equivalence is in tests/distributed."""

import pytest
import torch

from holderpo_megatron.algorithms import compute_policy_loss
from holderpo_megatron.parallel.loss_scaling import all_reduce_loss_metrics, megatron_loss_outputs
from tests.references import random_batch


@pytest.mark.parametrize("name,kw,counts", [
    ("holder", {"p": 1.0}, "sequence"), ("grpo", {}, "token"), ("grpo", {"aggregation": "seq-mean-token-mean"}, "sequence"),
    ("dr_grpo", {"max_len": 9}, "sequence"), ("gspo", {}, "sequence"), ("gmpo", {}, "sequence"),
])
def test_megatron_outputs_are_the_loss_sum_and_its_integer_count(name, kw, counts):
    """calculate_per_token_loss: Megatron backpropagates the returned loss undivided and divides the
    gradients by the summed integer counts, so the pair must be (loss_sum, count of loss units)."""
    logp, old, adv, mask = random_batch(7, 12, seed=4)
    out = compute_policy_loss(name, logp, old, adv, mask, **kw)
    loss, n = megatron_loss_outputs(out)
    assert loss is out.loss_sum and n.dtype == torch.int and n.shape == ()
    expected = int(mask.sum()) if counts == "token" else int(mask.any(-1).sum())
    assert int(n) == expected
    assert out.normaliser == counts
    torch.testing.assert_close(loss / n, out.loss)


def test_single_rank_metrics_are_identity():
    logp, old, adv, mask = random_batch(4, 6)
    m = compute_policy_loss("holder", logp, old, adv, mask, p=2.0).metrics
    assert all_reduce_loss_metrics(m, None) is m

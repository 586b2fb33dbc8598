"""Exact loss scaling: DP = 2 gloo ranks x 3 microbatches of ragged sequences, each microbatch's loss
passed through Megatron-Core's own ``forward_step_calc_loss`` (the schedule's division), then
gradients combined the way Megatron's DDP / ``finalize_model_grads`` do under
``calculate_per_token_loss=True`` (the Actor's one path). The combined gradient of a small model
equals the full-batch gradient for sequence- and token-normalised losses; the merged metrics equal
the full-batch metrics."""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from holderpo_megatron.algorithms import compute_policy_loss
from holderpo_megatron.parallel.logprobs import vocab_parallel_logprobs
from holderpo_megatron.parallel.loss_scaling import all_reduce_loss_metrics, megatron_loss_outputs
from tests.distributed.gloo_spawn import run_gloo

pytestmark = pytest.mark.distributed

HIDDEN, VOCAB, T_MAX = 8, 40, 11
NUM_MB = 3
# sequences per (rank, microbatch): ragged on purpose, rank 1 has more
SEQS = [[2, 3, 1], [4, 1, 2]]
LOSSES = [("holder", {"p": 2.0}), ("holder", {"p": -1.0, "variant": "token"}), ("grpo", {}),
          ("grpo", {"aggregation": "seq-mean-token-mean"}), ("dr_grpo", {"max_len": T_MAX}), ("gmpo", {})]


def _data():
    """All sequences of the global batch: features [N, T, H], targets, old log-probs, advantages, mask."""
    g = torch.Generator().manual_seed(0)
    n = sum(map(sum, SEQS))
    feats = torch.randn(n, T_MAX, HIDDEN, generator=g, dtype=torch.float64)
    target = torch.randint(0, VOCAB, (n, T_MAX), generator=g)
    lengths = torch.randint(1, T_MAX + 1, (n,), generator=g)
    mask = torch.arange(T_MAX) < lengths.unsqueeze(1)
    adv = torch.randn(n, generator=g, dtype=torch.float64).float()
    weight0 = 0.3 * torch.randn(HIDDEN, VOCAB, generator=g, dtype=torch.float64)
    with torch.no_grad():
        old = vocab_parallel_logprobs(feats @ weight0, target).logprobs + 0.2 * torch.randn(n, T_MAX, generator=g)
    weight = weight0 + 0.05 * torch.randn(HIDDEN, VOCAB, generator=g, dtype=torch.float64)
    return feats, target, old, adv, mask, weight


def _microbatches(rank):
    start = sum(map(sum, SEQS[:rank]))
    out = []
    for k in SEQS[rank]:
        out.append(slice(start, start + k))
        start += k
    return out


def _worker(rank: int, world: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
    group = dist.group.WORLD
    feats, target, old, adv, mask, weight0 = _data()
    for name, kw in LOSSES:
        # full batch on one process: the definition of the right gradient
        w_ref = weight0.clone().requires_grad_(True)
        ref = compute_policy_loss(name, vocab_parallel_logprobs(feats @ w_ref, target).logprobs, old, adv, mask, **kw)
        ref.loss.backward()
        where = f"{name} {kw}"
        config = SimpleNamespace(calculate_per_token_loss=True, timers=None)
        w = weight0.clone().requires_grad_(True)
        total_num_tokens = torch.zeros((), dtype=torch.int)
        metrics = None
        for s in _microbatches(rank):
            logp = vocab_parallel_logprobs(feats[s] @ w, target[s]).logprobs

            def loss_func(lp, s=s):
                out = compute_policy_loss(name, lp, old[s], adv[s], mask[s], **kw)
                return (*megatron_loss_outputs(out), {"metrics": out.metrics})

            store = []
            loss, num_tokens = forward_step_calc_loss(
                object(), logp, loss_func, config, None, False, NUM_MB, store, cp_group_size=1, is_last_stage=True,
            )
            loss.backward()
            total_num_tokens += num_tokens
            metrics = store[0]["metrics"] if metrics is None else metrics.merge(store[0]["metrics"])
        # Megatron's DDP over the DP x CP group (scaling factor 1.0, SUM), then finalize_model_grads
        grad = w.grad.clone()
        dist.all_reduce(grad, group=group)
        dist.all_reduce(total_num_tokens, group=group)
        grad /= total_num_tokens
        rel = float((grad - w_ref.grad).abs().max() / w_ref.grad.abs().max())
        assert rel <= 1e-5, (where, rel)
        merged = all_reduce_loss_metrics(metrics, group).to_dict()
        for k, v in ref.metrics.to_dict().items():
            assert math.isclose(merged[k], v, rel_tol=1e-6, abs_tol=1e-9), (where, k, merged[k], v)


def test_dp2_three_microbatches_combined_gradient_equals_full_batch():
    run_gloo(_worker, 2)

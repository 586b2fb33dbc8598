"""Context parallelism (CP=2 over gloo): sequences split over two ranks give the padded layout's
loss, gradients w.r.t. the log-probs, loss counts and metrics, for every registered loss, with
per-sequence communication only (all-reduced tensors of O(sequences) size, none in backward)."""

import math

import pytest
import torch
import torch.distributed as dist

from holderpo_megatron.algorithms import PaddedReducer, compute_policy_loss
from holderpo_megatron.parallel.aggregation import (
    ContextParallelReducer,
    PackedSequenceReducer,
    segment_ids_from_cu_seqlens,
    thd_context_parallel_reducer,
)
from holderpo_megatron.parallel.loss_scaling import all_reduce_loss_metrics, megatron_loss_outputs
from tests.distributed.gloo_spawn import AllReduceRecorder, run_gloo

pytestmark = pytest.mark.distributed

LOSSES = (
    [("holder", {"p": p, "variant": v}) for p in (2.0, 0.0, -1.0) for v in ("seq", "token", "seq_tokclip")]
    + [("grpo", {}), ("grpo", {"aggregation": "seq-mean-token-mean"}), ("dr_grpo", {"max_len": 64}),
       ("gspo", {}), ("gmpo", {})]
)
LENGTHS = [7, 1, 12, 4, 9, 3]  # response lengths of the S = 6 sequences


def _batch(scale: int, seed: int = 0):
    """Padded [S, T] batch with holes in the mask, a fully masked sequence and one NaN log-prob."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(LENGTHS) * scale
    s, t = len(LENGTHS), int(lengths.max())
    old = -4 * torch.rand(s, t, generator=g)
    logp = old + 0.3 * torch.randn(s, t, generator=g)
    in_seq = torch.arange(t) < lengths.unsqueeze(1)
    mask = in_seq & (torch.rand(s, t, generator=g) > 0.15)
    mask[5] = False  # a sequence with no valid token
    mask[2, 0] = True
    logp[2, 0] = float("nan")  # sequence 2 is excluded, consistently on both ranks
    adv = torch.randn(s, generator=g)
    return logp, old, adv, mask, in_seq, lengths


def _splits(rank: int, world: int, in_seq, lengths):
    """(name, reducer, gather): gather maps a padded [S, T] tensor to this rank's local tokens."""
    s, t = in_seq.shape
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    total = int(cu[-1])
    seg = segment_ids_from_cu_seqlens(cu)
    # contiguous halves of the packed row: cuts sequences anywhere
    half = slice(0, total // 2) if rank == 0 else slice(total // 2, total)
    out = [("packed-contiguous", ContextParallelReducer(PackedSequenceReducer(seg[half], num_sequences=s), dist.group.WORLD),
            lambda x: x[in_seq][half])]
    # Megatron/TE THD load-balanced order: slots padded to a multiple of 2 * cp
    mult = 2 * world
    padded_len = (lengths + mult - 1) // mult * mult
    cup = torch.cat([torch.zeros(1, dtype=torch.long), padded_len.cumsum(0)])
    red, index = thd_context_parallel_reducer(cu, cup, dist.group.WORLD)
    seg_pad = segment_ids_from_cu_seqlens(cu, cup)

    def thd(x):
        row = torch.zeros(int(cup[-1]), dtype=x.dtype)
        row[seg_pad >= 0] = x[in_seq]  # padding slots hold zeros (and never count)
        return row[index]

    out.append(("thd-load-balanced", red, thd))
    # BSHD (padded rows) split like megatron.core.utils.get_batch_on_this_cp_rank: 2 * cp chunks of
    # the token dim, rank r holding chunks r and 2 * cp - 1 - r
    t_pad = (t + mult - 1) // mult * mult
    c = t_pad // mult
    cols = torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange((mult - 1 - rank) * c, (mult - rank) * c)])

    def bshd(x):
        xp = torch.zeros(s, t_pad, dtype=x.dtype)
        xp[:, :t] = x
        return xp[:, cols]

    out.append(("bshd-load-balanced", ContextParallelReducer(PaddedReducer((s, 2 * c)), dist.group.WORLD), bshd))
    return out


def _close(a, b, rtol=1e-5, atol=1e-6):
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol) or (math.isnan(a) and math.isnan(b))


def _worker(rank: int, world: int) -> None:
    group = dist.group.WORLD
    comm_sizes = {}
    for scale in (1, 4):  # the same sequences, 4x as many tokens: communication must not change
        logp, old, adv, mask, in_seq, lengths = _batch(scale)
        n_seq = len(LENGTHS)
        for name, kw in LOSSES:
            # unsplit reference: padded layout on one process, no communication
            x = logp.clone().requires_grad_(True)
            ref = compute_policy_loss(name, x, old, adv, mask, **kw)
            ref.loss.backward()
            ref_metrics = ref.metrics.to_dict()
            for split, red, gather in _splits(rank, world, in_seq, lengths):
                where = f"{name} {kw} {split} scale={scale}"
                lp = gather(logp).requires_grad_(True)
                local_mask = gather(mask)
                with AllReduceRecorder() as rec:
                    out = compute_policy_loss(name, lp, gather(old), adv, local_mask, reducer=red, **kw)
                sizes = rec.numels
                # O(sequences): a few [S] (at most 2 stacked) per reduction, never the tokens
                assert sizes and max(sizes) <= 2 * n_seq, (where, sizes)
                assert comm_sizes.setdefault((name, str(kw), split), sizes) == sizes, (where, sizes)
                # Megatron's finalize_model_grads: the integer counts summed over the DP x CP group
                denom = megatron_loss_outputs(out)[1].double()
                dist.all_reduce(denom, group=group)
                assert float(denom) == float(ref.loss_count), where
                out = compute_policy_loss(name, lp, gather(old), adv, local_mask, reducer=red, denominator=denom, **kw)
                with AllReduceRecorder() as rec:
                    out.loss.backward()
                assert rec.numels == [], where  # each rank's gradient is local
                # the rank sums of the loss and its numerator are the unsplit ones
                tot = torch.stack([out.loss.detach(), out.loss_sum.detach().float()])
                dist.all_reduce(tot, group=group)
                torch.testing.assert_close(tot[0], ref.loss.detach(), rtol=1e-5, atol=1e-6, msg=where)
                torch.testing.assert_close(tot[1], ref.loss_sum.detach().float(), rtol=1e-5, atol=1e-6, msg=where)
                # every token's gradient comes from exactly one rank and equals the unsplit one
                torch.testing.assert_close(lp.grad, gather(x.grad), rtol=1e-5, atol=1e-7, msg=where)
                merged = all_reduce_loss_metrics(out.metrics, group).to_dict()
                assert merged.keys() == ref_metrics.keys(), where
                for k, v in ref_metrics.items():
                    assert _close(merged[k], v), (where, k, merged[k], v)


def test_cp2_split_sequences_match_unsplit_loss_gradients_and_metrics():
    run_gloo(_worker, 2)

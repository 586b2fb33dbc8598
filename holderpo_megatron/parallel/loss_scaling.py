"""Exact global loss scaling under microbatches, data and context parallelism: the one path.

The loss of a global batch is ``sum of loss_sum / sum of loss_count`` over all its microbatches and
all data-parallel (DP) x context-parallel (CP) ranks: a mean over sequences (or tokens for the
token-mean baselines), whatever the split. Every ``LossOutput`` carries that numerator and
denominator as this shard reports it (``algorithms.reducers`` explains the CP reporting rule: under
CP only CP rank 0 counts a sequence, so the counts add up over the CP group too), so:

1. the Actor's Megatron loss function returns :func:`megatron_loss_outputs` of each microbatch's
   loss: its sum and its integer count; Megatron (``calculate_per_token_loss=True``) sums the counts
   over microbatches and the DP x CP group and divides the summed gradients by that total;
2. :func:`all_reduce_loss_metrics` merges the metrics of the step over the DP x CP group.

Context parallelism needs nothing more here: the CP reducer's count rule plus Megatron's all-reduce
of the counts over the DP x CP group (``finalize_model_grads``) give the global mean.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from holderpo_megatron.algorithms import LossMetrics, LossOutput

__all__ = ["megatron_loss_outputs", "all_reduce_loss_metrics"]


def megatron_loss_outputs(out: LossOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, num_tokens)`` for a Megatron loss function to return as ``(loss, num_tokens, logs)``
    under ``calculate_per_token_loss=True``, such that the gradient Megatron leaves in the model is
    exactly d/dtheta [sum of loss_sum over all microbatches and DP x CP ranks / sum of loss_count].

    What Megatron-Core 0.16.1 does with it (``pipeline_parallel/schedules.py``
    ``forward_step_calc_loss``; ``distributed/finalize_model_grads.py``): the schedule backpropagates
    ``loss`` undivided; DDP sums gradients over DP x CP unscaled; ``finalize_model_grads``
    all-reduces the sum of the returned ``num_tokens`` (over microbatches, then DP x CP) and divides
    the gradients by it. The count is an integer (sequences or tokens), and it follows sequences the
    loss dropped for non-finite inputs. Assumes the 3-tuple return (a 2-tuple makes Megatron multiply
    the loss by ``cp_size``), ``calculate_per_token_loss`` set alike in ``TransformerConfig`` and
    the DDP wrapper, and ``finalize_model_grads_func`` set.
    """
    count = out.loss_count.detach()
    return out.loss_sum, torch.round(count).to(dtype=torch.int, device=out.loss_sum.device).reshape(())


def all_reduce_loss_metrics(metrics: LossMetrics, group=None) -> LossMetrics:
    """Merge one step's ``LossMetrics`` (already merged over this rank's microbatches) over
    ``group`` (the DP x CP group): sums, counts and totals add, mins and maxes reduce. Two
    collectives whatever the number of metrics. Every rank must hold the same metric names (true when
    all run the same loss); a mismatch raises ValueError rather than mixing up values."""
    if group is None or dist.get_world_size(group) == 1:
        return metrics
    sum_keys = sorted(metrics.sums)
    tot_keys = sorted(metrics.totals)
    min_keys = sorted(metrics.mins)
    max_keys = sorted(metrics.maxs)
    names = "|".join(["s:" + k for k in sum_keys] + ["t:" + k for k in tot_keys]
                     + ["n:" + k for k in min_keys] + ["x:" + k for k in max_keys])
    sig = float(zlib.crc32(names.encode()))
    ref = next(iter([*metrics.sums.values(), *metrics.totals.values(), *metrics.mins.values(), *metrics.maxs.values()]), None)
    device = ref.device if ref is not None else torch.device("cpu")

    def flat(vals):
        return [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(1) for v in vals]

    # extrema in one MIN all-reduce (maxima negated), with the name signature as +sig and -sig:
    # after MIN both equal the local ones only if every rank has the same names.
    ext = torch.cat(flat([sig, -sig]) + flat([metrics.mins[k] for k in min_keys])
                    + flat([-metrics.maxs[k] for k in max_keys]))
    dist.all_reduce(ext, op=dist.ReduceOp.MIN, group=group)
    if float(ext[0]) != sig or float(ext[1]) != -sig:
        raise ValueError(f"ranks hold different loss metric names; this rank has: {names}")
    sums = torch.cat(flat([metrics.sums[k] for k in sum_keys]) + flat([metrics.counts[k] for k in sum_keys])
                     + flat([metrics.totals[k] for k in tot_keys]) + [torch.zeros(1, dtype=torch.float64, device=device)])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    n_s, n_t = len(sum_keys), len(tot_keys)
    out = LossMetrics(constants=dict(metrics.constants))
    for i, k in enumerate(sum_keys):
        out.sums[k] = sums[i]
        out.counts[k] = sums[n_s + i]
    for i, k in enumerate(tot_keys):
        out.totals[k] = sums[2 * n_s + i]
    for i, k in enumerate(min_keys):
        out.mins[k] = ext[2 + i]
    for i, k in enumerate(max_keys):
        out.maxs[k] = -ext[2 + len(min_keys) + i]
    return out

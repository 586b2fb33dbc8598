"""Exact global loss scaling under microbatches, data and context parallelism.

The loss of a global batch is ``sum of loss_sum / sum of loss_count`` over all its microbatches and
all data-parallel (DP) x context-parallel (CP) ranks: a mean over sequences (or tokens for the
token-mean baselines), whatever the split. Every ``LossOutput`` carries that numerator and
denominator as this shard reports it (``algorithms.reducers`` explains the CP reporting rule), so:

1. before the step, :func:`global_loss_denominator` all-reduces the local count of loss units
   (:func:`local_loss_count`, from the masks) over the DP x CP group;
2. each microbatch's loss is computed with ``denominator=`` that global count;
3. :func:`megatron_loss_func_outputs` undoes Megatron's own averaging, in one place;
4. :func:`all_reduce_loss_metrics` merges the metrics of the step over the DP x CP group.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from holderpo_megatron.algorithms import LossMetrics, SequenceReducer, compute_policy_loss

__all__ = [
    "policy_loss_normaliser",
    "local_loss_count",
    "global_loss_denominator",
    "megatron_loss_func_outputs",
    "all_reduce_loss_metrics",
]

NORMALISERS = ("sequence", "token")


def policy_loss_normaliser(name: str, **loss_kwargs) -> str:
    """``"sequence"`` or ``"token"``: what registered loss ``name`` (with these options) averages
    over. Asked of the loss itself on a one-token batch, so a newly registered loss needs nothing here."""
    kw = {k: v for k, v in loss_kwargs.items() if k not in ("denominator", "reducer", "strict")}
    z = torch.zeros(1, 1)
    return compute_policy_loss(name, z, z, torch.zeros(1), torch.ones(1, 1, dtype=torch.bool), **kw).normaliser


def local_loss_count(
    mask: torch.Tensor, normaliser: str, reducer: SequenceReducer | None = None
) -> torch.Tensor:
    """This shard's count of loss units, from the loss mask alone (known before any forward).

    ``mask``: token-shaped (``[B, T]`` padded by default, else the ``reducer``'s layout). ``sequence``:
    sequences with at least one valid token, as this rank reports them (under CP only rank 0 counts
    them; one ``[S]`` all-reduce over the CP group); ``token``: valid tokens of this shard.

    A sequence the loss later drops for non-finite log-probs stays in this count (it then adds 0 to
    the numerator); use ``calculate_per_token_loss`` in :func:`megatron_loss_func_outputs` for a
    denominator that follows such drops exactly.
    """
    if normaliser not in NORMALISERS:
        raise ValueError(f"normaliser must be one of {NORMALISERS}, got {normaliser!r}")
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a tensor, got {type(mask).__name__}")
    mask = mask.bool()
    if reducer is None:
        if mask.dim() != 2:
            raise ValueError(f"mask must be [batch, tokens] without a reducer, got shape {tuple(mask.shape)}")
        if normaliser == "token":
            return mask.sum().double()
        return mask.any(-1).sum().double()
    reducer.check_tokens("mask", mask)
    member = reducer.token_member()
    if member is not None:
        mask = mask & member
    if normaliser == "token":
        return mask.sum().double()
    return reducer.total((reducer.seq_sum(mask.double()) > 0).double()).detach()


def global_loss_denominator(local_count, group=None) -> torch.Tensor:
    """The global count of loss units: ``local_count`` (this rank's count summed over its
    microbatches; a number or 0-dim tensor) all-reduced (SUM) over ``group``, the DP x CP group
    (``parallel_state.get_data_parallel_group(with_context_parallel=True)``); None means one rank.
    Returns a float64 0-dim tensor, at least 1 (an empty global batch has loss 0 either way)."""
    count = torch.as_tensor(local_count, dtype=torch.float64).detach().clone().reshape(())
    if not bool(torch.isfinite(count)) or float(count) < 0:
        raise ValueError(f"local_count must be a finite count >= 0, got {float(count)!r}")
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count.clamp_min(1.0)


def megatron_loss_func_outputs(
    loss_sum: torch.Tensor,
    loss_count: torch.Tensor,
    *,
    num_microbatches: int,
    dp_cp_size: int,
    calculate_per_token_loss: bool = False,
    global_denominator: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, num_tokens)`` for the loss function given to Megatron's ``forward_backward_func``
    to return as ``(loss, num_tokens, logging_dict)``, such that the gradient Megatron leaves in the
    model after the step is exactly d/dtheta [sum of loss_sum over all microbatches and DP x CP
    ranks / global denominator].

    What Megatron-Core 0.16.1 does to the returned loss (``pipeline_parallel/schedules.py``,
    ``forward_step_calc_loss``; ``distributed/distributed_data_parallel.py``;
    ``distributed/finalize_model_grads.py``):

    * ``calculate_per_token_loss=False`` (the default): the schedule backpropagates
      ``loss / max(num_tokens, 1) / num_microbatches``; DDP then scales every gradient by
      ``1 / dp_cp_size`` (``gradient_scaling_factor``, or ``average_in_collective``'s AVG) and sums
      it over the DP x CP group. So we return ``loss = loss_sum / global_denominator *
      num_microbatches * dp_cp_size`` with ``num_tokens = 1``: the factors cancel and the
      rank-summed gradient is that of ``sum(loss_sum) / global_denominator``.
    * ``calculate_per_token_loss=True``: the schedule does not divide; DDP sums gradients over DP x
      CP unscaled; ``finalize_model_grads`` all-reduces the sum of the returned ``num_tokens``
      (over microbatches, then DP x CP) and divides the gradients by it. So we return
      ``loss = loss_sum`` and ``num_tokens = loss_count`` (an integer count: sequences or tokens).
      No global denominator is needed, and it follows sequences dropped for non-finite inputs.

    Assumes: the 3-tuple return (a 2-tuple makes Megatron multiply the loss by ``cp_size``, which
    this does not undo); Megatron's ``DistributedDataParallel`` over the DP x CP group with its default
    scaling (``calculate_per_token_loss`` the same in ``TransformerConfig`` and the DDP wrapper,
    ``finalize_model_grads_func`` set, as ``megatron.training`` does); ``num_microbatches`` the value
    passed to ``forward_backward_func`` (per pipeline stage; the interleaved schedule divides by the
    same number); ``dp_cp_size = data_parallel_size * context_parallel_size``. The fp16 loss scale
    (``grad_scale_func``) and MoE/MTP auxiliary-loss scaling are applied by Megatron on top and are
    unaffected.
    """
    if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be an int >= 1, got {num_microbatches!r}")
    if isinstance(dp_cp_size, bool) or not isinstance(dp_cp_size, int) or dp_cp_size < 1:
        raise ValueError(f"dp_cp_size must be an int >= 1, got {dp_cp_size!r}")
    if calculate_per_token_loss:
        count = torch.as_tensor(loss_count).detach()
        return loss_sum, torch.round(count).to(dtype=torch.int, device=loss_sum.device).reshape(())
    if global_denominator is None:
        raise ValueError("global_denominator is required unless calculate_per_token_loss=True; "
                         "get it from global_loss_denominator before the step")
    if not isinstance(global_denominator, torch.Tensor) and not global_denominator > 0:
        raise ValueError(f"global_denominator must be > 0, got {global_denominator!r}")
    denom = torch.as_tensor(global_denominator, dtype=loss_sum.dtype, device=loss_sum.device)
    loss = loss_sum / denom * float(num_microbatches * dp_cp_size)
    return loss, torch.ones((), dtype=torch.int, device=loss_sum.device)


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

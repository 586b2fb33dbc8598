"""The Actor: a Megatron policy that scores sequences and takes training steps.

Both go through Megatron's own schedules (``get_forward_backward_func``: no pipelining, 1F1B, or
interleaved 1F1B with virtual pipeline chunks), so a pipeline-parallel run is exactly Megatron's.

The Actor is configured once (:class:`ActorSettings`: token budget, packing, the loss and its
options, regularizers, the scoring temperature); a step calls ``score(sequences)`` and
``forward_backward(batch, p=p)``.

Loss normalisation, in one place (:func:`parallel.loss_scaling.megatron_loss_outputs`): the model
config sets ``calculate_per_token_loss=True``, so Megatron neither divides a microbatch's loss by
the number of microbatches nor averages gradients over data-parallel ranks; our loss function
returns the *sum* of its per-sequence (or per-token) losses and the matching *count*, and
Megatron's ``finalize_model_grads`` divides the summed gradients by the count summed over all
microbatches and DP ranks. The result is the gradient of the global-batch mean, whatever the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from holderpo_megatron.algorithms import (
    KL_ESTIMATORS,
    HolderOptions,
    LossMetrics,
    LossOptions,
    LossOutput,
    compute_policy_loss,
    kl_penalty,
    policy_loss_options,
)
from holderpo_megatron.data.batching import (
    MicroBatch,
    build_microbatch,
    plan_microbatches,
    plan_units,
    shared_prompt_lengths,
)
from holderpo_megatron.models import (
    ModelArch,
    build_gpt_model,
    check_recompute,
    output_hidden_states,
    output_weight,
    to_transformer_config,
)
from holderpo_megatron.parallel.aggregation import (
    ContextParallelReducer,
    PackedSequenceReducer,
    load_balanced_cp_index,
)
from holderpo_megatron.parallel.cpu_compat import fuse_cpu_adam
from holderpo_megatron.parallel.embedding import fuse_embedding_wgrad
from holderpo_megatron.parallel.layout import ParallelLayout
from holderpo_megatron.parallel.logprobs import output_layer_input, output_layer_logprobs
from holderpo_megatron.parallel.loss_scaling import all_reduce_loss_metrics, megatron_loss_outputs

from .batch import RolloutBatch, loss_mask

__all__ = ["OptimizerSettings", "ActorSettings", "MegatronActor", "Regularizers"]


@dataclass(frozen=True)
class OptimizerSettings:
    """Adam for the policy (YAML: ``train.optimizer``)."""

    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0: off
    use_distributed_optimizer: bool | None = None  # None: on GPU yes, on CPU no (needs CUDA)

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip_grad < 0:
            raise ValueError(f"clip_grad must be >= 0 (0 = off), got {self.clip_grad}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError(f"adam_beta1/adam_beta2 must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        if not self.adam_eps > 0:
            raise ValueError(f"adam_eps must be > 0, got {self.adam_eps}")


@dataclass(frozen=True)
class Regularizers:
    """KL to a reference policy and an entropy bonus, averaged with the policy loss's own normaliser."""

    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0

    def __post_init__(self):
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ValueError(f"kl_coef and entropy_coef must be >= 0, got {self.kl_coef}, {self.entropy_coef}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")


@dataclass(frozen=True)
class ActorSettings:
    """How the Actor scores and trains, fixed for a run.

    token_budget: tokens per microbatch; pack: several sequences per row; loss / loss_options: a
    registered policy loss and its options (``p`` is injected per step); temperature: log-probs are
    those of logits / T, the rollout's sampling temperature, so old, new and engine log-probs are of
    one distribution; generation_budget: ``rollout.max_new_tokens`` (Dr. GRPO's default divisor);
    recompute: activation recompute (``models.config.RECOMPUTE_MODES``), read once when the Actor
    builds its model config; share_prompts: consecutive samples with the same prompt put it in a
    packed row once (``data.batching``; needs ``pack``, cp = 1 and the local attention).
    """

    token_budget: int = 4096
    pack: bool = False
    loss: str = "holder"
    loss_options: LossOptions = field(default_factory=HolderOptions)
    regularizers: Regularizers = field(default_factory=Regularizers)
    temperature: float = 1.0
    generation_budget: int | None = None
    max_sequences_per_microbatch: int | None = None
    recompute: str = "none"
    share_prompts: bool = False

    def __post_init__(self):
        check_recompute(self.recompute)
        if self.share_prompts and not self.pack:
            raise ValueError("share_prompts=True needs packed rows (pack=True)")
        if self.token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {self.token_budget}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        cls = policy_loss_options(self.loss)
        if not isinstance(self.loss_options, cls):
            raise ValueError(f"loss {self.loss!r} takes {cls.__name__}, got {type(self.loss_options).__name__}")


def _wgrad_fusion_available() -> bool:
    """Megatron's own test for its gradient-accumulation fusion kernel (apex's
    fused_weight_gradient_mlp_cuda; the CPU layer provides it on CPU)."""
    from megatron.core.tensor_parallel import layers

    return bool(layers._grad_accum_fusion_available)


def _thd_params(mb: MicroBatch, device):
    """Megatron's PackedSeqParams (THD) for one packed row: a segment per sequence, plus one for
    the row's tail padding (which then attends only to itself); under context parallelism each
    sequence's slot is padded to a multiple of 2 * cp (``cu_seqlens_*_padded``), offsets global."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = mb.cu_seqlens.to(device)
    cu_padded = None if torch.equal(mb.cu_seqlens, mb.cu_seqlens_padded) else mb.cu_seqlens_padded.to(device)
    slots = cu if cu_padded is None else cu_padded
    longest = int((slots[1:] - slots[:-1]).max())
    kw = dict(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
              cu_seqlens_kv_padded=cu_padded, max_seqlen_q=longest, max_seqlen_kv=longest)
    if mb.prefix_segment is not None:  # shared prompts: RoPE positions and prompt segments ride along
        from holderpo_megatron.models.attention import SharedPrefixSeqParams

        return SharedPrefixSeqParams(**kw, prefix_segment=mb.prefix_segment.tolist(),
                                     positions=mb.position_ids[0].to(device))
    return PackedSeqParams(**kw)


class MegatronActor:
    def __init__(self, arch: ModelArch, layout: ParallelLayout, settings: ActorSettings | None = None, *,
                 params_dtype: torch.dtype = torch.float32, optimizer: OptimizerSettings | None = None,
                 use_te: bool | None = None, max_seq_length: int | None = None):
        from megatron.core import parallel_state as ps

        self.arch = arch
        self.layout = layout
        self.settings = settings or ActorSettings()
        self.max_seq_length = max_seq_length or arch.max_position_embeddings
        self.config = to_transformer_config(
            arch, layout.tp, layout.pp, layout.cp, params_dtype=params_dtype,
            sequence_parallel=layout.sequence_parallel, use_cpu_initialization=not torch.cuda.is_available(),
            recompute=self.settings.recompute, calculate_per_token_loss=True,
            # microbatches may differ in shape (token-budget batching): pipeline stages exchange
            # shapes; the interleaved schedule does not, so its microbatches are padded alike.
            variable_seq_lengths=layout.pp > 1 and not layout.vpp,
            moe_token_dispatcher_type="alltoall",
            # gloo matches batched isend/irecv pairs out of order in the interleaved schedule
            batch_p2p_comm=torch.cuda.is_available(),
            virtual_pipeline_model_parallel_size=layout.vpp,
            # weight gradients straight into DDP's main_grad where the kernel exists (apex on GPU, the
            # CPU layer's addmm_); only a trained (DDP-wrapped) model has main_grad
            gradient_accumulation_fusion=optimizer is not None and _wgrad_fusion_available(),
        )
        chunks = layout.vpp or 1
        # Packed rows go to the model as THD (segment boundaries, no [S, S] mask): TE's flash varlen
        # on GPU, models.attention.SegmentCausalAttention in the local spec.
        self.model = [
            build_gpt_model(arch, self.config, use_te=use_te, vp_stage=(v if layout.vpp else None))
            for v in range(chunks)
        ]
        # The last stage returns hidden states; the Actor applies the output layer itself, to the
        # response positions only and chunked with the log-softmax (no [tokens, vocab] logits).
        from holderpo_megatron.models.attention import positioned_rope, shares_prefixes

        # per-token RoPE positions for rows with shared prompts (identity for every other input)
        self._shares_prompts = all(positioned_rope(m) and shares_prefixes(m) for m in self.model)
        if self.settings.share_prompts:
            self._check_shared_prompts()
        self._head = None
        for m in self.model:
            if m.post_process:
                output_hidden_states(m)
                self._head = m
        self.optimizer = None
        if optimizer is not None:
            self._setup_training(optimizer)
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.cp_group = ps.get_context_parallel_group() if layout.cp > 1 else None
        self.cp_rank = ps.get_context_parallel_rank()
        self.is_last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.vocab_start = ps.get_tensor_model_parallel_rank() * (self._padded_vocab() // layout.tp)

    # ------------------------------------------------------------------ setup
    def _padded_vocab(self) -> int:
        from holderpo_megatron.models import padded_vocab_size

        return padded_vocab_size(self.arch.vocab_size, self.layout.tp)

    def _setup_training(self, opt: OptimizerSettings) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        use_dist = opt.use_distributed_optimizer
        if use_dist is None:
            use_dist = torch.cuda.is_available()
        if use_dist and not torch.cuda.is_available():
            raise ValueError("use_distributed_optimizer=True needs CUDA; CPU runs use the non-distributed optimizer")
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use_dist,
        )
        self.model = [
            DistributedDataParallel(self.config, ddp_config, module=m) for m in self.model
        ]
        self.config.finalize_model_grads_func = finalize_model_grads
        if self.config.gradient_accumulation_fusion:  # the embedding too writes main_grad in place
            for m in self.model:
                fuse_embedding_wgrad(m.module)
        bf16 = self.config.bf16
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=opt.lr, weight_decay=opt.weight_decay, adam_beta1=opt.adam_beta1,
                adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps, clip_grad=opt.clip_grad, bf16=bf16,
                params_dtype=self.config.params_dtype, use_distributed_optimizer=use_dist,
            ),
            self.model,
        )
        fuse_cpu_adam(self.optimizer)

    def unwrapped(self) -> list[torch.nn.Module]:
        return [getattr(m, "module", m) for m in self.model]

    # ------------------------------------------------------------------ schedules
    def _run(self, microbatches: list[MicroBatch], loss_func_for, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        dev = self.device

        def forward_step(data_iterator, model):
            mb: MicroBatch = next(data_iterator)
            thd = _thd_params(mb, dev) if mb.packed else None
            out = model(mb.input_ids.to(dev), mb.position_ids.to(dev), None, packed_seq_params=thd)
            return out, partial(loss_func_for, mb)

        n = len(microbatches)
        chunks = len(self.model)
        iters = [iter(microbatches) for _ in range(chunks)] if chunks > 1 else iter(microbatches)
        seq_len = max(mb.global_length or mb.input_ids.shape[1] for mb in microbatches)
        mbs = max(mb.input_ids.shape[0] for mb in microbatches)
        if chunks > 1 and n % self.layout.pp:
            raise ValueError(
                f"interleaved pipeline needs the number of microbatches ({n}) to be a multiple of pp={self.layout.pp}"
            )
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iters, model=self.model, num_microbatches=n,
            seq_length=seq_len, micro_batch_size=mbs, forward_only=forward_only,
        )

    def _token_logprobs(self, hidden: torch.Tensor, mb: MicroBatch, keep: torch.Tensor | None = None,
                        fill: torch.Tensor | None = None, entropy: bool = False, entropy_grad: bool = False):
        """The last stage's hidden states ``[rows, S, H]`` (``[rows, S/tp, H]`` under sequence
        parallelism) -> ``[N]`` log-probs of the microbatch's targets (and, with ``entropy``,
        ``([N] log-probs, [N] entropy)``). ``keep`` ``[N]`` bool: the positions to compute (the
        response's); the others are 0 and get no gradient."""
        head = self._head
        x = output_layer_input(hidden.transpose(0, 1), sequence_parallel=head.output_layer.sequence_parallel,
                               group=self.tp_group if self.layout.tp > 1 else None)
        flat = x.transpose(0, 1).reshape(-1, x.shape[-1])
        index, targets = mb.token_index, mb.targets
        if keep is not None:
            index, targets = index[keep], targets[keep]
        picked = flat.index_select(0, index.to(flat.device))
        out = output_layer_logprobs(
            picked, output_weight(head), targets.to(flat.device), group=self.tp_group if self.layout.tp > 1 else None,
            vocab_start=self.vocab_start, vocab_size=self.arch.vocab_size, temperature=self.settings.temperature,
            entropy=entropy, entropy_grad=entropy_grad,
            gradient_accumulation_fusion=self.config.gradient_accumulation_fusion,
        )
        lp, ent = out.logprobs, out.entropy
        if keep is not None:
            dev = lp.device
            k = keep.to(dev)
            base = lp.new_zeros(keep.shape) if fill is None else fill.detach().to(dev, torch.float32)
            lp = base.index_put((k,), lp)
            ent = None if ent is None else ent.new_zeros(keep.shape).index_put((k,), ent)
        return (lp, ent) if entropy else lp

    def _check_shared_prompts(self) -> None:
        if self.layout.cp > 1:
            raise ValueError(f"share_prompts=True does not combine with context parallelism (cp={self.layout.cp})")
        if not self._shares_prompts:
            raise ValueError("share_prompts=True needs the local attention (models.attention.SegmentCausalAttention) "
                             "and plain RoPE; this model has Transformer Engine's attention or another position "
                             "embedding: set train.share_prompts=false")

    def _plan(self, sequences: list[list[int]], units: list[list[int]] | None = None,
              unit_names: list | None = None, prompt_lengths: list[int] | None = None) -> list[MicroBatch]:
        """Microbatches of ``sequences``; with the settings' ``share_prompts``, ``prompt_lengths`` (the
        response starts) and single-sample units, rows share prompts (``data.batching``)."""
        token_budget, pack = self.settings.token_budget, self.settings.pack
        max_sequences = self.settings.max_sequences_per_microbatch
        for i, s in enumerate(sequences):
            if len(s) > self.max_seq_length:
                raise ValueError(
                    f"sequence {i} has {len(s)} tokens, more than the model's max length {self.max_seq_length}"
                )
        if units is None:
            units = [[i] for i in range(len(sequences))]
        shared = None
        if self.settings.share_prompts and prompt_lengths is not None and all(len(u) == 1 for u in units):
            self._check_shared_prompts()
            shared = shared_prompt_lengths(sequences, prompt_lengths)  # units are then [[0], [1], ..]
        if any(len(u) > 1 for u in units):
            # a trajectory's turns share one microbatch (its Hölder mean needs all of its tokens)
            if max_sequences is not None:
                raise ValueError("max_sequences_per_microbatch cannot be combined with multi-turn trajectories "
                                 "(a trajectory's turns must share a microbatch); bound train.token_budget instead")
            ugroups = plan_units([[len(sequences[i]) for i in u] for u in units], token_budget, pack=pack,
                                 names=unit_names)
        else:
            ugroups = plan_microbatches([len(sequences[u[0]]) for u in units], token_budget, pack=pack,
                                        max_sequences=max_sequences, shared=shared)
        if self.layout.vpp and len(ugroups) % self.layout.pp:
            # interleaved 1F1B wants a multiple of pp microbatches: split the largest groups, at
            # unit boundaries (a trajectory is never cut in two)
            while len(ugroups) % self.layout.pp:
                big = max(range(len(ugroups)), key=lambda k: len(ugroups[k]))
                if len(ugroups[big]) < 2:
                    raise ValueError(f"cannot make a multiple of pp={self.layout.pp} microbatches from "
                                     f"{len(sequences)} sequences in {len(units)} unsplittable units (trajectories)")
                g = ugroups.pop(big)
                ugroups[big:big] = [g[: len(g) // 2], g[len(g) // 2:]]
        groups = [[i for k in g for i in units[k]] for g in ugroups]
        cp = self.layout.cp
        # CP: every row (padded) or sequence slot (packed) splits into 2 * cp chunks; sequence
        # parallelism then splits each CP rank's share over TP
        seq_multiple = 2 * cp if cp > 1 else 1
        shape = dict(seq_multiple=seq_multiple,
                     pad_to_multiple=seq_multiple * (self.layout.tp if self.layout.sequence_parallel else 1))
        if self.layout.vpp:
            # Megatron's interleaved schedule sends activations of one fixed shape: pad every
            # microbatch to the largest length and row count of the step.
            if pack:
                shape.update(min_length=max(sum(-(-len(sequences[i]) // seq_multiple) * seq_multiple for i in g)
                                            for g in groups), min_rows=1)
            else:
                shape.update(min_length=max(len(s) for s in sequences), min_rows=max(len(g) for g in groups))
        if shared is not None:
            shape["shared"] = shared
        mbs = [build_microbatch(sequences, g, pack=pack, **shape) for g in groups]
        if cp > 1:
            mbs = [mb.shard(self._cp_positions(mb)) for mb in mbs]
        return mbs

    def _cp_positions(self, mb: MicroBatch) -> torch.Tensor:
        """Row positions this CP rank holds, Megatron's load-balanced order (chunks r, 2cp-1-r)."""
        bounds = mb.cu_seqlens_padded if mb.packed else torch.tensor([0, mb.input_ids.shape[1]])
        return load_balanced_cp_index(bounds, self.layout.cp, self.cp_rank).unsqueeze(0)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, sequences: list[list[int]], response_start: list[int] | None = None) -> list[torch.Tensor]:
        """Per-sequence float32 log-probs ``[n-1]`` (log p(x_t | x_<t), t = 1..n-1, under the
        settings' temperature), on every rank of the pipeline (broadcast from the last stage).
        ``sequences`` is this DP rank's share. With ``response_start`` (per sequence, the index of
        its first response token) only response tokens are scored (t >= response_start: the output
        layer runs at those positions only); the prompt's positions hold 0."""
        if response_start is not None and len(response_start) != len(sequences):
            raise ValueError(f"response_start has {len(response_start)} entries for {len(sequences)} sequences")
        for m in self.model:
            m.eval()
        mbs = self._plan(sequences, prompt_lengths=response_start)
        store: dict[int, torch.Tensor] = {}

        def loss_func(mb: MicroBatch, hidden: torch.Tensor):
            keep = None
            if response_start is not None:
                keep = self._local(mb, torch.cat([loss_mask(n, response_start[i])
                                                  for n, i in zip(mb.seq_lengths, mb.seq_indices)]))
            lp = self._token_logprobs(hidden, mb, keep).float()
            if mb.token_keep is not None:  # CP: this rank's tokens; the group adds up the whole
                full = lp.new_zeros(mb.token_keep.shape)
                full[mb.token_keep.to(lp.device)] = lp
                dist.all_reduce(full, group=self.cp_group)
                lp = full
            for k, v in zip(mb.seq_indices, mb.split_per_sequence(lp)):
                store[k] = v
            return hidden.new_zeros(()), torch.ones((), dtype=torch.int), {}

        self._run(mbs, loss_func, forward_only=True)
        flat_len = sum(len(s) - 1 for s in sequences)
        flat = torch.empty(flat_len, dtype=torch.float32, device=self.device)
        if self.is_last_stage and sequences:
            flat = torch.cat([store[i] for i in range(len(sequences))])
        if self.layout.pp > 1:
            from megatron.core import parallel_state as ps

            dist.broadcast(flat, src=ps.get_pipeline_model_parallel_last_rank(), group=self.pp_group)
        return list(flat.cpu().split([len(s) - 1 for s in sequences]))

    # ------------------------------------------------------------------ training
    def forward_backward(self, batch: RolloutBatch, p: float | None = None) -> LossMetrics:
        """Gradients of the global-batch loss into the DDP grad buffers (``param.main_grad``).
        ``batch`` is this DP rank's share; normalisation is global (see the module docstring);
        ``p``: the p schedule's value this step (for losses with a power). The settings'
        regularizers add a KL to a reference policy (``batch.ref_logprobs``) and an entropy bonus,
        averaged with the policy loss's own normaliser. A sample whose ``old_logprobs`` is None takes
        this forward's log-probs, detached, as its old ones (call it only before the policy moves
        away from the one that generated the sample); with ``batch.rollout_logprobs`` the metrics
        carry this forward's drift from the engine's log-probs."""
        if self.optimizer is None:
            raise RuntimeError("this actor was built without an optimizer (optimizer=None)")
        st = self.settings
        reg = st.regularizers
        options = st.loss_options if p is None else st.loss_options.at_p(p)
        if reg.kl_coef > 0 and batch.ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs batch.ref_logprobs (score the batch with the reference actor)")
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        units = batch.units()
        names = None if batch.trajectory is None else [batch.trajectory[u[0]] for u in units]
        mbs = self._plan(batch.sequences, units=units, unit_names=names, prompt_lengths=batch.response_start)
        collected: list[LossMetrics] = []

        def loss_func(mb: MicroBatch, hidden: torch.Tensor):
            # log-probs at response positions only (all the loss reads); the prompt's hold the old
            # ones, so every term there is finite (ratio 1, KL 0) before the mask zeroes it
            old, mask, own = self._old_and_mask(batch, mb, hidden.device)
            lp, ent = self._token_logprobs(hidden, mb, keep=mask, fill=old, entropy=True,
                                           entropy_grad=reg.entropy_coef > 0)
            if own is not None:  # the behaviour policy is this one: old = this forward's, detached
                old = torch.where(own, lp.detach(), old)
            out = self._microbatch_loss(batch, mb, lp, ent, options, old, mask)
            if batch.rollout_logprobs is not None:
                self._add_drift(out.metrics, batch, mb, lp, mask)
            collected.append(out.metrics)
            return (*megatron_loss_outputs(out), {})

        self._run(mbs, loss_func, forward_only=False)
        metrics = LossMetrics()
        for m in collected:
            metrics = metrics.merge(m)
        if self.cp_group is not None and self.is_last_stage:
            # CP ranks hold parts of the same sequences: merged here, over DP by the caller
            metrics = all_reduce_loss_metrics(metrics, self.cp_group)
        return metrics

    # ------------------------------------------------------------------ memory handover
    def _host_state(self) -> list[torch.Tensor]:
        """What :meth:`offload` moves: the DDP grad buffers, the optimizer's state (Adam m, v) and its
        fp32 master copies of half-precision parameters; never the weights themselves."""
        tensors = [b.grad_data for m in self.model for b in m.buffers + m.expert_parallel_buffers]
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            for st in opt.optimizer.state.values():
                tensors += [v for v in st.values() if torch.is_tensor(v) and v.numel() > 1]
            for name in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
                tensors += [t for group in getattr(opt, name, None) or [] for t in group]
        return tensors

    @property
    def offloaded(self) -> bool:
        return bool(getattr(self, "_offloaded", None))

    def offload(self) -> None:
        """Optimizer state and grad buffers to host memory, their device storage freed (size 0), so
        colocated engines can use it; :meth:`onload` brings them back bit for bit. Tensors keep their
        identity (views of the same storages), so Megatron's and the optimizer's references hold."""
        if self.optimizer is None or self.offloaded:
            return
        pin = self.device.type == "cuda"
        saved, seen = [], set()
        for t in self._host_state():
            st = t.untyped_storage()
            if st.data_ptr() in seen or st.nbytes() == 0:
                continue
            seen.add(st.data_ptr())
            view = torch.empty(0, dtype=torch.uint8, device=t.device).set_(st, 0, (st.nbytes(),), (1,))
            host = torch.empty(st.nbytes(), dtype=torch.uint8, pin_memory=pin)
            host.copy_(view)
            st.resize_(0)
            saved.append((st, host))
        self._offloaded = saved

    def onload(self) -> None:
        """Inverse of :meth:`offload`."""
        for st, host in getattr(self, "_offloaded", None) or []:
            st.resize_(host.numel())
            torch.empty(0, dtype=torch.uint8, device=st.device).set_(st, 0, (host.numel(),), (1,)).copy_(host)
        self._offloaded = None

    def applied_lr(self) -> float:
        """The learning rate the optimizer applies now (its param groups), not the configured one."""
        return float(self.optimizer.param_groups[0]["lr"])

    def optimizer_step(self) -> dict[str, float]:
        ok, grad_norm, _ = self.optimizer.step()
        return {"grad_norm": float(grad_norm) if grad_norm is not None else math.nan, "update_ok": float(bool(ok))}

    def train_step(self, batch: RolloutBatch, p: float | None = None) -> dict[str, float]:
        """forward_backward + optimizer step; returns this rank's loss metrics, grad norm."""
        metrics = self.forward_backward(batch, p)
        out = metrics.to_dict()
        out.update(self.optimizer_step())
        return out

    @staticmethod
    def _local(mb: MicroBatch, per_token: torch.Tensor) -> torch.Tensor:
        """``[N]`` of the full microbatch -> this CP rank's."""
        return per_token if mb.token_keep is None else per_token[mb.token_keep]

    def _old_and_mask(self, batch: RolloutBatch, mb: MicroBatch, dev):
        """This rank's ``[N]`` old log-probs (float32; 0 where a sample's are None), response mask
        (bool), and ``own`` (bool ``[N]``: the sample's old log-probs are None, to be taken from this
        forward; None if no sample of the microbatch has them None)."""
        olds = [batch.old_logprobs[i] for i in mb.seq_indices]
        sizes = [n - 1 for n in mb.seq_lengths]
        old = self._local(mb, torch.cat([torch.zeros(k) if o is None else o.float()
                                         for o, k in zip(olds, sizes)])).to(dev)
        mask = self._local(mb, torch.cat([loss_mask(n, batch.response_start[i])
                                          for n, i in zip(mb.seq_lengths, mb.seq_indices)])).to(dev)
        own = None
        if any(o is None for o in olds):
            own = self._local(mb, torch.cat([torch.full((k,), o is None) for o, k in zip(olds, sizes)])).to(dev)
        return old, mask, own

    def _add_drift(self, metrics: LossMetrics, batch: RolloutBatch, mb: MicroBatch, logp: torch.Tensor,
                   mask: torch.Tensor) -> None:
        """|this forward's log-probs - the engine's| over the microbatch's response tokens (nats):
        ``logprob_drift_mean`` (sum, count) and ``logprob_drift_max``, merged like the loss metrics."""
        engine = self._local(mb, torch.cat([batch.rollout_logprobs[i].float() for i in mb.seq_indices]))
        d = (logp.detach().double() - engine.to(logp.device, torch.float64)).abs()
        metrics.add_mean("logprob_drift_mean", (d * mask).sum(), mask.sum())
        metrics.add_max("logprob_drift_max", d, mask)

    def _microbatch_loss(self, batch: RolloutBatch, mb: MicroBatch, logp: torch.Tensor,
                         entropy: torch.Tensor | None, options: LossOptions, old: torch.Tensor,
                         mask: torch.Tensor):
        """Flat next-token log-probs ``[N]`` of a microbatch -> the registered loss (reduced per
        sequence by segment id, no padding to ``[B, T]``) plus the KL and entropy terms. ``old``,
        ``mask``: :meth:`_old_and_mask`."""
        dev = logp.device
        here = partial(self._local, mb)
        if batch.trajectory is None:
            seq_id, heads = mb.seq_id, list(range(mb.num_sequences))
        else:  # reduce per trajectory: all turns of an episode are one "sequence" of the loss
            local: dict[int, int] = {}
            heads = []
            of_sample = []
            for k, i in enumerate(mb.seq_indices):
                t = batch.trajectory[i]
                if t not in local:
                    local[t] = len(local)
                    heads.append(k)
                of_sample.append(local[t])
            seq_id = torch.tensor(of_sample, dtype=torch.long)[mb.seq_id]
        adv = batch.advantages[[mb.seq_indices[k] for k in heads]].float().to(dev)
        reducer = PackedSequenceReducer(seq_id.to(dev), num_sequences=len(heads),
                                        max_len=self.settings.generation_budget)
        if self.cp_group is not None:  # Hölder means over tokens on several ranks: [S] all-reduces
            reducer = ContextParallelReducer(reducer, self.cp_group, max_len=self.settings.generation_budget)
        out = compute_policy_loss(self.settings.loss, logp, old, adv, mask, options, reducer=reducer)
        reg = self.settings.regularizers
        maskf = mask.float()
        n_tok = maskf.sum()

        def averaged(x: torch.Tensor) -> torch.Tensor:
            # the policy loss's own unit: per-sequence means summed, or a token sum
            if out.normaliser == "token":
                return (x * maskf).sum()
            return reducer.total(reducer.seq_sum(x * maskf) / reducer.seq_sum(maskf).clamp_min(1))

        extra = logp.new_zeros(())
        if entropy is not None:
            out.metrics.add_mean("entropy", (entropy.detach() * maskf).sum(), n_tok)
            if reg.entropy_coef > 0:
                extra = extra - reg.entropy_coef * averaged(entropy)
        if reg.kl_coef > 0:
            ref = here(torch.cat([batch.ref_logprobs[i].float() for i in mb.seq_indices])).to(dev)
            ref = torch.where(mask, ref, logp.detach())  # prompt positions: KL 0 (masked anyway)
            kl = kl_penalty(logp, ref, reg.kl_estimator)
            out.metrics.add_mean("kl", (kl.detach() * maskf).sum(), n_tok)
            extra = extra + reg.kl_coef * averaged(kl)
        if reg.kl_coef > 0 or reg.entropy_coef > 0:
            out = LossOutput(out.loss, out.loss_sum + extra, out.loss_count, out.normaliser, out.metrics)
        return out

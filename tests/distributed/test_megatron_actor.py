"""The Megatron Actor under gloo against transformers: log-prob parity and exact gradients.

Every layout runs the real megatron-core GPTModel through Megatron's own schedules (no pipelining,
1F1B, interleaved 1F1B) with Megatron's DDP; the reference is the same tiny model in transformers,
one process, full batch, plain autograd.
"""

import pytest
import torch

from tests.distributed.gloo_spawn import run_gloo
from tests.distributed.megatron_fixtures import (
    actor_settings,
    hf_logprobs,
    hf_reference_grads,
    make_hf_model,
    make_rollout,
    ragged_sequences,
)

pytestmark = pytest.mark.distributed

LOSSES = [
    ("holder", {"p": 2.0}),
    ("holder", {"p": 0.0}),
    ("holder", {"p": -1.0}),
    ("holder", {"p": 1.5, "variant": "token"}),
    ("grpo", {}),
    ("grpo", {"aggregation": "seq-mean-token-mean"}),
]


def _setup(layout_kw, arch_cfg, sd, optimizer):
    from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

    enable_cpu_megatron()
    from holderpo_megatron.checkpoint.mapping import load_hf_weights_into_model
    from holderpo_megatron.models import ModelArch
    from holderpo_megatron.parallel.layout import ParallelLayout, initialize_model_parallel
    from holderpo_megatron.trainer.actor import MegatronActor, OptimizerSettings

    arch = ModelArch.from_hf_config(arch_cfg)
    layout = ParallelLayout(**layout_kw)
    initialize_model_parallel(layout)
    actor = MegatronActor(arch, layout, optimizer=OptimizerSettings(lr=1e-3, clip_grad=0.0) if optimizer else None)
    load_hf_weights_into_model(actor.unwrapped(), arch, sd)
    return arch, actor


def _my_share(n):
    from megatron.core import parallel_state as ps

    return list(range(ps.get_data_parallel_rank(), n, ps.get_data_parallel_world_size()))


def _parity_worker(rank, world, cfg, sd, seqs, refs):
    from holderpo_megatron.parallel.layout import destroy_model_parallel

    for tp, pp in [(1, 1), (2, 1), (1, 2), (2, 2)]:
        _, actor = _setup(dict(tp=tp, pp=pp), cfg, sd, optimizer=False)
        mine = _my_share(len(seqs))
        for temperature, ref in refs.items():
            actor.settings = actor_settings(token_budget=64, temperature=temperature)
            lps = actor.score([seqs[i] for i in mine])
            for i, lp in zip(mine, lps):
                err = (lp.double() - ref[i]).abs().max().item()
                assert err <= 1e-4, f"tp{tp}pp{pp} T={temperature} seq {i}: max abs diff {err:.2e}"
        destroy_model_parallel()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logprob_parity_with_transformers_at_every_layout(family):
    model = make_hf_model(family)
    seqs = ragged_sequences(model.config.vocab_size, 8, seed=1)
    refs = {}
    with torch.no_grad():
        refs[1.0] = hf_logprobs(model, seqs)
        # temperature: log_softmax(logits / T), the reference scaled the same way
        refs[0.7] = [
            torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0, :-1].double() / 0.7, -1)
            .gather(-1, torch.tensor(s[1:])[:, None]).squeeze(-1)
            for s in seqs
        ]
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run_gloo(_parity_worker, 4, model.config.to_dict(), sd, seqs, refs)


def _grad_worker(rank, world, cfg, sd, seqs, starts, old, adv, refs, layouts, ref_lp=None):
    from holderpo_megatron.checkpoint.mapping import export_hf_weights
    from holderpo_megatron.parallel.layout import destroy_model_parallel
    from holderpo_megatron.trainer.batch import RolloutBatch

    for layout_kw, run_kw in layouts:
        arch, actor = _setup(layout_kw, cfg, sd, optimizer=True)
        assert actor.config.sequence_parallel == layout_kw.get("sequence_parallel", False)
        assert actor.config.gradient_accumulation_fusion  # the fused wgrad paths are under test
        mine = _my_share(len(seqs))
        if ref_lp is not None:  # score(): every rank gets whole sequences' log-probs
            actor.settings = actor_settings(**run_kw)
            for i, lp in zip(mine, actor.score([seqs[i] for i in mine])):
                err = (lp.double() - ref_lp[i]).abs().max().item()
                assert err <= 1e-4, f"{layout_kw} {run_kw} score seq {i}: max abs diff {err:.2e}"
        batch = RolloutBatch([seqs[i] for i in mine], [starts[i] for i in mine], [old[i] for i in mine], adv[mine])
        for (name, kw), ref in zip(LOSSES, refs):
            actor.settings = actor_settings(name, kw, **run_kw)
            actor.forward_backward(batch)
            seen = 0
            for hf_name, g in export_hf_weights(actor.unwrapped(), arch, tensor_of=lambda p: p.main_grad):
                r = ref[hf_name].double()
                rel = (g.double() - r).abs().max().item() / r.abs().max().item()
                assert rel <= 1e-5, f"{layout_kw} {run_kw} {name}{kw}: {hf_name} max rel err {rel:.2e}"
                seen += 1
            assert seen > 0
        destroy_model_parallel()


def _grad_case(family, layouts, check_scores=False):
    model = make_hf_model(family)
    seqs = ragged_sequences(model.config.vocab_size, 8, seed=2)
    with torch.no_grad():
        ref_lp = hf_logprobs(model, seqs)
    starts, old, adv = make_rollout(seqs, ref_lp)
    refs = [hf_reference_grads(model, seqs, starts, old, adv, n, kw) for n, kw in LOSSES]
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run_gloo(_grad_worker, 4, model.config.to_dict(), sd, seqs, starts, old, adv, refs, layouts,
             ref_lp if check_scores else None)


def test_gradients_equal_single_process_full_batch_llama():
    _grad_case("llama", [
        # TP2 x PP2, 4 microbatches through 1F1B
        (dict(tp=2, pp=2), dict(token_budget=128, max_sequences_per_microbatch=2)),
        # DP2 x TP2, 2 microbatches per rank
        (dict(tp=2, pp=1), dict(token_budget=128, max_sequences_per_microbatch=2)),
        # DP4 with packing (several sequences per row, block-diagonal causal mask)
        (dict(tp=1, pp=1), dict(token_budget=80, pack=True)),
    ])


def test_gradients_equal_single_process_full_batch_qwen2_tied():
    _grad_case("qwen2", [
        # DP2 x TP2: embedding and output layer share one weight on the stage, both writing main_grad
        # (the embedding's fused backward hands autograd the placeholder; parallel.embedding)
        (dict(tp=2, pp=1), dict(token_budget=128, max_sequences_per_microbatch=2)),
        # DP2 x PP2 with packing, tied embeddings across the pipeline
        (dict(tp=1, pp=2), dict(token_budget=64, pack=True)),
        # DP2 x PP2 x interleaved virtual pipeline (2 chunks), 4 microbatches per rank
        (dict(tp=1, pp=2, vpp=2), dict(token_budget=128, max_sequences_per_microbatch=1)),
    ])


def test_gradients_and_scores_equal_single_process_context_and_sequence_parallel():
    """Context parallelism (K/V all-gathered over CP, load-balanced chunks, Hölder means through
    ContextParallelReducer) and sequence parallelism, packed and padded."""
    _grad_case("llama", [
        # DP2 x CP2, padded rows of a multiple of 2 * cp tokens, 2 microbatches per rank
        (dict(cp=2), dict(token_budget=128, max_sequences_per_microbatch=2)),
        # TP2 x CP2, packed: each sequence's slot padded to a multiple of 2 * cp and split in 4 chunks
        (dict(tp=2, cp=2), dict(token_budget=80, pack=True)),
        # TP2 x CP2, padded
        (dict(tp=2, cp=2), dict(token_budget=128, max_sequences_per_microbatch=3)),
        # DP2 x TP2 with sequence parallelism (the same layout without it: the test above), packed
        (dict(tp=2, sequence_parallel=True), dict(token_budget=80, pack=True)),
        # TP2 x CP2 x sequence parallelism, padded (as the 32B recipe: tp, cp and SP together)
        (dict(tp=2, cp=2, sequence_parallel=True), dict(token_budget=128, max_sequences_per_microbatch=2)),
    ], check_scores=True)


def _bad_input_worker(rank, world, cfg, sd):
    _, actor = _setup(dict(tp=1, pp=1), cfg, sd, optimizer=False)
    too_long = [list(range(10)) * 13]  # 130 tokens > max_position_embeddings=128
    with pytest.raises(ValueError, match="130 tokens, more than the model's max length 128"):
        actor.score(too_long)
    with pytest.raises(ValueError, match="more than the microbatch token budget"):
        actor.settings = actor_settings(token_budget=20)
        actor.score([list(range(50))])


def test_bad_input_is_refused_before_any_work():
    model = make_hf_model("llama")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run_gloo(_bad_input_worker, 1, model.config.to_dict(), sd)


# ---------------------------------------------------------------------------------------------
# Multi-turn trajectories: the turns of an episode are one sequence of the loss

# episode id -> its turns as (observation length, response length); a turn's sequence is the
# whole history so far (earlier turns' prompts and responses, then this turn's observation) plus
# its response, so only the response tokens of the turn are trained on and the rest is masked.
EPISODES = {11: [(8, 6), (4, 7), (3, 5)], 3: [(12, 9)], 7: [(9, 6), (4, 7)], 5: [(6, 5), (5, 4)]}
EPISODE_ADV = {11: 0.6, 3: -0.8, 7: 1.3, 5: -1.5}

TRAJ_LOSSES = [
    ("holder", {"p": 2.0}),
    ("holder", {"p": 0.0}),
    ("holder", {"p": -1.0}),
    ("gspo", {}),
    ("grpo", {"aggregation": "seq-mean-token-mean"}),
]


def _episodes(vocab: int, seed: int = 3):
    """Samples (one per turn) in round-robin order over episodes, as batched env stepping gives."""
    g = torch.Generator().manual_seed(seed)
    hist = {t: [] for t in EPISODES}
    seqs, starts, traj = [], [], []
    for k in range(max(len(v) for v in EPISODES.values())):
        for t, turns in EPISODES.items():
            if k < len(turns):
                obs, resp = turns[k]
                hist[t] += torch.randint(0, vocab, (obs,), generator=g).tolist()
                starts.append(len(hist[t]))
                hist[t] += torch.randint(0, vocab, (resp,), generator=g).tolist()
                seqs.append(list(hist[t]))
                traj.append(t)
    return seqs, starts, traj


def _hf_grouped_reference(model, seqs, starts, old, traj, name, kw, per_turn: bool):
    """Gradients (transformers, one process, full batch) of the loss over rows that are each the
    concatenation of one episode's response-token log-ratios across its turns (``per_turn``: one
    row per turn instead, the grouping ignored). Also returns the float64 loss of an independent
    formula on the same rows, to check the padded loss itself."""
    from holderpo_megatron.algorithms import compute_policy_loss
    from tests.references import ref_grpo_loss, ref_holder_loss

    model.zero_grad()
    lp_rows: dict = {}
    old_rows: dict = {}
    adv_of: dict = {}
    for i, s in enumerate(seqs):
        ids = torch.tensor([s])
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        key = i if per_turn else traj[i]
        lp_rows.setdefault(key, []).append(lp[starts[i] - 1:])
        old_rows.setdefault(key, []).append(old[i][starts[i] - 1:])
        adv_of[key] = EPISODE_ADV[traj[i]]
    keys = list(lp_rows)
    lps = [torch.cat(lp_rows[k]) for k in keys]
    olds = [torch.cat(old_rows[k]) for k in keys]
    t = max(x.numel() for x in lps)
    logp = torch.stack([torch.nn.functional.pad(x, (0, t - x.numel())) for x in lps])
    old_p = torch.stack([torch.nn.functional.pad(x, (0, t - x.numel())) for x in olds])
    mask = torch.arange(t)[None] < torch.tensor([x.numel() for x in lps])[:, None]
    adv = torch.tensor([adv_of[k] for k in keys])
    out = compute_policy_loss(name, logp, old_p, adv, mask, **kw)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    if name == "grpo":
        indep = ref_grpo_loss(logp.detach(), old_p, adv, mask, aggregation=kw["aggregation"])
    else:  # holder seq; gspo is the p = 0 (geometric) mean with the same sequence clip
        indep = ref_holder_loss(logp.detach(), old_p, adv, mask, kw.get("p", 0.0))
    return grads, out.loss.item(), float(indep)


def _trajectory_grad_worker(rank, world, cfg, sd, seqs, starts, old, adv, traj, refs, layouts):
    from megatron.core import parallel_state as ps

    from holderpo_megatron.checkpoint.mapping import export_hf_weights
    from holderpo_megatron.parallel.layout import destroy_model_parallel
    from holderpo_megatron.trainer.batch import RolloutBatch

    full = RolloutBatch(seqs, starts, old, adv, trajectory=traj)
    for li, (layout_kw, run_kw) in enumerate(layouts):
        arch, actor = _setup(layout_kw, cfg, sd, optimizer=True)
        # this DP rank's share: whole episodes, as the training loop splits them
        mine = full.units()[ps.get_data_parallel_rank()::ps.get_data_parallel_world_size()]
        batch = full.select(mine)
        if li == 0:
            # episode 11 has 14 + 25 + 33 = 72 tokens: it cannot be split, so it is refused by name
            with pytest.raises(ValueError, match=r"trajectory 11\b.*72 tokens.*more than the microbatch token budget 60"):
                actor.settings = actor_settings("gspo", token_budget=60, pack=True)
                actor.forward_backward(batch)
        for (name, kw), ref in zip(TRAJ_LOSSES, refs):
            actor.settings = actor_settings(name, kw, **run_kw)
            metrics = actor.forward_backward(batch)
            if actor.is_last_stage:  # the loss saw one sequence per episode, not one per turn
                assert metrics.to_dict()["num_seqs"] == len(mine), f"{layout_kw} {name}{kw}: {metrics.to_dict()}"
            seen = 0
            for hf_name, g in export_hf_weights(actor.unwrapped(), arch, tensor_of=lambda p: p.main_grad):
                r = ref[hf_name].double()
                rel = (g.double() - r).abs().max().item() / r.abs().max().item()
                assert rel <= 1e-5, f"{layout_kw} {run_kw} {name}{kw}: {hf_name} max rel err {rel:.2e}"
                seen += 1
            assert seen > 0
        destroy_model_parallel()


def test_multi_turn_trajectory_gradients_equal_per_episode_reference():
    model = make_hf_model("llama")
    seqs, starts, traj = _episodes(model.config.vocab_size)
    with torch.no_grad():
        ref_lp = hf_logprobs(model, seqs)
    g = torch.Generator().manual_seed(4)
    old = [(lp + 0.15 * torch.randn(lp.shape, generator=g, dtype=lp.dtype)).float() for lp in ref_lp]
    adv = torch.tensor([EPISODE_ADV[t] for t in traj])
    refs = []
    for name, kw in TRAJ_LOSSES:
        grads, loss, indep = _hf_grouped_reference(model, seqs, starts, old, traj, name, kw, per_turn=False)
        assert abs(loss - indep) <= 1e-5 * max(1.0, abs(indep)), f"{name}{kw}: padded loss {loss} vs float64 {indep}"
        # the grouping matters: one sequence per turn gives materially different gradients, so
        # an Actor that ignored the trajectories could not pass the comparison below
        per_turn, _, _ = _hf_grouped_reference(model, seqs, starts, old, traj, name, kw, per_turn=True)
        diff = max((grads[k] - per_turn[k]).abs().max().item() / grads[k].abs().max().item() for k in grads)
        assert diff > 0.05, f"{name}{kw}: per-episode and per-turn gradients differ by only {diff:.2e}"
        refs.append(grads)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run_gloo(_trajectory_grad_worker, 4, model.config.to_dict(), sd, seqs, starts, old, adv, traj, refs, [
        # TP2 x PP2, padded: several microbatches of different shapes through 1F1B
        (dict(tp=2, pp=2), dict(token_budget=100)),
        # DP2 x PP2 x interleaved (2 chunks), packed: rank 0 holds episodes 11 (3 turns) and 7
        # (2 turns) in one 113-token microbatch, which the interleaved schedule must split in two:
        # at the episode boundary, not after the second of its five samples
        (dict(tp=1, pp=2, vpp=2), dict(token_budget=128, pack=True)),
    ])


def test_rollout_batch_refuses_inconsistent_trajectories():
    from holderpo_megatron.trainer.batch import RolloutBatch

    seqs, starts, traj = _episodes(50)
    old = [torch.zeros(len(s) - 1) for s in seqs]
    adv = torch.tensor([EPISODE_ADV[t] for t in traj])
    batch = RolloutBatch(seqs, starts, old, adv, trajectory=traj)
    assert batch.units() == [[0, 4, 7], [1], [2, 5], [3, 6]]  # first-appearance order, turns in order
    sub = batch.select([[2, 5], [1]])
    assert sub.trajectory == [7, 7, 3] and sub.sequences == [seqs[i] for i in (2, 5, 1)]
    assert sub.units() == [[0, 1], [2]] and sub.advantages.tolist() == pytest.approx([1.3, 1.3, -0.8])
    bad = adv.clone()
    bad[4] += 0.25  # episode 11's second turn
    with pytest.raises(ValueError, match=r"trajectory 11: its turns carry different advantages"):
        RolloutBatch(seqs, starts, old, bad, trajectory=traj)
    with pytest.raises(ValueError, match="trajectory has 7 ids for 8 sequences"):
        RolloutBatch(seqs, starts, old, adv, trajectory=traj[:-1])


def _response_only_worker(rank, world, cfg, sd, seqs, starts, old, adv):
    from holderpo_megatron.models import padded_vocab_size
    from holderpo_megatron.trainer.batch import RolloutBatch

    arch, actor = _setup(dict(tp=1, pp=1), cfg, sd, optimizer=True)
    actor.settings = actor_settings(token_budget=80, pack=True)
    # on CPU a trained actor adds weight gradients straight into main_grad (the CPU layer's kernel for
    # Megatron's gradient-accumulation fusion) and steps torch's fused Adam kernel
    assert actor.config.gradient_accumulation_fusion
    groups = [g for o in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer]) for g in o.optimizer.param_groups]
    assert groups and all(g["fused"] for g in groups)
    full = actor.score(seqs)
    part = actor.score(seqs, starts)
    for lp_full, lp_part, n, r in zip(full, part, map(len, seqs), starts):
        keep = torch.arange(1, n) >= r  # next-token positions predicting response tokens
        assert torch.equal(lp_part[keep], lp_full[keep]) and torch.all(lp_part[~keep] == 0)
    # a training step keeps no [tokens, vocab] logits for backward: besides parameters, the only
    # vocab-sized tensors saved are each microbatch's one working buffer of its response positions'
    # logits (they fit one chunk here: kept instead of recomputed, parallel.logprobs)
    vocab = {padded_vocab_size(arch.vocab_size, 1), arch.vocab_size}
    params = {p.untyped_storage().data_ptr() for m in actor.unwrapped() for p in m.parameters()}
    big = []

    def pack(t):
        if vocab & set(t.shape) and t.untyped_storage().data_ptr() not in params:
            big.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        actor.forward_backward(RolloutBatch(seqs, starts, old, adv))
    responses = sum(len(s) - r for s, r in zip(seqs, starts))  # positions that predict a response token
    assert all(s[1:] == (arch.vocab_size,) for s in big) and sum(s[0] for s in big) == responses, \
        f"vocab-sized tensors saved for backward: {big}, for {responses} response positions"
    with pytest.raises(ValueError, match="response_start has 1 entries for 8 sequences"):
        actor.score(seqs, starts[:1])


def test_response_only_scores_and_logits_kept_only_at_response_positions():
    model = make_hf_model("llama")
    seqs = ragged_sequences(model.config.vocab_size, 8, seed=3)
    with torch.no_grad():
        ref_lp = hf_logprobs(model, seqs)
    starts, old, adv = make_rollout(seqs, ref_lp)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run_gloo(_response_only_worker, 1, model.config.to_dict(), sd, seqs, starts, old, adv)


def _recompute_worker(rank, world, cfg, sd, seqs, starts, old, adv):
    from holderpo_megatron.checkpoint.mapping import export_hf_weights, load_hf_weights_into_model
    from holderpo_megatron.models import ModelArch
    from holderpo_megatron.parallel.layout import ParallelLayout
    from holderpo_megatron.trainer.actor import MegatronActor, OptimizerSettings
    from holderpo_megatron.trainer.batch import RolloutBatch

    _setup(dict(tp=1, pp=1), cfg, sd, optimizer=False)  # model-parallel state
    arch = ModelArch.from_hf_config(cfg)
    batch = RolloutBatch(seqs, starts, old, adv)
    grads, kept, scores = {}, {}, {}
    for mode in ("none", "full"):
        # one microbatch, so that everything forward keeps is still held when backward starts
        actor = MegatronActor(arch, ParallelLayout(), actor_settings(token_budget=1024, pack=True, recompute=mode),
                              optimizer=OptimizerSettings(lr=1e-3, clip_grad=0.0))
        load_hf_weights_into_model(actor.unwrapped(), arch, sd)
        c = actor.config
        assert (c.recompute_granularity, c.recompute_method, c.recompute_num_layers) == (
            ("full", "uniform", 1) if mode == "full" else (None, None, None))
        params = {p.untyped_storage().data_ptr() for m in actor.unwrapped() for p in m.parameters()}
        saved, backward_started = {}, []

        def pack(t):
            # what forward keeps: storages saved before backward's first unpack (recompute saves again
            # inside backward, one layer at a time, after that)
            ptr = t.untyped_storage().data_ptr()
            if not backward_started and ptr not in params:
                saved[ptr] = t.untyped_storage().nbytes()
            return t

        def unpack(t):
            backward_started.append(True)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            actor.forward_backward(batch)
        kept[mode] = sum(saved.values())
        scores[mode] = actor.score(seqs)  # scoring (no backward) runs the same forward
        grads[mode] = dict(export_hf_weights(actor.unwrapped(), arch, tensor_of=lambda p: p.main_grad.clone()))
    assert grads["none"].keys() == grads["full"].keys() and grads["none"]
    for name, g in grads["none"].items():
        rel = (grads["full"][name].double() - g.double()).abs().max().item() / g.abs().max().item()
        assert rel <= 1e-6, f"{name}: recompute changes the gradient, max rel err {rel:.2e}"
    for a, b in zip(scores["none"], scores["full"]):
        assert torch.equal(a, b)
    tokens = sum(map(len, seqs))
    # full recompute keeps each layer's input [tokens, hidden] (fp32) where no recompute keeps all of
    # the layer's activations: tens of hidden-sized vectors per token per layer
    per_layer_none = (kept["none"] - kept["full"]) / (tokens * arch.num_layers * arch.hidden_size)
    assert kept["full"] < 0.2 * kept["none"], kept  # measured: 0.42 vs 5.06 MB
    assert per_layer_none >= 10, f"{kept}: only {per_layer_none:.1f} bytes per token per layer per hidden saved"


def test_full_recompute_reaches_megatron_keeps_less_and_leaves_gradients_unchanged():
    model = make_hf_model("llama")
    seqs = ragged_sequences(model.config.vocab_size, 8, seed=4)
    with torch.no_grad():
        ref_lp = hf_logprobs(model, seqs)
    starts, old, adv = make_rollout(seqs, ref_lp)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run_gloo(_recompute_worker, 1, model.config.to_dict(), sd, seqs, starts, old, adv)


# ---------------------------------------------------------------------------------------------
# Optimizer steps: what the loop applies is torch's AdamW at the configured lr, with grad-norm clipping

ADAM_LR, ADAM_STEPS = 1e-4, 3


def _adam_worker(rank, world, cfg, sd, seqs, starts, old, adv, want):
    from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

    enable_cpu_megatron()
    from holderpo_megatron.checkpoint.mapping import export_hf_weights, load_hf_weights_into_model
    from holderpo_megatron.models import ModelArch
    from holderpo_megatron.parallel.layout import ParallelLayout, initialize_model_parallel
    from holderpo_megatron.trainer.actor import MegatronActor, OptimizerSettings
    from holderpo_megatron.trainer.batch import RolloutBatch

    arch, layout = ModelArch.from_hf_config(cfg), ParallelLayout(tp=1, pp=2)
    initialize_model_parallel(layout)
    actor = MegatronActor(arch, layout, optimizer=OptimizerSettings(lr=ADAM_LR, clip_grad=1.0))
    load_hf_weights_into_model(actor.unwrapped(), arch, sd)
    actor.settings = actor_settings("holder", {"p": 0.0}, token_budget=64, pack=True)
    batch = RolloutBatch(seqs, starts, old, adv)
    for k, (grad_norm, params) in enumerate(want):
        actor.forward_backward(batch)
        got = actor.optimizer_step()["grad_norm"]
        assert got == pytest.approx(grad_norm, rel=1e-4), f"step {k + 1}: grad norm {got} vs {grad_norm}"
        assert actor.applied_lr() == ADAM_LR
        for name, t in export_hf_weights(actor.unwrapped(), arch):
            # AdamW moves every weight by about lr a step: a wrong lr, a lost moment or a stale tied
            # copy is off by ~lr on average. (Not the max: where a gradient is ~adam_eps, float32
            # rounding of the gradient changes that element's first update by a fraction of lr.)
            err = (t.double() - params[name]).abs().mean().item()
            assert err <= 0.01 * ADAM_LR, f"step {k + 1}: {name} off by {err:.2e} on average (lr {ADAM_LR})"


def test_optimizer_steps_equal_torch_adamw_with_clipping_through_the_pipeline():
    """Several updates through Megatron (PP2 1F1B, packed, tied embeddings split over the two stages)
    against transformers + ``torch.optim.AdamW`` + ``clip_grad_norm_`` on the full batch: the same
    clipped grad norm and the same weights after every step (the lr actually applied, the Adam state
    carried between steps, both copies of the tied embedding)."""
    model = make_hf_model("qwen2").train()
    seqs = ragged_sequences(model.config.vocab_size, 8, seed=5)
    with torch.no_grad():
        ref_lp = hf_logprobs(model, seqs)
    starts, _, adv = make_rollout(seqs, ref_lp)
    old = [lp.float() for lp in ref_lp]  # on-policy, as the loop's first minibatch
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=ADAM_LR, weight_decay=0.0, eps=1e-8)
    want = []
    for _ in range(ADAM_STEPS):
        hf_reference_grads(model, seqs, starts, old, adv, "holder", {"p": 0.0})
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        assert norm > 1.0  # the clip acts: it is under test
        opt.step()
        want.append((norm, {n: p.detach().double().clone() for n, p in model.state_dict().items()}))
    run_gloo(_adam_worker, 2, model.config.to_dict(), sd, seqs, starts, old, adv, want)


def _grouped_rollout(vocab: int, seed: int = 3):
    """GRPO-shaped data: 4 prompts of 3-12 tokens, 4 responses each of 2-20 tokens (one of a single
    token: its only target is predicted from the prompt's last position)."""
    g = torch.Generator().manual_seed(seed)
    seqs, starts = [], []
    for grp in range(4):
        p = int(torch.randint(3, 13, (1,), generator=g))
        prompt = torch.randint(0, vocab, (p,), generator=g).tolist()
        for k in range(4):
            r = 1 if (grp, k) == (1, 2) else int(torch.randint(2, 21, (1,), generator=g))
            seqs.append(prompt + torch.randint(0, vocab, (r,), generator=g).tolist())
            starts.append(p)
    return seqs, starts


def _shared_prompt_worker(rank, world, cfg, sd, seqs, starts, old, adv, refs, ref_lp, layouts):
    from holderpo_megatron.checkpoint.mapping import export_hf_weights
    from holderpo_megatron.parallel.layout import destroy_model_parallel
    from holderpo_megatron.trainer.batch import RolloutBatch

    for layout_kw, run_kw in layouts:
        arch, actor = _setup(layout_kw, cfg, sd, optimizer=True)
        mine = _my_share(len(seqs))
        my_seqs, my_starts = [seqs[i] for i in mine], [starts[i] for i in mine]
        actor.settings = actor_settings(share_prompts=True, pack=True, **run_kw)
        # the rows really share: each prompt once per microbatch run, fewer tokens than one per sample
        mbs = actor._plan(my_seqs, prompt_lengths=my_starts)
        assert all(mb.prefix_segment is not None for mb in mbs) and any((mb.prefix_segment >= 0).any() for mb in mbs)
        rows = sum(mb.cu_seqlens[-1].item() for mb in mbs)
        assert rows < sum(len(s) for s in my_seqs) - len(my_seqs), f"{layout_kw}: {rows} tokens in rows"
        for i, lp, s in zip(mine, actor.score(my_seqs, my_starts), my_starts):
            err = (lp[s - 1:].double() - ref_lp[i][s - 1:]).abs().max().item()
            assert err <= 1e-4 and not lp[:s - 1].any(), f"{layout_kw} score seq {i}: max abs diff {err:.2e}"
        batch = RolloutBatch(my_seqs, my_starts, [old[i] for i in mine], adv[mine])
        for (name, kw), ref in zip(LOSSES, refs):
            actor.settings = actor_settings(name, kw, share_prompts=True, pack=True, **run_kw)
            actor.forward_backward(batch)
            for hf_name, g in export_hf_weights(actor.unwrapped(), arch, tensor_of=lambda p: p.main_grad):
                r = ref[hf_name].double()
                rel = (g.double() - r).abs().max().item() / r.abs().max().item()
                assert rel <= 1e-5, f"{layout_kw} {run_kw} {name}{kw}: {hf_name} max rel err {rel:.2e}"
        destroy_model_parallel()


def test_shared_prompt_rows_give_the_unshared_gradients_and_scores():
    """train.share_prompts: a group's prompt once per row (its responses attend to it at positions
    following it, RoPE at those positions); scores and gradients equal the one-row-per-sample
    reference, through DP, TP with sequence parallelism, the pipeline and groups cut between
    microbatches."""
    model = make_hf_model("qwen2")
    seqs, starts = _grouped_rollout(model.config.vocab_size)
    with torch.no_grad():
        ref_lp = hf_logprobs(model, seqs)
    _, old, adv = make_rollout(seqs, ref_lp)
    refs = [hf_reference_grads(model, seqs, starts, old, adv, n, kw) for n, kw in LOSSES]
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run_gloo(_shared_prompt_worker, 4, model.config.to_dict(), sd, seqs, starts, old, adv, refs, ref_lp, [
        # DP2 x PP2: runs of 2 samples per prompt; a budget of 40 tokens cuts runs between microbatches
        (dict(tp=1, pp=2), dict(token_budget=40)),
        # TP2 x PP2: runs of 4 through 1F1B, tied embeddings across the pipeline
        (dict(tp=2, pp=2), dict(token_budget=80)),
        # DP2 x TP2 with sequence parallelism: the row split over TP before attention gathers it
        (dict(tp=2, sequence_parallel=True), dict(token_budget=64)),
    ])

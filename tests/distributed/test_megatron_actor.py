"""The Megatron Actor under gloo against transformers: log-prob parity and exact gradients.

Every layout runs the real megatron-core GPTModel through Megatron's own schedules (no pipelining,
1F1B, interleaved 1F1B) with Megatron's DDP; the reference is the same tiny model in transformers,
one process, full batch, plain autograd.
"""

import pytest
import torch

from tests.distributed.gloo_spawn import run_gloo
from tests.distributed.megatron_fixtures import (
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
            lps = actor.score([seqs[i] for i in mine], token_budget=64, temperature=temperature)
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


def _grad_worker(rank, world, cfg, sd, seqs, starts, old, adv, refs, layouts):
    from holderpo_megatron.checkpoint.mapping import export_hf_weights
    from holderpo_megatron.parallel.layout import destroy_model_parallel
    from holderpo_megatron.trainer.actor import RolloutBatch

    for layout_kw, run_kw in layouts:
        arch, actor = _setup(layout_kw, cfg, sd, optimizer=True)
        mine = _my_share(len(seqs))
        batch = RolloutBatch([seqs[i] for i in mine], [starts[i] for i in mine], [old[i] for i in mine], adv[mine])
        for (name, kw), ref in zip(LOSSES, refs):
            actor.forward_backward(batch, loss_name=name, loss_kwargs=kw, **run_kw)
            seen = 0
            for hf_name, g in export_hf_weights(actor.unwrapped(), arch, tensor_of=lambda p: p.main_grad):
                r = ref[hf_name].double()
                rel = (g.double() - r).abs().max().item() / r.abs().max().item()
                assert rel <= 1e-5, f"{layout_kw} {run_kw} {name}{kw}: {hf_name} max rel err {rel:.2e}"
                seen += 1
            assert seen > 0
        destroy_model_parallel()


def _grad_case(family, layouts):
    model = make_hf_model(family)
    seqs = ragged_sequences(model.config.vocab_size, 8, seed=2)
    with torch.no_grad():
        ref_lp = hf_logprobs(model, seqs)
    starts, old, adv = make_rollout(seqs, ref_lp)
    refs = [hf_reference_grads(model, seqs, starts, old, adv, n, kw) for n, kw in LOSSES]
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run_gloo(_grad_worker, 4, model.config.to_dict(), sd, seqs, starts, old, adv, refs, layouts)


def test_gradients_equal_single_process_full_batch_llama():
    _grad_case("llama", [
        # TP2 x PP2, 4 microbatches through 1F1B
        (dict(tp=2, pp=2), dict(token_budget=128, max_sequences_per_microbatch=2)),
        # DP2 x TP2, 2 microbatches per rank
        (dict(tp=2, pp=1), dict(token_budget=128, max_sequences_per_microbatch=2)),
        # DP4 with packing (several sequences per row, block-diagonal causal mask)
        (dict(tp=1, pp=1), dict(token_budget=80, pack=True)),
    ])


def test_gradients_equal_single_process_full_batch_qwen2_pipelines():
    _grad_case("qwen2", [
        # DP2 x PP2 with packing, tied embeddings across the pipeline
        (dict(tp=1, pp=2), dict(token_budget=64, pack=True)),
        # DP2 x PP2 x interleaved virtual pipeline (2 chunks), 4 microbatches per rank
        (dict(tp=1, pp=2, vpp=2), dict(token_budget=128, max_sequences_per_microbatch=1)),
    ])


def _bad_input_worker(rank, world, cfg, sd):
    _, actor = _setup(dict(tp=1, pp=1), cfg, sd, optimizer=False)
    too_long = [list(range(10)) * 13]  # 130 tokens > max_position_embeddings=128
    with pytest.raises(ValueError, match="130 tokens, more than the model's max length 128"):
        actor.score(too_long)
    with pytest.raises(ValueError, match="more than the microbatch token budget"):
        actor.score([list(range(50))], token_budget=20)


def test_bad_input_is_refused_before_any_work():
    model = make_hf_model("llama")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run_gloo(_bad_input_worker, 1, model.config.to_dict(), sd)

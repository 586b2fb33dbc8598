"""Every replica generates: a DP2 run on CPU with two SGLang servers, one per data-parallel replica
(rollout.mode=servers; the placement gives each replica its own engine, fed locally).

On 2 gloo ranks with a tiny random Llama, through the real loop (``TrainContext`` + ``one_step``):
both engines generate every step, after each sync each engine's weights equal its replica's Megatron
weights exactly (read back through the engine), every sample carries the current weight version,
log-prob drift stays small, the memory handover's calls come in their order, the engines' log-probs
train as old ones within rollout.drift_max and a step beyond it is refused before any update, and a
killed engine fails the next step's sync on every rank, naming the engine, with no new version declared.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.distributed.gloo_spawn import run_gloo
from tests.integration.tiny_llama import require_sglang, save_tiny_llama

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "recipes" / "tiny-cpu.yaml"


def _overrides(model: Path, out: Path) -> list[str]:
    return [f"model.hf_path={model}", f"output_dir={out}", "name=fleet", "data.prompt_template=plain",
            "data.answer_template=plain", "rollout.max_prompt_tokens=48", "rollout.max_new_tokens=8",
            "train.prompts_per_step=4", "rollout.group_size=4", "train.token_budget=256",
            "parallel.pp=1", "parallel.nproc_per_node=2", "rollout.mode=servers", "rollout.engines_per_node=null",
            "rollout.weight_sync=auto", "algorithm.regularizers={entropy_coef: 0.01}", "logging.progress=false",
            "checkpoint.resume=false", "checkpoint.export_hf_at_end=false",
            "rollout.mem_fraction_static=0.05"]  # two CPU engines for a tiny model: small KV caches suffice


def _engine_holds_my_weights(ctx) -> int:
    """On a replica's first rank: every HF tensor its engine holds equals this replica's Megatron
    weights, bit for bit. Returns how many tensors were compared."""
    from holderpo_megatron.checkpoint.mapping import export_hf_weights

    n = 0
    for name, t in export_hf_weights(ctx.actor.unwrapped(), ctx.arch, dtype=torch.float32):
        got = ctx.fleet.feed.get_weight(name)
        assert torch.equal(got, t), f"rank {ctx.rank}: engine {ctx.fleet.feed.engine_names} holds another {name}"
        n += 1
    return n


def _worker(rank, world, overrides):
    import torch.distributed as dist

    from holderpo_megatron.trainer.config import load_run_config
    from holderpo_megatron.trainer.loop import one_step
    from holderpo_megatron.trainer.setup import setup_training

    ctx = setup_training(load_run_config(RECIPE, overrides))
    try:
        fleet = ctx.fleet
        assert len(fleet.urls) == 2 and fleet.urls[0] != fleet.urls[1]
        assert [slot.index for slot in ctx.placement.owned_by(rank)] == [rank]  # each rank starts one engine
        assert fleet.feed is not None and fleet.feed.engine_names == [fleet.urls[rank]]  # each replica its own
        assert (fleet.driver is not None) == (rank == 0)
        assert _engine_holds_my_weights(ctx) > 0  # the initial weights, before any training
        for step in range(2):
            m = one_step(ctx, step)
            assert ctx.weight_version == step + 1
            assert _engine_holds_my_weights(ctx) > 0
            if rank == 0:
                assert m["rollout/engine0/samples"] > 0 and m["rollout/engine1/samples"] > 0, m
                assert m["rollout/engine0/samples"] + m["rollout/engine1/samples"] == 16, m
                assert m["stale_samples"] == 0, m  # every sample carries the version the trainer holds
                assert m["weight_sync/bytes"] > 0, m
            assert m["logprob_drift_max"] < 5e-3, m
        if rank == 0:
            calls = [json.loads(line) for line in (ctx.cfg.run_dir / "handover.jsonl").read_text().splitlines()]
            assert [c["step"] for c in calls] == [1, 2]
            for c in calls:  # release -> train -> resume weights -> sync -> resume KV (skipped on CPU, recorded)
                assert c["calls"] == ["release_memory (skipped: cpu)", "train", "resume_weights (skipped: cpu)",
                                      "sync", "resume_kv_cache (skipped: cpu)"], c
        # the engines' log-probs as old ones (no scoring pass), guarded by the drift the training
        # forward measures: within rollout.drift_max the step trains; beyond it every rank refuses it
        # before any update (the engines keep the weights Megatron still holds)
        ctx.cfg.rollout = replace(ctx.cfg.rollout, use_rollout_logprobs=True, drift_max=0.05)
        m = one_step(ctx, 2)
        assert ctx.weight_version == 3 and _engine_holds_my_weights(ctx) > 0
        assert m["logprob_drift_tokens"] > 0 and m["logprob_drift_max"] < 5e-3, m
        ctx.cfg.rollout = replace(ctx.cfg.rollout, drift_max=1e-12)
        with pytest.raises(RuntimeError, match=r"step 4: train/rollout log-prob drift, mean \|logp_train - logp_rollout\| "
                                               r"= .* nats over \d+ response tokens .*exceeds rollout.drift_max=1e-12; "
                                               r"the step is refused before any update"):
            one_step(ctx, 3)
        assert ctx.weight_version == 3 and _engine_holds_my_weights(ctx) > 0
        # engine 1 dies: the next sync fails on every rank, naming it; no engine declares the version
        ctx.cfg.rollout = replace(ctx.cfg.rollout, drift_max=0.05)
        dead = fleet.urls[1]
        if rank == 1:
            fleet.processes[0][1].kill()  # (slot, server process, URL)
        dist.barrier()
        with pytest.raises(RuntimeError, match=rf"weight sync of version 4 failed; no engine declares it: .*{dead}"):
            one_step(ctx, 3)
        assert ctx.weight_version == 3
    finally:
        ctx.close()


def test_dp2_two_engines_generate_sync_exactly_and_fail_by_name(tmp_path):
    require_sglang()
    model = save_tiny_llama(tmp_path / "tiny")
    run_gloo(_worker, 2, _overrides(model, tmp_path / "runs"))

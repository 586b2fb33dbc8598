"""Every shipped recipe starts: validated, planned, and what start-up builds is built on a scaled-down
stand-in of it. Same keys and features; the model is a tiny random one of the recipe model's family
(its architecture, tying, RoPE scaling and biases, with hidden 64 and 4 layers), and the layout is
mapped onto CPU ranks: tp, pp and cp each capped at 2, at most 2 "nodes", data parallelism taking
the rest of 4 ranks (8 when tp, pp and cp are all 2, so every feature stays). In one gloo world per
world size, per recipe: the placement, Megatron's parallel groups, the
Actor with its optimizer, the engine config, and the weight transport the run would pick (by the
host of each rank). A recipe using a refused feature fails here (validation names it).
"""

import json
from pathlib import Path

import pytest
import torch

from holderpo_megatron.trainer.config import load_run_config, validate_run
from holderpo_megatron.trainer.plan import arch_for_plan, plan_run
from tests.distributed.gloo_spawn import run_gloo

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (ROOT / "examples" / "recipes").glob("*.yaml") if p.name != "math-base.yaml")


def stand_in_world(cfg) -> int:
    p = cfg.parallel
    return max(4, min(p.tp, 2) * min(p.pp, 2) * min(p.cp, 2))


def scaled_overrides(cfg, model_dir: Path) -> list[str]:
    """The recipe's layout on CPU ranks (see the module docstring) and the tiny model."""
    p, r = cfg.parallel, cfg.rollout
    tp, pp, cp = min(p.tp, 2), min(p.pp, 2), min(p.cp, 2)
    nnodes = min(p.nnodes, 2)
    nproc = stand_in_world(cfg) // nnodes
    engine_tp = min(r.engine_tp, nproc)
    out = [f"model.hf_path={model_dir}", "model.dtype=fp32", f"parallel.tp={tp}", f"parallel.pp={pp}",
           f"parallel.cp={cp}", f"parallel.nnodes={nnodes}", f"parallel.nproc_per_node={nproc}",
           f"rollout.engine_tp={engine_tp}"]
    if p.vpp:
        out.append(f"parallel.vpp={min(p.vpp, 2) if pp > 1 else 'null'}")
    if r.engines_per_node is not None:
        out.append(f"rollout.engines_per_node={min(r.engines_per_node, nproc // engine_tp)}")
    return out


def tiny_of_family(arch_name: str, known: dict, directory: Path) -> Path:
    """A random tiny model with the recipe model's architecture and features, saved as HF."""
    import transformers

    cfg = dict(known)
    cfg.update(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=301)
    cfg.pop("head_dim", None)
    config = transformers.AutoConfig.for_model(arch_name, **cfg)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def _model_type(known: dict) -> str:
    return {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
            "MistralForCausalLM": "mistral"}[known["architectures"][0]]


def _build_worker(rank, world, cases):
    from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

    enable_cpu_megatron()
    from holderpo_megatron.models import ModelArch
    from holderpo_megatron.parallel.layout import ParallelLayout, destroy_model_parallel, initialize_model_parallel
    from holderpo_megatron.trainer.actor import MegatronActor
    from holderpo_megatron.trainer.config import engine_config, run_placement
    from holderpo_megatron.trainer.fleet import sync_topology
    from holderpo_megatron.weight_sync import MegatronWeightSource, choose_transport

    for recipe, overrides, expect in cases:
        cfg = load_run_config(recipe, overrides)
        p = cfg.parallel
        arch = ModelArch.from_pretrained_dir(cfg.model.hf_path)
        placement = run_placement(cfg)
        initialize_model_parallel(ParallelLayout(tp=p.tp, pp=p.pp, cp=p.cp, vpp=p.vpp), seed=cfg.train.seed)
        try:
            actor = MegatronActor(arch, ParallelLayout(tp=p.tp, pp=p.pp, cp=p.cp, vpp=p.vpp), cfg.actor_settings(),
                                  max_seq_length=cfg.max_sequence_length, optimizer=cfg.train.optimizer)
            assert actor.optimizer is not None
            engine_cfg = engine_config(cfg, cfg.model.hf_path)
            assert engine_cfg.tp_size == cfg.rollout.engine_tp
            fed = [e for e in placement.engines if e.replica == _replica(rank, placement)]  # as the fleet does
            source = MegatronWeightSource(actor.unwrapped(), arch, feeds=bool(fed))
            hosts = [f"node{k // p.nproc_per_node}" for k in range(world)]
            transport = choose_transport(sync_topology(fed, source.stage_senders, hosts, p.tp))
            if source.is_owner and cfg.rollout.weight_sync == "auto":
                assert transport == expect[rank], (recipe, rank, transport, expect)
        finally:
            destroy_model_parallel()


def _replica(rank, placement):
    from holderpo_megatron.parallel.placement import rank_coords

    return rank_coords(rank, tp=placement.tp, cp=placement.cp, dp=placement.dp, pp=placement.pp).dp


def _expected_transport(placement, nproc: int) -> dict[int, str]:
    """By the placement alone: a replica's owner uses shared memory when its stage senders and every
    engine it feeds are on one node, else the distributed transport."""
    out = {}
    for e in placement.engines:
        nodes = {s // nproc for s in e.senders} | ({e.owner_rank // nproc} if e.owner_rank is not None else {-1})
        owner = e.senders[0]
        kind = "tensor" if len(nodes) == 1 else "distributed"
        out[owner] = "distributed" if out.get(owner) == "distributed" else kind
    return out


def test_every_shipped_recipe_validates_plans_and_builds_its_start_up(tmp_path):
    from holderpo_megatron.models.known import KNOWN_CONFIGS
    from holderpo_megatron.trainer.config import run_placement

    cases = []
    for recipe in RECIPES:
        full = load_run_config(recipe)
        validate_run(full, arch_for_plan(full), check_paths=False)  # the recipe as shipped
        assert plan_run(full, arch_for_plan(full), on_gpu=full.model.dtype != "fp32").fits, recipe.name
        known = KNOWN_CONFIGS[full.model.name or "HuggingFaceTB/SmolLM2-135M-Instruct"]
        model = tiny_of_family(_model_type(known), known, tmp_path / recipe.stem)
        overrides = scaled_overrides(full, model)
        small = load_run_config(recipe, overrides)
        validate_run(small, arch_for_plan(small), check_paths=False)  # the stand-in keeps every feature
        assert json.loads((model / "config.json").read_text())["architectures"] == known["architectures"]
        placement = run_placement(small)
        cases.append((small.parallel.world_size, (str(recipe), overrides,
                                                  _expected_transport(placement, small.parallel.nproc_per_node))))
    assert len(cases) == len(RECIPES) >= 9
    for world in sorted({w for w, _ in cases}):
        run_gloo(_build_worker, world, [c for w, c in cases if w == world])

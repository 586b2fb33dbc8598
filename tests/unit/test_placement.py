"""Placement of the rollout engines over real cluster layouts, refusals, and `holderpo plan`'s memory rule."""

import inspect

import pytest

from holderpo_megatron.parallel.placement import plan_placement, rank_coords, replica_ranks
from holderpo_megatron.trainer.config import ConfigError, RunConfig, load_run_config, run_placement, validate_run
from holderpo_megatron.trainer.config_loader import from_dict
from holderpo_megatron.trainer.plan import HEADROOM, arch_for_plan, plan_main, plan_run

# (name, plan_placement kwargs, expected engines as (node, gpus, owner, replica, senders, feed))
LAYOUTS = [
    ("1x8 TP2xDP4 etp2: one engine per replica", dict(nnodes=1, gpus_per_node=8, tp=2, engine_tp=2),
     [(0, (0, 1), 0, 0, (0,), "local"), (0, (2, 3), 2, 1, (2,), "local"),
      (0, (4, 5), 4, 2, (4,), "local"), (0, (6, 7), 6, 3, (6,), "local")]),
    ("4x8 TP8xPP4 etp8: one engine per node, broadcast", dict(nnodes=4, gpus_per_node=8, tp=8, pp=4, engine_tp=8),
     [(n, tuple(range(8)), 8 * n, 0, (0, 8, 16, 24), "broadcast") for n in range(4)]),
    ("1x2 CPU DP2 etp1: two engines", dict(nnodes=1, gpus_per_node=2),
     [(0, (0,), 0, 0, (0,), "local"), (0, (1,), 1, 1, (1,), "local")]),
    ("1x2 CPU PP2, one engine (the demo)", dict(nnodes=1, gpus_per_node=2, pp=2, engines_per_node=1),
     [(0, (0,), 0, 0, (0, 1), "local")]),
    ("1x8 TP1xDP8 etp2: lowest replica on the GPUs", dict(nnodes=1, gpus_per_node=8, engine_tp=2),
     [(0, (2 * k, 2 * k + 1), 2 * k, 2 * k, (2 * k,), "local") for k in range(4)]),
    ("1x8 TP2xPP2xDP2 etp2: stages on one host stay local", dict(nnodes=1, gpus_per_node=8, tp=2, pp=2, engine_tp=2),
     [(0, (0, 1), 0, 0, (0, 4), "local"), (0, (2, 3), 2, 1, (2, 6), "local"),
      (0, (4, 5), 4, 0, (0, 4), "local"), (0, (6, 7), 6, 1, (2, 6), "local")]),
    ("2x4 TP2xPP2xDP2 etp2: pp across nodes", dict(nnodes=2, gpus_per_node=4, tp=2, pp=2, engine_tp=2),
     [(0, (0, 1), 0, 0, (0, 4), "broadcast"), (0, (2, 3), 2, 1, (2, 6), "broadcast"),
      (1, (0, 1), 4, 0, (0, 4), "broadcast"), (1, (2, 3), 6, 1, (2, 6), "broadcast")]),
    ("2x8 TP8xDP2 etp8: a replica per node", dict(nnodes=2, gpus_per_node=8, tp=8, engine_tp=8),
     [(0, tuple(range(8)), 0, 0, (0,), "local"), (1, tuple(range(8)), 8, 1, (8,), "local")]),
    ("4x8 TP4xPP2xCP2xDP2 etp8 (32B)", dict(nnodes=4, gpus_per_node=8, tp=4, pp=2, cp=2, engine_tp=8),
     [(0, tuple(range(8)), 0, 0, (0, 16), "broadcast"), (1, tuple(range(8)), 8, 1, (8, 24), "broadcast"),
      (2, tuple(range(8)), 16, 0, (0, 16), "broadcast"), (3, tuple(range(8)), 24, 1, (8, 24), "broadcast")]),
    ("separate: 2 trainer nodes + 1 engine node", dict(nnodes=2, gpus_per_node=8, tp=8, engine_tp=4,
                                                       placement="separate", engine_gpus_per_node=8, engine_nodes=1),
     [(2, (0, 1, 2, 3), None, 0, (0,), "broadcast"), (2, (4, 5, 6, 7), None, 0, (0,), "broadcast")]),
    ("separate: 4 extra GPUs on the trainer's node", dict(nnodes=1, gpus_per_node=4, tp=2, engine_tp=2,
                                                          placement="separate", engine_gpus_per_node=4),
     [(0, (4, 5), 0, 0, (0,), "broadcast"), (0, (6, 7), 0, 0, (0,), "broadcast")]),
    ("separate: servers at URLs", dict(nnodes=1, gpus_per_node=2, placement="separate",
                                       server_urls=["http://a:30000", "http://b:30000"]),
     [(None, (), None, 0, (0,), "broadcast"), (None, (), None, 0, (0,), "broadcast")]),
]


@pytest.mark.parametrize("name,kw,want", LAYOUTS, ids=[n for n, _, _ in LAYOUTS])
def test_layouts(name, kw, want):
    p = plan_placement(**kw)
    got = [(e.node, e.gpus, e.owner_rank, e.replica, e.senders, e.feed) for e in p.engines]
    assert got == want
    assert [e.index for e in p.engines] == list(range(len(want)))
    for e in p.engines:
        # the feeding ranks are the replica's ranks at cp rank 0, and include every stage sender
        rr = replica_ranks(e.replica, tp=p.tp, cp=p.cp, dp=p.dp, pp=p.pp)
        assert e.feeding_ranks == tuple(r for r in rr if rank_coords(r, tp=p.tp, cp=p.cp, dp=p.dp, pp=p.pp).cp == 0)
        assert set(e.senders) <= set(e.feeding_ranks) and len(e.feeding_ranks) == p.tp * p.pp
        if e.owner_rank is not None:
            assert e in p.owned_by(e.owner_rank)
        assert all(e in p.fed_by(r) for r in e.feeding_ranks)
    table = p.describe()
    assert len(table.splitlines()) >= 2 + len(want) and f"{len(want)} engine(s) of TP{p.engine_tp}" in table


def test_colocated_engines_cover_every_gpu_once():
    p = plan_placement(nnodes=4, gpus_per_node=8, tp=2, pp=2, engine_tp=2)
    used = [(e.node, g) for e in p.engines for g in e.gpus]
    assert sorted(used) == [(n, g) for n in range(4) for g in range(8)] and p.total_gpus == 32
    assert len({e.owner_rank for e in p.engines}) == 16  # one engine per owner


def test_separate_gpu_totals_and_urls():
    assert plan_placement(nnodes=2, gpus_per_node=8, placement="separate", engine_gpus_per_node=8,
                          engine_nodes=1).total_gpus == 24
    assert plan_placement(nnodes=1, gpus_per_node=4, placement="separate", engine_gpus_per_node=4).total_gpus == 8
    p = plan_placement(nnodes=1, gpus_per_node=2, placement="separate", server_urls=["http://a:1", "http://b:2"])
    assert [e.url for e in p.engines] == ["http://a:1", "http://b:2"] and p.total_gpus == 2


def test_describe_reads_as_a_table():
    table = plan_placement(nnodes=4, gpus_per_node=8, tp=8, pp=4, engine_tp=8).describe()
    assert table.splitlines()[1].split() == ["engine", "node", "GPUs", "owner", "fed", "by", "feed"]
    assert "rank 24  replica 0 (ranks 0-31; senders 0,8,16,24)  broadcast" in table
    assert "broadcast: each stage sender" in table and "local:" not in table
    table = plan_placement(nnodes=2, gpus_per_node=8, tp=8, placement="separate", engine_gpus_per_node=8,
                           engine_nodes=1, engine_tp=8).describe()
    assert "2 (engines only)" in table and "external" in table and "24 GPUs in all" in table


REFUSALS = [
    (dict(nnodes=1, gpus_per_node=8, engine_tp=3), "engine_tp=3 does not divide the 8 GPUs of a node; allowed engine_tp: 1, 2, 4, 8"),
    (dict(nnodes=2, gpus_per_node=8, tp=16, engine_tp=16), "engine_tp=16 exceeds the 8 GPUs of a node: an engine may not span nodes"),
    (dict(nnodes=1, gpus_per_node=6, tp=4), "world size nnodes\\*gpus_per_node = 1\\*6 = 6 is not divisible by tp\\*pp\\*cp"),
    (dict(nnodes=1, gpus_per_node=8, tp=0), "tp must be an int >= 1, got 0"),
    (dict(nnodes=1, gpus_per_node=8, placement="remote"), "placement 'remote' is not one of"),
    (dict(nnodes=1, gpus_per_node=8, placement="separate"), "separate placement needs engine GPUs"),
    (dict(nnodes=1, gpus_per_node=8, engine_nodes=1, engine_gpus_per_node=8), "are only for placement 'separate'"),
    (dict(nnodes=1, gpus_per_node=8, server_urls=["http://a:1"]), "are only for placement 'separate'"),
    (dict(nnodes=1, gpus_per_node=8, placement="separate", engine_gpus_per_node=8, server_urls=["http://a:1"]),
     "either as server_urls \\(1\\) or as engine_gpus_per_node=8 .* not both"),
    (dict(nnodes=1, gpus_per_node=8, placement="separate", engine_gpus_per_node=4, engine_tp=8),
     "engine_tp=8 exceeds the 4 engine GPUs of a node"),
    (dict(nnodes=1, gpus_per_node=8, placement="separate", engine_nodes=-1, engine_gpus_per_node=8),
     "engine_nodes must be an int >= 0"),
    (dict(nnodes=1, gpus_per_node=8, engine_tp=2, engines_per_node=5), "engines_per_node=5 exceeds the 4 engine\\(s\\) of TP2"),
    (dict(nnodes=1, gpus_per_node=8, engines_per_node=0), "engines_per_node must be an int >= 1"),
]


@pytest.mark.parametrize("kw,match", REFUSALS, ids=[m[:40] for _, m in REFUSALS])
def test_refusals(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        plan_placement(**kw)
    assert "\n" not in str(e.value)


MEGATRON_LAYOUTS = [(2, 1, 4, 1), (8, 1, 1, 4), (4, 2, 2, 2), (2, 1, 2, 2), (1, 2, 3, 2), (2, 2, 2, 2), (1, 1, 8, 1)]


@pytest.mark.parametrize("tp,cp,dp,pp", MEGATRON_LAYOUTS)
def test_rank_order_matches_megatron(tp, cp, dp, pp):
    ps = pytest.importorskip("megatron.core.parallel_state")
    order = inspect.signature(ps.initialize_model_parallel).parameters["order"].default
    assert order == "tp-cp-ep-dp-pp"
    rg = ps.RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=order)
    assert rg.get_ranks("tp-cp-pp") == [list(replica_ranks(d, tp=tp, cp=cp, dp=dp, pp=pp)) for d in range(dp)]
    for token in ("tp", "cp", "dp", "pp"):
        for group in rg.get_ranks(token):
            coords = [rank_coords(r, tp=tp, cp=cp, dp=dp, pp=pp) for r in group]
            assert [getattr(c, token) for c in coords] == list(range(len(group)))  # group order = that rank
            others = {tuple(getattr(c, k) for k in ("tp", "cp", "dp", "pp") if k != token) for c in coords}
            assert len(others) == 1


# -- the run config and `holderpo plan` --------------------------------------------------------------------


def test_config_keys_reach_the_placement():
    cfg = from_dict(RunConfig, {"parallel": {"nnodes": 2, "nproc_per_node": 8, "tp": 8},
                                "rollout": {"mode": "servers", "placement": "separate", "engine_tp": 8,
                                            "engine_gpus_per_node": 8, "engine_nodes": 2}})
    p = run_placement(cfg)
    assert [(e.node, e.owner_rank, e.feed) for e in p.engines] == [(2, None, "broadcast"), (3, None, "broadcast")]


BAD_CONFIGS = [
    ({"rollout": {"placement": "remote"}}, "rollout.placement: 'remote' is not allowed"),
    ({"rollout": {"engines_per_node": 0}}, "rollout.engines_per_node must be null or >= 1"),
    ({"rollout": {"engine_nodes": -1}}, "rollout.engine_gpus_per_node and rollout.engine_nodes must be >= 0"),
    ({"rollout": {"placement": "separate", "engine_nodes": 1, "engine_gpus_per_node": 8}},
     "rollout.engine_nodes=1: .* set rollout.mode=servers"),
]


@pytest.mark.parametrize("data,match", BAD_CONFIGS, ids=[m[:30] for _, m in BAD_CONFIGS])
def test_bad_placement_keys(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(RunConfig, data)


@pytest.mark.parametrize("rollout,parallel,match", [
    ({"engine_tp": 3}, {"nproc_per_node": 8}, "rollout placement: engine_tp=3 does not divide the 8 GPUs"),
    ({"engine_tp": 4}, {"nproc_per_node": 2}, "rollout placement: engine_tp=4 exceeds the 2 GPUs of a node"),
    ({"mode": "servers", "server_urls": ["http://a:1"]}, {}, "rollout placement: colocated .* only for placement 'separate'"),
    ({"placement": "separate"}, {}, "rollout placement: separate placement needs engine GPUs"),
])
def test_validate_run_refuses_impossible_placements(rollout, parallel, match):
    cfg = from_dict(RunConfig, {"rollout": rollout, "parallel": parallel, "data": {"train": "arithmetic"}})
    with pytest.raises(ConfigError, match=match):
        validate_run(cfg, None, check_paths=False)


@pytest.mark.parametrize("name,engines,feed", [
    ("deepseek-r1-distill-qwen-7b", [(0, (0, 1)), (0, (2, 3)), (0, (4, 5)), (0, (6, 7))], "local"),
    ("qwen2.5-math-7b", [(0, (0, 1)), (0, (2, 3)), (0, (4, 5)), (0, (6, 7))], "local"),
    ("llama-3.1-70b", [(n, tuple(range(8))) for n in range(4)], "broadcast"),
    ("qwen2.5-32b", [(n, tuple(range(8))) for n in range(4)], "broadcast"),
    ("tiny-cpu", [(0, (0,))], "local"),
    ("alfworld-tiny-cpu", [(0, (0,))], "local"),
])
def test_recipe_placements(name, engines, feed):
    p = run_placement(load_run_config(f"examples/recipes/{name}.yaml"))
    assert [(e.node, e.gpus) for e in p.engines] == engines and {e.feed for e in p.engines} == {feed}


def test_plan_memory_rule_max_with_handover_else_sum():
    cfg = load_run_config("examples/recipes/deepseek-r1-distill-qwen-7b.yaml")
    arch = arch_for_plan(cfg)
    on = plan_run(cfg, arch, on_gpu=True)
    assert on.handover and on.peak_gib == max(on.training_gib, on.rollout_gib) and on.fits
    off = plan_run(load_run_config("examples/recipes/deepseek-r1-distill-qwen-7b.yaml",
                                   ["rollout.release_memory_during_train=false"]), arch, on_gpu=True)
    assert not off.handover and off.peak_gib == pytest.approx(off.training_gib + off.rollout_gib)
    assert not off.fits  # ~47 GiB of training + ~48 GiB of SGLang on one 80 GB GPU
    cpu = plan_run(cfg, arch, on_gpu=False)  # CPU engines cannot release: the sum
    assert not cpu.handover and cpu.peak_gib == pytest.approx(cpu.training_gib + cpu.rollout_gib)
    sep = plan_run(load_run_config("examples/recipes/deepseek-r1-distill-qwen-7b.yaml", [
        "rollout.placement=separate", "rollout.engine_gpus_per_node=8", "rollout.engines_per_node=null"]), arch)
    assert not sep.colocated and sep.peak_gib == sep.training_gib  # engines on GPUs of their own


def test_plan_prints_the_placement_and_refuses_what_does_not_fit(capsys):
    assert plan_main(load_run_config("examples/recipes/deepseek-r1-distill-qwen-7b.yaml")) == 0
    out = capsys.readouterr().out
    assert "placement: colocated, 4 engine(s) of TP2" in out and "released in training: peak = max" in out
    assert plan_main(load_run_config("examples/recipes/deepseek-r1-distill-qwen-7b.yaml",
                                     ["rollout.release_memory_during_train=false"])) == 1
    out = capsys.readouterr().out
    assert "resident in training: peak = sum" in out and "refused:" in out
    assert "set rollout.release_memory_during_train=true" in out  # max() would fit: say so
    assert plan_main(load_run_config("examples/recipes/llama-3.1-70b.yaml", [
        "parallel.tp=1", "parallel.sequence_parallel=false", "parallel.pp=1", "parallel.nnodes=1",
        "parallel.nproc_per_node=1", "rollout.engine_tp=1", "rollout.engines_per_node=null"])) == 1
    out = capsys.readouterr().out
    assert "refused:" in out and "release_memory_during_train" not in out  # fits neither way
    assert HEADROOM < 1


def test_placement_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, holderpo_megatron.parallel.placement; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

"""Training-state checkpoints under gloo with a real Megatron actor (TP=2, Adam).

World A trains two steps, saves (rotating away step 1), draws from every RNG, trains a third
step, records everything, then dies (os._exit on rank 0) in the middle of saving step 3. World B
starts from nothing with other seeds and other weights, resumes: it must pick step 2 (the
half-written step 3 is ignored and removed), draw the same random numbers and reach the same
parameters and Adam state after its third step, bit for bit.
"""

import json
import os
import random

import numpy as np
import psutil
import pytest
import torch
import torch.multiprocessing as mp

from tests.distributed.gloo_spawn import run_gloo
from tests.distributed.megatron_fixtures import actor_settings, hf_logprobs, make_hf_model, make_rollout, ragged_sequences

pytestmark = pytest.mark.distributed

EXTRA = {"data": {"epoch": 0, "cursor": 16}, "p_schedule": {"kind": "linear", "step": 2}, "tokens_seen": 1234}


def _actor(cfg, sd, init: bool = True):
    from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

    enable_cpu_megatron()
    from holderpo_megatron.checkpoint.mapping import load_hf_weights_into_model
    from holderpo_megatron.models import ModelArch
    from holderpo_megatron.parallel.layout import ParallelLayout, initialize_model_parallel
    from holderpo_megatron.trainer.actor import MegatronActor, OptimizerSettings

    arch = ModelArch.from_hf_config(cfg)
    layout = ParallelLayout(tp=2, pp=1)
    if init:
        initialize_model_parallel(layout)
    actor = MegatronActor(arch, layout, actor_settings(options={"p": 1.5}, token_budget=128),
                          optimizer=OptimizerSettings(lr=1e-2, clip_grad=0.0))
    if sd is not None:
        load_hf_weights_into_model(actor.unwrapped(), arch, sd)
    return actor


def _train(actor, batch):
    return actor.train_step(batch)


def _draws():
    return {"python": random.random(), "numpy": float(np.random.rand()), "torch": torch.rand(4)}


def _snapshot(actor) -> dict:
    params = {n: p.detach().clone() for m in actor.unwrapped() for n, p in m.named_parameters()}
    opt = actor.optimizer.state_dict()
    state = {f"{i}.{k}": v.clone() for i, s in opt["state"].items() for k, v in s.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
    return {"params": params, "opt": state, "groups": groups}


def _world_a(rank, world, cfg, sd, batches, root, ref_dir):
    from holderpo_megatron.checkpoint import train_state

    actor = _actor(cfg, sd)
    _train(actor, batches[0])
    train_state.save_train_state(root, 1, model=actor.model, optimizer=actor.optimizer, extra={}, keep_last=1)
    _train(actor, batches[1])
    train_state.save_train_state(root, 2, model=actor.model, optimizer=actor.optimizer, extra=EXTRA, keep_last=1)
    ref = {"draws": _draws()}
    _train(actor, batches[2])
    ref.update(_snapshot(actor))
    torch.save(ref, os.path.join(ref_dir, f"rank{rank}.pt"))
    # Megatron's torch_dist writer started a multiprocessing Manager in this process; a killed rank
    # leaves it orphaned, so the test names it for the parent to stop.
    kids = [(c.pid, c.create_time()) for c in psutil.Process().children(recursive=True)]
    with open(os.path.join(ref_dir, f"children{rank}.json"), "w") as f:
        json.dump(kids, f)

    if rank == 0:
        def die_mid_commit(self, tmp, step, marker):
            # the marker half-written, then the process is gone: no rename, no pointer update
            with open(tmp / train_state.TRAIN_STATE_MARKER, "w") as f:
                f.write('{"format": "holderpo/train-state", "ver')
            os._exit(3)

        train_state.TrainStateDirectory.commit = die_mid_commit
    train_state.save_train_state(root, 3, model=actor.model, optimizer=actor.optimizer, extra=EXTRA, keep_last=1)
    raise AssertionError("unreachable: rank 0 died during the save")


def _world_b(rank, world, cfg, batches, root, ref_dir):
    from holderpo_megatron.checkpoint.train_state import load_latest_train_state

    random.seed(100 + rank)
    np.random.seed(100 + rank)
    torch.manual_seed(100 + rank)
    actor = _actor(cfg, None)  # Megatron's own random init: everything must come from the checkpoint
    info = load_latest_train_state(root, model=actor.model, optimizer=actor.optimizer)
    assert info is not None and info.step == 2 and info.extra == EXTRA, info
    ref = torch.load(os.path.join(ref_dir, f"rank{rank}.pt"), weights_only=True)
    draws = _draws()
    assert draws["python"] == ref["draws"]["python"] and draws["numpy"] == ref["draws"]["numpy"]
    assert torch.equal(draws["torch"], ref["draws"]["torch"])
    _train(actor, batches[2])
    got = _snapshot(actor)
    assert got["params"].keys() == ref["params"].keys()
    for n, p in got["params"].items():
        assert torch.equal(p, ref["params"][n]), f"rank {rank}: parameter {n} differs after the resumed step"
    assert got["opt"].keys() == ref["opt"].keys() and len(got["opt"]) > 0
    for k, v in got["opt"].items():
        assert torch.equal(v, ref["opt"][k]), f"rank {rank}: optimizer state {k} differs after the resumed step"
    assert got["groups"] == ref["groups"]


def _batches():
    from holderpo_megatron.trainer.batch import RolloutBatch

    model = make_hf_model("llama")
    out = []
    for seed in (11, 12, 13):
        seqs = ragged_sequences(model.config.vocab_size, 4, seed=seed, lo=6, hi=24)
        with torch.no_grad():
            ref = hf_logprobs(model, seqs)
        starts, old, adv = make_rollout(seqs, ref, seed=seed)
        out.append(RolloutBatch(seqs, starts, old, adv))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model.config.to_dict(), sd, out


def _stop_orphans(ref_dir):
    for f in ref_dir.glob("children*.json"):
        for pid, created in json.loads(f.read_text()):
            try:
                p = psutil.Process(pid)
                if p.create_time() == created:
                    p.kill()
            except psutil.NoSuchProcess:
                pass  # it went away by itself


def test_resume_is_bitwise_equal_and_a_crashed_save_is_ignored(tmp_path):
    cfg, sd, batches = _batches()
    root, ref_dir = tmp_path / "ckpt", tmp_path / "ref"
    ref_dir.mkdir()
    try:
        with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
            run_gloo(_world_a, 2, cfg, sd, batches, str(root), str(ref_dir))
    finally:
        _stop_orphans(ref_dir)
    # what the crash left: step 2 committed, step 1 rotated away, step 3 half-written in its temp dir
    names = sorted(p.name for p in root.iterdir())
    assert "step_00000002" in names and "step_00000001" not in names and "step_00000003" not in names
    assert ".incomplete.step_00000003" in names, names
    assert (root / "latest").read_text().strip() == "step_00000002"
    marker = json.loads((root / "step_00000002" / "train_state.json").read_text())
    assert marker["step"] == 2 and marker["extra"] == EXTRA and marker["layout"]["tensor_parallel"] == 2
    assert sorted(os.listdir(root / "step_00000002" / "rng")) == ["rank_00000.pt", "rank_00001.pt"]

    run_gloo(_world_b, 2, cfg, batches, str(root), str(ref_dir))
    assert sorted(p.name for p in root.iterdir()) == [".holderpo-root-id", "latest", "step_00000002"]


def _offload_world(rank, world, cfg, sd, batches):
    """Two actors from the same weights train the same three batches; one hands its optimizer state
    and grad buffers to host memory (device storage freed) before each of the later steps, as the
    colocated memory handover does during rollout, and takes them back for training."""
    plain = _actor(cfg, sd)
    handed = _actor(cfg, sd, init=False)
    for k, batch in enumerate(batches):
        if k > 0:
            handed.offload()
            assert handed.offloaded
            freed = handed._host_state()
            assert freed and all(t.untyped_storage().nbytes() == 0 for t in freed)  # memory really given up
            assert len(handed.optimizer.state_dict()["state"]) > 0
            handed.onload()
            assert not handed.offloaded
        _train(plain, batch)
        _train(handed, batch)
    a, b = _snapshot(plain), _snapshot(handed)
    for n, p in a["params"].items():
        assert torch.equal(p, b["params"][n]), f"rank {rank}: parameter {n} differs after offload/onload"
    assert a["opt"].keys() == b["opt"].keys() and len(a["opt"]) > 0
    for k, v in a["opt"].items():
        assert torch.equal(v, b["opt"][k]), f"rank {rank}: optimizer state {k} differs after offload/onload"


def test_training_after_offload_and_onload_equals_training_without_it():
    cfg, sd, batches = _batches()
    run_gloo(_offload_world, 2, cfg, sd, batches)

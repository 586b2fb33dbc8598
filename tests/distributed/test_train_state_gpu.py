"""Training-state resume on a GPU with Megatron's distributed optimizer (skipped without CUDA).

The CPU tests cover the non-distributed optimizer; this one covers what a GPU run uses: the
DistributedOptimizer's state saved in its fully reshardable form. One NCCL process per world:
world A trains two steps, saves, trains a third and records; world B resumes from Megatron's own
random init and must reach the same parameters and Adam state bit for bit (deterministic kernels).
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CFG = dict(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, rope_theta=10000.0,
           rms_norm_eps=1e-6, hidden_act="silu", architectures=["LlamaForCausalLM"], model_type="llama")


def _entry(rank, fn, store, args):
    torch.cuda.set_device(0)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def _spawn(fn, *args):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(fn, os.path.join(d, "store"), args), nprocs=1, join=True)


def _actor():
    from holderpo_megatron.models import ModelArch
    from holderpo_megatron.parallel.layout import ParallelLayout, initialize_model_parallel
    from holderpo_megatron.trainer.actor import MegatronActor, OptimizerSettings

    layout = ParallelLayout()
    initialize_model_parallel(layout)
    actor = MegatronActor(ModelArch.from_hf_config(CFG), layout, use_te=False,
                          optimizer=OptimizerSettings(lr=1e-2, clip_grad=0.0, use_distributed_optimizer=True))
    return actor


def _batch(seed):
    from holderpo_megatron.trainer.batch import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 301, (n,), generator=g).tolist() for n in (9, 17, 12, 20)]
    starts = [3, 5, 4, 6]
    old = [-torch.rand(len(s) - 1, generator=g) - 1.0 for s in seqs]
    return RolloutBatch(seqs, starts, old, torch.randn(4, generator=g))


def _train(actor, seed):
    return actor.train_step(_batch(seed), p=1.5)


def _snapshot(actor) -> dict:
    out = {f"model.{n}": p.detach().cpu().clone() for m in actor.unwrapped() for n, p in m.named_parameters()}
    for i, o in enumerate(getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])):
        for gi, g in enumerate(o.optimizer.param_groups):
            for pi, p in enumerate(g["params"]):
                out[f"opt{i}.{gi}.{pi}.main"] = p.detach().cpu().clone()
                for k, v in o.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(v):
                        out[f"opt{i}.{gi}.{pi}.{k}"] = v.detach().cpu().clone()
    return out


def _world_a(root, ref):
    from holderpo_megatron.checkpoint.train_state import save_train_state

    torch.manual_seed(0)
    actor = _actor()
    assert type(actor.optimizer.chained_optimizers[0]).__name__ == "DistributedOptimizer"
    _train(actor, 1)
    _train(actor, 2)
    save_train_state(root, 2, model=actor.model, optimizer=actor.optimizer, extra={"cursor": 2})
    draws = torch.rand(4, device="cuda").cpu()
    _train(actor, 3)
    torch.save({"draws": draws, **_snapshot(actor)}, ref)


def _world_b(root, ref):
    from holderpo_megatron.checkpoint.train_state import load_latest_train_state

    torch.manual_seed(123)
    actor = _actor()
    info = load_latest_train_state(root, model=actor.model, optimizer=actor.optimizer)
    assert info == (2, {"cursor": 2}), info
    want = torch.load(ref, weights_only=True)
    assert torch.equal(torch.rand(4, device="cuda").cpu(), want.pop("draws"))
    _train(actor, 3)
    got = _snapshot(actor)
    assert got.keys() == want.keys()
    bad = {k: (got[k] - want[k]).abs().max().item() for k in got if not torch.equal(got[k], want[k])}
    assert not bad, f"differs after the resumed step (max abs diff): {bad}"


def test_gpu_distributed_optimizer_resume_is_bitwise_equal(tmp_path, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    root, ref = str(tmp_path / "ckpt"), str(tmp_path / "ref.pt")
    _spawn(_world_a, root, ref)
    _spawn(_world_b, root, ref)

"""Megatron TP2 x PP2 (gloo, 4 processes) trains, then syncs into a real SGLang engine by every transport.

How the ranks and the engine meet: the engine is the embedded one, in global rank 0's process
(the colocated layout: rank 0 is pipeline stage 0's sender and owns the engine). Stage 1's sender
(global rank 2) relays its buckets to rank 0. One world and one engine serve all cases; before each
sync the model takes one optimizer step, so every sync carries new weights. After each sync:
every engine tensor equals Megatron's weights converted to HF, and the engine's log-probs of fixed
sequences equal the Actor's ``score`` (<= 1e-3).
"""

import pytest
import torch

from tests.distributed.gloo_spawn import run_gloo
from tests.integration.tiny_llama import require_sglang, save_tiny_llama

pytestmark = pytest.mark.integration
require_sglang()

# (transport, bucket bytes): smaller than one tensor (most tensors then travel alone; the 256-byte
# norms pair up), and larger than the whole model (one bucket per pipeline stage)
CASES = [("tensor", 1024), ("tensor", 1 << 30), ("distributed", 1024), ("distributed", 1 << 30), ("disk", 64 * 1024)]


def _sequences():
    g = torch.Generator().manual_seed(7)
    return [[1] + torch.randint(3, 320, (n,), generator=g).tolist() for n in (9, 14, 6, 20)]


def _reference_hf(actor, arch, source):
    """All HF tensors of the Megatron model, full, on global rank 0 (stage senders send theirs)."""
    import torch.distributed as dist

    from holderpo_megatron.checkpoint import export_hf_weights

    mine = {n: t.clone() for n, t in export_hf_weights(actor.unwrapped(), arch)} if source.participates else {}
    if not source.is_sender:
        return None
    if source.is_owner:
        for stage in range(1, source.pp_size):
            box = [None]
            dist.recv_object_list(box, src=source.stage_senders[stage])
            mine.update(box[0])
        return mine
    dist.send_object_list([mine], dst=source.stage_senders[0])
    return None


def _worker(rank, world, model_dir, seqs, cases):
    import torch.distributed as dist

    engine = None
    if rank == 0:  # before the CPU Megatron layer patches torch.cuda in this process
        from holderpo_megatron.rollout import SGLangEngine, SGLangEngineConfig

        engine = SGLangEngine(SGLangEngineConfig(model_path=model_dir, dtype="float32"))
    dist.barrier()
    try:
        _run(rank, model_dir, seqs, cases, engine)
    finally:
        if engine is not None:
            engine.shutdown()


def _run(rank, model_dir, seqs, cases, engine):
    from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

    enable_cpu_megatron()
    from holderpo_megatron.checkpoint import SafetensorsReader, load_hf_weights_into_model
    from holderpo_megatron.models import ModelArch
    from holderpo_megatron.parallel.layout import ParallelLayout, initialize_model_parallel
    from holderpo_megatron.trainer.actor import ActorSettings, MegatronActor, OptimizerSettings
    from holderpo_megatron.trainer.batch import RolloutBatch
    from holderpo_megatron.weight_sync import MegatronWeightSource, make_weight_synchronizer

    arch = ModelArch.from_pretrained_dir(model_dir)
    layout = ParallelLayout(tp=2, pp=2)
    initialize_model_parallel(layout)
    actor = MegatronActor(arch, layout, ActorSettings(token_budget=256), optimizer=OptimizerSettings(lr=1e-2, clip_grad=0.0))
    load_hf_weights_into_model(actor.unwrapped(), arch, SafetensorsReader(model_dir))
    source = MegatronWeightSource(actor.unwrapped(), arch)
    assert source.is_owner == (rank == 0) and source.is_sender == (rank in (0, 2))

    g = torch.Generator().manual_seed(3)
    watched = ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight")
    before = {n: engine.get_weight(n) for n in watched} if rank == 0 else {}
    for version, (transport, bucket_bytes) in enumerate(cases, start=1):
        old = actor.score(seqs)
        batch = RolloutBatch(seqs, [len(s) // 2 for s in seqs], old, torch.randn(len(seqs), generator=g))
        actor.train_step(batch, p=1.0)
        for n, w in before.items():  # the engine holds copies: training does not move its weights
            assert torch.equal(engine.get_weight(n), w), f"before sync {version}: the engine's {n} changed"
        sync = make_weight_synchronizer(source, engine, dtype=torch.float32, transport=transport,
                                        bucket_bytes=bucket_bytes)
        try:
            report = sync.sync(version)
        finally:
            sync.close()
        ref = _reference_hf(actor, arch, source)
        trained = actor.score(seqs)
        if rank != 0:
            continue
        case = f"{transport} bucket={bucket_bytes}"
        assert report.tensors == len(source.expected) == len(ref), case
        if bucket_bytes == 1 << 30:
            assert report.buckets == 2, f"{case}: {report.buckets} buckets, expected one per stage"
        moved = 0
        for name, want in ref.items():
            got = engine.get_weight(name)
            assert torch.equal(got, want.float()), f"{case}: engine {name} != Megatron's (max diff " \
                                                   f"{(got - want).abs().max().item():.3e})"
        assert engine.weight_version == version
        before = {n: ref[n].float() for n in watched}
        for k, (lp_engine, lp_train, lp_old) in enumerate(zip(engine.score(seqs), trained, old)):
            err = (lp_engine.double() - lp_train.double()).abs().max().item()
            assert err <= 1e-3, f"{case}: sequence {k}: engine vs Megatron log-prob max diff {err:.2e}"
            moved = max(moved, (lp_train - lp_old).abs().max().item())
        assert moved > 1e-3, f"{case}: the optimizer step did not change the log-probs ({moved:.2e})"


def test_megatron_tp2pp2_trains_then_syncs_by_every_transport(tmp_path):
    model_dir = str(save_tiny_llama(tmp_path / "tiny_llama"))
    run_gloo(_worker, 4, model_dir, _sequences(), CASES)

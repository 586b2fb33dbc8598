"""Weight export at TP2 (x PP1, x PP2) gathers each bucket's shards to the stage's sender only.

HF tensors are loaded into a real Megatron model (gloo, 4 processes), exported bucket by bucket
the way every weight sync does (``MegatronWeightSource.buckets``: the sender packs, its TP peer
sends), and every packed tensor must equal the HF file's bit for bit: QKV interleave with one and
with two query groups per TP rank, qkv bias, qk-norm, gate/up, row-parallel dim-1 shards, tied
embeddings and the padded vocab (301 rows, not a multiple of 128), in fp32 (pieces land in the
bucket) and cast to bf16 (pieces staged, then cast). Bucket sizes: one parameter per bucket, a
few per bucket, one bucket per stage.

Both ways a peer hands over its shards run: ``p2p`` (the bytes, point to point over the TP group:
the GPU path, NCCL there) and ``shared`` (shared-memory handles the sender reads in place, CPU),
each exporting twice, so the second ``shared`` export reuses the sender's mappings of the peer's
memory; between the two exports every parameter is changed in place, and the second must carry
the new values (a stale mapping would not).

The peer's allocations are probed with torch's profiler (every ATen allocation with its size):
while sending it allocates nothing the size of a full tensor, while the all-gathering export
(``export_hf_weights``, probed the same way) does. The sender, exporting a second time into a
bucket buffer of the right size, allocates nothing beyond the test's own clones of the results
(its staging arena is reused).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.gloo_spawn import run_gloo
from tests.hf_tiny import save_hf_model

pytestmark = pytest.mark.distributed

# (family, HF config overrides): qwen2 has qkv bias and tied embeddings (the last stage's output
# layer is not exported), llama untied (lm_head exported from a padded vocab), qwen3 qk-norm with
# 2 query groups per TP rank at TP2
MODELS = [("qwen2", {}), ("llama", {}), ("qwen3", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=16))]
BUCKETS = (1, 24 * 1024, 1 << 30)


def _largest_allocation(fn) -> int:
    """Bytes of the largest single ATen allocation while ``fn`` runs (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0], default=0)


@torch.no_grad()
def _negate(model) -> None:
    """Every parameter of this rank times -1, in place (exact in any float format)."""
    for p in model.parameters():
        p.neg_()


def _export_and_check(model, arch, hf, source, tp, pp, name) -> None:
    """Every bucket of this stage, exported twice at each dtype and bucket size: the sender's packed
    tensors equal the HF file's; the peer allocates nothing the size of a full tensor, the sender
    nothing beyond the test's clones the second time."""
    from holderpo_megatron.checkpoint.mapping import export_params
    from holderpo_megatron.weight_sync.buckets import BucketBuffer
    from holderpo_megatron.weight_sync.tp_gather import StagingArena

    # the smallest full (gathered) TP-split tensor of this stage: a peer must allocate less; in the
    # shared gather it sends handles only (their pickle: a few hundred bytes a tensor), less than
    # its largest shard (what a copy of its shards would allocate)
    split = [m for m in model.parameters() if getattr(m, "tensor_model_parallel", False)]
    smallest_full = min(p.numel() * p.element_size() * tp for p in split)
    if source.tp_gather == "shared":
        smallest_full = max(p.numel() * p.element_size() for p in split)
    for dtype in (torch.float32, torch.bfloat16):
        staging = StagingArena(source.device)
        for bucket_bytes in BUCKETS:
            case = f"{name} TP{tp}PP{pp} {dtype} bucket={bucket_bytes}"
            buckets = list(source.buckets(dtype, bucket_bytes))
            if bucket_bytes == 1 << 30:  # one bucket, unless a stage has two padded vocabs
                vocabs = sum(p.mapping.padded for p in export_params(model, arch))
                assert len(buckets) == max(1, vocabs), case
            if not source.is_sender:
                for _ in range(2):  # in step with the sender's two exports
                    peak = _largest_allocation(lambda: [b.send() for b in buckets])
                    assert peak < smallest_full, f"{case}: the TP peer allocated {peak} bytes " \
                                                 f"(limit {smallest_full})"
                    _negate(model)
                continue
            got = {}
            buf = BucketBuffer(source.device)

            def pack_all():
                for b in buckets:
                    packed = b.pack(buf, staging)
                    assert not set(got) & {m.name for m in packed.metas}, case
                    got.update({n: t.clone() for n, t in packed.tensors()})

            def check(sign):
                assert sorted(got) == sorted(source.stage_expected), case
                for n, t in got.items():
                    want = hf[n].to(dtype) * sign
                    assert t.dtype == dtype and torch.equal(t, want), \
                        f"{case}: {n} differs (max diff {(t.float() - want.float()).abs().max().item():.3e})"

            pack_all()
            check(1)
            _negate(model)  # every rank changes its parameters in place: the next export must see it
            got = {}
            buf = BucketBuffer(source.device)
            buf.get(max(b.nbytes + b.spare for b in buckets))
            # again, the bucket buffer given: the sender allocates nothing beyond the
            # clones made here (its staging arena already holds the largest bucket's need)
            clones = max(m.nbytes for b in buckets for m in b.metas)
            peak = _largest_allocation(pack_all)
            assert peak <= clones, f"{case}: the sender allocated {peak} bytes (the largest clone: {clones})"
            check(-1)
            _negate(model)


def _worker(rank: int, world: int, tp: int, pp: int, models: list) -> None:
    from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

    enable_cpu_megatron()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from holderpo_megatron.checkpoint import (SafetensorsReader, expected_hf_shapes, export_hf_weights,
                                              load_hf_weights_into_model)
    from holderpo_megatron.models import ModelArch, build_gpt_model, to_transformer_config
    from holderpo_megatron.weight_sync import MegatronWeightSource

    ps.initialize_model_parallel(tp, pp)
    model_parallel_cuda_manual_seed(123)
    try:
        for family, hf_dir in models:
            arch = ModelArch.from_pretrained_dir(hf_dir)
            model = build_gpt_model(arch, to_transformer_config(arch, tp, pp, use_cpu_initialization=True))
            hf = SafetensorsReader(hf_dir)
            load_hf_weights_into_model(model, arch, hf)
            for gather in ("p2p", "shared"):
                source = MegatronWeightSource(model, arch, tp_gather=gather)
                assert source.tp_gather == gather
                assert source.participates == (ps.get_data_parallel_rank() == 0)
                if source.participates:
                    _export_and_check(model, arch, hf, source, tp, pp, f"{family} {gather}")
            if not source.participates:
                continue
            split = [m for m in model.parameters() if getattr(m, "tensor_model_parallel", False)]
            smallest_full = min(p.numel() * p.element_size() * tp for p in split)
            # the probe sees a full-size allocation where one happens: the all-gathering export
            if not source.is_sender:
                peak = _largest_allocation(lambda: list(export_hf_weights(model, arch)))
                assert peak >= smallest_full, f"{family}: the probe missed the all-gather's {smallest_full} bytes"
            else:
                list(export_hf_weights(model, arch))
            assert set(source.stage_expected) <= set(expected_hf_shapes(arch))
    finally:
        ps.destroy_model_parallel()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_gather")
    return [(family, str(save_hf_model(family, root / family, **kw))) for family, kw in MODELS]


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)], ids=["tp2pp1", "tp2pp2"])
def test_tp_export_gathers_to_the_sender_exactly(hf_models, tp, pp):
    run_gloo(_worker, 4, tp, pp, hf_models)

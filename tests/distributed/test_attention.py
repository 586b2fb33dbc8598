"""The local spec's core attention (models/attention.SegmentCausalAttention) against Megatron's dense
masked DotProductAttention, under context parallelism against a float64 reference, and a packed
row whose dense [heads, S, S] form would need tens of GB."""

import resource

import pytest
import torch

from tests.distributed.gloo_spawn import run_gloo

pytestmark = pytest.mark.distributed

HEADS, GROUPS, DIM = 4, 2, 8


def _attention(layout_kw):
    from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

    enable_cpu_megatron()
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from holderpo_megatron.models.attention import SegmentCausalAttention
    from holderpo_megatron.parallel.layout import ParallelLayout, initialize_model_parallel

    layout = ParallelLayout(**layout_kw)
    initialize_model_parallel(layout)
    cfg = TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS, num_query_groups=GROUPS,
                            kv_channels=DIM, attention_dropout=0.0, hidden_dropout=0.0, masked_softmax_fusion=False,
                            context_parallel_size=layout.cp)
    ours = SegmentCausalAttention(cfg, 1, AttnMaskType.causal, "self")
    dense = DotProductAttention(cfg, 1, AttnMaskType.causal, "self") if layout.cp == 1 else None
    return ours, dense


def _qkv(t, rows=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lead = (t,) if rows is None else (t, rows)
    return [torch.randn(*lead, h, DIM, generator=g, dtype=dtype) for h in (HEADS, GROUPS, GROUPS)]


def _grads(fn, q, k, v, upstream):
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v)
    (out * upstream).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _thd(cu, cu_padded=None):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor(cu, dtype=torch.int32)
    cup = None if cu_padded is None else torch.tensor(cu_padded, dtype=torch.int32)
    longest = int(((cu if cup is None else cup).diff()).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cup,
                           cu_seqlens_kv_padded=cup, max_seqlen_q=longest, max_seqlen_kv=longest)


def _assert_close(name, got, ref, tol):
    err = (got.double() - ref.double()).abs().max().item() / ref.double().abs().max().item()
    assert err <= tol, f"{name}: max rel err {err:.2e}"


def _vs_dense_worker(rank, world):
    from holderpo_megatron.models.attention import dense_block_causal_mask

    ours, dense = _attention({})
    # a packed row: three sequences, then the row's tail padding as a fourth segment
    cu = [0, 5, 12, 20, 24]
    q, k, v = _qkv(24)
    up = torch.randn(24, HEADS * DIM, generator=torch.Generator().manual_seed(1))
    mask = dense_block_causal_mask(cu, 24)
    got = _grads(lambda q, k, v: ours(q, k, v, None, packed_seq_params=_thd(cu)), q, k, v, up)
    ref = _grads(lambda q, k, v: dense(q[:, None], k[:, None], v[:, None], mask)[:, 0], q, k, v, up)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        _assert_close(f"thd {name}", a, b, 1e-5)
    # padded rows [s, b, heads, d]: causal over each row, as Megatron's attention without a mask
    q, k, v = _qkv(12, rows=3, seed=2)
    up = torch.randn(12, 3, HEADS * DIM, generator=torch.Generator().manual_seed(3))
    got = _grads(lambda q, k, v: ours(q, k, v, None), q, k, v, up)
    ref = _grads(lambda q, k, v: dense(q, k, v, None), q, k, v, up)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        _assert_close(f"sbhd {name}", a, b, 1e-5)
    with pytest.raises(ValueError, match="no dense attention_mask"):
        ours(q, k, v, mask)


def test_segment_attention_equals_dense_masked_attention():
    run_gloo(_vs_dense_worker, 1)


def _reference(q, k, v, bounds):
    """float64, dense: causal within each segment, [t, rows, heads, d] -> [t, rows, heads * d]."""
    from holderpo_megatron.models.attention import dense_block_causal_mask

    t = q.shape[0]
    kk = k.repeat_interleave(HEADS // GROUPS, dim=2)
    vv = v.repeat_interleave(HEADS // GROUPS, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, kk) / DIM ** 0.5
    scores = scores.masked_fill(dense_block_causal_mask(bounds, t), float("-inf"))
    return torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), vv).reshape(t, q.shape[1], -1)


def _context_parallel_worker(rank, world):
    from holderpo_megatron.parallel.aggregation import load_balanced_cp_index

    ours, _ = _attention(dict(cp=world))
    # packed: slots of a multiple of 2 * cp = 4 tokens (global offsets), as the Actor builds them
    cu_padded = [0, 8, 12, 24, 32]
    idx = load_balanced_cp_index(torch.tensor(cu_padded), world, rank)
    q, k, v = _qkv(32, seed=4, dtype=torch.float64)
    up = torch.randn(32, HEADS * DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = _grads(lambda q, k, v: _reference(q[:, None], k[:, None], v[:, None], cu_padded)[:, 0], q, k, v, up)
    thd = _thd([0, 6, 9, 20, 28], cu_padded)  # real lengths inside the slots: the slots decide
    got = _grads(lambda q, k, v: ours(q, k, v, None, packed_seq_params=thd), q[idx], k[idx], v[idx], up[idx])
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        _assert_close(f"cp{world} thd {name} rank {rank}", a, b[idx], 1e-10)
    # padded rows: each row of 16 splits into chunks r and 2 * cp - 1 - r
    idx = load_balanced_cp_index(torch.tensor([0, 16]), world, rank)
    q, k, v = _qkv(16, rows=2, seed=6, dtype=torch.float64)
    up = torch.randn(16, 2, HEADS * DIM, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref = _grads(lambda q, k, v: _reference(q, k, v, [0, 16]), q, k, v, up)
    got = _grads(lambda q, k, v: ours(q, k, v, None), q[idx], k[idx], v[idx], up[idx])
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        _assert_close(f"cp{world} sbhd {name} rank {rank}", a, b[idx], 1e-10)


def test_context_parallel_attention_equals_full_sequence_reference():
    """K/V all-gathered over CP in forward, their gradients reduce-scattered in backward: each
    rank's outputs and q/k/v gradients are the full-sequence ones at its positions."""
    run_gloo(_context_parallel_worker, 2)


def _long_row_worker(rank, world, cfg):
    from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

    enable_cpu_megatron()
    from holderpo_megatron.models import ModelArch
    from holderpo_megatron.parallel.layout import ParallelLayout, initialize_model_parallel
    from holderpo_megatron.trainer.actor import MegatronActor, OptimizerSettings
    from holderpo_megatron.trainer.batch import RolloutBatch
    from tests.distributed.megatron_fixtures import actor_settings

    arch = ModelArch.from_hf_config(dict(cfg, max_position_embeddings=1024))
    initialize_model_parallel(ParallelLayout())
    actor = MegatronActor(arch, ParallelLayout(), actor_settings(token_budget=32768, pack=True),
                          optimizer=OptimizerSettings())
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, arch.vocab_size, (512,), generator=g).tolist() for _ in range(64)]
    batch = RolloutBatch(seqs, [256] * 64, [torch.full((511,), -3.0) for _ in seqs], torch.randn(64, generator=g))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    metrics = actor.forward_backward(batch).to_dict()
    grown_gb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    assert metrics["num_seqs"] == 64
    # dense: scores [heads, S, S] fp32 at S = 32768 are 17 GB per layer (x 4 layers), the bool mask 1 GB
    assert grown_gb < 2.0, f"peak RSS grew by {grown_gb:.2f} GB for one packed row of 32768 tokens"


def test_packed_row_of_32k_tokens_trains_without_s_by_s_memory():
    from tests.distributed.megatron_fixtures import FAMILY_CONFIGS

    cfg = {k: v for k, v in FAMILY_CONFIGS["llama"].items() if k != "cls"}
    run_gloo(_long_row_worker, 1, cfg)

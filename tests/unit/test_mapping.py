"""The HF <-> Megatron mapping kinds and the expected-tensor checks, on plain tensors.

Megatron's layouts are written out here independently (explicit loops over heads and ranks) and
compared with the mappings; TP is simulated by lists of shards. The distributed tests run the same
mappings inside real Megatron models (tests/distributed/test_checkpoint_layouts.py).
"""

from __future__ import annotations

import pytest
import torch

from holderpo_megatron.checkpoint.mapping import (
    GatedMLPMapping, RowMapping, VocabMapping, _resolver, check_hf_tensors, expected_hf_shapes,
    mappings_for)
from holderpo_megatron.models import ModelArch
from tests.hf_tiny import CASES, build_hf_model, hf_config


def _arch(name, **kw):
    return ModelArch.from_hf_config(hf_config(name, **kw))


def _mapping(arch, megatron_name):
    return next(m for m in mappings_for(arch) if m.megatron == megatron_name)


@pytest.mark.parametrize("name", list(CASES))
def test_expected_names_and_shapes_match_transformers(name):
    model = build_hf_model(name)
    arch = ModelArch.from_hf_config(model.config)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if arch.tie_word_embeddings:
        got.pop("lm_head.weight", None)
    assert expected_hf_shapes(arch) == got
    check_hf_tensors(arch, got)  # accepts the real thing
    order = list(expected_hf_shapes(arch))  # HF order: embedding, layers in order, norm, head
    assert order[0] == "model.embed_tokens.weight" and order[-1] in ("model.norm.weight", "lm_head.weight")
    layer_of = [int(n.split(".")[2]) for n in order if n.startswith("model.layers.")]
    assert layer_of == sorted(layer_of)


def test_qkv_layout_is_grouped_per_kv_head():
    arch = _arch("qwen3")  # 4 q heads, 2 kv heads, head_dim 32, hidden 64
    hd, g, qpg = arch.head_dim, arch.num_kv_heads, arch.num_heads // arch.num_kv_heads
    q = torch.randn(arch.num_heads * hd, arch.hidden_size)
    k = torch.randn(g * hd, arch.hidden_size)
    v = torch.randn(g * hd, arch.hidden_size)
    rows = []
    for group in range(g):  # Megatron: for each query group, its q heads, then k, then v
        for j in range(qpg):
            head = group * qpg + j
            rows.append(q[head * hd:(head + 1) * hd])
        rows.append(k[group * hd:(group + 1) * hd])
        rows.append(v[group * hd:(group + 1) * hd])
    want = torch.cat(rows)
    m = _mapping(arch, "decoder.layers.*.self_attention.linear_qkv.weight")
    fused = m.fuse([q, k, v], arch, want.shape)
    assert torch.equal(fused, want)
    assert all(torch.equal(a, b) for a, b in zip(m.split(fused, arch), (q, k, v)))
    # TP2: rank r holds whole query groups r*g/2 .. (r+1)*g/2 - 1
    per_group = (qpg + 2) * hd
    for r in range(2):
        assert torch.equal(m.shard(fused, r, 2), want[r * per_group:(r + 1) * per_group])
    bias = _arch("qwen2")
    mb = _mapping(bias, "decoder.layers.*.self_attention.linear_qkv.bias")
    qb, kb, vb = (torch.randn(n * bias.head_dim) for n in (bias.num_heads, bias.num_kv_heads, bias.num_kv_heads))
    assert all(torch.equal(a, b) for a, b in zip(mb.split(mb.fuse([qb, kb, vb], bias, None), bias), (qb, kb, vb)))


def test_gated_mlp_shard_is_gate_shard_then_up_shard():
    arch = _arch("llama")
    m = _mapping(arch, "decoder.layers.*.mlp.linear_fc1.weight")
    assert isinstance(m, GatedMLPMapping)
    gate, up = torch.randn(96, 64), torch.randn(96, 64)
    full = m.fuse([gate, up], arch, None)
    assert torch.equal(full, torch.cat([gate, up]))
    for tp in (2, 4):
        shards = [m.shard(full, r, tp) for r in range(tp)]
        n = 96 // tp
        for r, s in enumerate(shards):
            assert torch.equal(s, torch.cat([gate[r * n:(r + 1) * n], up[r * n:(r + 1) * n]]))
            assert not torch.equal(s, full.chunk(tp)[r])
        assert torch.equal(m.unshard(shards), full)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_mapping_shards_and_gathers_back(tp):
    arch = _arch("qwen2", num_attention_heads=8, num_key_value_heads=4)
    for m in mappings_for(arch):
        hf = [torch.randn(tuple(_dims(arch, s))) for s in m.hf_shapes]
        padded = 384 if isinstance(m, VocabMapping) else None
        full = m.fuse(hf, arch, torch.Size((padded, 64)) if padded else None)
        shards = [m.shard(full, r, tp) for r in range(tp)]
        if m.tp_dim is None:
            assert all(s is full for s in shards)
        else:
            assert sum(s.shape[m.tp_dim] for s in shards) == full.shape[m.tp_dim]
        assert torch.equal(m.unshard(shards), full)
        assert all(torch.equal(a, b) for a, b in zip(m.split(m.unshard(shards), arch), hf)), m.megatron


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tp", [2, 4])
def test_every_mapping_gathers_shards_into_hf_tensors(tp, dtype):
    """The gathering rank's plan (weight sync at TP > 1): each rank's pieces received where the plan
    says, then ``finish``, give the HF tensors exactly; fp32 dim-0 pieces land in place (no staging).
    The padded vocab (384 rows at TP2, 512 at TP4: its last shard holds padding only) straddles
    the real rows."""
    arch = _arch("qwen2", num_attention_heads=8, num_key_value_heads=4)
    for m in mappings_for(arch):
        hf = [torch.randn(tuple(_dims(arch, s))) for s in m.hf_shapes]
        full = m.fuse(hf, arch, torch.Size((384 if tp == 2 else 512, 64)) if isinstance(m, VocabMapping) else None)
        shards = [m.shard(full, r, tp).contiguous() for r in range(tp)]
        outs = [torch.full(h.shape, float("nan"), dtype=dtype) for h in hf]
        staged = []

        def stage(shape, dt):
            staged.append(torch.full(shape, float("nan"), dtype=dt))
            return staged[-1]

        targets, finish = m.gather_plan(shards[0], outs, arch, tp, stage)
        pieces = [m.export_pieces(s) for s in shards]
        assert len(targets) == len(pieces[0]), m.megatron
        for i, per_rank in enumerate(targets):
            assert len(per_rank) == tp
            for r, target in enumerate(per_rank):
                assert target.is_contiguous() and target.shape == pieces[r][i].shape, (m.megatron, i, r)
                assert pieces[r][i].is_contiguous()
                target.copy_(pieces[r][i])
        finish()
        for got, want in zip(outs, hf):
            assert torch.equal(got, want.to(dtype)), m.megatron
        in_place = dtype == torch.float32 and type(m).__name__ in ("GatedMLPMapping", "ColumnMapping")
        assert not (in_place and staged), f"{m.megatron}: staged although its pieces land in place"


@pytest.mark.parametrize("tp", [2, 4])
def test_padded_vocab_gathers_in_place_given_room_for_the_padding(tp):
    """The weight sync puts the vocab tensor last in its bucket, with the padding rows' bytes spare
    after it: given that longer place, every shard lands in it (no staging)."""
    arch = _arch("llama")
    m = _mapping(arch, "output_layer.weight")
    emb = torch.randn(301, 64)
    full = m.fuse([emb], arch, torch.Size((384 if tp == 2 else 512, 64)))
    shards = [m.shard(full, r, tp) for r in range(tp)]
    room = torch.full(full.shape, float("nan"))
    targets, finish = m.gather_plan(shards[0], [room], arch, tp, lambda *a: pytest.fail("staged"))
    for r, target in enumerate(targets[0]):
        assert target.data_ptr() == room[r * shards[0].shape[0]:].data_ptr()
        target.copy_(shards[r])
    finish()
    assert torch.equal(room[:301], emb)


def _dims(arch, syms):
    from holderpo_megatron.checkpoint.mapping import hf_shape

    return hf_shape(arch, syms)


def test_vocab_padding_rows_are_zero_and_removed_on_export():
    arch = _arch("llama")
    m = _mapping(arch, "embedding.word_embeddings.weight")
    emb = torch.randn(301, 64)
    full = m.fuse([emb], arch, torch.Size((512, 64)))
    assert full.shape == (512, 64) and torch.equal(full[:301], emb) and not full[301:].any()
    (back,) = m.split(full, arch)
    assert torch.equal(back, emb)
    with pytest.raises(ValueError, match="padded vocab 256 < vocab_size 301"):
        m.fuse([emb], arch, torch.Size((256, 64)))


def test_row_parallel_splits_columns():
    arch = _arch("llama")
    m = _mapping(arch, "decoder.layers.*.self_attention.linear_proj.weight")
    assert isinstance(m, RowMapping)
    w = torch.randn(64, 64)
    assert torch.equal(m.shard(w, 1, 2), w[:, 32:])


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_family_features_switch_mappings(name):
    arch = _arch(name)
    names = {m.megatron for m in mappings_for(arch)}
    assert ("decoder.layers.*.self_attention.linear_qkv.bias" in names) == arch.qkv_bias == (name == "qwen2")
    assert ("decoder.layers.*.self_attention.q_layernorm.weight" in names) == arch.qk_norm == (name == "qwen3")
    out = [m for m in mappings_for(arch) if m.megatron == "output_layer.weight"]
    assert len(out) == 1 and out[0].export == (not arch.tie_word_embeddings)
    assert out[0].hf == (("model.embed_tokens.weight",) if arch.tie_word_embeddings else ("lm_head.weight",))
    assert _arch("llama", attention_bias=True).qkv_bias


def test_resolver_accepts_local_and_transformer_engine_names():
    arch = _arch("qwen3")
    resolve = _resolver(arch)
    for local, te in [("decoder.layers.3.input_layernorm.weight", "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"),
                      ("decoder.layers.3.pre_mlp_layernorm.weight", "decoder.layers.3.mlp.linear_fc1.layer_norm_weight")]:
        (m1, i1), (m2, i2) = resolve(local), resolve(te)
        assert m1 is m2 and i1 == i2 == 3
    m, i = resolve("decoder.layers.12.self_attention.q_layernorm.weight")
    assert i == 12 and m.hf_names(i) == ("model.layers.12.self_attn.q_norm.weight",)
    assert resolve("decoder.layers.0.mlp.router.weight") is None


def test_check_refusals_name_the_tensor():
    arch = _arch("qwen3")
    good = expected_hf_shapes(arch)
    bad = dict(good)
    del bad["model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.1\.self_attn\.k_norm\.weight' is missing"):
        check_hf_tensors(arch, bad)
    bad = dict(good, **{"model.layers.0.self_attn.q_proj.bias": (128,)})
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        check_hf_tensors(arch, bad)
    bad = dict(good, **{"model.layers.1.self_attn.q_norm.weight": (16,)})
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.q_norm\.weight' has shape \(16,\) .*head_dim=32"):
        check_hf_tensors(arch, bad)
    # rotary caches of old checkpoints carry no weights
    check_hf_tensors(arch, dict(good, **{"model.layers.0.self_attn.rotary_emb.inv_freq": (16,)}))

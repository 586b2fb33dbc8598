"""A converted checkpoint (saved at TP1PP1) loads at TP2PP2, TP1PP2 and TP2PP1 and gives
transformers' logits; at TP2PP2 the in-memory mapping round-trips HF tensors exactly.

This is also the proof that ``models.build_gpt_model`` builds the model transformers runs: every
family's forward (GQA, qkv bias, qk-norm, tied embeddings across pipeline stages, rope theta,
padded vocab) is compared in fp32 to max |diff| <= 1e-4. One spawned group of 4 processes per layout
(with TP*PP < 4 the rest are data-parallel replicas).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed.gloo_spawn import run_gloo
from tests.hf_tiny import input_ids, save_hf_model

pytestmark = pytest.mark.distributed

# Family per layout: every family is loaded across pipeline stages at least once, and the tied
# ones (mistral, qwen2) at PP2, where the last stage holds the output layer as an embedding copy.
LAYOUTS = {
    (2, 2): ["qwen2", "qwen3"],
    (1, 2): ["llama", "mistral"],
    (2, 1): ["llama", "qwen2"],
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """HF dir, Megatron checkpoint and transformers logits for each family used here."""
    from transformers import AutoModelForCausalLM

    from tests.hf_tiny import convert_in_subprocess

    root = tmp_path_factory.mktemp("layouts")
    out = {}
    jobs = []
    for name in sorted({n for names in LAYOUTS.values() for n in names}):
        hf = save_hf_model(name, root / f"{name}_hf")
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(input_ids()).logits
        torch.save(logits, root / f"{name}_logits.pt")
        out[name] = (str(hf), str(root / f"{name}_meg"), str(root / f"{name}_logits.pt"))
        jobs.append(("hf2meg", str(hf), str(root / f"{name}_meg")))
    convert_in_subprocess(jobs)
    return out


def _pipeline_logits(model, ids: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """Forward through the pipeline with point-to-point sends; full logits on the last stage."""
    from megatron.core import parallel_state as ps

    b, s = ids.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(s, b, model.config.hidden_size)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    with torch.no_grad():
        out = model(ids, pos, None)  # causal
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    tp = ps.get_tensor_model_parallel_world_size()
    pieces = [torch.empty_like(out) for _ in range(tp)]
    dist.all_gather(pieces, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=-1)[..., :vocab]


def _layout_worker(rank: int, world: int, tp: int, pp: int, cases: list) -> None:
    from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

    enable_cpu_megatron()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from holderpo_megatron.checkpoint import (SafetensorsReader, expected_hf_shapes, export_hf_checkpoint,
                                              export_hf_weights, load_hf_weights_into_model,
                                              load_megatron_checkpoint, save_megatron_checkpoint)
    from holderpo_megatron.models import ModelArch, build_gpt_model, to_transformer_config

    ps.initialize_model_parallel(tp, pp)
    model_parallel_cuda_manual_seed(123)
    try:
        for name, hf_dir, meg_dir, logits_path in cases:
            arch = ModelArch.from_pretrained_dir(meg_dir)
            config = to_transformer_config(arch, tp, pp, use_cpu_initialization=True)

            # (b) the checkpoint saved at TP1PP1 loads here and gives transformers' logits
            model = build_gpt_model(arch, config).eval()
            load_megatron_checkpoint(model, meg_dir, arch)
            logits = _pipeline_logits(model, input_ids(), arch.vocab_size)
            if logits is not None:
                ref = torch.load(logits_path)
                diff = (logits - ref).abs().max().item()
                assert diff <= 1e-4, f"{name} at TP{tp}PP{pp}: max |logits diff| = {diff}"

            if (tp, pp) == (1, 2) and name == "llama":
                _check_virtual_pipeline(arch, hf_dir, meg_dir)
            if (tp, pp) != (2, 2):
                continue
            # (d) HF tensors -> this rank's shard -> export (TP all-gather) gives them back exactly
            model = build_gpt_model(arch, config)
            hf = SafetensorsReader(hf_dir)
            load_hf_weights_into_model(model, arch, hf)
            got = dict(export_hf_weights(model, arch))
            layers = sorted(layer.layer_number - 1 for layer in model.decoder.layers)
            want = expected_hf_shapes(arch, layers, embedding=model.pre_process, head=model.post_process)
            assert sorted(got) == sorted(want), (name, rank, sorted(got), sorted(want))
            for n, t in got.items():
                assert torch.equal(t, hf[n]), f"{name}: {n} differs after load+export at TP2PP2"
            if model.post_process and arch.tie_word_embeddings and not model.pre_process:
                # the last stage's output layer is the (padded, sharded) embedding copy
                w = model.output_layer.weight
                rows = w.shape[0]
                r = ps.get_tensor_model_parallel_rank()
                padded = torch.cat([hf["model.embed_tokens.weight"], torch.zeros(rows * tp - arch.vocab_size, arch.hidden_size)])
                assert torch.equal(w, padded[r * rows:(r + 1) * rows])
            names = [None] * dist.get_world_size()
            dist.all_gather_object(names, sorted(got))
            assert set().union(*names) == set(expected_hf_shapes(arch)), name
            # a checkpoint saved at this layout (TP shards stored as separate chunks, vocab padded
            # to 512) is read back by the Megatron -> HF converter in the test process
            save_megatron_checkpoint(model, f"{meg_dir}_tp2pp2", arch, hf_dir=hf_dir)
            # and the live model exports to an HF directory, every stage writing its own tensors
            export_hf_checkpoint(model, arch, hf_dir, f"{meg_dir}_hf_export")
            # bf16 weights all-gather over gloo too
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)
            for n, t in export_hf_weights(model, arch):
                assert t.dtype == torch.bfloat16 and torch.equal(t, hf[n].to(torch.bfloat16)), n
    finally:
        ps.destroy_model_parallel()


def _check_virtual_pipeline(arch, hf_dir: str, meg_dir: str) -> None:
    """PP2 x 2 virtual stages (4 layers: rank 0 holds layers 0 and 2, rank 1 layers 1 and 3):
    load and export over a list of chunks, and the checkpoint loads into the chunks."""
    from megatron.core import parallel_state as ps

    from holderpo_megatron.checkpoint import (SafetensorsReader, export_hf_checkpoint, export_hf_weights,
                                              load_hf_weights_into_model, load_megatron_checkpoint)
    from holderpo_megatron.models import build_gpt_model, to_transformer_config

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 2, virtual_pipeline_model_parallel_size=2)
    config = to_transformer_config(arch, 1, 2, use_cpu_initialization=True, virtual_pipeline_model_parallel_size=2)
    hf = SafetensorsReader(hf_dir)
    chunks = [build_gpt_model(arch, config, vp_stage=v) for v in range(2)]
    load_hf_weights_into_model(chunks, arch, hf)
    got = dict(export_hf_weights(chunks, arch))
    stage = ps.get_pipeline_model_parallel_rank()
    layers = {int(n.split(".")[2]) for n in got if n.startswith("model.layers.")}
    assert layers == {stage, stage + 2}, layers
    assert all(torch.equal(t, hf[n]) for n, t in got.items())
    export_hf_checkpoint(chunks, arch, hf_dir, f"{meg_dir}_hf_export_vpp")  # DP replicas (ranks 2, 3) only wait
    fresh = [build_gpt_model(arch, config, vp_stage=v) for v in range(2)]
    load_megatron_checkpoint(fresh, meg_dir, arch)
    for a, b in zip(chunks, fresh):
        for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert na == nb and torch.equal(pa, pb), na
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 2)


@pytest.mark.parametrize("tp,pp", list(LAYOUTS), ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_converted_checkpoint_logits_at_layout(converted, tp, pp, tmp_path):
    cases = [(n, *converted[n]) for n in LAYOUTS[(tp, pp)]]
    run_gloo(_layout_worker, 4, tp, pp, cases)
    from holderpo_megatron.checkpoint import convert_megatron_to_hf, read_marker
    from tests.distributed.test_convert import _tensors

    def same_as_source(hf_dir: str, out: Path) -> None:
        src, got = _tensors(Path(hf_dir)), _tensors(out)
        assert sorted(src) == sorted(got) and all(torch.equal(src[k], got[k]) for k in src), out
        assert (Path(hf_dir) / "config.json").read_bytes() == (out / "config.json").read_bytes()

    for name, hf_dir, meg_dir, _ in cases:
        if (tp, pp) == (2, 2):
            marker = read_marker(f"{meg_dir}_tp2pp2")
            assert marker["saved_layout"] == {"tensor_parallel": 2, "pipeline_parallel": 2, "world_size": 4}
            convert_megatron_to_hf(f"{meg_dir}_tp2pp2", tmp_path / name, progress=False)
            same_as_source(hf_dir, tmp_path / name)
            same_as_source(hf_dir, Path(f"{meg_dir}_hf_export"))
        if (tp, pp) == (1, 2) and name == "llama":
            same_as_source(hf_dir, Path(f"{meg_dir}_hf_export_vpp"))

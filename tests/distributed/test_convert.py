"""HF -> Megatron torch_dist -> HF through the converters, for every family, and every refusal.

(a) the round trip is bit-identical (names, dtypes, values) with equal config files, and the output
loads in transformers; (c) each refusal names the field or tensor at fault. Conversions run in a
fresh interpreter (tests.hf_tiny.convert_in_subprocess); refusals that happen before Megatron is
initialised run in this process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from holderpo_megatron.checkpoint import (MARKER, MegatronCheckpointReader, convert_hf_to_megatron,
                                          convert_megatron_to_hf, load_megatron_checkpoint, read_marker)
from tests.hf_tiny import CASES, convert_in_subprocess, input_ids, save_hf_model

ROOT = Path(__file__).resolve().parents[2]


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    """Every family HF -> Megatron -> HF, plus llama fp32 -> Megatron bf16 -> HF."""
    root = tmp_path_factory.mktemp("convert")
    jobs, dirs = [], {}
    for name in CASES:
        hf = save_hf_model(name, root / f"{name}_hf")
        meg, back = root / f"{name}_meg", root / f"{name}_back"
        jobs += [("hf2meg", str(hf), str(meg)), ("meg2hf", str(meg), str(back))]
        dirs[name] = (hf, meg, back)
    hf = dirs["llama"][0]
    jobs += [("hf2meg", str(hf), str(root / "llama_meg_bf16"), "bf16"),
             ("meg2hf", str(root / "llama_meg_bf16"), str(root / "llama_back_bf16"))]
    dirs["llama->bf16"] = (hf, root / "llama_meg_bf16", root / "llama_back_bf16")
    convert_in_subprocess(jobs)
    return dirs


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_bit_identical(round_trips, name):
    hf, meg, back = round_trips[name]
    src, out = _tensors(hf), _tensors(back)
    assert sorted(src) == sorted(out)
    for k in src:
        assert src[k].dtype == out[k].dtype and torch.equal(src[k], out[k]), k
    for f in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (hf / f).read_bytes() == (back / f).read_bytes(), f
        assert (meg / f).read_bytes() == (hf / f).read_bytes(), f  # the checkpoint describes itself
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(src)
    marker = read_marker(meg)
    assert marker["architecture"] == CASES[name][1]
    assert marker["dtype"] == str(CASES[name][3]).removeprefix("torch.")
    assert not list(meg.parent.glob(".*incomplete"))


def test_dtype_conversion(round_trips):
    hf, meg, back = round_trips["llama->bf16"]
    src, out = _tensors(hf), _tensors(back)
    for k in src:
        assert out[k].dtype == torch.bfloat16 and torch.equal(src[k].to(torch.bfloat16), out[k]), k
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((meg / "config.json").read_text())["dtype"] == "bfloat16"
    assert MegatronCheckpointReader(meg).dtype == torch.bfloat16


def test_output_loads_in_transformers(round_trips):
    from transformers import AutoModelForCausalLM

    hf, _, back = round_trips["qwen2"]
    a = AutoModelForCausalLM.from_pretrained(hf).eval()
    b = AutoModelForCausalLM.from_pretrained(back).eval()
    with torch.no_grad():
        assert torch.equal(a(input_ids()).logits, b(input_ids()).logits)


def test_sharded_output(round_trips, tmp_path):
    """A small --max-shard-size gives several shards, still bit-identical, through the CLI."""
    hf, meg, _ = round_trips["llama"]
    out = tmp_path / "sharded"
    proc = _tool("convert_megatron_to_hf.py", "--load", meg, "--save", out, "--max-shard-size", "100KB")
    assert proc.returncode == 0, proc.stderr
    assert "Megatron -> HF:" in proc.stderr and "tensors" in proc.stderr  # the summary
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3
    src, got = _tensors(hf), _tensors(out)
    assert sorted(src) == sorted(got) and all(torch.equal(src[k], got[k]) for k in src)


def _tool(script: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "tools" / script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------


def _edit_config(directory: Path, **changes) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def hf_copy(round_trips, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(round_trips["qwen2"][0], dst)
    return dst


@pytest.fixture
def meg_copy(round_trips, tmp_path):
    dst = tmp_path / "meg"
    shutil.copytree(round_trips["qwen3"][1], dst)
    return dst


def test_refuses_unsupported_architecture(hf_copy, tmp_path):
    _edit_config(hf_copy, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"unsupported architectures \['GPT2LMHeadModel'\]"):
        convert_hf_to_megatron(hf_copy, tmp_path / "out")


@pytest.mark.parametrize("field,value,tensor", [
    ("num_key_value_heads", 4, "model.layers.0.self_attn.k_proj.weight"),
    ("num_attention_heads", 2, "model.layers.0.self_attn.k_proj.weight"),  # head_dim follows heads
    ("vocab_size", 300, "model.embed_tokens.weight"),
    ("intermediate_size", 128, "model.layers.0.mlp.gate_proj.weight"),
])
def test_refuses_config_that_disagrees_with_tensors(hf_copy, tmp_path, field, value, tensor):
    _edit_config(hf_copy, **{field: value})
    with pytest.raises(ValueError, match=rf"tensor '{tensor}' has shape .* config \(.*{field}") as e:
        convert_hf_to_megatron(hf_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    print(e.value)


def test_refuses_more_layers_than_tensors(hf_copy, tmp_path):
    _edit_config(hf_copy, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.2\..*' is missing .*num_hidden_layers=3"):
        convert_hf_to_megatron(hf_copy, tmp_path / "out")


def _rewrite_safetensors(directory: Path, edit) -> None:
    from safetensors.torch import save_file

    f = directory / "model.safetensors"
    tensors = _tensors(directory)
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_refuses_missing_tensor(hf_copy, tmp_path):
    _rewrite_safetensors(hf_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        convert_hf_to_megatron(hf_copy, tmp_path / "out")


def test_refuses_extra_tensor(hf_copy, tmp_path):
    _rewrite_safetensors(hf_copy, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        convert_hf_to_megatron(hf_copy, tmp_path / "out")


def test_refuses_untied_head_on_tied_config(hf_copy, tmp_path):
    """A tied model may carry a redundant lm_head of the embedding's shape, not another shape."""
    _rewrite_safetensors(hf_copy, lambda t: t.update({"lm_head.weight": torch.zeros(3, 64)}))
    with pytest.raises(ValueError, match=r"'lm_head\.weight' has shape \(3, 64\) but the config ties it"):
        convert_hf_to_megatron(hf_copy, tmp_path / "out")


def test_refuses_pytorch_bin_checkpoint(hf_copy, tmp_path):
    (hf_copy / "model.safetensors").rename(hf_copy / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \*\.safetensors files .*only safetensors"):
        convert_hf_to_megatron(hf_copy, tmp_path / "out")


def test_refuses_non_empty_output_dir(round_trips, tmp_path):
    hf, meg, _ = round_trips["mistral"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match=r"output directory .*out' exists and is not empty \(pass --overwrite"):
        convert_hf_to_megatron(hf, out)
    with pytest.raises(ValueError, match=r"exists and is not empty \(pass --overwrite"):
        convert_megatron_to_hf(meg, out)
    assert (out / "keep.txt").read_text() == "x"
    # the CLI says the same with exit code 2; with --overwrite it replaces the directory
    proc = _tool("convert_megatron_to_hf.py", "--load", meg, "--save", out)
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    proc = _tool("convert_megatron_to_hf.py", "--load", meg, "--save", out, "--overwrite", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").is_file()


def test_refuses_incomplete_checkpoint(meg_copy, tmp_path):
    (meg_copy / MARKER).unlink()  # as if its writer were still at work (or had died)
    with pytest.raises(ValueError, match=rf"has no {MARKER}: it is incomplete"):
        convert_megatron_to_hf(meg_copy, tmp_path / "out")
    with pytest.raises(ValueError, match=rf"has no {MARKER}: it is incomplete"):
        load_megatron_checkpoint(None, meg_copy)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field,value,key", [
    ("intermediate_size", 128, "decoder.layers.mlp.linear_fc1.weight"),
    ("vocab_size", 250, "embedding.word_embeddings.weight"),
    ("num_hidden_layers", 3, "decoder.layers.self_attention.linear_qkv.layer_norm_weight"),
])
def test_refuses_megatron_config_that_disagrees_with_tensors(meg_copy, tmp_path, field, value, key):
    _edit_config(meg_copy, **{field: value})
    with pytest.raises(ValueError, match=rf"tensor '{key}' has shape .*{field}={value}"):
        convert_megatron_to_hf(meg_copy, tmp_path / "out")


def test_refuses_megatron_tensor_set_that_disagrees_with_config(meg_copy, tmp_path):
    _edit_config(meg_copy, tie_word_embeddings=True)  # qwen3 case is untied: output_layer is extra
    with pytest.raises(ValueError, match=r"unexpected tensor 'output_layer\.weight'"):
        convert_megatron_to_hf(meg_copy, tmp_path / "out")
    _edit_config(meg_copy, tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"])  # expects qkv bias
    with pytest.raises(ValueError, match=r"tensor 'decoder\.layers\.self_attention\.linear_qkv\.bias' is missing"):
        convert_megatron_to_hf(meg_copy, tmp_path / "out")


@pytest.mark.distributed
def test_torchrun_conversion_gives_the_same_weights(round_trips, tmp_path):
    """Under torchrun (2 ranks: PP2, each rank reads and holds half the layers) the checkpoint's
    files differ (one set per rank) but its weights are the same: the HF export is byte-identical."""
    hf, _, back = round_trips["llama"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tools" / "convert_hf_to_megatron.py"), "--hf-path", str(hf), "--save", str(tmp_path / "meg"),
           "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_marker(tmp_path / "meg")["saved_layout"] == {"tensor_parallel": 1, "pipeline_parallel": 2,
                                                             "world_size": 2}
    convert_in_subprocess([("meg2hf", str(tmp_path / "meg"), str(tmp_path / "back"))])
    for f in sorted(p.name for p in back.iterdir()):
        assert (back / f).read_bytes() == (tmp_path / "back" / f).read_bytes(), f


# ---------------------------------------------------------------------------------------------
# refused before anything is read or deleted; one line per error (issue 14)
# ---------------------------------------------------------------------------------------------


def _cli(capsys, *args) -> tuple[int, str]:
    from holderpo_megatron.checkpoint.convert import main

    rc = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return rc, err


def _listing(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where,relation", [("same", "is"), ("parent", "contains"), ("child", "is inside")])
def test_save_that_is_contains_or_is_inside_an_input_is_refused_and_nothing_deleted(
        hf_copy, meg_copy, tmp_path, capsys, where, relation):
    sibling = tmp_path / "sibling_model"
    sibling.mkdir()
    (sibling / "weights.bin").write_bytes(b"w")
    for direction, flag, src in (("hf-to-megatron", "--hf-path", hf_copy), ("megatron-to-hf", "--load", meg_copy)):
        save = {"same": src, "parent": src.parent, "child": src / "out"}[where]
        before = _listing(tmp_path)
        rc, err = _cli(capsys, direction, flag, src, "--save", save, "--overwrite", "--quiet")
        assert rc == 2 and err.count("\n") == 0, err
        assert err.startswith(f"error: output {str(save)!r} {relation} the input {flag} {str(src)!r}"), err
        assert _listing(tmp_path) == before  # the source, and its sibling, untouched


def test_unwritable_save_is_refused_before_reading(meg_copy, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "ro"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: ask the check what an unprivileged user would get
        import holderpo_megatron.checkpoint.output_dir as od

        real = os.access
        monkeypatch.setattr(od.os, "access", lambda p, m: False if Path(p) == locked else real(p, m))
    else:
        locked.chmod(0o500)
    (meg_copy / "__0_0.distcp").write_bytes(b"")  # damaged too: the output is checked first
    rc, err = _cli(capsys, "megatron-to-hf", "--load", meg_copy, "--save", locked / "out", "--quiet")
    locked.chmod(0o700)
    assert rc == 2 and err == f"error: output {str(locked / 'out')!r} cannot be written: {locked} is not writable"


def _distcp(meg: Path) -> Path:
    return sorted(meg.glob("*.distcp"))[0]


@pytest.mark.parametrize("damage,message", [
    ("config_json", r"config\.json is not valid JSON"),
    ("no_metadata", r"\.metadata is missing: .* is not a complete torch_dist checkpoint"),
    ("short_metadata", r"\.metadata: not a readable torch distributed checkpoint metadata file .* damaged or incomplete"),
    ("no_distcp", r"__0_0\.distcp is missing \(its \.metadata lists tensors stored there\)"),
    ("short_distcp", r"__0_0\.distcp is \d+ bytes but its \.metadata places data up to byte \d+: the file is truncated"),
])
def test_damaged_checkpoints_give_one_line_naming_the_file(meg_copy, tmp_path, capsys, damage, message):
    if damage == "config_json":
        (meg_copy / "config.json").write_text('{"architectures": ["Qwen3ForCausalLM"],')
    elif damage == "no_metadata":
        (meg_copy / ".metadata").unlink()
    elif damage == "short_metadata":
        data = (meg_copy / ".metadata").read_bytes()
        (meg_copy / ".metadata").write_bytes(data[: len(data) // 2])
    elif damage == "no_distcp":
        _distcp(meg_copy).unlink()
    else:
        f = _distcp(meg_copy)
        f.write_bytes(f.read_bytes()[:-100])
    rc, err = _cli(capsys, "megatron-to-hf", "--load", meg_copy, "--save", tmp_path / "out", "--quiet")
    assert rc == 2 and err.count("\n") == 0 and re.search(message, err), err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.incomplete").exists()


def test_malformed_hf_config_is_one_line(hf_copy, tmp_path, capsys):
    (hf_copy / "config.json").write_text("{not json")
    rc, err = _cli(capsys, "hf-to-megatron", "--hf-path", hf_copy, "--save", tmp_path / "out", "--quiet")
    assert rc == 2 and err.startswith(f"error: {hf_copy / 'config.json'} is not valid JSON") and "\n" not in err


def test_a_crafted_metadata_runs_nothing(meg_copy, tmp_path, capsys):
    """A .metadata whose unpickling calls os.system: refused, the command never runs."""
    from tests.crafted import exploit_pickle

    flag = tmp_path / "pwned"
    (meg_copy / ".metadata").write_bytes(exploit_pickle(flag))
    rc, err = _cli(capsys, "megatron-to-hf", "--load", meg_copy, "--save", tmp_path / "out", "--quiet")
    assert rc == 2 and "refused to load: it asks for posix.system" in err, err
    assert not flag.exists()

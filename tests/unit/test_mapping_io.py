"""The file side of conversion: safetensors read/write, output directories, sizes, progress."""

from __future__ import annotations

import io
import json

import pytest
import torch

from holderpo_megatron.checkpoint.convert import parse_size
from holderpo_megatron.checkpoint.output_dir import check_output_dir, copy_side_files, publish, staging_dir
from holderpo_megatron.checkpoint.progress import ConversionSummary, ProgressBar
from holderpo_megatron.checkpoint.safetensors_io import SafetensorsReader, ShardedSafetensorsWriter
from tests.hf_tiny import build_hf_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_safetensors_writer_reads_back_everywhere(tmp_path, dtype):
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(3 + i, 5, generator=g).to(dtype) for i in range(7)}
    tensors["scalar"] = torch.tensor(2.5).to(dtype)
    entries = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    w = ShardedSafetensorsWriter(tmp_path, entries, max_shard_bytes=100 * dtype.itemsize)
    for n in reversed(list(tensors)):  # any order
        w.write(n, tensors[n])
    w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    for f in files:
        with safe_open(str(tmp_path / f), "pt") as st:
            assert st.metadata() == {"format": "pt"}
            for k in st.keys():
                assert index["weight_map"][k] == f and torch.equal(st.get_tensor(k), tensors[k])
    r = SafetensorsReader(tmp_path)
    assert sorted(r) == sorted(tensors) and all(torch.equal(r[k], tensors[k]) for k in tensors)
    assert r.dtype("t0") == dtype and r.shapes()["t3"] == (6, 5)


def test_writer_refusals(tmp_path):
    w = ShardedSafetensorsWriter(tmp_path, [("a", (2,), torch.float32), ("b", (3,), torch.float32)])
    with pytest.raises(ValueError, match=r"tensor 'a': got \(3,\) torch.float32, planned \(2,\)"):
        w.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match=r"'c' was not planned"):
        w.write("c", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match=r"tensor 'b' was never written"):
        w.close()
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_reader_reads_transformers_output_and_refuses_garbage(tmp_path):
    model = build_hf_model("mistral")
    model.save_pretrained(tmp_path / "m")
    r = SafetensorsReader(tmp_path / "m")
    sd = model.state_dict()
    assert all(torch.equal(r[k], sd[k]) for k in r)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        SafetensorsReader(tmp_path / "bad")


def test_output_dir_staging_and_publish(tmp_path):
    out = tmp_path / "ckpt"
    check_output_dir(out, overwrite=False)  # absent: fine
    tmp = staging_dir(out)
    assert tmp.name == ".ckpt.incomplete" and tmp.is_dir()
    (tmp / "a").write_text("new")
    publish(tmp, out, overwrite=False)
    assert (out / "a").read_text() == "new" and not tmp.exists()
    with pytest.raises(ValueError, match=r"exists and is not empty \(pass --overwrite"):
        check_output_dir(out, overwrite=False)
    tmp = staging_dir(out)
    (tmp / "b").write_text("newer")
    publish(tmp, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        check_output_dir(tmp_path / "file", overwrite=True)


def test_config_dtype_is_rewritten_only_when_it_changes(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    raw = '{"dtype": "float32", "vocab_size": 301}'
    (src / "config.json").write_text(raw)
    (src / "tokenizer.json").write_text("{}")
    assert copy_side_files(src, dst, config_dtype="float32") == ["config.json", "tokenizer.json"]
    assert (dst / "config.json").read_text() == raw  # byte for byte
    copy_side_files(src, dst, config_dtype="bfloat16")
    assert json.loads((dst / "config.json").read_text()) == {"dtype": "bfloat16", "vocab_size": 301}


def test_parse_size():
    assert parse_size("5GB") == 5 * 1024**3 and parse_size("100KB") == 102400 and parse_size("1024") == 1024
    assert parse_size("1.5g") == int(1.5 * 1024**3)
    with pytest.raises(ValueError, match="size 'lots' is not understood"):
        parse_size("lots")


def test_progress_bar_and_summary():
    out = io.StringIO()  # not a terminal: one line per 10%
    bar = ProgressBar(1000, "convert", stream=out)
    for _ in range(10):
        bar.update(100)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("convert [") and "100%" in lines[-1] and len(lines) == 11
    silent = io.StringIO()
    ProgressBar(10, "x", stream=silent, enabled=False).close()
    assert silent.getvalue() == ""
    s = str(ConversionSummary("HF -> Megatron", "/out", 146, 2 * 1024**3, 8.0, "bfloat16"))
    assert s == "HF -> Megatron: 146 tensors, 2.00 GB (bfloat16) in 8.0 s (256.00 MB/s) -> /out"


def test_dcp_metadata_is_read_through_an_allow_list(tmp_path):
    """What Megatron's loader reads (torch's FileSystemReader.read_metadata) while a checkpoint is
    loaded (model.megatron_load, a resume): real metadata reads as before, a crafted one runs nothing."""
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp

    from tests.crafted import exploit_pickle
    from torch.distributed.checkpoint import FileSystemReader

    from holderpo_megatron.checkpoint.safe_metadata import (UnsafeCheckpointError, read_dcp_metadata,
                                                            safe_dcp_metadata_reads)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.randn(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16), "step": 7, "name": "x"},
                 checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    with safe_dcp_metadata_reads():
        md = FileSystemReader(str(tmp_path / "ok")).read_metadata()
    assert set(md.state_dict_metadata) == {"w", "b", "step", "name"}
    assert read_dcp_metadata(tmp_path / "ok").state_dict_metadata["w"].size == torch.Size([3, 4])

    flag = tmp_path / "pwned"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ".metadata").write_bytes(exploit_pickle(flag))
    with safe_dcp_metadata_reads(), pytest.raises(UnsafeCheckpointError, match="asks for posix.system"):
        FileSystemReader(str(bad)).read_metadata()
    for payload in (pickle.dumps(print), pickle.dumps(getattr)):  # any callable outside the allow-list
        (bad / ".metadata").write_bytes(payload)
        with pytest.raises(UnsafeCheckpointError, match="refused to load"):
            read_dcp_metadata(bad)
    assert not flag.exists()
    assert FileSystemReader.read_metadata.__module__.startswith("torch")  # restored afterwards

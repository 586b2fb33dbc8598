"""HF -> Megatron -> HF on a random ~1.2B-parameter Llama (Llama-3.2-1B shapes) in bf16, on disk.

    python bench/convert.py [--workdir /tmp/holderpo_bench_convert] [--keep] [--json OUT]

Writes the random HF checkpoint (one model.safetensors, ~2.5 GB), then runs in fresh child
processes: (1) one plain read of every tensor with ``safetensors.safe_open`` (the yardstick),
(2) ``tools/convert_hf_to_megatron.py``, (3) ``tools/convert_megatron_to_hf.py``, and checks the
result is bit-identical to the input. For each child: wall seconds (interpreter start-up included),
the peak RSS of the child process itself (sampled every 20 ms and its VmHWM read at exit) and the
peak of the RSS summed over the child and its own children (torch_dist writes with forked workers
whose pages are mostly shared copy-on-write, so the sum over-counts).

Targets: Megatron -> HF peak RSS <= largest output shard + 1 GB; HF -> Megatron peak RSS <= 1.5x
the model's bytes; each direction <= 3x the time of one read. Everything runs twice: "warm" (the
input is in the page cache, as just written) and "cold" (the child's input evicted from the page
cache with posix_fadvise first). Both directions must also write the whole model once; on a
machine whose disk writes far slower than it reads, that alone can exceed 3x a read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
GB = 1024**3

# Llama-3.2-1B shapes (tied embeddings, GQA 32/8, vocab 128256)
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "dtype": "bfloat16",
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}, "bos_token_id": 128000,
    "eos_token_id": 128001,
}

READ_CODE = """
import sys, time
from pathlib import Path
from safetensors import safe_open
t = time.perf_counter(); n = 0
for f in sorted(Path(sys.argv[1]).glob('*.safetensors')):
    with safe_open(str(f), 'pt') as st:
        for k in st.keys():
            n += st.get_tensor(k).nbytes
print(f'read {n} bytes in {time.perf_counter() - t:.2f} s', file=sys.stderr)
"""

COMPARE_CODE = """
import sys, torch
from holderpo_megatron.checkpoint import SafetensorsReader
a, b = SafetensorsReader(sys.argv[1]), SafetensorsReader(sys.argv[2])
assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:5]
for k in a:
    x, y = a[k], b[k]
    assert x.dtype == y.dtype and torch.equal(x, y), k
print(f'bit-identical: {len(a)} tensors')
"""


def write_random_hf(directory: Path) -> int:
    """Random bf16 weights (std 0.02, norms 1) streamed to one safetensors file; returns bytes."""
    import torch

    from holderpo_megatron.checkpoint import ShardedSafetensorsWriter, expected_hf_shapes
    from holderpo_megatron.models import ModelArch

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": 128001}) + "\n")
    shapes = expected_hf_shapes(ModelArch.from_hf_config(CONFIG))
    entries = [(n, s, torch.bfloat16) for n, s in shapes.items()]
    writer = ShardedSafetensorsWriter(directory, entries, max_shard_bytes=50 * GB)
    g = torch.Generator().manual_seed(0)
    for n, s in shapes.items():
        t = torch.ones(s) if n.endswith("norm.weight") else torch.randn(s, generator=g) * 0.02
        writer.write(n, t.to(torch.bfloat16))
    writer.close()
    # HF's own single-file name, as a real 1B checkpoint has it
    (directory / "model-00001-of-00001.safetensors").rename(directory / "model.safetensors")
    (directory / "model.safetensors.index.json").unlink()
    return writer.total_bytes


def evict(directory: Path) -> None:
    """Drop ``directory``'s files from the page cache (flushed first), so the next read is cold."""
    os.sync()
    for p in directory.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_child(cmd: list[str], cold: Path | None = None) -> dict:
    """Run ``cmd``; wall time and peak RSS (own, and summed with its descendants). ``cold``: a
    directory evicted from the page cache first (and the writes flushed before timing starts)."""
    if cold is not None:
        evict(cold)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"own": 0, "tree": 0, "hwm": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                own = proc.memory_info().rss
                tree = own + sum(c.memory_info().rss for c in proc.children(recursive=True))
                peak["own"], peak["tree"] = max(peak["own"], own), max(peak["tree"], tree)
                with open(f"/proc/{proc.pid}/status") as f:  # the kernel's own peak (VmHWM)
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peak["hwm"] = max(peak["hwm"], int(line.split()[1]) * 1024)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, FileNotFoundError, ProcessLookupError):
                pass
            stop.wait(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    stop.set()
    t.join()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{err[-3000:]}")
    last = [line for line in err.splitlines() if line.strip()][-1:]
    return {"seconds": wall, "peak_rss": max(peak["own"], peak["hwm"]), "peak_rss_tree": peak["tree"],
            "log": (last[0] if last else "") + (out.strip() and " | " + out.strip())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/holderpo_bench_convert")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    free = shutil.disk_usage(work.parent).free
    if free < 10 * GB:
        raise SystemExit(f"{work.parent} has {free / GB:.1f} GB free; the benchmark needs ~8 GB")
    hf, meg, back = work / "hf", work / "megatron", work / "hf_back"
    t = time.perf_counter()
    model_bytes = write_random_hf(hf)
    print(f"random HF checkpoint: {model_bytes / GB:.2f} GB in {time.perf_counter() - t:.1f} s", file=sys.stderr)

    py = sys.executable
    to_meg_cmd = [py, str(ROOT / "tools/convert_hf_to_megatron.py"), "--hf-path", str(hf), "--save", str(meg), "--quiet"]
    to_hf_cmd = [py, str(ROOT / "tools/convert_megatron_to_hf.py"), "--load", str(meg), "--save", str(back), "--quiet"]
    runs = {}
    for cache in ("warm", "cold"):
        for d in (meg, back):
            if d.exists():
                shutil.rmtree(d)
        c = cache == "cold"
        runs[cache] = {
            "read": run_child([py, "-c", READ_CODE, str(hf)], cold=hf if c else None),
            "hf_to_megatron": run_child(to_meg_cmd, cold=hf if c else None),
            "megatron_to_hf": run_child(to_hf_cmd, cold=meg if c else None),
        }
    check = run_child([py, "-c", COMPARE_CODE, str(hf), str(back)])
    read, to_meg, to_hf = (runs["warm"][k] for k in ("read", "hf_to_megatron", "megatron_to_hf"))
    largest_shard = max(p.stat().st_size for p in back.glob("*.safetensors"))
    meg_bytes = sum(p.stat().st_size for p in meg.iterdir())

    res = {
        "model_bytes": model_bytes, "megatron_ckpt_bytes": meg_bytes, "largest_output_shard": largest_shard,
        "runs": runs, "check": check["log"],
        "targets": {
            "hf_to_megatron_rss <= 1.5x model": max(r["hf_to_megatron"]["peak_rss"] for r in runs.values()) <= 1.5 * model_bytes,
            "megatron_to_hf_rss <= shard + 1GB": max(r["megatron_to_hf"]["peak_rss"] for r in runs.values()) <= largest_shard + GB,
            **{f"{d}_time <= 3x read ({cache} cache)": r[d]["seconds"] <= 3 * r["read"]["seconds"]
               for cache, r in runs.items() for d in ("hf_to_megatron", "megatron_to_hf")},
        },
    }
    print(f"\nmodel: {model_bytes / GB:.2f} GB bf16 ({model_bytes // 2 / 1e9:.2f} B params); "
          f"largest output shard {largest_shard / GB:.2f} GB; {check['log']}")
    print(f"{'step':<22}{'seconds':>9}{'x read':>8}{'peak RSS GB':>13}{'x model':>9}{'tree RSS GB':>13}")
    for cache, r3 in runs.items():
        rd = r3["read"]["seconds"]
        for name, key in (("read once", "read"), ("HF -> Megatron", "hf_to_megatron"), ("Megatron -> HF", "megatron_to_hf")):
            r = r3[key]
            print(f"{name + f' ({cache})':<22}{r['seconds']:9.1f}{r['seconds'] / rd:8.2f}{r['peak_rss'] / GB:13.2f}"
                  f"{r['peak_rss'] / model_bytes:9.2f}{r['peak_rss_tree'] / GB:13.2f}")
    for name in ("hf_to_megatron", "megatron_to_hf"):
        print(f"  {runs['warm'][name]['log']}")
    for k, ok in res["targets"].items():
        print(f"target {k}: {'met' if ok else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())

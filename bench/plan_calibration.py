"""Measure the constants of `holderpo plan`'s CPU host-memory terms (trainer/plan.py) on the real Actor.

    python bench/plan_calibration.py [--tokens 2048] [--seq-len 128]

Each case runs in a fresh subprocess (one rank, gloo, fp32, SmolLM2-135M's shape, random weights):

* ``base``: RSS of a rank process after importing torch + megatron-core, ``enable_cpu_megatron``, a gloo
  process group and ``initialize_model_parallel``, before any model exists: the plan's rank base.
* ``layers2`` / ``layers4``: ``MegatronActor.train_step`` on one packed row of ``--tokens`` tokens with 2
  and 4 decoder layers, under ``torch.autograd.graph.saved_tensors_hooks`` counting the bytes of every
  distinct storage autograd keeps for backward (parameters left out: they are the weights term). The difference of the two, divided by 2 layers and the
  tokens, is the activation bytes one decoder layer keeps per token (segment attention: no S x S term);
  the RSS after model + optimizer minus the base, over the parameter count, is bytes per parameter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.attention_memory import SMOLLM2_135M  # noqa: E402


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def run_case(case: str, tokens: int, seq_len: int) -> dict:
    import torch
    import torch.distributed as dist

    from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

    enable_cpu_megatron()
    from holderpo_megatron.models import ModelArch
    from holderpo_megatron.parallel.layout import ParallelLayout, initialize_model_parallel
    from holderpo_megatron.trainer.actor import ActorSettings, MegatronActor, OptimizerSettings
    from holderpo_megatron.trainer.batch import RolloutBatch

    store = tempfile.mkdtemp()
    dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=0, world_size=1)
    initialize_model_parallel(ParallelLayout())
    base = _rss()
    if case == "base":
        dist.destroy_process_group()
        shutil.rmtree(store, ignore_errors=True)
        return {"case": case, "base_bytes": base}
    layers = int(case.removeprefix("layers"))
    arch = ModelArch.from_hf_config(dict(SMOLLM2_135M, num_hidden_layers=layers))
    actor = MegatronActor(arch, ParallelLayout(), ActorSettings(token_budget=tokens, pack=True),
                          optimizer=OptimizerSettings(lr=1e-6))
    params = sum(p.numel() for m in actor.unwrapped() for p in m.parameters())
    g = torch.Generator().manual_seed(0)

    def batch(n, length):
        seqs = [torch.randint(0, arch.vocab_size, (length,), generator=g).tolist() for _ in range(n)]
        return RolloutBatch(seqs, [length * 3 // 4] * n, [torch.full((length - 1,), -3.0) for _ in seqs],
                            torch.randn(n, generator=g))

    actor.train_step(batch(2, 16))  # Adam's state exists after the first step
    with_model = _rss()
    saved: dict[int, int] = {}
    # linear layers save their weight for backward: parameters are the plan's weights term, not activations
    weights = {p.untyped_storage().data_ptr() for m in actor.unwrapped() for p in m.parameters()}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        actor.train_step(batch(tokens // seq_len, seq_len))
    dist.destroy_process_group()
    shutil.rmtree(store, ignore_errors=True)
    return {"case": case, "base_bytes": base, "with_model_bytes": with_model, "params": params,
            "saved_bytes": sum(saved.values())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.case:
        print(json.dumps(run_case(a.case, a.tokens, a.seq_len)), flush=True)
        return
    rows = {}
    for case in ("base", "layers2", "layers4"):
        cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--tokens", str(a.tokens),
               "--seq-len", str(a.seq_len)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
        if not lines:
            raise SystemExit(f"case {case} failed ({res.returncode}):\n{res.stderr[-3000:]}")
        rows[case] = json.loads(lines[-1])
    gib = 2**30
    print(f"rank base (imports, gloo, model-parallel state; no model): {rows['base']['base_bytes'] / gib:.2f} GiB")
    l2, l4 = rows["layers2"], rows["layers4"]
    per_layer_token = (l4["saved_bytes"] - l2["saved_bytes"]) / (2 * a.tokens)
    print(f"saved for backward, {a.tokens} tokens: 2 layers {l2['saved_bytes'] / gib:.3f} GiB, "
          f"4 layers {l4['saved_bytes'] / gib:.3f} GiB")
    print(f"activation bytes per token per decoder layer: {per_layer_token:.0f} "
          f"({per_layer_token / SMOLLM2_135M['hidden_size']:.1f} x hidden)")
    outside = l2["saved_bytes"] - 2 * a.tokens * per_layer_token
    print(f"saved outside the decoder layers (embedding, output layer, loss): {outside / gib:.3f} GiB "
          f"= {outside / a.tokens:.0f} bytes per token")
    for r in (l2, l4):
        per_param = (r["with_model_bytes"] - r["base_bytes"]) / r["params"]
        print(f"{r['case']}: {r['params'] / 1e6:.1f}M params, RSS with model + Adam - base = "
              f"{(r['with_model_bytes'] - r['base_bytes']) / gib:.2f} GiB = {per_param:.1f} bytes/param")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

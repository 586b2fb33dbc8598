"""Peak RSS of one training step on CPU: Megatron's dense masked attention vs our segment attention.

    python bench/attention_memory.py [--tokens 4096] [--seq-len 128] [--layers 15] [--cap-gb G]

The tiny CPU recipe's model shape (SmolLM2-135M: hidden 576, 9 heads, 3 KV heads, vocab 49152,
random weights; ``--layers`` 15 = one rank's stage of its PP2 layout), fp32, one packed row of
``--tokens`` tokens (sequences of ``--seq-len``), the real Actor step: ``MegatronActor.train_step``
(Hölder loss, Megatron DDP and Adam). Cases, each in a fresh subprocess:

* ``dense``: what the Actor did before: Megatron's local ``DotProductAttention`` in every layer and
  the row's ``[S, S]`` block-diagonal mask (``models.attention.dense_block_causal_mask``), and
  Megatron's output layer: full logits ``[rows, S, vocab]``, then log-probs of every position;
* ``recompute``: today's Actor with the recipe switch ``train.recompute: full`` (Megatron's full
  activation recompute, uniform, 1 layer per checkpoint: only each layer's input is kept; backward
  reruns the layer's forward);
* ``segment``: today's Actor: packed rows as THD, ``models.attention.SegmentCausalAttention``, the
  output layer fused with the log-softmax at response positions only
  (``parallel.logprobs.output_layer_logprobs``).

A warm-up step on a small batch first (kernels, Adam's state); then the process's peak RSS
(VmHWM, reset through ``/proc/self/clear_refs``) over the measured step, and the resident size just
before it. In the dense case a saved-tensor hook also counts the S x S tensors autograd keeps for
backward. A watchdog ends a case whose RSS passes ``--cap-gb`` (default: what the machine has
available now, less 1.5 GB), so that a shared machine is never pushed into its OOM killer; such a
case is reported as "> cap".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.logprob_memory import _hwm_bytes, _rss_bytes  # noqa: E402

TARGET_RATIO = 4.0
# SmolLM2-135M-Instruct's config (builtin:smollm2-135m-instruct), the tiny CPU recipe's model
SMOLLM2_135M = dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu")


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _watchdog(cap: int, case: str) -> None:
    def watch():
        while True:
            if _rss_bytes() > cap:
                print(json.dumps({"case": case, "capped_bytes": cap}), flush=True)
                os._exit(3)
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()


def _use_dense_attention(actor) -> None:
    """Turn today's Actor into the one before: DotProductAttention and the [S, S] mask."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from holderpo_megatron.models.attention import dense_block_causal_mask

    for gpt in actor.unwrapped():
        for layer in gpt.decoder.layers:
            layer.self_attention.core_attention = DotProductAttention(
                actor.config, layer.layer_number, AttnMaskType.causal, "self")
        forward = gpt.forward

        def dense_forward(input_ids, position_ids, attention_mask, packed_seq_params=None, _forward=forward, **kw):
            if packed_seq_params is not None:
                bounds = packed_seq_params.cu_seqlens_q.tolist()
                attention_mask = dense_block_causal_mask(bounds, input_ids.shape[1]).to(input_ids.device)
            return _forward(input_ids, position_ids, attention_mask, **kw)

        gpt.forward = dense_forward


def _use_full_logits(actor) -> None:
    """Turn today's output path into the one before: GPTModel returns full logits, and log-probs of
    every next-token position come from them (``vocab_parallel_logprobs``)."""
    from holderpo_megatron.parallel.logprobs import vocab_parallel_logprobs

    for gpt in actor.unwrapped():
        if gpt.post_process:
            gpt.output_layer.__class__ = type(gpt.output_layer).__mro__[1]  # Megatron's own class

    def token_logprobs(logits, mb, keep=None, fill=None, entropy=False, entropy_grad=False):
        flat = logits.reshape(-1, logits.shape[-1])
        out = vocab_parallel_logprobs(flat.index_select(0, mb.token_index), mb.targets, vocab_size=actor.arch.vocab_size,
                                      temperature=actor.settings.temperature, entropy=entropy, entropy_grad=entropy_grad)
        return (out.logprobs, out.entropy) if entropy else out.logprobs

    actor._token_logprobs = token_logprobs


def run_case(case: str, tokens: int, seq_len: int, layers: int, cap: int) -> dict:
    _watchdog(cap, case)
    import torch
    import torch.distributed as dist

    from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

    enable_cpu_megatron()
    from holderpo_megatron.models import ModelArch
    from holderpo_megatron.parallel.layout import ParallelLayout, initialize_model_parallel
    from holderpo_megatron.trainer.actor import ActorSettings, MegatronActor, OptimizerSettings
    from holderpo_megatron.trainer.batch import RolloutBatch

    store = tempfile.mkdtemp()  # kept until the end: new_group() still uses the file store
    dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=0, world_size=1)
    initialize_model_parallel(ParallelLayout())
    arch = ModelArch.from_hf_config(dict(SMOLLM2_135M, num_hidden_layers=layers))
    # the recipe switch train.recompute, carried by ActorSettings to the Actor's TransformerConfig
    settings = ActorSettings(token_budget=tokens, pack=True, recompute="full" if case == "recompute" else "none")
    actor = MegatronActor(arch, ParallelLayout(), settings, optimizer=OptimizerSettings(lr=1e-6))
    if case == "dense":
        _use_dense_attention(actor)
        _use_full_logits(actor)
    g = torch.Generator().manual_seed(0)

    def batch(n, length):
        seqs = [torch.randint(0, arch.vocab_size, (length,), generator=g).tolist() for _ in range(n)]
        return RolloutBatch(seqs, [length * 3 // 4] * n, [torch.full((length - 1,), -3.0) for _ in seqs],
                            torch.randn(n, generator=g))

    actor.train_step(batch(2, 16))  # warm-up: kernels, thread pools, Adam's state
    big = batch(tokens // seq_len, seq_len)
    saved: dict[int, tuple] = {}

    def pack(t):
        if t.dim() >= 2 and min(t.shape[-2:]) >= tokens:  # [..., S, S]: scores, probabilities, the mask
            saved[t.untyped_storage().data_ptr()] = (tuple(t.shape), str(t.dtype), t.untyped_storage().nbytes())
        return t

    before = _rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        actor.train_step(big)
    dt = time.perf_counter() - t0
    peak = _hwm_bytes()
    dist.destroy_process_group()
    shutil.rmtree(store, ignore_errors=True)
    return {"case": case, "before_bytes": before, "peak_bytes": peak, "seconds": dt,
            "sxs_saved": len(saved), "sxs_saved_bytes": sum(v[2] for v in saved.values()),
            "sxs_shapes": sorted({f"{v[0]} {v[1]}" for v in saved.values()})}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="the packed row (train.token_budget)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (tiny recipe: 96 + 32)")
    ap.add_argument("--layers", type=int, default=15, help="decoder layers (15: a PP2 stage of SmolLM2's 30)")
    ap.add_argument("--cap-gb", type=float, default=None, help="end a case above this RSS (default: available - 1.5)")
    ap.add_argument("--cases", nargs="+", default=["dense", "segment"], choices=["dense", "segment", "recompute"])
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = ap.parse_args(argv)
    cap = int((args.cap_gb * 2**30) if args.cap_gb else _available_bytes() - 1.5 * 2**30)
    if args.case:
        print(json.dumps(run_case(args.case, args.tokens, args.seq_len, args.layers, cap)), flush=True)
        return
    rows = {}
    for case in args.cases:
        cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--tokens", str(args.tokens),
               "--seq-len", str(args.seq_len), "--layers", str(args.layers), "--cap-gb", str(cap / 2**30)]
        res = subprocess.run(cmd, capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        lines = [x for x in res.stdout.strip().splitlines() if x.startswith("{")]
        if not lines:
            raise SystemExit(f"case {case!r} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
        rows[case] = json.loads(lines[-1])
    print(f"one training step (MegatronActor.train_step), SmolLM2-135M shape with {args.layers} layers, fp32, CPU: "
          f"one packed row of {args.tokens} tokens ({args.tokens // args.seq_len} x {args.seq_len})")
    print(f"{'case':<9}{'resident before GB':>20}{'peak RSS GB':>13}{'step s':>9}   S x S tensors kept for backward")
    for case, r in rows.items():
        if "capped_bytes" in r:
            print(f"{case:<9}{'':>20}{'> ' + format(r['capped_bytes'] / 2**30, '.2f'):>13}{'':>9}   (stopped at the cap)")
            continue
        kept = (f"{r['sxs_saved']} ({r['sxs_saved_bytes'] / 2**30:.2f} GB; {', '.join(r['sxs_shapes'])})"
                if r["sxs_saved"] else "none")
        print(f"{case:<9}{r['before_bytes'] / 2**30:>20.2f}{r['peak_bytes'] / 2**30:>13.2f}{r['seconds']:>9.1f}   {kept}")
    for new_case in ("segment", "recompute"):
        if {"dense", new_case} <= set(rows) and "capped_bytes" not in rows[new_case]:
            _ratios(rows, new_case)


def _ratios(rows: dict, case: str) -> None:
    new = rows[case]["peak_bytes"]
    dense = rows["dense"].get("peak_bytes", rows["dense"].get("capped_bytes"))
    bound = ">= " if "capped_bytes" in rows["dense"] else ""
    ratio = dense / new
    print(f"peak RSS dense / {case}: {bound}{ratio:.2f}x (target >= {TARGET_RATIO:.0f}x: "
          f"{'met' if ratio >= TARGET_RATIO else 'MISSED'})")
    step_new = new - rows[case]["before_bytes"]
    step_dense = dense - rows["dense"].get("before_bytes", rows[case]["before_bytes"])
    print(f"the step's own memory (peak - resident before): dense {bound}{step_dense / 2**30:.2f} GB, "
          f"{case} {step_new / 2**30:.2f} GB ({bound}{step_dense / step_new:.2f}x)")


if __name__ == "__main__":
    main()

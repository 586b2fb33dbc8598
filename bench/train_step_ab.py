"""One rank's training step, side by side: the embedding's fused weight gradient and the output layer's
kept logits, each on and off, in one process, interleaved.

    python bench/train_step_ab.py [--reps 5] [--samples 8] [--prompt 45] [--response 32] [--threads 1]
        [--out bench/results/train_step_ab_cpu.json]

The tiny CPU recipe's model shape (SmolLM2-135M: 30 layers, hidden 576, vocab 49152, tied embeddings;
random weights), fp32, one process on ``--threads`` threads (a DP2 rank of ``tiny-cpu.yaml`` has one
core). The step is the loop's: ``forward_backward`` then ``optimizer_step`` (Hölder loss, Megatron DDP
with gradient-accumulation fusion, Adam) over ``--samples`` sequences of ``--prompt`` + ``--response``
tokens, packed into rows of 512 tokens (one minibatch of the fixed-length e2e bench's rank share).
Cases, switched in place between repetitions (same model, same process):

* ``megatron``: Megatron's embedding (``F.embedding``: a dense ``[vocab, H]`` gradient that DDP adds
  into ``main_grad``; the tied output layer's placeholder then zeros, Megatron's ``zero_out_wgrad``),
  and the output layer's logits recomputed in backward;
* ``embedding``: the embedding's gradient added in place (``parallel/embedding.py``), logits recomputed;
* ``both``: today's: that, and one chunk's logits kept for backward (``parallel/logprobs.py``).

First the three cases' gradients of one forward-backward on the same weights are compared (max
relative difference per parameter); then ``--reps`` rounds time each case's step in turn, the first
round a warm-up. Printed: each case's median seconds and the ratios to ``megatron``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.attention_memory import SMOLLM2_135M  # noqa: E402

CASES = ("megatron", "embedding", "both")


def _switch(actor, case: str, logprobs, embedding_cls, forward_keep) -> None:
    """Sets ``actor`` (one model chunk, pp = 1, tied) to ``case``; see the module docstring."""
    gpt = actor.unwrapped()[0]
    layer = gpt.embedding.word_embeddings
    weight = layer.weight
    if case == "megatron":
        layer.__class__ = embedding_cls.__mro__[1]  # Megatron's own class
        weight.wgrad_from_embedding = False
        weight.zero_out_wgrad = True
    else:
        layer.__class__ = embedding_cls
        weight.wgrad_from_embedding = True
        weight.zero_out_wgrad = False

    def no_keep(*a, keep=False, **k):
        out = forward_keep(*a, keep=False, **k)
        return (*out, None) if keep else out

    logprobs._forward = forward_keep if case == "both" else no_keep


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="rounds of the three cases (the first one a warm-up)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=45)
    ap.add_argument("--response", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    for name in ("reps", "samples", "prompt", "response", "threads"):
        v = getattr(args, name)
        if v < (2 if name == "reps" else 1):
            raise SystemExit(f"--{name} must be >= {2 if name == 'reps' else 1}, got {v}")

    load_before = os.getloadavg()
    import torch
    import torch.distributed as dist

    from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

    enable_cpu_megatron()
    torch.set_num_threads(args.threads)
    from holderpo_megatron.models import ModelArch
    from holderpo_megatron.parallel import logprobs
    from holderpo_megatron.parallel.layout import ParallelLayout, initialize_model_parallel
    from holderpo_megatron.trainer.actor import ActorSettings, MegatronActor, OptimizerSettings
    from holderpo_megatron.trainer.batch import RolloutBatch

    store = tempfile.mkdtemp()
    dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=0, world_size=1)
    initialize_model_parallel(ParallelLayout())
    arch = ModelArch.from_hf_config(SMOLLM2_135M)
    actor = MegatronActor(arch, ParallelLayout(), ActorSettings(token_budget=512, pack=True),
                          optimizer=OptimizerSettings(lr=1e-6, clip_grad=1.0))
    assert actor.config.gradient_accumulation_fusion, "the CPU layer's fusion kernel is missing"
    embedding_cls = type(actor.unwrapped()[0].embedding.word_embeddings)
    assert embedding_cls.__name__.startswith("WgradFused"), embedding_cls
    forward_keep = logprobs._forward
    g = torch.Generator().manual_seed(0)
    n = args.prompt + args.response
    seqs = [torch.randint(0, arch.vocab_size, (n,), generator=g).tolist() for _ in range(args.samples)]
    batch = RolloutBatch(seqs, [args.prompt] * args.samples,
                         [torch.randn(n - 1, generator=g) * 0.1 - 3.0 for _ in seqs], torch.randn(args.samples, generator=g))

    # the same gradients in every case (one forward-backward, no update)
    grads = {}
    for case in CASES:
        _switch(actor, case, logprobs, embedding_cls, forward_keep)
        actor.forward_backward(batch)
        grads[case] = {name: p.main_grad.clone() for name, p in actor.unwrapped()[0].named_parameters()}
    worst = {}
    for case in CASES[1:]:
        worst[case] = max(((grads[case][k].double() - v.double()).abs().max() / v.double().abs().max().clamp_min(1e-30)).item()
                          for k, v in grads["megatron"].items())
    del grads

    times = {c: [] for c in CASES}
    for rep in range(args.reps):
        for case in (CASES if rep % 2 == 0 else CASES[::-1]):
            _switch(actor, case, logprobs, embedding_cls, forward_keep)
            t0 = time.perf_counter()
            actor.forward_backward(batch)
            actor.optimizer_step()
            times[case].append(time.perf_counter() - t0)
    logprobs._forward = forward_keep
    dist.destroy_process_group()
    shutil.rmtree(store, ignore_errors=True)

    med = {c: statistics.median(v[1:]) for c, v in times.items()}
    print(f"one training step, SmolLM2-135M shape (random weights, fp32), {args.samples} x ({args.prompt} + "
          f"{args.response}) tokens, {args.threads} thread(s); median of {args.reps - 1} after a warm-up round")
    for c in CASES:
        extra = "" if c == "megatron" else f"  megatron/{c} {med['megatron'] / med[c]:.3f}x  max rel grad diff {worst[c]:.1e}"
        print(f"  {c:9s} {med[c]:7.3f} s  (all: {', '.join(f'{t:.2f}' for t in times[c])}){extra}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"bench": "train_step_ab", "args": vars(args), "machine": platform.processor() or platform.machine(),
                       "cpu_count": os.cpu_count(), "seconds": times, "median_s": med, "max_rel_grad_diff": worst,
                       "load_avg_before": load_before}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

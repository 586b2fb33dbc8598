"""What an engine pays per weight sync for mapping the trainer's shared memory anew, vs keeping the mapping.

    python bench/shared_memory_mapping.py [--threads 2] [--repeats 3]

A parent process moves Qwen2.5-0.5B-shaped float32 tensors (217 tensors, 1.98 GB) into shared memory
(``rollout.shared_memory.share_tensor``, as the trainer's parameters are for the ``tensor`` weight sync) and
sends their handles to a spawned child ``2 x repeats`` times. Each time, the child unpickles the handles
(torch maps each file, or finds it in its storage cache) and copies every tensor into its own preallocated
one (an engine loading weights). The first ``repeats`` times the child then drops the tensors (the file is
unmapped: SGLang's default loader); the last ``repeats`` times it holds them until the next handles have
arrived (``rollout/engine_weights.py``). Printed per time: unpickle, copy and release seconds, beside one
flat memcpy of the same bytes in the parent.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from holderpo_megatron.rollout.shared_memory import dumps_shared, loads_shared, share_tensor  # noqa: E402

# embedding, then per layer q, k, v, o, gate, up, down, two norms (x 24)
SHAPES = [(151936, 896)] + [(896, 896), (128, 896), (128, 896), (896, 896), (4864, 896), (4864, 896), (896, 4864),
                            (896,), (896,)] * 24


def _child(inbox, outbox, threads: int, repeats: int) -> None:
    torch.set_num_threads(threads)
    dst = [torch.empty(s) for s in SHAPES]
    held = None
    for k in range(2 * repeats):
        data = inbox.get()
        t0 = time.perf_counter()
        tensors = loads_shared(data)
        t1 = time.perf_counter()
        for d, s in zip(dst, tensors):
            d.copy_(s)
        t2 = time.perf_counter()
        hold = k >= repeats
        if hold:
            held = tensors  # the previous sync's go now, after this sync's found them in the cache
        del tensors
        t3 = time.perf_counter()
        outbox.put(("held" if hold else "dropped", t1 - t0, t2 - t1, t3 - t2))
    del held


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    src = [share_tensor(torch.randn(s)) for s in SHAPES]
    nbytes = sum(t.numel() * t.element_size() for t in src)
    a, b = torch.randn(nbytes // 4), torch.empty(nbytes // 4)
    flat = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        b.copy_(a)
        flat = min(flat, time.perf_counter() - t0)
    del a, b
    print(f"{nbytes / 1e9:.2f} GB in {len(src)} tensors; one flat memcpy on {args.threads} threads: {flat:.3f} s")
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_child, args=(inbox, outbox, args.threads, args.repeats))
    child.start()
    print("| sync | mapping | unpickle s | copy s | release s | total s |\n|---|---|---|---|---|---|")
    for k in range(2 * args.repeats):
        inbox.put(dumps_shared(src))
        mode, u, c, r = outbox.get()
        print(f"| {k + 1} | {mode} | {u:.3f} | {c:.3f} | {r:.3f} | {u + c + r:.3f} |", flush=True)
    child.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Host memory of the fused output layer (``parallel.logprobs.output_layer_logprobs``) on CPU, alone.

    python bench/output_layer_memory.py [--vocab 49152] [--hidden 576] [--tokens 1024 4096]

fp32, one process, one thread: forward + backward (log-probs and entropy) at each token count; prints
the peak RSS over the resident size before the call (VmHWM, reset through /proc/self/clear_refs),
next to what ``holderpo plan`` counts for the last stage (2 x 64 MiB working buffers + 32 B per
token) and the output weight's float32 gradient, which autograd makes before Megatron's DDP hook
adds it into main_grad (transient; ``vocab x hidden x 4`` bytes).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MIB = 2**20


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    args = ap.parse_args(argv)
    import torch

    from holderpo_megatron.parallel.logprobs import output_layer_logprobs
    from holderpo_megatron.trainer.plan import LOGIT_CHUNK_BYTES, LOGIT_VECTOR_BYTES

    torch.set_num_threads(1)
    w = torch.randn(args.vocab, args.hidden, requires_grad=True)
    grad_w = w.numel() * 4
    print(f"output layer alone, fp32, vocab {args.vocab}, hidden {args.hidden}; weight gradient {grad_w / MIB:.1f} MiB")
    print(f"{'tokens':>7}{'peak - before MiB':>19}{'plan MiB':>10}{'plan + weight grad MiB':>24}")
    for n in [64] + args.tokens:  # 64: a warm-up (kernels, allocator pools), not printed
        h = torch.randn(n, args.hidden, requires_grad=True)
        t = torch.randint(0, args.vocab, (n,))
        w.grad = None
        before = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        out = output_layer_logprobs(h, w, t, entropy=True, entropy_grad=True)
        (out.logprobs.sum() + out.entropy.sum()).backward()
        peak = _status("VmHWM") - before
        plan = LOGIT_CHUNK_BYTES + n * LOGIT_VECTOR_BYTES
        if n == 64:
            continue
        print(f"{n:>7}{peak / MIB:>19.1f}{plan / MIB:>10.1f}{(plan + grad_w) / MIB:>24.1f}")


if __name__ == "__main__":
    main()

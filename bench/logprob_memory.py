"""Peak extra memory of token log-probs (+ entropy) from bf16 logits: ours vs the plain way.

    python bench/logprob_memory.py [--tokens 8192] [--vocab 32000 152064] [--full]

Each case runs in a fresh subprocess (no allocator cache carried over). The bf16 logits
``[tokens, vocab]`` are created and touched first; then the process's peak resident set size
(VmHWM) is reset through ``/proc/self/clear_refs`` and the op runs; the peak minus the resident size
just before is the op's extra memory, printed as a ratio to the size of the logits tensor. (Where
clear_refs is not writable, a 1 ms RSS sampling thread gives the peak instead.) Python's tracemalloc
cannot see torch's allocations; RSS sees every page the op touches.

Cases: ``ours score`` (``torch.no_grad``: old/ref policy scoring), ``ours fwd`` (logits require
grad: the training forward, entropy detached), ``ours fwd+bwd`` (includes the returned gradient,
itself 1.0x the logits), and the baseline ``logits.float().log_softmax(-1).gather(...)`` forward
(and forward+backward at the smaller vocab, or everywhere with ``--full``: it needs ~7x the logits).
Target: ours <= 1.25x the logits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

TARGET_RATIO = 1.25


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _measure(fn) -> tuple[int, float]:
    """(peak extra bytes over the RSS at entry, seconds) of ``fn()``."""
    base = _rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        sampler = None
    except OSError:
        peak = [base]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_bytes())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    if sampler is None:
        return _hwm_bytes() - base, dt
    stop.set()
    sampler.join()
    return max(peak[0], _rss_bytes()) - base, dt


def run_case(method: str, tokens: int, vocab: int) -> dict:
    import torch

    from holderpo_megatron.parallel.logprobs import vocab_parallel_logprobs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(tokens, vocab, generator=g).mul_(3).to(torch.bfloat16)
    target = torch.randint(0, vocab, (tokens,), generator=g)
    keep = []  # results stay alive until measured, as they would in a trainer

    def ours_score():
        with torch.no_grad():
            keep.append(vocab_parallel_logprobs(logits, target, entropy=True))

    def ours_fwd():
        x = logits.requires_grad_(True)
        keep.append(vocab_parallel_logprobs(x, target, entropy=True))

    def ours_fwd_bwd():
        x = logits.requires_grad_(True)
        out = vocab_parallel_logprobs(x, target, entropy=True)
        out.logprobs.sum().backward()
        keep.append(x.grad)

    def base_fwd():
        with torch.no_grad():
            keep.append(logits.float().log_softmax(-1).gather(-1, target[:, None]).squeeze(-1))

    def base_fwd_bwd():
        x = logits.requires_grad_(True)
        lp = x.float().log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)
        lp.sum().backward()
        keep.append(x.grad)

    fns = {"ours score": ours_score, "ours fwd": ours_fwd, "ours fwd+bwd": ours_fwd_bwd,
           "baseline fwd": base_fwd, "baseline fwd+bwd": base_fwd_bwd}
    # load kernels and thread pools on a small input first, so their one-off memory is not counted
    small = logits[:64].detach().clone()
    vocab_parallel_logprobs(small.requires_grad_(True), target[:64], entropy=True).logprobs.sum().backward()
    small.detach().float().log_softmax(-1)
    extra, dt = _measure(fns[method])
    return {"method": method, "tokens": tokens, "vocab": vocab, "logits_bytes": logits.nbytes,
            "extra_bytes": extra, "ratio": extra / logits.nbytes, "seconds": dt}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064])
    ap.add_argument("--full", action="store_true", help="also the baseline fwd+bwd at every vocab (~7x logits)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.tokens, args.vocab[0])))
        return
    rows = []
    for vocab in args.vocab:
        methods = ["ours score", "ours fwd", "ours fwd+bwd", "baseline fwd"]
        if args.full or vocab == min(args.vocab):
            methods.append("baseline fwd+bwd")
        for m in methods:
            cmd = [sys.executable, os.path.abspath(__file__), "--case", m, "--tokens", str(args.tokens), "--vocab", str(vocab)]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            if res.returncode != 0:
                raise SystemExit(f"case {m!r} vocab={vocab} failed:\n{res.stderr}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"peak extra memory over the bf16 logits [tokens={args.tokens}, vocab], as a ratio to their size (RSS high-water mark)")
    print(f"{'vocab':>8}  {'case':<18}{'logits MiB':>11}{'extra MiB':>11}{'x logits':>10}{'seconds':>9}")
    for r in rows:
        print(f"{r['vocab']:>8}  {r['method']:<18}{r['logits_bytes'] / 2**20:>11.0f}{r['extra_bytes'] / 2**20:>11.0f}"
              f"{r['ratio']:>10.3f}{r['seconds']:>9.2f}")
    worst = max(r["ratio"] for r in rows if r["method"] in ("ours score", "ours fwd"))
    print(f"worst forward ratio of ours: {worst:.3f} (target <= {TARGET_RATIO}: {'met' if worst <= TARGET_RATIO else 'MISSED'}); "
          f"fwd+bwd includes the returned gradient (1.0x)")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()

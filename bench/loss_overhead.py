"""Forward+backward time of the HölderPO loss vs token-level GRPO on the same tensors.

    python bench/loss_overhead.py [--batch 256] [--tokens 4096] [--repeats 15] [--device cpu|cuda]

Prints the median time of each loss and its ratio to ``grpo`` (target: holder <= 1.10x grpo).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from holderpo_megatron.algorithms import compute_policy_loss

CASES = [
    ("grpo", {}),
    ("holder p=2", {"p": 2.0}),
    ("holder p=0", {"p": 0.0}),
    ("holder p=-1", {"p": -1.0}),
]


def _make(batch, tokens, dtype, device):
    g = torch.Generator().manual_seed(0)
    old = (-torch.rand(batch, tokens, generator=g) * 4).to(device)
    logp = (old + 0.1 * torch.randn(batch, tokens, generator=g).to(device)).to(dtype)
    lengths = torch.randint(tokens // 4, tokens + 1, (batch,), generator=g).to(device)
    mask = torch.arange(tokens, device=device) < lengths.unsqueeze(1)
    adv = torch.randn(batch, generator=g).to(device)
    return logp, old.to(dtype), adv, mask


def time_case(name, kwargs, tensors, repeats, device):
    logp, old, adv, mask = tensors
    loss_name = name.split()[0]

    def step():
        x = logp.detach().requires_grad_(True)
        compute_policy_loss(loss_name, x, old, adv, mask, **kwargs).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(batch: int, tokens: int, repeats: int, device: str) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        tensors = _make(batch, tokens, dtype, device)
        # interleave repeats of each case so drift on a shared machine hits all alike
        times = {name: [] for name, _ in CASES}
        for _ in range(3):
            for name, kw in CASES:
                times[name].append(time_case(name, kw, tensors, max(1, repeats // 3), device))
        base = statistics.median(times["grpo"])
        for name, _ in CASES:
            t = statistics.median(times[name])
            rows.append({"dtype": str(dtype).replace("torch.", ""), "loss": name, "ms": 1e3 * t, "ratio": t / base})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    rows = run(args.batch, args.tokens, args.repeats, args.device)
    print(f"loss forward+backward, B={args.batch} T={args.tokens} on {args.device} "
          f"({torch.get_num_threads()} threads), median of {args.repeats}")
    print(f"{'dtype':<10}{'loss':<14}{'ms':>10}{'x grpo':>10}")
    for r in rows:
        print(f"{r['dtype']:<10}{r['loss']:<14}{r['ms']:>10.2f}{r['ratio']:>10.3f}")
    worst = max(r["ratio"] for r in rows if r["loss"] != "grpo")
    print(f"worst holder/grpo ratio: {worst:.3f} (target <= 1.10: {'met' if worst <= 1.10 else 'MISSED'})")


if __name__ == "__main__":
    main()

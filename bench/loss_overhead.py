"""Forward+backward time of the HölderPO loss against the simplest token-level GRPO, side by side.

    python bench/loss_overhead.py [--batch 128] [--tokens 2048] [--repeats 21] [--threads 1]
                                  [--device cpu|cuda]

The baseline is the minimal PPO-clip GRPO written inline below (exp, clamp, max, masked token mean:
no non-finite guard, no metrics). Every case runs once per round, rounds interleave all cases so drift
on a shared machine hits each alike, and each case's time is its median over the rounds. Prints each
case's ratio to the baseline, per dtype, and whether the target holds (holder <= 1.10x minimal).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from holderpo_megatron.algorithms import compute_policy_loss

TARGET = 1.10
CLIP = 0.2


def minimal_grpo(logp, old, adv, mask):
    """The few-line token-level PPO-clip GRPO the issue measures against. ``mask`` comes as float32
    0/1, converted outside the timed region, so the baseline pays no bool conversion."""
    ratio = torch.exp(logp - old)
    a = adv.unsqueeze(-1)
    per_tok = torch.maximum(-a * ratio, -a * ratio.clamp(1 - CLIP, 1 + CLIP))
    return (per_tok * mask).sum() / mask.sum()


def _ours(name, **kw):
    def loss(logp, old, adv, mask):
        return compute_policy_loss(name, logp, old, adv, mask, **kw).loss
    return loss


def _minimal(logp, old, adv, mask, maskf):
    return minimal_grpo(logp, old, adv, maskf)


def _with_bool_mask(fn):
    def loss(logp, old, adv, mask, maskf):
        return fn(logp, old, adv, mask)
    return loss


CASES = [
    ("minimal grpo", _minimal),
    ("grpo (ours)", _with_bool_mask(_ours("grpo"))),
    ("holder p=2", _with_bool_mask(_ours("holder", p=2.0))),
    ("holder p=0", _with_bool_mask(_ours("holder", p=0.0))),
    ("holder p=-1", _with_bool_mask(_ours("holder", p=-1.0))),
]
BASE = CASES[0][0]


def _make(batch, tokens, dtype, device):
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(batch, tokens, generator=g) * 4
    logp = old + 0.1 * torch.randn(batch, tokens, generator=g)
    lengths = torch.randint(tokens // 4, tokens + 1, (batch,), generator=g)
    mask = torch.arange(tokens) < lengths.unsqueeze(1)
    adv = torch.randn(batch, generator=g)
    mask = mask.to(device)
    return logp.to(device, dtype), old.to(device, dtype), adv.to(device), mask, mask.float()


def _time_once(fn, tensors, device) -> float:
    logp, *rest = tensors
    x = logp.detach().requires_grad_(True)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(x, *rest).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(batch: int, tokens: int, repeats: int, device: str) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        tensors = _make(batch, tokens, dtype, device)
        for _, fn in CASES:  # warm-up: allocator, kernels
            for _ in range(2):
                _time_once(fn, tensors, device)
        times = {name: [] for name, _ in CASES}
        for r in range(repeats):
            # rotate the order each round so no case always runs right after the same neighbour
            for name, fn in CASES[r % len(CASES):] + CASES[: r % len(CASES)]:
                times[name].append(_time_once(fn, tensors, device))
        base = statistics.median(times[BASE])
        for name, _ in CASES:
            t = statistics.median(times[name])
            rows.append({"dtype": str(dtype).replace("torch.", ""), "loss": name, "ms": 1e3 * t, "ratio": t / base})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    rows = run(args.batch, args.tokens, args.repeats, args.device)
    print(f"loss forward+backward, B={args.batch} T={args.tokens} on {args.device} "
          f"({torch.get_num_threads()} threads), median of {args.repeats} interleaved rounds")
    print(f"{'dtype':<10}{'loss':<14}{'ms':>9}{'x minimal':>11}  target <= {TARGET:.2f}x")
    for r in rows:
        verdict = "" if r["loss"] in (BASE, "grpo (ours)") else ("met" if r["ratio"] <= TARGET else "MISSED")
        print(f"{r['dtype']:<10}{r['loss']:<14}{r['ms']:>9.2f}{r['ratio']:>11.3f}  {verdict}")
    holder = [r for r in rows if r["loss"].startswith("holder")]
    worst = max(holder, key=lambda r: r["ratio"])
    print(f"worst holder/minimal: {worst['ratio']:.3f} ({worst['dtype']} {worst['loss']}); "
          f"target <= {TARGET:.2f}: {'met' if worst['ratio'] <= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()

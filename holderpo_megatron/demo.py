"""``make demo``: the main job on the embedded default.

The trainer (SmolLM2-135M on Megatron + SGLang, CPU) has not landed yet, so for now this prints the
Hölder ratio table of a sample batch across p and runs the loss benchmark on a reduced size.
"""

from __future__ import annotations

import torch

from holderpo_megatron.algorithms import PSchedule, holder_log_ratio


def ratio_table() -> None:
    g = torch.Generator().manual_seed(0)
    d = 0.3 * torch.randn(4, 16, generator=g)
    d[0, 3] = 2.0  # one token the new policy likes much more
    d[1, 5] = -2.0  # one token it likes much less
    mask = torch.ones_like(d, dtype=torch.bool)
    ps = [-8.0, -2.0, -1.0, 0.0, 1.0, 2.0, 8.0]
    print("Hölder sequence ratio rho_p of 4 sample sequences (16 tokens each):")
    print(f"{'seq':<28}" + "".join(f"{'p=' + format(p, 'g'):>9}" for p in ps) + f"{'min r':>9}{'max r':>9}")
    labels = ["one token at r=e^2", "one token at r=e^-2", "noise only", "noise only"]
    rows = torch.stack([torch.exp(holder_log_ratio(d, mask, p)) for p in ps], -1)
    for i, lab in enumerate(labels):
        r = torch.exp(d[i])
        print(f"{lab:<28}" + "".join(f"{v:>9.3f}" for v in rows[i].tolist()) + f"{r.min():>9.3f}{r.max():>9.3f}")
    s = PSchedule("linear_dec", p_min=-1.0, p_max=2.0, schedule_steps=500)
    print("p schedule linear_dec 2 -> -1 over 500 steps: " + ", ".join(f"step {t}: {s.value(t):+.2f}" for t in (0, 125, 250, 375, 500)))


def main() -> None:
    print("NOTE: the trainer has not landed yet; `make demo` shows the algorithm core instead.\n")
    ratio_table()
    print()
    from bench.loss_overhead import main as bench_main  # noqa: PLC0415 (bench is a script folder)

    bench_main(["--batch", "64", "--tokens", "2048", "--repeats", "9"])


if __name__ == "__main__":
    main()

"""Write a held-out set of generated arithmetic problems as an evaluation benchmark.

    python tools/arithmetic_eval_set.py --data-dir runs/arith_eval --name arith_words9 --n 200 --max-operand 9

writes DATA_DIR/math/NAME/data.jsonl (problem, answer), which a recipe evaluates with
``data.data_dir: DATA_DIR`` and ``eval.benchmarks: [NAME]``. The problems come from seed 10007
(the demo's held-out seed); training draws its problems from ``train.seed``, so they are other items.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from holderpo_megatron.data.datasets import generate_arithmetic_problems

HELD_OUT_SEED = 10_007


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="the recipe's data.data_dir")
    ap.add_argument("--name", required=True, help="the benchmark's name (eval.benchmarks entry)")
    ap.add_argument("--n", type=int, default=200, help="problems (default 200)")
    ap.add_argument("--max-operand", type=int, default=99, help="operands in 1..this (data.arithmetic_max_operand)")
    ap.add_argument("--direct", action="store_true", help="only 'What is a plus/minus b?' (data.arithmetic_direct)")
    args = ap.parse_args(argv)
    try:
        ds = generate_arithmetic_problems(args.n, seed=HELD_OUT_SEED, max_operand=args.max_operand, direct=args.direct)
    except ValueError as e:
        print(f"arithmetic_eval_set: {e}", file=sys.stderr)
        return 2
    out = Path(args.data_dir) / "math" / args.name / "data.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"problem": it.problem, "answer": it.answers[0]}) + "\n" for it in ds.items))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``holderpo`` command. Subcommands arrive with their issues; ``--help`` lists the plan."""

from __future__ import annotations

import argparse
import sys

_PLANNED = {
    "train": "train a policy from a YAML recipe (torchrun + SGLang)",
    "eval": "evaluate a checkpoint on the math suite or an agent environment",
    "plan": "print the parallel layout and per-GPU memory estimate of a recipe",
    "plot": "write PNG curves of a run directory",
    "convert": "convert checkpoints between Hugging Face and Megatron",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="holderpo",
        description="HölderPO RL post-training on Megatron-Core with SGLang rollouts.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in _PLANNED.items():
        sub.add_parser(name, help=help_text + " (not yet available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    print(f"holderpo {args.command}: not yet available in this version", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

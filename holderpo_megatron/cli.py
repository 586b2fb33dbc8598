"""The ``holderpo`` command: train, sweep, eval, plan, plot, convert.

    holderpo train --config RECIPE.yaml [key=value ...]   # this node's share: starts torchrun itself
    holderpo plan  --config RECIPE.yaml [key=value ...]   # layout + per-GPU memory estimate
    holderpo eval  --config RECIPE.yaml [key=value ...]   # the recipe's evaluation suite on its model
    holderpo sweep --config RECIPE.yaml --grid GRID.yaml|key=v1,v2 --seeds 1,2,3 --out DIR [key=value ...]
    holderpo plot  RUN_DIR|SWEEP_DIR                      # PNG curves of a run, or one PNG of a sweep
    holderpo convert hf-to-megatron|megatron-to-hf ...    # checkpoint conversion (tools/ wrappers)

On a cluster every node runs the same command with its node rank (or under SLURM, nothing more):
    holderpo train --config RECIPE.yaml --nnodes N --node-rank R --master-addr NODE0 [--master-port P]
"""

from __future__ import annotations

import argparse
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe YAML (may use defaults: inheritance)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 rollout.temperature=0.7")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="holderpo", description="HölderPO RL post-training on Megatron-Core with SGLang rollouts.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("train", help="train a policy from a YAML recipe (starts torchrun and the SGLang engine)")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint (default: checkpoint.resume)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the torchrun command, start nothing")
    g = p.add_argument_group("several nodes (default: SLURM's variables when present, else one node)")
    g.add_argument("--nnodes", type=int, default=None, help="nodes in the run (must equal parallel.nnodes)")
    g.add_argument("--node-rank", type=int, default=None, help="this node's rank, 0..nnodes-1")
    g.add_argument("--master-addr", default=None, help="node 0's address (the rendezvous)")
    g.add_argument("--master-port", type=int, default=None, help="the rendezvous port on node 0 (default 29500)")
    p = sub.add_parser("eval", help="evaluate the recipe's model on its math suite")
    _add_config_args(p)
    p.add_argument("--out", default=None, help="output directory (default: <run dir>/eval)")
    p = sub.add_parser("plan", help="print the parallel layout and per-GPU memory estimate of a recipe")
    _add_config_args(p)
    p = sub.add_parser("sweep", help="run a recipe over a grid of overrides and seeds, then summarise (resumable)")
    _add_config_args(p)
    p.add_argument("--grid", action="append", default=[], metavar="GRID.yaml|key=v1,v2",
                   help="a YAML file of named configs (name: {dotted.key: value}) or key=v1,v2; several --grid "
                        "make their cartesian product")
    p.add_argument("--seeds", default="1", help="comma-separated train.seed values (default 1)")
    p.add_argument("--out", required=True, help="sweep directory: DIR/<config>/seed<k> per run, DIR/summary.md")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--checkpoint-every", type=int, default=1,
                   help="checkpoint at least every N steps, so a killed run loses at most N steps (default 1)")
    p.add_argument("--summary-only", action="store_true", help="write DIR/summary.{json,md} of the runs so far")
    p.add_argument("--dry-run", action="store_true", help="validate every run and print them, start nothing")
    p = sub.add_parser("plot", help="write PNG curves of a run directory, or one PNG of a sweep directory")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None)
    p = sub.add_parser("convert", help="convert checkpoints between Hugging Face and Megatron")
    p.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of tools/convert_*.py")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from holderpo_megatron.trainer.config import ConfigError, load_run_config

    try:
        if args.command == "plan":
            from holderpo_megatron.trainer.plan import plan_main

            return plan_main(load_run_config(args.config, args.overrides))
        if args.command == "train":
            from holderpo_megatron.trainer.launch import launch_training

            cfg = load_run_config(args.config, args.overrides)
            nodes = dict(nnodes=args.nnodes, node_rank=args.node_rank, master_addr=args.master_addr,
                         master_port=args.master_port)
            return launch_training(args.config, args.overrides, cfg, resume=args.resume, dry_run=args.dry_run,
                                   nodes=nodes)
        if args.command == "sweep":
            return _sweep(args, argv)
        if args.command == "eval":
            from holderpo_megatron.trainer.evaluate import eval_main

            return eval_main(load_run_config(args.config, args.overrides), args.out)
    except ConfigError as e:
        print(f"holderpo {args.command}: bad config: {e}", file=sys.stderr)
        return 2
    if args.command == "plot":
        from holderpo_megatron.observability.plots import main as plot_main

        return plot_main([args.run_dir] + (["--out", args.out] if args.out else []))
    if args.command == "convert":
        from holderpo_megatron.checkpoint.convert import main as convert_main

        return convert_main([args.direction, *args.args])
    return 2


def _sweep(args, argv: list[str] | None) -> int:
    import shlex

    from holderpo_megatron.trainer.config import ConfigError

    from holderpo_megatron.observability.sweep_summary import write_summary
    from holderpo_megatron.trainer.sweep import parse_grid, parse_seeds, plan_sweep, run_sweep

    command = "holderpo " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.summary_only:
        from pathlib import Path

        from holderpo_megatron.trainer.sweep import summary_order

        if not Path(args.out).is_dir():
            raise ConfigError(f"--out {args.out!r} is not a directory (a sweep's --out)")
        configs, planned = summary_order(args.out)
        _, md = write_summary(args.out, configs, command=planned)
        print(md.read_text())
        return 0
    grid = parse_grid(args.grid)
    runs = plan_sweep(args.config, grid, parse_seeds(args.seeds), args.out, args.overrides,
                      checkpoint_every=args.checkpoint_every)
    n_seeds = len(runs) // len(grid)
    print(f"sweep: {len(grid)} config{'s' * (len(grid) != 1)} x {n_seeds} seed{'s' * (n_seeds != 1)} = "
          f"{len(runs)} run{'s' * (len(runs) != 1)}, all valid", flush=True)
    if args.dry_run:
        for r in runs:
            print(f"  {r.label}: {' '.join(r.overrides)}")
        return 0
    return run_sweep(args.config, runs, args.out, parallel=args.parallel, command=command)


if __name__ == "__main__":
    sys.exit(main())

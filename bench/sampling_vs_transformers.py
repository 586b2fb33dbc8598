"""Does our rollout engine sample what transformers' ``generate`` (TRL's sampler) samples? Step-1 check.

    python bench/sampling_vs_transformers.py [--prompts 8] [--n 32] [--seed 1234] [--out bench/results/sampling_vs_transformers_cpu.json]

Both sides start from the same weights (the tiny-cpu recipe's SmolLM2-135M-Instruct, fp32) and get the
same prompts (the first ``--prompts`` of the run's arithmetic problems, rendered as in
``bench/e2e_vs_trl.py``); each samples ``--n`` completions per prompt at the recipe's settings
(temperature 1, top-p 1, no top-k, at most 32 new tokens):

* ours: the SGLang engine as the loop drives it (``SGLangEngine.generate``, output_ids as returned);
* TRL: ``model.generate`` with the ``GenerationConfig`` TRL 1.16's ``GRPOTrainer`` builds (do_sample,
  temperature, top_p, top_k=0, min_p None, repetition_penalty 1.0, eos/pad ids), completions cut after
  the first EOS, as TRL's completion mask does.

Every completion is then re-scored by one independent transformers forward (unpadded): the log-prob
of each sampled token and the entropy of the model's distribution at that position. If a side samples
from the model's own distribution at temperature 1, the mean of -log p(sampled token) equals the mean
entropy over the same positions up to sampling noise (printed with its standard error); a sampler that
truncates (top-k, top-p) or sharpens shows -log p clearly below the entropy. Also printed: reward
(ExactIntReward, truncated completions scored as the run does), mean length (EOS included), the
fraction cut at the length limit, and for our side the fraction of stopped completions whose last
output id is the EOS (it must be 1: the policy learns to stop only if the EOS is a trained token).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_vs_trl as e2e  # noqa: E402 - same settings and prompts as the end-to-end bench


def rescore(model, prompt: list[int], completion: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """-log p and entropy (nats) at each completion token, one unpadded forward."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].double()
    lp = torch.log_softmax(logits, -1)
    nll = -lp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
    ent = -(lp.exp() * lp).sum(-1)
    return nll, ent


def summarise(name, model, tok, reward, prompts, answers, comps, reasons) -> dict:
    nll, ent, lengths = [], [], []
    for p, c in zip(prompts, comps):
        if not c:
            continue
        a, b = rescore(model, p, c)
        nll.append(a)
        ent.append(b)
        lengths.append(len(c))
    nll_t, ent_t = torch.cat(nll), torch.cat(ent)
    diff = nll_t - ent_t  # per token: E[diff] = 0 when sampling from the model at T = 1
    texts = [tok.decode(c, skip_special_tokens=True) for c in comps]
    rewards = reward.score(texts, answers, reasons).rewards
    return {
        "side": name, "completions": len(comps), "tokens": int(nll_t.numel()),
        "reward_mean": statistics.fmean(rewards),
        "length_mean": statistics.fmean(len(c) for c in comps),
        "truncated_frac": sum(r == "length" for r in reasons) / len(reasons),
        "nll_sampled_mean": nll_t.mean().item(), "entropy_mean": ent_t.mean().item(),
        "nll_minus_entropy": diff.mean().item(),
        "nll_minus_entropy_stderr": (diff.std() / math.sqrt(diff.numel())).item(),
    }



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=32, help="completions per prompt")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default=str(e2e.ROOT / "bench" / "results" / "sampling_vs_transformers_cpu.json"))
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from holderpo_megatron.data.templates import get_prompt_template, prompt_token_ids
    from holderpo_megatron.rewards.math import ExactIntReward
    from holderpo_megatron.rollout import SamplingParams, SGLangEngine, SGLangEngineConfig

    work = Path(tempfile.mkdtemp(prefix="sampling_check_"))
    s = e2e.shared_settings(math.ceil(args.prompts / 4), work, seed=args.seed)
    probs = s["problems"][: args.prompts]
    tok = AutoTokenizer.from_pretrained(s["model_dir"])
    tpl = get_prompt_template(s["prompt_template"])
    prompts = [prompt_token_ids(tpl, tok, x["problem"]) for x in probs]
    max_new, n = s["max_new_tokens"], args.n
    reward = ExactIntReward(truncated_reward=s["truncated_reward"])
    eos = tok.eos_token_id
    flat_prompts = [p for p in prompts for _ in range(n)]
    flat_answers = [list(x["answers"]) for x in probs for _ in range(n)]

    # ours: the engine as the loop builds it (float32, the run's seed)
    engine = SGLangEngine(SGLangEngineConfig(model_path=s["model_dir"], dtype="float32", mem_fraction_static=0.1,
                                             random_seed=args.seed))
    try:
        groups = engine.generate(prompts, SamplingParams(n=n, temperature=s["temperature"], top_p=s["top_p"],
                                                         top_k=s["top_k"], max_new_tokens=max_new))
    finally:
        engine.shutdown()
    ours = [x for g in groups for x in g]
    ours_comps = [x.output_ids for x in ours]
    ours_reasons = [x.finish_reason for x in ours]
    stopped = [x for x in ours if x.finish_reason == "stop"]
    eos_last = sum(bool(x.output_ids) and x.output_ids[-1] == eos for x in stopped) / max(1, len(stopped))

    # TRL's sampler: transformers generate with the GenerationConfig GRPOTrainer builds
    model = AutoModelForCausalLM.from_pretrained(s["model_dir"], dtype=torch.float32).eval()
    torch.manual_seed(args.seed)
    gen = GenerationConfig(max_new_tokens=max_new, do_sample=True, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=[eos], temperature=s["temperature"],
                           top_p=s["top_p"], top_k=0 if s["top_k"] == -1 else s["top_k"], min_p=None,
                           repetition_penalty=1.0, disable_compile=True)
    tok.padding_side = "left"
    trl_comps, trl_reasons = [], []
    for p in prompts:
        batch = tok.pad({"input_ids": [p] * n}, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**batch, generation_config=gen)[:, batch["input_ids"].shape[1]:].tolist()
        for c in out:
            cut = c.index(eos) + 1 if eos in c else len(c)
            trl_comps.append(c[:cut])
            trl_reasons.append("stop" if eos in c else "length")

    res = {"settings": {k: v for k, v in s.items() if k != "problems"}, "prompts": args.prompts, "n": n,
           "ours": summarise("ours (SGLang)", model, tok, reward, flat_prompts, flat_answers, ours_comps, ours_reasons),
           "trl": summarise("TRL (transformers generate)", model, tok, reward, flat_prompts, flat_answers, trl_comps,
                            trl_reasons)}
    res["ours"]["stopped_ending_in_eos"] = eos_last
    lines = [f"{'':30}{'ours (SGLang)':>16}{'TRL (generate)':>16}"]
    for key in ("completions", "tokens", "reward_mean", "length_mean", "truncated_frac", "nll_sampled_mean",
                "entropy_mean", "nll_minus_entropy", "nll_minus_entropy_stderr"):
        lines.append(f"{key:30}{res['ours'][key]:>16.4f}{res['trl'][key]:>16.4f}")
    lines.append(f"ours: stopped completions whose last output id is EOS ({eos}): {eos_last:.3f} of {len(stopped)}")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    out.with_suffix(".log").write_text(
        f"python bench/sampling_vs_transformers.py {' '.join(argv if argv is not None else sys.argv[1:])}\n\n{text}\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

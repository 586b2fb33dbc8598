"""Does our rollout engine sample what transformers' ``generate`` (TRL's sampler) samples? Step-1 check.

    python bench/sampling_vs_transformers.py [--prompts 8] [--n 32] [--seed 1234] [--backend sglang|transformers]
        [--fixed-length] [--repeats 1] [--out bench/results/sampling_vs_transformers_cpu.json]

Both sides start from the same weights (the tiny-cpu recipe's SmolLM2-135M-Instruct, fp32) and get the
same prompts (the first ``--prompts`` of the run's arithmetic problems, rendered as in
``bench/e2e_vs_trl.py``); each samples ``--n`` completions per prompt at the recipe's settings
(temperature 1, top-p 1, no top-k, at most 32 new tokens):

* ours: the engine as the loop drives it (``SGLangEngine.generate``, output_ids as returned), with
  ``--backend`` (``rollout.backend``: SGLang's CPU engine, or the HF model under our decode loop);
* TRL: ``model.generate`` with the ``GenerationConfig`` TRL 1.16's ``GRPOTrainer`` builds (do_sample,
  temperature, top_p, top_k=0, min_p None, repetition_penalty 1.0, eos/pad ids), all completions in one
  left-padded batch as TRL generates a step's, cut after the first EOS, as TRL's completion mask does.

Speed, side by side: the wall time of each side's one call for all ``prompts x n`` completions, on
torch's threads (ours: ``cpu_threads`` = the same count), ``--repeats`` times alternating, median;
``--fixed-length``: every completion exactly 32 tokens (ours ``ignore_eos``, TRL ``min_new_tokens``),
the same work on both sides (its distribution rows then compare unlike things: TRL masks the EOS until
the limit, ours samples it and goes on).

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
import time
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
    ap.add_argument("--backend", choices=("sglang", "transformers"), default="sglang", help="our engine's rollout.backend")
    ap.add_argument("--fixed-length", action="store_true", help="every completion exactly max_new_tokens, both sides")
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per side, alternating (median reported)")
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
    threads = torch.get_num_threads()
    engine = SGLangEngine(SGLangEngineConfig(model_path=s["model_dir"], dtype="float32", mem_fraction_static=0.1,
                                             random_seed=args.seed, backend=args.backend, cpu_threads=threads))
    ours_params = SamplingParams(n=n, temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
                                 max_new_tokens=max_new, ignore_eos=args.fixed_length)

    # TRL's sampler: transformers generate with the GenerationConfig GRPOTrainer builds
    model = AutoModelForCausalLM.from_pretrained(s["model_dir"], dtype=torch.float32).eval()
    torch.manual_seed(args.seed)
    gen = GenerationConfig(max_new_tokens=max_new, do_sample=True, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=[eos], temperature=s["temperature"],
                           top_p=s["top_p"], top_k=0 if s["top_k"] == -1 else s["top_k"], min_p=None,
                           repetition_penalty=1.0, disable_compile=True,
                           min_new_tokens=max_new if args.fixed_length else None)
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": flat_prompts}, return_tensors="pt")

    def trl_generate() -> list[list[int]]:
        with torch.no_grad():
            return model.generate(**batch, generation_config=gen)[:, batch["input_ids"].shape[1]:].tolist()

    times: dict[str, list[float]] = {"ours": [], "trl": []}
    try:
        for r in range(args.repeats):
            t0 = time.perf_counter()
            groups = engine.generate(prompts, ours_params)
            times["ours"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            trl_out = trl_generate()
            times["trl"].append(time.perf_counter() - t0)
            if r == 0:
                first_groups, first_trl = groups, trl_out
    finally:
        engine.shutdown()
    ours = [x for g in first_groups for x in g]
    ours_comps = [x.output_ids for x in ours]
    ours_reasons = [x.finish_reason for x in ours]
    stopped = [x for x in ours if x.finish_reason == "stop"]
    eos_last = sum(bool(x.output_ids) and x.output_ids[-1] == eos for x in stopped) / max(1, len(stopped))
    trl_comps, trl_reasons = [], []
    for c in first_trl:
        stop = eos in c and not args.fixed_length
        trl_comps.append(c[: c.index(eos) + 1] if stop else c)
        trl_reasons.append("stop" if stop else "length")

    res = {"settings": {k: v for k, v in s.items() if k != "problems"}, "prompts": args.prompts, "n": n,
           "ours": summarise(f"ours ({args.backend})", model, tok, reward, flat_prompts, flat_answers, ours_comps, ours_reasons),
           "trl": summarise("TRL (transformers generate)", model, tok, reward, flat_prompts, flat_answers, trl_comps,
                            trl_reasons)}
    res["ours"]["stopped_ending_in_eos"] = eos_last
    for side in ("ours", "trl"):
        res[side]["sampling_s_median"] = statistics.median(times[side])
        res[side]["sampling_s"] = times[side]
    res["backend"], res["fixed_length"], res["threads"] = args.backend, args.fixed_length, threads
    lines = [f"{'':30}{'ours (' + args.backend + ')':>16}{'TRL (generate)':>16}"]
    for key in ("completions", "tokens", "reward_mean", "length_mean", "truncated_frac", "nll_sampled_mean",
                "entropy_mean", "nll_minus_entropy", "nll_minus_entropy_stderr"):
        lines.append(f"{key:30}{res['ours'][key]:>16.4f}{res['trl'][key]:>16.4f}")
    lines.append(f"ours: stopped completions whose last output id is EOS ({eos}): {eos_last:.3f} of {len(stopped)}")
    lines.append(f"sampling s (median of {args.repeats}, {threads} threads{', fixed length' if args.fixed_length else ''}): "
                 f"ours {res['ours']['sampling_s_median']:.2f}  TRL {res['trl']['sampling_s_median']:.2f}  "
                 f"TRL/ours {res['trl']['sampling_s_median'] / res['ours']['sampling_s_median']:.2f}x; "
                 f"per call ours {[round(t, 2) for t in times['ours']]}, TRL {[round(t, 2) for t in times['trl']]}")
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

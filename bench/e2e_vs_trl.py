"""End to end: steps/s and generated tokens/s of our loop vs TRL's ``GRPOTrainer`` on CPU, side by side.

    python bench/e2e_vs_trl.py [--steps 6] [--quick] [--fixed-length] [--sides ours,trl] [--ours-override K=V]
                               [--out bench/results/e2e_vs_trl_cpu.json]

Needs TRL (bench only): ``pip install -r requirements-bench.txt -c <(pip freeze | grep -v '^-e')``.

Both sides run in one invocation, one after the other, each in its own subprocess (ours first, then
TRL), for the same number of steps, from the same recipe (examples/recipes/tiny-cpu.yaml):

* model      SmolLM2-135M-Instruct (``builtin:smollm2-135m-instruct``), fp32 on both sides
* prompts    the run's own arithmetic problems, in the order our loop draws them (same seed, same
             ``BatchIterator``), rendered with the ``arithmetic`` chat template by the model's tokenizer
             (``apply_chat_template(..., add_generation_prompt=True)`` on both sides: same prompt tokens)
* reward     our ``ExactIntReward`` (with the run's ``truncated_reward`` for completions cut at the
             length limit), wrapped as a TRL reward function
* sampling   group size 8, 4 prompts per step -> 32 completions per step, temperature 1.0, top-p 1,
             no top-k, at most 32 new tokens (TRL 1.16 has no prompt-length cap: our prompts are far
             below the recipe's ``max_prompt_tokens``, so neither side truncates a prompt)
* loss       GSPO on both sides: ours ``algorithm.loss=holder`` (variant ``seq``) at constant p = 0
             (the geometric-mean / GSPO limit); TRL ``importance_sampling_level="sequence"`` with
             ``loss_type="grpo"`` (per-sequence loss, mean over sequences: the same sequence mean),
             clip 0.2 / 0.2 (``epsilon``, ``epsilon_high``), ``beta=0`` (no KL, no reference model),
             group-normalised advantages (``scale_rewards="group"``)
* optimiser  Adam(W) at the recipe's lr (constant; TRL ``lr_scheduler_type="constant"``), weight decay 0,
             grad-norm clip 1.0; torch's fused CPU kernel on both sides (TRL's default ``optim``,
             ``adamw_torch_fused``; ours through the CPU layer, ``parallel/cpu_compat.fuse_cpu_adam``)

Step mapping. Our step = one rollout of 32 completions, one forward-only re-score (old log-probs),
then ``train.minibatches_per_step = 2`` optimizer updates on 16 completions each, then the weight
sync to SGLang. TRL counts optimizer updates as its steps, so it gets
``per_device_train_batch_size = 32 / 2 = 16``, ``gradient_accumulation_steps = 1``,
``steps_per_generation = 2`` (=> ``generation_batch_size = 32``: 4 prompts x 8 generations per
generation) and ``num_iterations = 1``: it generates 32 completions, then does 2 optimizer updates
on 16 each. Because ``gradient_accumulation_steps % steps_per_generation != 0``, TRL also computes the
old log-probs with a forward-only pass right after generation, as we do. One of our steps = two TRL
optimizer steps (``max_steps = 2 * steps``); the prompts are given in our order with
``shuffle_dataset=False``.

What still differs between the sides (checked for ``bench/learning_vs_trl.py``; see its results):

* the sampler: SGLang's CPU sampler (softmax at the temperature, ``torch.multinomial`` from the
  engine's RNG seeded with ``train.seed``; per-request seeds act only in SGLang's deterministic mode,
  GPU only) vs transformers' ``generate`` (TRL's ``GenerationConfig``: top_k=0, min_p None,
  repetition_penalty 1.0) under ``torch.manual_seed(seed)``. Same distribution, different draws: for
  one seed the two sides see the same prompts but different completions
  (``bench/sampling_vs_transformers.py`` checks that both sample the model's own distribution). With
  ``--ours-override rollout.backend=transformers`` ours samples the HF model by its own decode loop
  instead (one prefill per distinct prompt, finished rows dropped, one inverse-CDF draw per token);
* the model runs as Megatron in the recipe's layout (DP2 since 2026-12-03, TP1 x PP2 before: 1F1B, tied
  embeddings kept in sync across the two stages), packed microbatches of <= ``train.token_budget``
  tokens, vs one HF model, padded rows; the
  log-probs agree to ~1e-5 (the ``logprob_drift`` metric: trainer vs engine) and the gradients and
  AdamW updates to float32 rounding (tests/distributed/test_megatron_actor.py);
* the minibatch shuffle (ours ``random.Random(seed * 1_000_003 + step)``, TRL its own sampler);
* group std: ours ``(r - mean) / (std + 1e-6)``, TRL ``/ (std + 1e-4)`` (both unbiased std; the
  rewards here are 0/1, so a group with any spread has std >= 0.35 and the eps is immaterial).

Two modes. Learning (default): completions end at EOS, so a side whose policy learns shorter answers
does less work per step, and steps/s mixes learning with throughput. ``--fixed-length``: every
completion is exactly ``max_new_tokens`` on both sides (ours ``rollout.ignore_eos=true``: SGLang does
not stop at EOS; TRL ``generation_kwargs={"min_new_tokens": max_new_tokens}``: EOS is masked until the
limit, so generate never stops early and TRL's mask-after-EOS keeps every token); the bench checks
that every step generated completions x max_new_tokens tokens on each side, else fails. Every
completion is then "truncated" (reward ``truncated_reward``, all advantages 0): the same work, no
learning signal, which is what a throughput comparison wants.

FLOPs per step (both sides, the same formula): N = non-embedding parameters + the output layer
(vocab x hidden, counted though SmolLM2 ties it to the embedding; attention-score FLOPs left out);
training 6 N x (prompt + completion tokens of every sequence), scoring 2 N x the same tokens times the
share the side re-scores (TRL all; ours minibatches 2..k with ``train.reuse_training_logprobs``, none
with ``rollout.use_rollout_logprobs``), generation 2 N x generated tokens (prompt prefill not counted).
These are nominal counts, the same work credited to both sides. Beside them, *executed* FLOPs count
what each side's matmuls run: the layers over the tokens its rows hold (ours with ``train.share_prompts``:
each group's prompt once; TRL: every sequence's prompt, its padding not counted, so a lower bound) and the
output layer at completion positions only (both sides: ours' response-only output layer, TRL's fused LM
head skips positions labelled -100). Achieved FLOP/s = FLOPs / step seconds, as a fraction of the machine's matmul
peak measured at the start of the same run (fp32 ``torch.mm`` 2048 x 2048, best of 5, on all cores and
on 1 thread; "cores x 1-thread peak" is what two single-threaded ranks could reach).

What is measured (honestly):

* step time: ours = the loop's own ``time/step`` (metrics.jsonl; wall time between two step
  records, rank 0); TRL = wall time between the ends of consecutive generation batches (a
  ``TrainerCallback``: ``on_step_end`` of its optimizer steps 2k and 2k+2; the first from
  ``on_step_begin`` of step 0). Both include everything the loop does in a step (logging too).
* steps/s = 1 / mean step time; generated tokens/s = sum of completion lengths / sum of step times,
  both over the steps after the first (step 1 is warm-up and is reported on its own). Completion
  length counts the sampled tokens including the end-of-sequence token where one was sampled (SGLang's
  ``output_ids``, TRL's completion ids up to and including the first EOS).
* start-up = from launching the subprocess to the start of step 1 (imports, model load, Megatron
  and process-group init, SGLang engine start / TRL trainer construction); reported separately.
* phases, ours: the loop's phase timers: ``rollout`` (SGLang generation + detokenise + reward +
  broadcast to rank 1), ``score`` (Megatron forward-only old log-probs), ``train`` (2 x
  forward/backward through the PP2 pipeline + optimizer steps), ``sync`` (weights Megatron -> SGLang),
  ``other`` = step - their sum. TRL: wrappers on the trainer's own methods: ``generate`` (the HF
  ``model.generate`` call), ``reward`` (``_calculate_rewards``), ``score`` (the forward-only old
  log-prob pass inside ``_generate_and_score_completions``), ``prep`` (the rest of
  ``_generate_and_score_completions``: tokenise, decode, pad, advantages), ``train`` = step - all of
  ``_generate_and_score_completions`` (2 x forward/backward + optimizer steps + trainer overhead);
  TRL has no weight sync (it generates with the model it trains).
* CPU s/step: user + system CPU seconds of each side's whole process tree during each step (read
  from /proc once a second, interpolated at the step boundaries), split by process group (trainer
  ranks, SGLang scheduler / detokenizer, TRL worker); "cores busy" = CPU s / wall s. CPU time hardly
  grows when a process waits for a core, so it is the number to look at on a shared machine; it
  does grow when threads spin (an idle SGLang scheduler polling, an OpenMP team waiting at a barrier
  for a thread the OS has descheduled).
* threads: ours as ``holderpo train`` sets them (``OMP_NUM_THREADS = cores / 2`` per rank: 2 ranks;
  SGLang's scheduler process on rank 0); TRL one process with torch's default thread count. Both
  get the whole machine; the 1-minute load average is sampled while each side runs (the machine may
  be shared: compare only runs with similar load). Multi-threaded torch ops degrade much more under
  CPU contention than single-threaded ones, so on a busy machine the TRL side (2 threads) slows down
  far more than ours (1 thread per process): read the per-step rows in the JSON, not only the means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "recipes" / "tiny-cpu.yaml"
DEFAULT_OUT = ROOT / "bench" / "results" / "e2e_vs_trl_cpu.json"


# --------------------------------------------------------------------------- shared settings

def our_overrides(steps: int, workdir: Path, seed: int | None = None, extra: tuple[str, ...] = (),
                  fixed_length: bool = False) -> list[str]:
    """The recipe overrides of our side (also used to derive TRL's settings from the same config).

    ``seed``: the run's ``train.seed`` (prompt order, initial sampling seeds on both sides; None keeps the
    recipe's); ``extra``: further overrides of our side only (``--ours-override``, e.g.
    ``rollout.mem_fraction_static=0.1`` or a parallel layout to compare); ``fixed_length``: every
    completion exactly max_new_tokens (ignore EOS).
    """
    return [
        f"output_dir={workdir}", "name=ours", f"train.steps={steps}",
        *([f"train.seed={seed}"] if seed is not None else []),
        "model.dtype=fp32",
        "algorithm.loss=holder", "algorithm.options.variant=seq", "algorithm.regularizers.kl_coef=0.0",
        "algorithm.p_schedule.kind=constant", "algorithm.p_schedule.p_min=0.0", "algorithm.p_schedule.p_max=0.0",
        "eval.every=0", "checkpoint.every=0", "checkpoint.resume=false", "checkpoint.export_hf_at_end=false",
        "logging.tensorboard=false", "logging.wandb=false",
        *(["rollout.ignore_eos=true"] if fixed_length else []), *extra,
    ]


def shared_settings(steps: int, workdir: Path, seed: int | None = None, extra: tuple[str, ...] = (),
                    fixed_length: bool = False) -> dict:
    """Everything both sides must agree on, read from the recipe + our overrides (see ``our_overrides``)."""
    from holderpo_megatron.data.datasets import BatchIterator, generate_arithmetic_problems
    from holderpo_megatron.models.builtin import resolve_model_path
    from holderpo_megatron.trainer.config import load_run_config

    overrides = our_overrides(steps, workdir, seed, extra, fixed_length)
    cfg = load_run_config(RECIPE, overrides)
    d, r, t, a = cfg.data, cfg.rollout, cfg.train, cfg.algorithm
    o, lo = t.optimizer, a.loss_options
    if d.train != "arithmetic" or d.reward != "exact_int":
        raise SystemExit("this bench expects the arithmetic data and the exact_int reward of tiny-cpu.yaml")
    # The batches our loop draws (setup.py: 50_000 problems, BatchIterator over them), in order.
    items = generate_arithmetic_problems(50_000, seed=t.seed, max_operand=d.arithmetic_max_operand,
                                         direct=d.arithmetic_direct).items
    it = BatchIterator(items, t.prompts_per_step, seed=t.seed, shuffle=d.shuffle)
    batches = [it.next_batch() for _ in range(steps)]
    return {
        "recipe": str(RECIPE.relative_to(ROOT)),
        "model_dir": str(resolve_model_path(cfg.model.hf_path)),
        "model": cfg.model.hf_path,
        "dtype": "fp32",
        "steps": steps,
        "fixed_length": fixed_length,
        "our_overrides": overrides,
        "layout": f"tp{cfg.parallel.tp} x pp{cfg.parallel.pp} x dp{cfg.parallel.dp}",
        "group_size": r.group_size,
        "prompts_per_step": t.prompts_per_step,
        "minibatches_per_step": t.minibatches_per_step,
        "max_new_tokens": r.max_new_tokens,
        "max_prompt_tokens": r.max_prompt_tokens,
        "temperature": r.temperature,
        "top_p": r.top_p,
        "top_k": r.top_k,
        "lr": o.lr,
        "weight_decay": o.weight_decay,
        "adam_beta1": o.adam_beta1,
        "adam_beta2": o.adam_beta2,
        "adam_eps": o.adam_eps,
        "clip_grad": o.clip_grad,
        "clip_low": lo.clip_low,
        "clip_high": lo.clip_high,
        "truncated_reward": a.truncated_reward,
        "seed": t.seed,
        "our_overrides": overrides,
        "prompt_template": d.prompt_template,
        "loss_ours": f"{a.loss} variant={lo.variant} p={a.p_schedule.value(0)} ({a.p_schedule.kind})",
        "loss_trl": "importance_sampling_level=sequence loss_type=grpo beta=0",
        "problems": [{"problem": it.problem, "answers": list(it.answers)} for b in batches for it in b],
    }


# --------------------------------------------------------------------------- load and CPU sampling

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime+stime ticks) of every process we can read."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            out[int(name)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
        except (OSError, IndexError, ValueError):
            continue
    return out


def _group(pid: int) -> str:
    """Which part of a side a process is: trainer ranks, SGLang processes, the TRL worker, the rest."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    if "sglang::" in cmd:
        return "sglang_" + cmd.split("sglang::", 1)[1].split()[0]
    if "trainer.main" in cmd:
        return "trainer_ranks"
    if "--_trl-worker" in cmd:
        return "trl_worker"
    return "other"


class Monitor:
    """While a side runs: the 1-minute load average, and the CPU seconds (user + system) of the side's
    process tree, per group of processes, sampled every ``every_s`` (Linux /proc; none elsewhere).
    CPU seconds are load-insensitive where wall time is not: a step that waits for the CPU takes
    longer but uses about the same CPU time (spin-waiting threads excepted)."""

    def __init__(self, root_pid: int, every_s: float = 1.0):
        self.root, self.every_s = root_pid, every_s
        self.load: list[float] = []
        self.cpu: list[tuple[float, dict[str, float]]] = []  # (time.time(), cumulative CPU s per group)
        self._last: dict[int, tuple[str, int]] = {}  # pid -> (group, last ticks): exited processes keep theirs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = os.path.isdir("/proc")

    def _sample(self):
        self.load.append(os.getloadavg()[0])
        if not self.available:
            return
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        todo, tree = [self.root], []
        while todo:
            pid = todo.pop()
            if pid in table:
                tree.append(pid)
                todo.extend(children.get(pid, []))
        for pid in tree:
            known = self._last.get(pid)
            group = known[0] if known and known[0] != "other" else _group(pid)
            self._last[pid] = (group, table[pid][1])
        totals: dict[str, float] = {}
        for group, ticks in self._last.values():
            totals[group] = totals.get(group, 0.0) + ticks / _HZ
        self.cpu.append((time.time(), totals))

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def cpu_between(self, t0: float, t1: float) -> dict[str, float] | None:
        """CPU seconds per group (and ``total``) used in the wall-clock interval [t0, t1] (interpolated)."""
        if len(self.cpu) < 2 or t0 < self.cpu[0][0] or t1 > self.cpu[-1][0]:
            return None

        def at(t, group):
            for (ta, a), (tb, b) in zip(self.cpu, self.cpu[1:]):
                if ta <= t <= tb:
                    va, vb = a.get(group, 0.0), b.get(group, 0.0)
                    return va + (vb - va) * ((t - ta) / (tb - ta) if tb > ta else 1.0)
            return self.cpu[-1][1].get(group, 0.0)

        groups = sorted({g for _, d in self.cpu for g in d})
        out = {g: at(t1, g) - at(t0, g) for g in groups}
        out["total"] = sum(out.values())
        return out

    def load_summary(self) -> dict:
        s = self.load or [float("nan")]
        return {"load1_mean": round(statistics.fmean(s), 2), "load1_max": round(max(s), 2), "samples": len(s)}


def _run_monitored(cmd: list[str], log_path: Path, env: dict | None = None) -> tuple[int, float, float, Monitor]:
    """Run ``cmd`` (stdout+stderr to ``log_path``) under a Monitor; (exit code, launch time, wall s, monitor)."""
    t_launch = time.time()
    with open(log_path, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        with Monitor(proc.pid) as mon:
            rc = proc.wait()
    return rc, t_launch, time.time() - t_launch, mon


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def _add_cpu(rows: list[dict], mon: Monitor) -> None:
    for row in rows:
        row["cpu_s"] = mon.cpu_between(row["t_start"], row["t_end"])


# --------------------------------------------------------------------------- our side

OUR_PHASES = ("rollout", "score", "train", "sync")


def run_ours(settings: dict, workdir: Path, cmd: list[str] | None = None, env: dict | None = None,
             tag: str = "ours") -> dict:
    """Our loop through ``holderpo train`` (``cmd``/``env``: another launch of the same run, for experiments)."""
    run_dir = workdir / "ours"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = cmd or [sys.executable, "-m", "holderpo_megatron.cli", "train", "--config", str(RECIPE),
                  *settings["our_overrides"]]
    print(f"[{tag}] load average before: {os.getloadavg()}", flush=True)
    print(f"[{tag}] {' '.join(cmd)}", flush=True)
    rc, t_launch, wall, mon = _run_monitored(cmd, workdir / f"{tag}.log", env=env)
    if rc != 0:
        raise SystemExit(f"[{tag}] failed with exit code {rc}; the end of {workdir / f'{tag}.log'} (removed with the "
                         f"scratch directory unless --keep):\n{_tail(workdir / f'{tag}.log')}")
    from holderpo_megatron.observability import read_metrics

    recs = [r for r in read_metrics(run_dir) if "time/step" in r]
    n_samples = settings["prompts_per_step"] * settings["group_size"]
    rows = []
    for r in recs:
        phases = {p: r.get(f"time/{p}", 0.0) or 0.0 for p in OUR_PHASES}
        row = {"step": r["step"], "time": r["time/step"], **phases,
               "gen_tokens": round(r["response_length_mean"] * n_samples), "samples": n_samples,
               "reward_mean": r.get("reward_mean"), "truncated_frac": r.get("truncated_frac"),
               "t_start": r["wall_time"] - r["time/step"], "t_end": r["wall_time"]}
        rows.append(row)
    # Step 1's time/step also counts the SGLang engine start (the logger's clock starts before it):
    # step 1 proper = its phases; start-up = launch -> start of step 1's rollout.
    first = recs[0]
    step1 = sum(rows[0][p] for p in OUR_PHASES)
    rows[0]["time"] = step1
    rows[0]["t_start"] = first["wall_time"] - step1
    startup = rows[0]["t_start"] - t_launch
    _add_cpu(rows, mon)
    for row in rows:
        row["other"] = row["time"] - sum(row[p] for p in OUR_PHASES)
    from holderpo_megatron.trainer.config import load_run_config

    cfg = load_run_config(RECIPE, settings["our_overrides"])
    nproc = cfg.parallel.nproc_per_node
    omp = (env or os.environ).get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    return {"rc": rc, "wall_s": wall, "startup_s": startup, "steps": rows, "load": mon.load_summary(),
            "scored_fraction": _scored_fraction(cfg),
            "share_group": cfg.rollout.group_size if cfg.train.share_prompts else None,
            "threads": f"{nproc} ranks (tp{cfg.parallel.tp} x pp{cfg.parallel.pp}) x OMP_NUM_THREADS={omp}"
                       f", rollout.backend={cfg.rollout.backend} (sglang: its own scheduler process)"}


def _scored_fraction(cfg) -> float:
    """The share of a step's sequences our forward-only old-log-prob pass covers (trainer/loop.py):
    none with the engine's log-probs, minibatches 2..k when minibatch 1 reuses its training forward."""
    k = cfg.train.minibatches_per_step
    if cfg.rollout.use_rollout_logprobs:
        return 0.0
    return (k - 1) / k if cfg.train.reuse_training_logprobs else 1.0


# --------------------------------------------------------------------------- TRL side

TRL_PHASES = ("generate", "reward", "score", "prep", "train")


def run_trl(settings: dict, workdir: Path) -> dict:
    spec = workdir / "trl_settings.json"
    out = workdir / "trl_result.json"
    spec.write_text(json.dumps(settings))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_trl-worker", str(spec), str(out)]
    print(f"[trl] load average before: {os.getloadavg()}", flush=True)
    print(f"[trl] {' '.join(cmd)}", flush=True)
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    rc, t_launch, wall, mon = _run_monitored(cmd, workdir / "trl.log", env=env)
    if rc != 0:
        raise SystemExit(f"[trl] failed with exit code {rc}; the end of {workdir / 'trl.log'}:\n{_tail(workdir / 'trl.log')}")
    res = json.loads(out.read_text())
    res.update(rc=rc, wall_s=wall, startup_s=res.pop("first_step_wall") - t_launch, load=mon.load_summary())
    _add_cpu(res["steps"], mon)
    return res


def trl_worker(spec_path: str, out_path: str) -> int:
    """Runs in its own process: TRL GRPOTrainer on the shared settings, timing each generation batch."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from holderpo_megatron.data.templates import get_prompt_template
    from holderpo_megatron.rewards.math import ExactIntReward

    s = json.loads(Path(spec_path).read_text())
    G, P, K, steps = s["group_size"], s["prompts_per_step"], s["minibatches_per_step"], s["steps"]
    if (P * G) % K:
        raise SystemExit(f"{P * G} completions per step do not split into {K} minibatches")
    tpl = get_prompt_template(s["prompt_template"])
    data = Dataset.from_list([{"prompt": tpl.messages(x["problem"]), "answer": x["answers"]} for x in s["problems"]])
    tok = AutoTokenizer.from_pretrained(s["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(s["model_dir"], dtype=torch.float32)
    eos_ids = {tok.eos_token_id} | set(model.generation_config.eos_token_id
                                       if isinstance(model.generation_config.eos_token_id, list)
                                       else [model.generation_config.eos_token_id])
    reward = ExactIntReward(truncated_reward=s["truncated_reward"])
    max_new = s["max_new_tokens"]

    def exact_int(prompts, completions, completion_ids, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        reasons = ["length" if len(ids) >= max_new and (not ids or ids[-1] not in eos_ids) else "stop"
                   for ids in completion_ids]
        got = reward.score(texts, [list(a) for a in answer], reasons).rewards
        phases["reward_mean"] = sum(got) / len(got)
        return got

    args = GRPOConfig(
        output_dir=str(Path(out_path).parent / "trl_out"),
        use_cpu=True, bf16=False, fp16=False, seed=s["seed"], data_seed=s["seed"],
        # one generation batch = P prompts x G completions; K optimizer updates on it (see module docstring)
        num_generations=G, per_device_train_batch_size=P * G // K, gradient_accumulation_steps=1,
        steps_per_generation=K, num_iterations=1, max_steps=K * steps, shuffle_dataset=False,
        max_completion_length=max_new, temperature=s["temperature"], top_p=s["top_p"],
        top_k=0 if s["top_k"] == -1 else s["top_k"],
        learning_rate=s["lr"], lr_scheduler_type="constant", weight_decay=s["weight_decay"],
        adam_beta1=s["adam_beta1"], adam_beta2=s["adam_beta2"], adam_epsilon=s["adam_eps"],
        max_grad_norm=s["clip_grad"],
        beta=0.0, epsilon=s["clip_low"], epsilon_high=s["clip_high"], importance_sampling_level="sequence",
        loss_type="grpo", scale_rewards="group", mask_truncated_completions=False,
        gradient_checkpointing=False, use_vllm=False,
        report_to="none", save_strategy="no", logging_strategy="steps", logging_steps=1, disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0,
        # fixed length: EOS is masked until max_new tokens, so generate never stops early (ours: ignore_eos)
        generation_kwargs={"min_new_tokens": max_new} if s["fixed_length"] else None,
    )
    phases: dict[str, float] = {}
    gens: list[dict] = []
    inside = {"prepare": False}

    def timed(obj, name, key, only_inside=False, after=None):
        orig = getattr(obj, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                out = orig(*a, **k)
            finally:
                if not only_inside or inside["prepare"]:
                    phases[key] = phases.get(key, 0.0) + time.perf_counter() - t0
            if after is not None:
                after(out)
            return out

        setattr(obj, name, wrapper)

    trainer = GRPOTrainer(model=model, reward_funcs=[exact_int], args=args, train_dataset=data, processing_class=tok)

    def count_tokens(out):
        prompt_ids, completion_ids = out[0], out[1]
        phases["gen_tokens"] = phases.get("gen_tokens", 0) + sum(len(c) for c in completion_ids)
        phases["prompt_tokens_max"] = max(len(p) for p in prompt_ids)

    timed(trainer, "_generate", "generate_outer", after=count_tokens)
    timed(trainer.model, "generate", "generate")
    timed(trainer, "_calculate_rewards", "reward")
    timed(trainer, "_get_per_token_logps_and_entropies", "score", only_inside=True)
    orig_prepare = trainer._generate_and_score_completions

    def prepare(*a, **k):
        phases.clear()
        inside["prepare"] = True
        t0 = time.perf_counter()
        try:
            return orig_prepare(*a, **k)
        finally:
            inside["prepare"] = False
            phases["prepare"] = time.perf_counter() - t0
            gens.append(dict(phases))

    trainer._generate_and_score_completions = prepare

    class Clock(TrainerCallback):
        def __init__(self):
            self.first = self.first_wall = None
            self.ends: list[float] = []
            self.ends_wall: list[float] = []
            self.logs: list[dict] = []

        def on_step_begin(self, args, state, control, **kw):
            if self.first is None:
                self.first, self.first_wall = time.perf_counter(), time.time()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())
            self.ends_wall.append(time.time())

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append(dict(logs or {}))

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()

    if len(gens) != steps or len(clock.ends) != K * steps:
        raise SystemExit(f"expected {steps} generations and {K * steps} optimizer steps, "
                         f"got {len(gens)} and {len(clock.ends)}")
    if any("generate" not in g for g in gens):
        raise SystemExit("the model.generate wrapper was not called: TRL generated through another path")
    bounds = [clock.first] + [clock.ends[K * (i + 1) - 1] for i in range(steps)]
    walls = [clock.first_wall] + [clock.ends_wall[K * (i + 1) - 1] for i in range(steps)]
    rows = []
    for i, g in enumerate(gens):
        t = bounds[i + 1] - bounds[i]
        row = {"step": i + 1, "time": t, "generate": g["generate"], "reward": g.get("reward", 0.0),
               "score": g.get("score", 0.0),
               "prep": g["prepare"] - g["generate"] - g.get("reward", 0.0) - g.get("score", 0.0),
               "train": t - g["prepare"], "gen_tokens": int(g["gen_tokens"]),
               "prompt_tokens_max": g["prompt_tokens_max"], "reward_mean": g.get("reward_mean"),
               "t_start": walls[i], "t_end": walls[i + 1]}
        rows.append(row)
    Path(out_path).write_text(json.dumps({
        "first_step_wall": clock.first_wall, "steps": rows, "trl_logs": clock.logs, "threads": f"1 process x torch threads={torch.get_num_threads()}",
        "trl_config": {k: getattr(args, k) for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation", "generation_batch_size",
            "num_iterations", "num_generations", "max_steps", "max_completion_length", "learning_rate", "beta",
            "epsilon", "epsilon_high", "importance_sampling_level", "loss_type", "scale_rewards", "use_cpu", "bf16",
            "gradient_checkpointing", "temperature", "top_k", "top_p")},
    }, default=str))
    return 0


# --------------------------------------------------------------------------- FLOPs and the matmul peak

def flop_params(model_dir: str) -> dict:
    """N for the FLOP count: every parameter that does a matmul per token, i.e. all but the input
    embedding (a lookup), plus the output layer (counted even when tied to the embedding)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    named = dict(model.named_parameters())  # tied weights appear once, under the embedding's name
    embed = sum(p.numel() for n, p in named.items() if "embed_tokens" in n)
    body = sum(p.numel() for n, p in named.items() if "embed_tokens" not in n and "lm_head" not in n)
    output = hf.vocab_size * hf.hidden_size
    return {"N": body + output, "non_embedding": body, "output_layer": output, "embedding": embed,
            "tied": bool(getattr(hf, "tie_word_embeddings", False)),
            "what": "non-embedding parameters + output layer (vocab x hidden); attention score FLOPs not counted"}


def prompt_tokens_per_step(settings: dict) -> list[int]:
    """Prompt tokens of each step's completions (every completion carries its prompt): G x sum over the
    step's prompts, tokenised as both sides do (the chat template through the model's tokenizer)."""
    from transformers import AutoTokenizer

    from holderpo_megatron.data.templates import get_prompt_template, prompt_token_lengths

    tok = AutoTokenizer.from_pretrained(settings["model_dir"])
    lens = prompt_token_lengths(get_prompt_template(settings["prompt_template"]), tok,
                                [x["problem"] for x in settings["problems"]])
    P, G = settings["prompts_per_step"], settings["group_size"]
    return [G * sum(lens[i * P:(i + 1) * P]) for i in range(settings["steps"])]


def add_flops(rows: list[dict], prompt_tokens: list[int], params: dict, scored: float, group: int | None = None) -> None:
    """Per step: training 6 N (prompt + completion tokens of every trained sequence), scoring 2 N over
    the share ``scored`` of those tokens that a forward-only old-log-prob pass covers, generation 2 N per generated
    token (prefill of the prompts not counted: SGLang shares it across a group, HF generate does not).
    The same work on both sides; ``group`` (ours with ``train.share_prompts``: the group size) also
    counts the tokens its rows hold (``row_tokens``): each prompt once, each sample's last token out.
    ``executed``: training and scoring as run, the layers (``params["non_embedding"]``) over ``row_tokens``
    and the output layer (``params["output_layer"]``) over the completion tokens only, plus generation."""
    n, body, head = params["N"], params["non_embedding"], params["output_layer"]
    for row in rows:
        tokens = prompt_tokens[row["step"] - 1] + row["gen_tokens"]
        row_tokens = tokens if group is None else prompt_tokens[row["step"] - 1] // group + row["gen_tokens"] - row["samples"]
        pass_flops = 2 * (body * row_tokens + head * row["gen_tokens"])  # one forward as run
        row["flops"] = {"train": 6 * n * tokens, "score": round(2 * n * tokens * scored),
                        "generate": 2 * n * row["gen_tokens"], "trained_tokens": tokens, "row_tokens": row_tokens}
        row["flops"]["total"] = row["flops"]["train"] + row["flops"]["score"] + row["flops"]["generate"]
        row["flops"]["executed"] = round(pass_flops * (3 + scored)) + row["flops"]["generate"]


def matmul_peak(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """fp32 ``torch.mm`` of two n x n matrices on ``threads`` threads: the best of ``repeats``, FLOP/s."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up (thread pool start, page faults)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 2 * n ** 3 / best


# --------------------------------------------------------------------------- summary

def _cpu_summary(steady: list[dict], total_time: float) -> dict:
    cpus = [r.get("cpu_s") for r in steady]
    if not cpus or any(c is None for c in cpus):
        return {"cpu_s_per_step": None, "cpu_s_per_step_by_group": None, "cores_busy": None}
    groups = sorted({g for c in cpus for g in c})
    by = {g: statistics.fmean(c.get(g, 0.0) for c in cpus) for g in groups}
    return {"cpu_s_per_step": by.pop("total"), "cpu_s_per_step_by_group": by,
            "cores_busy": sum(c["total"] for c in cpus) / total_time}


def _flop_summary(steady: list[dict], total_time: float, peak: dict | None) -> dict:
    if not steady or "flops" not in steady[0]:
        return {}
    per = {k: statistics.fmean(r["flops"][k] for r in steady) for k in ("train", "score", "generate", "total",
                                                                          "trained_tokens", "row_tokens", "executed")}
    achieved = sum(r["flops"]["total"] for r in steady) / total_time
    executed = sum(r["flops"]["executed"] for r in steady) / total_time
    out = {"flops_per_step": per, "flops_per_s": achieved, "executed_flops_per_s": executed}
    if peak:
        out["flops_fraction_of_peak"] = {"all_cores": achieved / peak["all_cores"],
                                         "one_thread_x_cores": achieved / (peak["one_thread"] * peak["cores"]),
                                         "executed_all_cores": executed / peak["all_cores"]}
    return out


def summarise(side: dict, phase_names: tuple[str, ...], peak: dict | None = None) -> dict:
    rows = side["steps"]
    steady = rows[1:] if len(rows) > 1 else rows
    t = [r["time"] for r in steady]
    tot = sum(t)
    return {
        "startup_s": side["startup_s"],
        "step1_s": rows[0]["time"],
        "steady_steps": len(steady),
        "step_s_mean": statistics.fmean(t),
        "step_s_median": statistics.median(t),
        "step_s_min": min(t),
        "step_s_max": max(t),
        "steps_per_s": len(t) / tot,
        "gen_tokens_per_step": statistics.fmean(r["gen_tokens"] for r in steady),
        "gen_tokens_per_s": sum(r["gen_tokens"] for r in steady) / tot,
        "phases_s": {p: statistics.fmean(r[p] for r in steady) for p in phase_names},
        **_flop_summary(steady, tot, peak),
        **_cpu_summary(steady, tot),
        "reward_mean": [r.get("reward_mean") for r in rows],
        "wall_s": side["wall_s"],
        "load": side["load"],
        "threads": side["threads"],
    }


def table(s_ours: dict | None, s_trl: dict | None, peak: dict | None = None) -> str:
    def cell(s, key, fmt):
        return format(s[key], fmt) if s and s.get(key) is not None else "-"

    lines = [f"{'':28}{'ours':>12}{'TRL':>12}{'ours/TRL':>10}"]
    for label, key, fmt, higher in [("steps/s", "steps_per_s", ".4f", True),
                                    ("generated tokens/s", "gen_tokens_per_s", ".2f", True),
                                    ("s/step (mean, steady)", "step_s_mean", ".2f", False),
                                    ("s/step median", "step_s_median", ".2f", False),
                                    ("s/step min", "step_s_min", ".2f", False),
                                    ("s/step max", "step_s_max", ".2f", False),
                                    ("generated tokens/step", "gen_tokens_per_step", ".1f", None),
                                    ("CPU s/step (process tree)", "cpu_s_per_step", ".1f", False),
                                    ("cores busy (CPU s / wall s)", "cores_busy", ".2f", None),
                                    ("step 1 (warm-up) s", "step1_s", ".2f", False),
                                    ("start-up s", "startup_s", ".1f", False)]:
        ratio = ""
        if s_ours and s_trl and higher is not None and s_trl.get(key) and s_ours.get(key):
            ratio = f"{s_ours[key] / s_trl[key]:.2f}x" if higher else f"{s_trl[key] / s_ours[key]:.2f}x"
        lines.append(f"{label:28}{cell(s_ours, key, fmt):>12}{cell(s_trl, key, fmt):>12}{ratio:>10}")
    if peak:
        lines.append(f"matmul peak (fp32 torch.mm {peak['n']}^2): all {peak['cores']} cores "
                     f"{peak['all_cores'] / 1e9:.1f} GFLOP/s, 1 thread {peak['one_thread'] / 1e9:.1f} GFLOP/s")
    for name, s in (("ours", s_ours), ("TRL", s_trl)):
        if s and s.get("flops_per_step"):
            f = s["flops_per_step"]
            frac = s.get("flops_fraction_of_peak") or {}
            lines.append(f"FLOPs  {name:5} (per step, TFLOP): train {f['train'] / 1e12:.2f}  score {f['score'] / 1e12:.2f}"
                         f"  generate {f['generate'] / 1e12:.3f}  total {f['total'] / 1e12:.2f}"
                         f" ({f['trained_tokens']:.0f} trained tokens"
                         + (f", {f['row_tokens']:.0f} in the rows: shared prompts" if f["row_tokens"] != f["trained_tokens"]
                            else "") + f"); achieved {s['flops_per_s'] / 1e9:.1f} GFLOP/s = "
                         f"{100 * frac.get('all_cores', float('nan')):.1f}% of the all-core peak, "
                         f"{100 * frac.get('one_thread_x_cores', float('nan')):.1f}% of cores x 1-thread peak")
            lines.append(f"       {'':5} executed {f['executed'] / 1e12:.2f} TFLOP a step ({f['row_tokens']:.0f} tokens through the"
                         f" layers, the output layer at completions only{', padding not counted' if name == 'TRL' else ''}): "
                         f"{s['executed_flops_per_s'] / 1e9:.1f} GFLOP/s = "
                         f"{100 * frac.get('executed_all_cores', float('nan')):.1f}% of the all-core peak")
    for name, s, phs in (("ours", s_ours, OUR_PHASES + ("other",)), ("TRL", s_trl, TRL_PHASES)):
        if not s:
            continue
        mean = s["step_s_mean"]
        parts = "  ".join(f"{p} {s['phases_s'][p]:.2f}s ({100 * s['phases_s'][p] / mean:.0f}%)" for p in phs)
        lines.append(f"phases {name:5} (mean s/step): {parts}")
        if s.get("cpu_s_per_step_by_group"):
            lines.append(f"CPU    {name:5} (mean CPU s/step): " + "  ".join(
                f"{g} {v:.1f}" for g, v in s["cpu_s_per_step_by_group"].items()))
    for name, s in (("ours", s_ours), ("TRL", s_trl)):
        if s:
            lines.append(f"load {name:5}: 1-min load avg mean {s['load']['load1_mean']} max {s['load']['load1_max']}"
                         f"  ({s['threads']})")
            lines.append(f"reward {name:5}: " + " ".join("-" if r is None else f"{r:.3f}" for r in s["reward_mean"]))
    return "\n".join(lines)


def _check_fixed_length(name: str, side: dict, settings: dict) -> None:
    """Fixed length: every step generated exactly completions x max_new_tokens tokens, else not the same work."""
    if not settings["fixed_length"]:
        return
    want = settings["prompts_per_step"] * settings["group_size"] * settings["max_new_tokens"]
    bad = [(r["step"], r["gen_tokens"]) for r in side["steps"] if r["gen_tokens"] != want]
    if bad:
        raise SystemExit(f"[{name}] --fixed-length: steps generated {bad} tokens (step, count), expected {want}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="steps per side (the first is warm-up)")
    ap.add_argument("--quick", action="store_true", help="3 steps per side (1 warm-up + 2 measured)")
    ap.add_argument("--sides", default="ours,trl", help="comma list of ours,trl (default both)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON result (a .log with the same stem is written beside it)")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a new temp dir, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--fixed-length", action="store_true",
                    help="every completion exactly max_new_tokens on both sides (EOS ignored): the same work per step")
    ap.add_argument("--ours-override", action="append", default=[], metavar="KEY=VALUE",
                    help="one more recipe override for our side (repeatable), e.g. parallel.pp=1")
    ap.add_argument("--_trl-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._trl_worker:
        return trl_worker(*args._trl_worker)
    steps = 3 if args.quick else args.steps
    if steps < 2:
        ap.error("--steps must be >= 2 (the first step is warm-up)")
    sides = [x.strip() for x in args.sides.split(",") if x.strip()]
    if not set(sides) <= {"ours", "trl"} or not sides:
        ap.error("--sides takes ours, trl or ours,trl")
    if "trl" in sides:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("TRL is not installed: pip install -r requirements-bench.txt (see its header)")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="e2e_vs_trl_")).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    settings = shared_settings(steps, workdir, extra=tuple(args.ours_override), fixed_length=args.fixed_length)
    res: dict = {"bench": "e2e_vs_trl", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                   "python": platform.python_version()},
                 "settings": {k: v for k, v in settings.items() if k != "problems"}, "sides": {}}
    import torch
    import transformers

    res["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import sglang
        res["versions"]["sglang"] = getattr(sglang, "__version__", "?")
    except Exception:  # noqa: BLE001 - only a version string
        pass
    if "trl" in sides:
        import trl
        res["versions"]["trl"] = trl.__version__
    print(f"{steps} steps per side, {settings['prompts_per_step']} prompts x {settings['group_size']} completions, "
          f"{'exactly' if args.fixed_length else '<='} {settings['max_new_tokens']} new tokens; ours "
          f"{settings['layout']}; scratch {workdir}", flush=True)
    cores = os.cpu_count() or 1
    peak = {"n": 2048, "cores": cores, "all_cores": matmul_peak(cores), "one_thread": matmul_peak(1),
            "load1": os.getloadavg()[0]}
    print(f"matmul peak: {peak['all_cores'] / 1e9:.1f} GFLOP/s on {cores} threads, "
          f"{peak['one_thread'] / 1e9:.1f} on 1", flush=True)
    res["matmul_peak_flops"] = peak
    params = flop_params(settings["model_dir"])
    res["flop_params"] = params
    prompt_tokens = prompt_tokens_per_step(settings)
    summaries = {}
    try:
        if "ours" in sides:
            r = run_ours(settings, workdir)
            add_flops(r["steps"], prompt_tokens, params, scored=r["scored_fraction"], group=r["share_group"])
            _check_fixed_length("ours", r, settings)
            res["sides"]["ours"] = r
            summaries["ours"] = summarise(r, OUR_PHASES + ("other",), peak)
            print(f"[ours] done: {summaries['ours']['step_s_mean']:.2f} s/step (steady)", flush=True)
        if "trl" in sides:
            r = run_trl(settings, workdir)
            add_flops(r["steps"], prompt_tokens, params, scored=1.0)  # TRL always re-scores here (docstring)
            _check_fixed_length("trl", r, settings)
            res["sides"]["trl"] = r
            summaries["trl"] = summarise(r, TRL_PHASES, peak)
            print(f"[trl] done: {summaries['trl']['step_s_mean']:.2f} s/step (steady)", flush=True)
    finally:
        logs = {n: (workdir / f"{n}.log").read_text(errors="replace") for n in ("ours", "trl")
                if (workdir / f"{n}.log").exists()}
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    res["summary"] = summaries
    if "ours" in summaries and "trl" in summaries:
        res["ratio_ours_over_trl"] = {
            "steps_per_s": summaries["ours"]["steps_per_s"] / summaries["trl"]["steps_per_s"],
            "gen_tokens_per_s": summaries["ours"]["gen_tokens_per_s"] / summaries["trl"]["gen_tokens_per_s"],
        }
    text = table(summaries.get("ours"), summaries.get("trl"), peak)
    print("\n" + text, flush=True)
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    with open(out.with_suffix(".log"), "w") as f:
        f.write(f"python bench/e2e_vs_trl.py {' '.join(argv if argv is not None else sys.argv[1:])}\n\n{text}\n")
        for name, body in logs.items():
            f.write(f"\n===== {name} subprocess output =====\n{body}")
    print(f"wrote {out} and {out.with_suffix('.log')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`holderpo sweep` without engines: grid parsing and validation, run planning, resumability of
finished runs, and the summary of metrics.jsonl files written by the real MetricsLogger."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from holderpo_megatron.observability import ObservabilityConfig
from holderpo_megatron.observability.logger import MetricsLogger
from holderpo_megatron.observability.plots import is_sweep_dir, main as plot_main, plot_sweep
from holderpo_megatron.observability.sweep_summary import (Aggregate, summarize_run, summarize_sweep,
                                                           t_quantile_975, write_summary)
from holderpo_megatron.trainer.config import ConfigError, load_run_config
from holderpo_megatron.trainer.config_loader import apply_overrides
from holderpo_megatron.trainer.sweep import (DONE_FILE, RUN_FILE, override_string, parse_grid, parse_seeds,
                                             plan_sweep, run_sweep)

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "examples" / "recipes" / "tiny-cpu.yaml")
GRID = ROOT / "examples" / "sweeps" / "p_tradeoff.yaml"


# ---------------------------------------------------------------- grid
@pytest.mark.parametrize("value", ["grpo", "a: b", "true", "1e-5", "", "x,y", -1.0, 2, 1e-5, True, None,
                                   [1, 2], {"kind": "constant", "p_max": -1.0}])
def test_override_string_parses_back_to_the_value(value):
    (key, raw) = override_string("a.b", value).split("=", 1)
    assert key == "a.b"
    assert apply_overrides({}, [f"a.b={raw}"]) == {"a": {"b": value}}


def test_grid_is_the_product_of_a_yaml_file_and_key_lists(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text("grpo: {algorithm.loss: grpo, algorithm.options: {clip_low: 0.2}}\n"
                 "p-1: {algorithm.p_schedule: {kind: constant, p_min: -1.0, p_max: -1.0}}\nbase:\n")
    grid = parse_grid([str(f), "train.optimizer.lr=1e-5,2e-5"])
    assert [n for n, _ in grid] == ["grpo_lr=1e-05", "grpo_lr=2e-05", "p-1_lr=1e-05", "p-1_lr=2e-05",
                                    "base_lr=1e-05", "base_lr=2e-05"]
    name, over = grid[2]
    data = apply_overrides({}, over)
    assert data == {"algorithm": {"p_schedule": {"kind": "constant", "p_min": -1.0, "p_max": -1.0}},
                    "train": {"optimizer": {"lr": 1e-5}}}
    assert parse_grid([]) == [("base", [])]
    assert parse_grid(["algorithm.loss=grpo, gspo"]) == [("loss=grpo", ["algorithm.loss=grpo"]),
                                                         ("loss=gspo", ["algorithm.loss=gspo"])]


@pytest.mark.parametrize("text,match", [
    ("a b: {train.steps: 1}", "config name 'a b' is not a directory name"),
    ("x: [1, 2]", "config 'x' must be a mapping of overrides"),
    ("[1, 2]", "top level must be a mapping"),
    ("{}", "no configs"),
])
def test_bad_grid_files_are_one_line_errors(tmp_path, text, match):
    f = tmp_path / "g.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        parse_grid([str(f)])


def test_bad_grid_lists_and_seeds():
    with pytest.raises(ConfigError, match="grid file 'missing.yaml' does not exist"):
        parse_grid(["missing.yaml"])
    with pytest.raises(ConfigError, match="neither a YAML file of named configs nor key=v1,v2"):
        parse_grid(["grpo"])
    with pytest.raises(ConfigError, match="must look like key.sub=v1,v2"):
        parse_grid(["train.steps="])
    with pytest.raises(ConfigError, match="names repeat: steps=1"):
        parse_grid(["train.steps=1,1"])
    assert parse_seeds("1, 2,3") == [1, 2, 3]
    for bad in ("1,a", "", "1,1"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


# ---------------------------------------------------------------- plan
def test_plan_orders_seed_major_and_layers_the_overrides(tmp_path):
    grid = parse_grid(["algorithm.p_schedule.p_max=2.0,3.0"])
    runs = plan_sweep(RECIPE, grid, [1, 2], tmp_path / "s", ["train.steps=5", "algorithm.p_schedule.p_max=9.0"])
    assert [r.label for r in runs] == ["p_max=2.0/seed1", "p_max=3.0/seed1", "p_max=2.0/seed2", "p_max=3.0/seed2"]
    r = runs[3]
    assert r.run_dir == (tmp_path / "s" / "p_max=3.0" / "seed2").absolute()
    assert r.cfg.train.seed == 2 and r.cfg.train.steps == 5 and r.cfg.checkpoint.resume
    assert r.cfg.algorithm.p_schedule.p_max == 3.0  # the config's own beats the command line's
    assert r.cfg.checkpoint.every == 1  # the recipe's 0 (only at the end) would lose a whole run
    assert load_run_config(RECIPE, r.overrides) == r.cfg  # what `holderpo train` gets back
    runs = plan_sweep(RECIPE, [("a", ["checkpoint.every=2"])], [1], tmp_path / "s", [], checkpoint_every=3)
    assert runs[0].cfg.checkpoint.every == 2  # denser than asked: kept


@pytest.mark.parametrize("grid,overrides,match", [
    ([("ok", []), ("bad", ["algorithm.loss=holdr"])], [], r"config 'bad' seed 1: algorithm.loss 'holdr' is not one of"),
    ([("bad", ["train.stepz=3"])], [], r"config 'bad' seed 1: unknown key 'train.stepz'; did you mean 'steps'"),
    ([("bad", ["train.steps=0"])], [], r"config 'bad' seed 1: .*train.steps must be >= 1, got 0"),
    ([("bad", ["train.seed=3"])], [], r"grid config 'bad': 'train.seed' is set by the sweep"),
    ([("ok", [])], ["output_dir=/x"], r"overrides: 'output_dir' is set by the sweep"),
    ([("ok", [])], ["data.train=nowhere.jsonl"], r"config 'ok' seed 1: data.train 'nowhere.jsonl'"),
])
def test_every_run_is_validated_before_any_starts(tmp_path, grid, overrides, match):
    with pytest.raises(ConfigError, match=match):
        plan_sweep(RECIPE, grid, [1], tmp_path / "s", overrides)
    assert not (tmp_path / "s").exists()


def test_the_example_grid_plans_18_valid_runs(tmp_path):
    recipe = ROOT / "examples" / "recipes" / "arith-hard-cpu.yaml"
    grid = parse_grid([str(GRID)])
    assert [n for n, _ in grid] == ["grpo", "gspo", "p-1", "p1", "p2", "anneal2to-1"]
    from tools.arithmetic_eval_set import main as make_set

    assert make_set(["--data-dir", str(tmp_path / "data"), "--name", "arith_words9", "--n", "20",
                     "--max-operand", "9"]) == 0
    runs = plan_sweep(str(recipe), grid, [1, 2, 3], tmp_path / "s", [f"data.data_dir={tmp_path / 'data'}"])
    assert len(runs) == 18
    by = {r.config: r.cfg for r in runs}
    assert by["grpo"].algorithm.loss == "grpo"
    p = {n: [by[n].algorithm.p_schedule.value(s) for s in (0, by[n].train.steps)] for n in by if n != "grpo"}
    assert by["grpo"].train.minibatches_per_step == 4 and not by["p2"].data.arithmetic_direct
    assert p == {"gspo": [0.0, 0.0], "p-1": [-1.0, -1.0], "p1": [1.0, 1.0], "p2": [2.0, 2.0],
                 "anneal2to-1": [2.0, -1.0]}


# ---------------------------------------------------------------- metrics and summary
def _log_run(run_dir: Path, rewards, grad_norms, evals=(), **extra_per_step):
    """A metrics.jsonl written by the real MetricsLogger (NaN grad norms become null, as in a run)."""
    cfg = ObservabilityConfig(tensorboard=False, progress=False, gpu_stats=False)
    with MetricsLogger(run_dir, cfg, total_steps=len(rewards), rank=0) as log:
        for i, (r, g) in enumerate(zip(rewards, grad_norms)):
            step = i + 1
            rec = {"reward_mean": r, "grad_norm": g, "clip_frac": 0.01 * step, "rho_min": 1.0 - 0.1 * step,
                   "rho_max": 1.0 + 0.2 * step, "entropy": 2.0 - 0.1 * step, "response_length_mean": 10.0 + step,
                   "nonfinite_seqs": 1.0 if step == 2 else 0.0}
            rec.update({k: v[i] for k, v in extra_per_step.items()})
            log.log(step, rec)
            for s, acc in evals:
                if s == step:
                    log.log_extra(step, {"eval/average": acc, "eval/gsm8k_test": acc})


def test_summarize_run_reads_the_loggers_file(tmp_path):
    grads = [1.0, 1.2, float("nan"), 0.9, 5.0, 1.1]
    _log_run(tmp_path / "r", [0.1, 0.2, 0.3, 0.2, 0.5, 0.6], grads, evals=[(3, 0.25), (6, 0.4)],
             skipped_update=[0, 0, 0, 1.0, 0, 0])
    s = summarize_run(tmp_path / "r", "c", 1)
    assert s.steps == 6 and s.held_out == 0.4 and s.held_out_step == 6
    assert s.final_reward == 0.6 and s.mean_reward == pytest.approx(1.9 / 6)
    assert s.reward_curve == [(i + 1, v) for i, v in enumerate([0.1, 0.2, 0.3, 0.2, 0.5, 0.6])]
    finite = [g for g in grads if math.isfinite(g)]
    assert s.grad_norm_spikes == sum(g > 3 * statistics.median(finite) for g in finite) == 1  # 5.0 > 3 * 1.1
    assert s.nonfinite == 2  # the NaN grad norm's step and one non-finite sequence
    assert s.skipped_updates == 1
    assert s.clip_frac_mean == pytest.approx(0.035) and s.clip_frac_max == pytest.approx(0.06)
    assert s.rho_min == pytest.approx(0.4) and s.rho_max == pytest.approx(2.2)
    assert (s.entropy_first, s.entropy_last) == pytest.approx((1.9, 1.4))
    assert (s.response_length_first, s.response_length_last) == (11.0, 16.0)


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 10, 29, 30):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)
    assert t_quantile_975(200) == pytest.approx(stats.t.ppf(0.975, 200), rel=0.01)


def test_aggregate_over_seeds():
    a = Aggregate.of([0.2, 0.3, 0.7, None])
    xs = [0.2, 0.3, 0.7]
    half = 4.303 * statistics.stdev(xs) / math.sqrt(3)
    assert a.n == 3 and a.mean == pytest.approx(0.4) and a.std == pytest.approx(statistics.stdev(xs))
    assert a.ci95 == pytest.approx((0.4 - half, 0.4 + half), abs=1e-3) and (a.min, a.max) == (0.2, 0.7)
    assert Aggregate.of([0.5]).ci95 is None and Aggregate.of([None]).n == 0


def test_paired_differences_use_the_seeds_both_configs_ran():
    from holderpo_megatron.observability.sweep_summary import RunSummary, paired_differences, paired_table

    def run(config, seed, held_out, reward):
        return RunSummary(config=config, seed=seed, run_dir="", steps=3, held_out=held_out, held_out_step=3,
                          final_reward=reward, mean_reward=reward)

    runs = [run("grpo", 1, 0.2, 0.1), run("grpo", 2, 0.4, 0.2), run("grpo", 3, 0.3, 0.3),
            run("p1", 1, 0.1, 0.3), run("p1", 3, None, 0.1), run("p1", 4, 0.9, 0.9)]
    (p,) = paired_differences(runs, "grpo")
    assert p.config == "p1" and p.seeds == [1, 3]  # seed 2 has no p1 run, seed 4 no grpo run
    assert p.diffs["held_out"].n == 1 and p.diffs["held_out"].mean == pytest.approx(-0.1)  # seed 3: no held-out
    assert p.diffs["mean_reward"].n == 2 and p.diffs["mean_reward"].mean == pytest.approx(0.0)
    table = paired_table([p])
    assert "| p1 | 2 | -10.0 | 0 ± 0.283 [-2.54, 2.54] |" in table and table.endswith("| no |")


def _sweep_dir(root: Path) -> Path:
    for config, finals in (("grpo", (0.2, 0.4, 0.3)), ("p2", (0.5, 0.6, 0.7))):
        for seed, final in zip((1, 2, 3), finals):
            _log_run(root / config / f"seed{seed}", [0.1, final / 2, final], [1.0, 1.0, 1.0],
                     evals=[(3, final / 2)])
    return root


def test_sweep_summary_and_plot(tmp_path, capsys):
    root = _sweep_dir(tmp_path / "sweep")
    (root / "empty" / "seed1").mkdir(parents=True)
    (root / "empty" / "seed1" / "metrics.jsonl").write_text("")  # died before its first step
    runs, per = summarize_sweep(root, ["p2", "grpo", "missing"])
    assert [c.config for c in per] == ["p2", "grpo"] and len(runs) == 6
    p2 = per[0]
    assert p2.seeds == [1, 2, 3]
    assert p2.stats["final_reward"].mean == pytest.approx(0.6)
    assert p2.stats["held_out"].mean == pytest.approx(0.3) and p2.stats["held_out"].std == pytest.approx(0.05)
    assert p2.reward_curve[2] == pytest.approx((3, 0.6, 0.5, 0.7, 3))
    jpath, mpath = write_summary(root, ["grpo", "p2"], command="holderpo sweep ...")
    data = json.loads(jpath.read_text())
    assert [c["config"] for c in data["configs"]] == ["grpo", "p2"] and len(data["runs"]) == 6
    md = mpath.read_text()
    assert "| p2 | 3 | 30.0 ± 5.0 | 0.6 ± 0.1 |" in md and "holderpo sweep ..." in md
    # p2 - grpo per seed: held-out (0.25, 0.3, 0.35) - (0.1, 0.2, 0.15) = (0.15, 0.1, 0.2)
    (paired,) = data["paired"]
    d = [0.15, 0.1, 0.2]
    half = 4.303 * statistics.stdev(d) / math.sqrt(3)
    assert paired["baseline"] == "grpo" and paired["seeds"] == [1, 2, 3]
    assert paired["diffs"]["held_out"]["ci95"] == pytest.approx([0.15 - half, 0.15 + half], abs=1e-3)
    assert "| p2 | 3 | 15.0 ± 5.0 [2.6, 27.4] |" in md and md.count("held-out acc, mean reward, final reward") == 1
    assert is_sweep_dir(root) and not is_sweep_dir(root / "p2" / "seed1")
    png = plot_sweep(root)
    assert png == root / "sweep.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_main([str(root), "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").is_file() and str(tmp_path / "x.png") in capsys.readouterr().out


# ---------------------------------------------------------------- running
def test_finished_runs_are_skipped_and_a_changed_run_is_refused(tmp_path, capsys):
    out = tmp_path / "sweep"
    grid = [("grpo", ["algorithm.loss=grpo", "algorithm.options={}"]), ("p2", [])]
    runs = plan_sweep(RECIPE, grid, [1, 2, 3], out, ["train.steps=3"])
    _sweep_dir(out)
    for r in runs:
        r.run_dir.joinpath(RUN_FILE).write_text(json.dumps({"recipe": RECIPE, "overrides": r.overrides}))
        r.run_dir.joinpath(DONE_FILE).write_text("{}")
    assert run_sweep(RECIPE, runs, out) == 0  # nothing to launch
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 6 and "starting" not in printed
    assert (out / "summary.md").is_file() and (out / "sweep.json").is_file()
    from holderpo_megatron.cli import main as cli_main

    (out / "summary.md").unlink()
    assert cli_main(["sweep", "--config", RECIPE, "--out", str(out), "--summary-only"]) == 0
    assert "| grpo | 3 |" in (out / "summary.md").read_text()
    assert cli_main(["sweep", "--config", RECIPE, "--out", str(tmp_path / "nope"), "--summary-only"]) == 2
    changed = plan_sweep(RECIPE, grid, [1], out, ["train.steps=4"])
    with pytest.raises(ConfigError, match="grpo/seed1: .* was started by a sweep with other settings"):
        run_sweep(RECIPE, changed, out)


def test_a_failing_run_is_reported_and_the_sweep_goes_on(tmp_path):
    """A real `holderpo train` that fails at its start (a model directory without config.json):
    the sweep runs the other config (two at a time here), names each failed run and its log, exits 1."""
    empty = tmp_path / "model"
    for d in ("_a", "_b"):
        Path(f"{empty}{d}").mkdir()
    out = tmp_path / "sweep"
    res = subprocess.run([sys.executable, "-m", "holderpo_megatron.cli", "sweep", "--config", RECIPE, "--grid",
                          f"model.hf_path={empty}_a,{empty}_b", "--out", str(out), "--parallel", "2",
                          "train.steps=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout.count("FAILED (exit code") == 2, res.stdout
    assert "these runs did not finish" in res.stderr and "train.log" in res.stderr
    assert not list(out.rglob(DONE_FILE))

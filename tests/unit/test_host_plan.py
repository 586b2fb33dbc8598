"""`holderpo plan` for CPU runs: host RAM of the node (trainer/plan.py plan_host), and its refusal at plan
and at `holderpo train` start-up. The node's RAM is given (``ram_gib`` / ``parallel.host_memory_gb``), so
these tests do not depend on the machine they run on."""

import pytest
import torch

from holderpo_megatron.cli import main as cli_main
from holderpo_megatron.models.known import KNOWN_CONFIGS
from holderpo_megatron.trainer import plan as plan_mod
from holderpo_megatron.trainer.config import ConfigError, load_run_config
from holderpo_megatron.trainer.plan import (
    GIB, HOST_HEADROOM, arch_for_plan, check_host_memory, plan_host, plan_main,
)

CPU_RECIPES = ["tiny-cpu", "alfworld-tiny-cpu"]


def _stage_params_from_transformers() -> list[int]:
    """SmolLM2-135M's parameters per PP2 stage, counted on the Hugging Face model itself (meta device):
    stage 0 = embedding + layers 0-14; stage 1 = layers 15-29 + final norm + the (tied) output layer,
    which Megatron's last stage keeps a copy of."""
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in KNOWN_CONFIGS["HuggingFaceTB/SmolLM2-135M-Instruct"].items()
                                      if k != "architectures"})
    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(cfg)
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    half = cfg.num_hidden_layers // 2
    emb = count(m.model.embed_tokens)
    s0 = emb + sum(count(layer) for layer in m.model.layers[:half])
    s1 = sum(count(layer) for layer in m.model.layers[half:]) + count(m.model.norm) + emb
    return [s0, s1]


def test_cpu_plan_terms_on_the_tiny_recipe():
    cfg = load_run_config("examples/recipes/tiny-cpu.yaml", ["parallel.pp=2"])  # stages: the recipe at PP2
    arch = arch_for_plan(cfg)
    hp = plan_host(cfg, arch, ram_gib=24.0)
    assert [r.stage for r in hp.ranks] == [0, 1] and hp.ram_source == "given"
    for r, n in zip(hp.ranks, _stage_params_from_transformers()):
        # the plan leaves out the final norm (576 parameters): well under 0.1 %
        assert r.weights_gib * GIB / 4 == pytest.approx(n, rel=1e-3)
        assert r.grads_gib == r.weights_gib and r.optimizer_gib == 2 * r.weights_gib
    # 4 prompts x 8 samples / 2 minibatches = 16 sequences of up to 96 + 32 tokens = 2048 tokens: 4
    # microbatches of token_budget 512; in 1F1B stage 0 holds 2 of them, stage 1 one
    assert (hp.microbatch_tokens, hp.microbatches) == (512, 4)
    per = 512 * 15 * plan_mod.ACT_BYTES_PER_TOKEN_PER_HIDDEN * 576 / GIB
    assert hp.ranks[0].activations_gib == pytest.approx(2 * per) and hp.ranks[1].activations_gib == pytest.approx(per)
    for r in hp.ranks:
        assert r.slack_gib == pytest.approx(plan_mod.RANK_SLACK_PER_ACTIVATION * r.activations_gib)
    # only the last stage computes log-probs: the chunked output layer's buffers + per-token vectors
    assert hp.ranks[0].logits_gib == 0
    assert hp.ranks[1].logits_gib * GIB == pytest.approx(2 * 64 * 2**20 + 512 * plan_mod.LOGIT_VECTOR_BYTES)
    assert hp.ranks[0].driver_gib == plan_mod.DRIVER_GIB and hp.ranks[1].driver_gib == 0
    # one embedded engine; its KV cache is SGLang's CPU rule: 0.3 x the RAM free when it starts
    held = sum(plan_mod.RANK_BASE_GIB + r.driver_gib + r.weights_gib + r.grads_gib for r in hp.ranks)
    assert hp.engines == 1
    assert hp.engine_kv_gib == pytest.approx(0.3 * (24.0 - plan_mod.OS_RESERVE_GIB - held - plan_mod.LAUNCHER_GIB))
    assert hp.engine_gib == pytest.approx(plan_mod.ENGINE_FIXED_GIB + hp.engine_kv_gib)
    # exact_int: no verifier; each rank's helper child
    assert (hp.env_workers, hp.reward_workers, hp.workers_gib) == (0, 0, 2 * plan_mod.RANK_HELPER_GIB)
    assert hp.node_gib == pytest.approx(sum(r.total_gib for r in hp.ranks) + hp.engine_gib + hp.workers_gib
                                        + hp.launcher_gib)
    assert hp.fits


def test_cpu_plan_terms_on_the_shipped_dp2_layout():
    cfg = load_run_config("examples/recipes/tiny-cpu.yaml")
    assert (cfg.parallel.pp, cfg.parallel.dp) == (1, 2)
    hp = plan_host(cfg, arch_for_plan(cfg), ram_gib=24.0)
    pp2 = plan_host(load_run_config("examples/recipes/tiny-cpu.yaml", ["parallel.pp=2"]), arch_for_plan(cfg),
                    ram_gib=24.0)
    # every DP rank holds the whole model once (the tied output layer is the embedding: no second copy)
    emb = pp2.ranks[1].weights_gib + pp2.ranks[0].weights_gib - hp.ranks[0].weights_gib
    assert [r.stage for r in hp.ranks] == [0, 0]
    for r in hp.ranks:
        assert r.grads_gib == r.weights_gib and r.optimizer_gib == 2 * r.weights_gib
        # one microbatch of all 30 layers in flight; log-probs on every rank
        assert r.activations_gib == pytest.approx(512 * 30 * plan_mod.ACT_BYTES_PER_TOKEN_PER_HIDDEN * 576 / GIB)
        assert r.logits_gib == pytest.approx(pp2.ranks[1].logits_gib)
    assert emb * GIB / 4 == pytest.approx(49152 * 576, rel=1e-3)
    assert hp.fits


def test_full_recompute_keeps_layer_inputs_plus_one_layer():
    cfg = load_run_config("examples/recipes/tiny-cpu.yaml", ["train.recompute=full", "parallel.pp=2"])
    assert cfg.actor_settings().recompute == "full"  # the one way to the Actor's TransformerConfig
    hp = plan_host(cfg, arch_for_plan(cfg), ram_gib=24.0)
    inputs = 512 * 15 * 4 * 576  # fp32 [tokens, hidden] per layer
    one_layer = 512 * plan_mod.ACT_BYTES_PER_TOKEN_PER_HIDDEN * 576
    assert hp.ranks[0].activations_gib * GIB == pytest.approx(2 * inputs + one_layer)  # 2 microbatches in flight
    assert hp.ranks[1].activations_gib * GIB == pytest.approx(inputs + one_layer)
    plain = plan_host(load_run_config("examples/recipes/tiny-cpu.yaml", ["parallel.pp=2"]), arch_for_plan(cfg),
                      ram_gib=24.0)
    assert plain.ranks[0].activations_gib > 10 * hp.ranks[0].activations_gib


def test_agent_recipe_counts_env_workers_and_turns():
    cfg = load_run_config("examples/recipes/alfworld-tiny-cpu.yaml")
    hp = plan_host(cfg, arch_for_plan(cfg), ram_gib=64.0)
    assert hp.env_workers == cfg.agent.num_workers and hp.reward_workers == 0
    assert hp.workers_gib == pytest.approx(cfg.agent.num_workers * plan_mod.ENV_WORKER_GIB + 2 * plan_mod.RANK_HELPER_GIB)
    # every turn of every play is a training sequence
    seqs = cfg.train.prompts_per_step * cfg.rollout.group_size * cfg.agent.play.max_turns
    tokens = seqs * cfg.max_sequence_length
    assert hp.microbatch_tokens == min(cfg.train.token_budget, tokens)
    assert hp.microbatches == -(-tokens // cfg.train.token_budget)


@pytest.mark.parametrize("name", CPU_RECIPES)
def test_cpu_recipes_fit_the_ram_their_header_states(name):
    cfg = load_run_config(f"examples/recipes/{name}.yaml")
    assert "GB RAM" in cfg.hardware and "8+ GB" not in cfg.hardware
    ram = float(cfg.hardware.split("GB RAM")[0].split()[-1]) * 1e9 / GIB  # a "24 GB" machine: 22.4 GiB at least
    assert plan_host(cfg, arch_for_plan(cfg), ram_gib=ram).fits, cfg.hardware


def test_the_ram_figure_comes_from_the_recipe_when_given():
    cfg = load_run_config("examples/recipes/tiny-cpu.yaml", ["parallel.host_memory_gb=7.5"])
    hp = plan_host(cfg, arch_for_plan(cfg))
    assert hp.ram_gib == 7.5 and hp.ram_source == "parallel.host_memory_gb"
    with pytest.raises(ValueError, match=r"parallel.host_memory_gb must be null .* or > 0, got -1"):
        load_run_config("examples/recipes/tiny-cpu.yaml", ["parallel.host_memory_gb=-1"])


@pytest.mark.parametrize("overrides, lower", [
    (["parallel.host_memory_gb=4"], "lower "),
    # 16 sequences of up to 8032 tokens a minibatch: microbatches of the full 32768-token budget
    (["rollout.max_prompt_tokens=8000", "train.token_budget=32768", "parallel.host_memory_gb=32"],
     "lower train.token_budget (now 32768)"),
])
def test_plan_refuses_a_cpu_recipe_that_cannot_fit(capsys, overrides, lower):
    cfg = load_run_config("examples/recipes/tiny-cpu.yaml", overrides)
    assert plan_main(cfg) == 1
    out = capsys.readouterr().out
    refusal = [line for line in out.splitlines() if line.startswith("refused:")]
    assert len(refusal) == 1 and "DOES NOT FIT" in out
    assert "host memory: node 0 needs an estimated" in refusal[0] and "(parallel.host_memory_gb)" in refusal[0]
    assert lower in refusal[0]
    hp = plan_host(cfg, arch_for_plan(cfg))
    assert f"{hp.node_gib:.1f} GiB" in refusal[0] and f"{HOST_HEADROOM * hp.ram_gib:.1f} GiB" in refusal[0]


def test_train_refuses_before_any_process_starts(capsys, tmp_path):
    rc = cli_main(["train", "--config", "examples/recipes/tiny-cpu.yaml", f"output_dir={tmp_path}",
                   "parallel.host_memory_gb=4"])
    err = capsys.readouterr()
    assert rc == 2 and "launching" not in err.out
    lines = err.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("holderpo train: bad config: host memory: node 0 needs")
    assert not (tmp_path / "tiny-cpu").exists()  # no run directory, no lock, no worker
    # and the same recipe on a node that holds it passes the check
    check_host_memory(load_run_config("examples/recipes/tiny-cpu.yaml", ["parallel.host_memory_gb=64"]),
                      arch_for_plan(load_run_config("examples/recipes/tiny-cpu.yaml")))


def test_gpu_recipes_keep_the_per_gpu_plan():
    cfg = load_run_config("examples/recipes/deepseek-r1-distill-qwen-7b.yaml", ["parallel.host_memory_gb=1"])
    check_host_memory(cfg, arch_for_plan(cfg))  # not a CPU run: no host check, even on a 1 GB node
    with pytest.raises(ConfigError, match="host memory"):
        check_host_memory(load_run_config("examples/recipes/tiny-cpu.yaml", ["parallel.host_memory_gb=1"]),
                          arch_for_plan(cfg))


def test_gpu_plan_counts_full_recompute():
    from holderpo_megatron.trainer.plan import plan_run

    name = "examples/recipes/deepseek-r1-distill-qwen-7b.yaml"
    cfg, rc = load_run_config(name), load_run_config(name, ["train.recompute=full"])
    arch, p = arch_for_plan(cfg), cfg.parallel
    tokens, hidden, layers = cfg.train.token_budget / p.cp, arch.hidden_size / p.tp, arch.num_layers / p.pp * p.pp
    # bf16 layer inputs of every layer plus one layer's 34 bytes per token per hidden, rerun in backward
    want = (2 * tokens * hidden * layers + 34 * tokens * hidden) / GIB
    assert plan_run(rc, arch).activations_gib == pytest.approx(want)
    assert plan_run(cfg, arch).activations_gib == pytest.approx(34 * tokens * hidden * layers / GIB)

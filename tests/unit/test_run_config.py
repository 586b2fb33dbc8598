"""Run config: YAML inheritance, overrides, and bad configs rejected with the key named."""

import textwrap

import pytest

from holderpo_megatron.trainer.config import ConfigError, RunConfig, load_run_config, validate_run
from holderpo_megatron.trainer.config_loader import from_dict
from holderpo_megatron.trainer.plan import arch_for_plan, plan_run

RECIPES = ["tiny-cpu", "deepseek-r1-distill-qwen-7b", "qwen2.5-math-7b", "deepseek-r1-distill-qwen-7b-grpo",
           "deepseek-r1-distill-qwen-7b-gspo", "qwen2.5-32b", "llama-3.1-70b", "alfworld-qwen2.5-1.5b-instruct",
           "alfworld-tiny-cpu"]


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_loads_and_passes_plan(name):
    cfg = load_run_config(f"examples/recipes/{name}.yaml")
    arch = arch_for_plan(cfg)
    validate_run(cfg, arch, check_paths=False)
    mp = plan_run(cfg, arch, on_gpu=cfg.model.dtype != "fp32")
    assert mp.fits, (name, mp)
    assert cfg.hardware


def test_defaults_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {steps: 7, optimizer: {lr: 1.0e-5}}\nrollout: {group_size: 4}\n")
    (tmp_path / "child.yaml").write_text("defaults: [base.yaml]\ntrain: {steps: 9}\nmodel: {hf_path: /x}\n")
    cfg = load_run_config(tmp_path / "child.yaml", ["rollout.temperature=0.7", "algorithm.p_schedule.kind=cos"])
    assert cfg.train.steps == 9 and cfg.train.optimizer.lr == 1e-5 and cfg.rollout.group_size == 4
    assert cfg.rollout.temperature == 0.7 and cfg.algorithm.p_schedule.kind == "cos"


def test_paper_math_setting_in_7b_recipe():
    cfg = load_run_config("examples/recipes/deepseek-r1-distill-qwen-7b.yaml")
    assert (cfg.train.optimizer.lr, cfg.rollout.group_size, cfg.train.prompts_per_step) == (1e-6, 8, 128)
    assert (cfg.algorithm.loss_options.clip_low, cfg.algorithm.regularizers.kl_coef, cfg.rollout.temperature) == (0.2, 0.0, 1.0)
    assert (cfg.rollout.max_new_tokens, cfg.rollout.max_prompt_tokens) == (3000, 1024)
    s = cfg.algorithm.p_schedule
    assert (s.kind, s.p_max, s.p_min, s.schedule_steps) == ("linear_dec", 2.0, -2.0, 500)
    assert cfg.eval.every == 16 and cfg.eval.sampled_benchmarks == ["aime25"] and cfg.eval.sampled_n == 8
    assert cfg.data.train == "math_lvl3to5_8k"


BAD = [
    ({"trian": {}}, "unknown key 'trian'; did you mean 'train'"),
    ({"train": {"stpes": 3}}, "unknown key 'train.stpes'; did you mean 'steps'"),
    ({"train": {"steps": "ten"}}, "train.steps: expected an integer"),
    ({"train": {"steps": 0}}, "train.steps must be >= 1"),
    ({"train": {"optimizer": {"lr": -1.0}}}, "train.optimizer: lr must be > 0"),
    ({"train": {"lr": 1.0}}, "unknown key 'train.lr'"),
    ({"rollout": {"temperature": "hot"}}, "rollout.temperature: expected a number"),
    ({"rollout": {"temperature": 0.0}}, "rollout.temperature must be > 0"),
    ({"rollout": {"group_size": 1}}, "rollout.group_size must be >= 2"),
    ({"rollout": {"top_p": 1.5}}, "rollout.top_p must be in"),
    ({"rollout": {"mode": "remote"}}, "rollout.mode: 'remote' is not allowed"),
    ({"rollout": {"weight_sync": "nfs"}}, "rollout.weight_sync: 'nfs' is not allowed"),
    ({"algorithm": {"loss": "ppo"}}, "algorithm.loss 'ppo' is not one of"),
    ({"algorithm": {"options": {"variant": "tok"}}}, "algorithm.options: variant must be one of"),
    ({"algorithm": {"options": {"clip_low": 1.5}}}, "algorithm.options: clip_low must be in"),
    ({"algorithm": {"loss": "grpo", "options": {"variant": "seq"}}},
     "algorithm.options: policy loss 'grpo' does not take option 'variant'; it takes: clip_low, clip_high, "
     "dual_clip, aggregation"),
    ({"algorithm": {"loss": "gmpo", "options": {"dual_clip": 3.0}}}, "does not take option 'dual_clip'"),
    ({"algorithm": {"options": {"p": 2.0}}}, "algorithm.options.p is set per step by algorithm.p_schedule"),
    ({"algorithm": {"loss": "dr_grpo", "options": {"max_len": 0}}}, "algorithm.options: max_len must be"),
    ({"algorithm": {"clip_low": 0.2}}, "unknown key 'algorithm.clip_low'"),
    ({"algorithm": {"p_schedule": {"kind": "exp"}}}, "algorithm.p_schedule: schedule kind must be one of"),
    ({"algorithm": {"p_schedule": {"kind": "linear", "p_min": 3, "p_max": 1}}}, "p_min"),
    ({"algorithm": {"regularizers": {"kl_estimator": "k9"}}}, "algorithm.regularizers: kl_estimator must be one of"),
    ({"algorithm": {"regularizers": {"kl_coef": -1.0}}}, "algorithm.regularizers: kl_coef and entropy_coef must be >= 0"),
    ({"parallel": {"tp": 2, "nproc_per_node": 3}}, "world size nnodes\\*nproc_per_node = 3 is not divisible"),
    ({"parallel": {"tp": 0}}, "parallel.tp must be >= 1"),
    ({"parallel": {"vpp": 2}}, "parallel.vpp must be null or >= 2 with pp >= 2"),
    ({"parallel": {"sequence_parallel": True}}, "parallel.sequence_parallel needs tp > 1"),
    ({"train": {"prompts_per_step": 3}, "rollout": {"group_size": 3}, "parallel": {"nproc_per_node": 2}},
     "samples per step must be divisible by data-parallel size"),
    ({"train": {"token_budget": 100}}, "train.token_budget=100 must hold one full sequence"),
    ({"train": {"share_prompts": True, "pack": False}}, "train.share_prompts=true needs train.pack=true"),
    ({"train": {"share_prompts": True}, "parallel": {"cp": 2, "nproc_per_node": 2}},
     "train.share_prompts=true does not combine with parallel.cp=2"),
    ({"train": {"share_prompts": True}, "agent": {"env": "alfworld"}}, "train.share_prompts=true is for single-turn"),
    ({"model": {"hf_path": "", "name": ""}}, "model.hf_path .* must be set"),
    ({"eval": {"every": -1}}, "eval.every must be >= 0"),
    ({"checkpoint": {"keep_last": 0}}, "checkpoint.keep_last must be >= 1"),
    ({"logging": {"tensorboard": "yes"}}, "logging.tensorboard: expected true/false"),
    ({"logging": {"log_every": 0}}, "logging.log_every must be an int >= 1"),
    ({"data": {"reward": "bleu"}}, r"data.reward: unknown reward 'bleu'; allowed: \['exact_int', 'math'.*\] or an import path"),
    ({"agent": {"env": "minecraft"}}, "agent.env 'minecraft' is not one of"),
    ({"agent": {"env": "alfworld", "train_split": "test"}}, "agent.train_split 'test' is not one of"),
    ({"agent": {"eval_splits": ["valid_seen", "seen"]}}, "agent.eval_splits entry 'seen' is not one of"),
    ({"agent": {"num_workers": 0}}, "agent.num_workers must be >= 1"),
    ({"agent": {"play": {"max_turns": 0}}}, "agent.play: AgentConfig.max_turns=0 is invalid"),
    ({"agent": {"max_turns": 3}}, "unknown key 'agent.max_turns'"),
    ({"agent": {"step_timeout_s": 0}}, "agent.step_timeout_s and agent.episode_timeout_s must be > 0"),
    ({"agent": {"games_limit": 0}}, "agent.games_limit must be null or >= 1"),
    # refused up front (issue 14): each names its key
    ({"data": {"prompt_template": "qwen-math"}}, "data.prompt_template 'qwen-math' is not one of"),
    ({"data": {"answer_template": "boxed"}}, "data.answer_template 'boxed' is not one of"),
    ({"data": {"max_dropped_prompt_fraction": 1.0}}, "data.max_dropped_prompt_fraction must be in"),
    ({"data": {"reward_batch_timeout_s": 0}}, "data.reward_batch_timeout_s must be null or > 0"),
    ({"eval": {"every": 10}}, "eval.every=10, eval.at_start=False but eval.benchmarks and eval.sampled_benchmarks "
                              "are empty"),
    ({"eval": {"at_start": True}}, "eval.at_start=True but eval.benchmarks"),
    ({"rollout": {"mode": "servers", "server_urls": ["localhost:30000"]}},
     "rollout.server_urls\\[0\\] 'localhost:30000' is not a server URL"),
    ({"rollout": {"mode": "servers", "server_urls": ["http://h:30000", "http//h:30001"]}},
     "rollout.server_urls\\[1\\] 'http//h:30001' is not a server URL"),
    ({"rollout": {"mode": "servers", "server_urls": ["http://h:port"]}}, "rollout.server_urls\\[0\\]"),
    ({"rollout": {"api_key": ""}}, "rollout.api_key must be null or a non-empty key"),
    ({"rollout": {"engine_cpu_threads": 0}}, "rollout.engine_cpu_threads must be null or >= 1, got 0"),
    ({"rollout": {"kv_cache_tokens": 0}}, "rollout.kv_cache_tokens must be null or an int >= 1, got 0"),
    ({"rollout": {"ignore_eos": "sometimes"}}, "rollout.ignore_eos: expected true/false"),
    ({"train": {"recompute": "selective"}}, "train.recompute='selective' is not supported; supported: none, full"),
    # the engine's log-probs as old ones only behind the drift guard (issue 17)
    ({"rollout": {"use_rollout_logprobs": True}}, "rollout.use_rollout_logprobs=true trains on the engine's "
                                                  "log-probs unchecked: set rollout.drift_max"),
    ({"rollout": {"drift_max": 0}}, "rollout.drift_max must be null or a finite number of nats > 0, got 0"),
    ({"rollout": {"drift_max": float("inf")}}, "rollout.drift_max must be null or a finite number"),
    ({"rollout": {"drift_action": "ignore"}}, "rollout.drift_action"),
    ({"train": {"reuse_training_logprobs": "yes"}}, "train.reuse_training_logprobs: expected true/false"),
]


@pytest.mark.parametrize("data,match", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_configs_are_rejected_naming_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(RunConfig, data)


def test_layout_against_the_model_and_paths(tmp_path):
    cfg = from_dict(RunConfig, {"model": {"hf_path": "builtin:smollm2-135m-instruct"},
                                "parallel": {"tp": 2, "nproc_per_node": 2}})
    arch = arch_for_plan(cfg)  # SmolLM2: 9 heads, 3 kv heads, 30 layers
    with pytest.raises(ConfigError, match="num_attention_heads=9 is not divisible by tensor_parallel=2"):
        validate_run(cfg, arch, check_paths=False)
    cfg = from_dict(RunConfig, {"model": {"hf_path": str(tmp_path / "nope")}, "data": {"train": "arithmetic"}})
    with pytest.raises(ConfigError, match="model.hf_path .* is neither a directory nor a Hugging Face Hub id"):
        validate_run(cfg, None)
    cfg = from_dict(RunConfig, {"data": {"train": "no_such_set", "data_dir": str(tmp_path)}})
    with pytest.raises(ConfigError, match="data.train 'no_such_set' is neither"):
        validate_run(cfg, None)


def test_plan_refuses_what_cannot_fit():
    cfg = load_run_config("examples/recipes/llama-3.1-70b.yaml", ["parallel.tp=1", "parallel.pp=1", "parallel.nnodes=1",
                                                                  "parallel.nproc_per_node=1",
                                                                  "parallel.sequence_parallel=false"])
    mp = plan_run(cfg, arch_for_plan(cfg))
    assert not mp.fits and mp.training_gib > 500


def test_unknown_yaml_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_run_config("examples/recipes/tiny-cpu.yaml", ["train.steps"])


def test_actor_settings_carry_the_run_constants_and_the_rollout_temperature():
    cfg = load_run_config("examples/recipes/tiny-cpu.yaml", ["rollout.temperature=0.7", "algorithm.loss=dr_grpo",
                                                               "algorithm.options={clip_high: 0.3}"])
    s = cfg.actor_settings()
    assert (s.token_budget, s.pack, s.loss, s.temperature, s.generation_budget) == (512, True, "dr_grpo", 0.7, 32)
    assert s.loss_options.clip_high == 0.3 and s.loss_options.max_len is None
    # the per-step p reaches the holder options only
    holder = load_run_config("examples/recipes/tiny-cpu.yaml").actor_settings().loss_options
    assert holder.at_p(-1.0).p == -1.0 and s.loss_options.at_p(-1.0) is s.loss_options


def test_engine_threads_and_ignore_eos_reach_the_engine_and_its_environment():
    from holderpo_megatron.rollout.sglang_launcher import sglang_env
    from holderpo_megatron.trainer.config import engine_config

    cfg = load_run_config("examples/recipes/tiny-cpu.yaml", ["rollout.ignore_eos=true"])
    assert cfg.rollout.ignore_eos is True
    assert engine_config(cfg, ".").cpu_threads == 2  # the recipe's: both cores while the ranks wait
    assert engine_config(load_run_config("examples/recipes/tiny-cpu.yaml", ["rollout.engine_cpu_threads=null"]),
                         ".").cpu_threads is None  # unset: the rank's own count
    e = engine_config(load_run_config("examples/recipes/tiny-cpu.yaml", ["rollout.engine_cpu_threads=3"]), ".")
    assert e.cpu_threads == 3
    assert sglang_env("cpu", base={"OMP_NUM_THREADS": "1"}, cpu_threads=3)["OMP_NUM_THREADS"] == "3"
    assert sglang_env("cpu", base={"OMP_NUM_THREADS": "1"})["OMP_NUM_THREADS"] == "1"
    # a fixed KV cache reaches SGLang as max_total_tokens; unset, SGLang sizes it from mem_fraction_static
    assert "max_total_tokens" not in engine_config(cfg, ".").server_args_dict()
    kv = engine_config(load_run_config("examples/recipes/arith-hard-cpu.yaml"), ".").server_args_dict()
    assert kv["max_total_tokens"] == 16384 and kv["mem_fraction_static"] == 0.3


def test_embedded_mode_is_one_engine_a_fleet_needs_servers():
    from holderpo_megatron.trainer.config import run_placement

    cfg = load_run_config("examples/recipes/tiny-cpu.yaml", ["parallel.pp=1", "rollout.engines_per_node=2"])
    with pytest.raises(ConfigError, match="rollout.mode=embedded runs one in-process engine, but the placement has "
                                          "2 engines: set rollout.mode=servers"):
        validate_run(cfg, arch_for_plan(cfg), check_paths=False)
    # unset: one engine when embedded (rank 0), every slot when servers (one per replica here)
    cfg = load_run_config("examples/recipes/tiny-cpu.yaml", ["parallel.pp=1", "rollout.engines_per_node=null"])
    validate_run(cfg, arch_for_plan(cfg), check_paths=False)
    assert [e.owner_rank for e in run_placement(cfg).engines] == [0]
    cfg = load_run_config("examples/recipes/tiny-cpu.yaml", ["parallel.pp=1", "rollout.engines_per_node=null",
                                                             "rollout.mode=servers"])
    validate_run(cfg, arch_for_plan(cfg), check_paths=False)
    assert [e.owner_rank for e in run_placement(cfg).engines] == [0, 1]


# ------------------------------------------------------------------ refused up front (issue 14)
def test_yaml_exponent_floats_are_numbers_and_loader_errors_are_one_line(tmp_path):
    (tmp_path / "r.yaml").write_text("train: {optimizer: {lr: 1e-6, weight_decay: 1E-2}}\nrollout: {temperature: 7e-1}\n")
    cfg = load_run_config(tmp_path / "r.yaml", ["train.optimizer.adam_eps=1e-9"])
    o = cfg.train.optimizer
    assert (o.lr, o.weight_decay, cfg.rollout.temperature, o.adam_eps) == (1e-6, 1e-2, 0.7, 1e-9)
    (tmp_path / "d.yaml").write_text("defaults: 5\n")
    with pytest.raises(ConfigError, match=r"d.yaml: defaults must be a file name or a list of file names \(relative to this file\), got 5"):
        load_run_config(tmp_path / "d.yaml")
    (tmp_path / "d2.yaml").write_text("defaults: [{a: 1}]\n")
    with pytest.raises(ConfigError, match="defaults must be a file name or a list"):
        load_run_config(tmp_path / "d2.yaml")
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not UTF-8 text \\(byte 0xe9 at offset 9\\)"):
        load_run_config(tmp_path / "latin1.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(tmp_path / "bad.yaml")
    assert "\n" not in str(e.value)


def _math_root(tmp_path, sets: dict[str, list[dict]]):
    import json

    for name, rows in sets.items():
        (tmp_path / "data" / "math" / name).mkdir(parents=True)
        (tmp_path / "data" / "math" / name / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "data")


def test_data_sets_and_benchmarks_are_checked_before_launch(tmp_path, monkeypatch):
    root = _math_root(tmp_path, {"good": [{"problem": "1+1?", "answer": "2"}],
                                 "math500": [{"problem": "2+2?", "answer": "4"}],
                                 "renamed": [{"problem": "1+1?", "solution": "2"}, {"problem": "2+2?", "final": "4"}],
                                 "empty": []})

    def cfg(**data):
        e = data.pop("eval", {})
        return from_dict(RunConfig, {"data": {"data_dir": root, **data}, "eval": e})

    validate_run(cfg(train="good", eval={"every": 5, "benchmarks": ["math500"]}), None)
    with pytest.raises(ConfigError, match="data.train 'renamed' .* has no usable items: all 2 rows lack an 'answer' "
                       "or 'answers' field with a value \\(a row's fields: problem, solution\\)"):
        validate_run(cfg(train="renamed"), None)
    with pytest.raises(ConfigError, match="data.train 'empty' .* has no usable items: the file has no rows"):
        validate_run(cfg(train="empty"), None)
    with pytest.raises(ConfigError, match="eval.benchmarks entry 'math5000' is not a set under .*there: empty, good, "
                       "math500, renamed"):
        validate_run(cfg(train="good", eval={"every": 5, "benchmarks": ["math500", "math5000"]}), None)
    with pytest.raises(ConfigError, match="eval.sampled_benchmarks entry 'aime26'"):
        validate_run(cfg(train="good", eval={"every": 5, "sampled_benchmarks": ["aime26"]}), None)
    # a ./math500 folder in the working directory would shadow the shared set
    monkeypatch.chdir(tmp_path)
    (tmp_path / "math500").mkdir()
    (tmp_path / "math500" / "data.jsonl").write_text('{"problem": "local", "answer": "0"}\n')
    with pytest.raises(ConfigError, match="data.train 'math500': math set 'math500' is ambiguous: it names the shared "
                       "set .* and the folder .*math500 in the working directory; write ./math500 for the folder"):
        validate_run(cfg(train="math500"), None)
    validate_run(cfg(train="./math500"), None)


def test_eval_requests_must_fit_the_model_context():
    cfg = load_run_config("examples/recipes/qwen2.5-math-7b.yaml", ["eval.max_new_tokens=4096"])
    with pytest.raises(ConfigError, match="eval.max_new_tokens=4096: an evaluation request of "
                       "rollout.max_prompt_tokens=1024 \\+ 4096 new tokens = 5120 exceeds the model's "
                       "max_position_embeddings=4096; lower eval.max_new_tokens to 3072"):
        validate_run(cfg, arch_for_plan(cfg), check_paths=False)
    cfg = load_run_config("examples/recipes/deepseek-r1-distill-qwen-7b.yaml")
    # the engine is started with room for evaluation's longer answers, not only the training ones
    assert cfg.engine_context_length == 1024 + 4096
    assert load_run_config("examples/recipes/deepseek-r1-distill-qwen-7b.yaml",
                           ["eval.every=0"]).engine_context_length == 1024 + 3000


def test_api_key_is_redacted_from_run_records():
    cfg = from_dict(RunConfig, {"rollout": {"mode": "servers", "server_urls": ["http://h:1"], "api_key": "s3cret"}})
    assert cfg.public_dict()["rollout"]["api_key"] == "<redacted>"
    assert "s3cret" not in repr(cfg)


def test_a_crafted_megatron_load_checkpoint_is_refused_before_launch(tmp_path):
    from holderpo_megatron.checkpoint.dist_ckpt import FORMAT, FORMAT_VERSION, MARKER
    from tests.crafted import exploit_pickle

    flag = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / MARKER).write_text(f'{{"format": "{FORMAT}", "version": {FORMAT_VERSION}}}')
    (ckpt / ".metadata").write_bytes(exploit_pickle(flag))
    cfg = from_dict(RunConfig, {"model": {"hf_path": "builtin:smollm2-135m-instruct", "megatron_load": str(ckpt)},
                                "data": {"train": "arithmetic"}})
    with pytest.raises(ConfigError, match="model.megatron_load: .*refused to load: it asks for posix.system"):
        validate_run(cfg, None)
    assert not flag.exists()

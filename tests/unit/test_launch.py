"""`holderpo train` before any process starts: the run directory's lock, a complete or ambiguous
resume, prompt lengths against the engine's limits (issue 14). Nothing here starts torchrun."""

import json
import logging
import os
import socket

import pytest

from holderpo_megatron import cli
from holderpo_megatron.checkpoint.train_state import TrainStateDirectory
from holderpo_megatron.trainer.config import ConfigError, RunConfig
from holderpo_megatron.trainer.config_loader import from_dict
from holderpo_megatron.trainer.data_checks import check_prompt_lengths, train_prompt_items
from holderpo_megatron.trainer.run_guard import RunDirectoryBusy, acquire_run_lock, hold_run_lock


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.integration.tiny_llama import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _recipe(tmp_path, model, **extra) -> str:
    body = {
        "name": "r", "output_dir": str(tmp_path / "runs"), "hardware": "test",
        "model": {"hf_path": str(model), "dtype": "fp32"},
        "parallel": {"nproc_per_node": 1},
        "rollout": {"group_size": 2, "max_prompt_tokens": 48, "max_new_tokens": 8},
        "train": {"steps": 3, "prompts_per_step": 2, "token_budget": 256},
        "data": {"train": "arithmetic", "prompt_template": "plain", "reward": "exact_int", "answer_template": "plain"},
        "logging": {"tensorboard": False, "progress": False},
    }
    for k, v in extra.items():
        body[k] = {**body.get(k, {}), **v}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return str(path)


def test_a_second_run_on_a_locked_directory_is_refused_naming_the_holder(tmp_path, tiny_model, capsys):
    recipe = _recipe(tmp_path, tiny_model)
    with acquire_run_lock(tmp_path / "runs" / "r"):
        rc = cli.main(["train", "--config", recipe])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err, err
        assert err.startswith(f"holderpo train: run directory {tmp_path / 'runs' / 'r'} is in use by another run: "
                              f"PID {os.getpid()} on host {socket.gethostname()}"), err
        with pytest.raises(RunDirectoryBusy):
            hold_run_lock(tmp_path / "runs" / "r")  # a worker of another launcher: refused too
        os.environ["HOLDERPO_RUN_LOCK_OWNER"] = str(os.getpid())
        try:
            assert hold_run_lock(tmp_path / "runs" / "r") is None  # a worker of this launcher: it is ours
        finally:
            del os.environ["HOLDERPO_RUN_LOCK_OWNER"]
    with acquire_run_lock(tmp_path / "runs" / "r") as lock:  # released: free again
        assert f"pid={os.getpid()} " in lock.path.read_text()


def _commit_fake_state(root, step):
    d = TrainStateDirectory(root)
    tmp = d.staging(step)
    (tmp / "w.bin").write_bytes(b"w")
    d.commit(tmp, step, {"extra": {}})


def test_resuming_a_complete_run_says_so_and_starts_nothing(tmp_path, tiny_model, capsys):
    recipe = _recipe(tmp_path, tiny_model)
    run = tmp_path / "runs" / "r"
    _commit_fake_state(run / "checkpoints", 3)
    (run / "hf").mkdir(parents=True)
    (run / "hf" / "config.json").write_text("{}")
    assert cli.main(["train", "--config", recipe, "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"run {run} is complete: its last state step_00000003 is step 3 of train.steps=3; its model is exported " \
           f"to {run / 'hf'}. Nothing to do" in out
    assert "launching" not in out


def test_an_ambiguous_checkpoint_root_is_refused_before_launch(tmp_path, tiny_model, capsys):
    recipe = _recipe(tmp_path, tiny_model)
    root = tmp_path / "runs" / "r" / "checkpoints"
    _commit_fake_state(root, 1)
    (root / "step_00000002").mkdir()  # copied in by hand
    assert cli.main(["train", "--config", recipe]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "latest names step_00000001, but newer step directories are there: step_00000002" \
        in err, err
    assert (root / "step_00000002").is_dir()


class _WordTokenizer:
    """One token per word; the chat template adds 3 tokens."""

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return "<user> " + " ".join(m["content"] for m in messages) + " <assistant> :"

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[0] * len(t.split()) for t in texts]}


def _math_set(tmp_path, name, problems):
    d = tmp_path / "data" / "math" / name
    d.mkdir(parents=True)
    rows = [{"problem": p, "answer": "1"} for p in problems] + [{"problem": "no answer here", "answer": None}]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "data")


def test_overlong_training_prompts_are_dropped_counted_and_refused_over_the_fraction(tmp_path, caplog):
    root = _math_set(tmp_path, "train", ["short one"] * 97 + ["word " * 60] * 3)
    cfg = from_dict(RunConfig, {"rollout": {"max_prompt_tokens": 48, "max_new_tokens": 8},
                                "train": {"token_budget": 256},
                                "data": {"train": "train", "data_dir": root, "max_dropped_prompt_fraction": 0.05}})
    with caplog.at_level(logging.WARNING, logger="holderpo"):
        items = train_prompt_items(cfg, None, tokenizer=_WordTokenizer())
    assert len(items) == 97
    assert "3 of 100 prompts (3.00%) are longer than rollout.max_prompt_tokens=48 (longest 75 tokens" in caplog.text
    assert "1 of 101 rows skipped (no usable answer)" in caplog.text
    cfg.data.max_dropped_prompt_fraction = 0.01
    with pytest.raises(ConfigError, match=r"data.train 'train': 3 of 100 prompts .* more than "
                       r"data.max_dropped_prompt_fraction=0.01 would be dropped"):
        check_prompt_lengths(cfg, None, tokenizer=_WordTokenizer())


def test_eval_prompts_that_cannot_fit_the_engine_context_are_refused(tmp_path):
    root = _math_set(tmp_path, "bench", ["short"] * 3 + ["word " * 50])
    cfg = from_dict(RunConfig, {"rollout": {"max_prompt_tokens": 48, "max_new_tokens": 8},
                                "train": {"token_budget": 256},
                                "data": {"train": "arithmetic", "data_dir": root},
                                "eval": {"every": 5, "benchmarks": ["bench"], "max_new_tokens": 16}})
    assert cfg.engine_context_length == 48 + 16
    with pytest.raises(ConfigError, match=r"eval.benchmarks entry 'bench': 1 of 4 prompts are longer than 48 tokens "
                       r"\(longest 65\), so with eval.max_new_tokens=16 they exceed the engine's context of 64 tokens"):
        check_prompt_lengths(cfg, None, tokenizer=_WordTokenizer())
    cfg.eval.limit = 3  # the long one is not evaluated
    check_prompt_lengths(cfg, None, tokenizer=_WordTokenizer())

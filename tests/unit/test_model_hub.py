"""Hub model ids (``model.hf_path: org/name``) resolve through huggingface_hub's cache.

No download can run here, so the cache is laid out by huggingface_hub's own cache functions (blob
store, snapshot links, refs) and checked with its ``scan_cache_dir`` before our code reads it; every
case runs in a fresh interpreter, since huggingface_hub reads HF_HOME and HF_HUB_OFFLINE at import.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAIN, V1 = "a" * 40, "b" * 40  # the commits of branch main and of tag v1

PREPARE = """
import hashlib, shutil, sys
from pathlib import Path
from huggingface_hub import constants, scan_cache_dir
from huggingface_hub.file_download import _cache_commit_hash_for_specific_revision, _create_symlink, repo_folder_name

def add_snapshot(repo_id, src, commit, revision):
    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    for f in sorted(Path(src).iterdir()):
        data = f.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        (storage / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(storage / "snapshots" / commit / f.name), new_blob=False)
    _cache_commit_hash_for_specific_revision(str(storage), revision, commit)

src, model_v1 = sys.argv[1], sys.argv[2]
add_snapshot("tiny-org/tiny-llama", src, "%(main)s", "main")
add_snapshot("tiny-org/tiny-llama", model_v1, "%(v1)s", "v1")
info = scan_cache_dir()
repos = {r.repo_id: r for r in info.repos}
revs = {r.commit_hash: sorted(r.refs) for r in repos["tiny-org/tiny-llama"].revisions}
assert revs == {"%(main)s": ["main"], "%(v1)s": ["v1"]}, revs
print("prepared", info.warnings)
""" % {"main": MAIN, "v1": V1}


def _py(code: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory):
    from tests.integration.tiny_llama import save_tiny_llama

    tmp = tmp_path_factory.mktemp("hub")
    model = save_tiny_llama(tmp / "model")
    v1 = save_tiny_llama(tmp / "model_v1", seed=1)
    cfg = json.loads((v1 / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # tells the revisions apart
    (v1 / "config.json").write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1")
    res = _py(PREPARE, env, str(model), str(v1))
    assert res.returncode == 0 and "prepared" in res.stdout, res.stderr
    return env, tmp


def test_a_hub_id_resolves_from_the_cache_offline_at_each_revision(hub_env):
    env, tmp = hub_env
    res = _py(f"""
        import json
        from holderpo_megatron.models.builtin import resolve_model_path
        for rev in (None, "v1", "{MAIN}"):
            for download in (True, False):
                p = resolve_model_path("tiny-org/tiny-llama", revision=rev, download=download)
                print(rev, download, p, json.loads((p / "config.json").read_text())["num_hidden_layers"])
    """, env)
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()]
    hub = Path(env["HF_HOME"]) / "hub" / "models--tiny-org--tiny-llama" / "snapshots"
    layers = json.loads((tmp / "model" / "config.json").read_text())["num_hidden_layers"]
    assert [(r[0], r[2], int(r[3])) for r in rows[::2]] == [
        ("None", str(hub / MAIN), layers), ("v1", str(hub / V1), 3), (MAIN, str(hub / MAIN), layers)]
    assert [r[2] for r in rows[::2]] == [r[2] for r in rows[1::2]]  # the workers' cache-only read agrees


def test_offline_without_the_model_fails_with_one_clear_line(hub_env):
    env, _ = hub_env
    res = _py("""
        from holderpo_megatron.models.builtin import resolve_model_path
        for spec, rev, dl in (("other-org/absent", None, True), ("tiny-org/tiny-llama", "v9", True),
                              ("other-org/absent", None, False)):
            try:
                resolve_model_path(spec, revision=rev, download=dl)
            except ValueError as e:
                print(e)
    """, env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    cache = str(Path(env["HF_HOME"]) / "hub")
    assert len(lines) == 3, lines
    assert lines[0].startswith("model.hf_path 'other-org/absent' is not in the Hugging Face cache " + cache)
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in lines[0]
    assert lines[1].startswith("model.hf_path 'tiny-org/tiny-llama' (model.revision 'v9') is not in the")
    assert "`holderpo train` downloads it before the workers start" in lines[2]


def test_holderpo_train_refuses_an_uncached_hub_id_offline_before_any_process_starts(hub_env, tmp_path):
    env, _ = hub_env
    recipe = tmp_path / "r.yaml"
    base = (f"output_dir: {tmp_path / 'runs'}\nlogging: {{tensorboard: false}}\n"
            "data: {train: arithmetic, arithmetic_max_operand: 9, prompt_template: plain, answer_template: plain}\n"
            "rollout: {max_prompt_tokens: 48, max_new_tokens: 12}\neval: {max_new_tokens: 16}\n")
    recipe.write_text("model: {hf_path: other-org/absent}\n" + base)
    cmd = [sys.executable, "-m", "holderpo_megatron.cli", "train", "--config", str(recipe)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("holderpo train: bad config: model.hf_path 'other-org/absent' is not"), err
    assert "launching" not in res.stdout
    # a cached one passes validation (a dry run reads its config and tokenizer from the cache)
    recipe.write_text("model: {hf_path: tiny-org/tiny-llama, revision: v1}\n" + base)
    res = subprocess.run(cmd + ["--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "launching (node 0 of 1)" in res.stdout, res.stdout + res.stderr


def test_revision_is_for_hub_ids_only(tmp_path):
    from holderpo_megatron.trainer.config import ConfigError, RunConfig, from_dict, validate_run

    with pytest.raises(ConfigError, match="model.revision 'v1' applies to a Hugging Face Hub id, not to 'builtin:"):
        from_dict(RunConfig, {"model": {"hf_path": "builtin:smollm2-135m-instruct", "revision": "v1"}})
    with pytest.raises(ConfigError, match="model.revision must be a branch, tag or commit hash"):
        from_dict(RunConfig, {"model": {"hf_path": "org/name", "revision": " "}})
    cfg = from_dict(RunConfig, {"model": {"hf_path": str(tmp_path), "revision": "v1"}, "data": {"train": "arithmetic"}})
    with pytest.raises(ConfigError, match="model.hf_path .* is a local directory"):
        validate_run(cfg, None)


def test_what_counts_as_a_hub_id(tmp_path, monkeypatch):
    from holderpo_megatron.models.hub import is_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert is_hub_id("Qwen/Qwen2.5-7B-Instruct") and is_hub_id("org/name")
    assert not is_hub_id("models/mine")  # a local directory wins
    for spec in ("/abs/path", "./org/name", "~/m", "a/b/c", "builtin:smollm2-135m-instruct", "name", "org/na me", ""):
        assert not is_hub_id(spec), spec


def test_plan_reads_a_cached_hub_id_and_knows_public_ones_without_a_download(hub_env):
    env, tmp = hub_env
    layers = json.loads((tmp / "model" / "config.json").read_text())["num_hidden_layers"]
    res = _py("""
        from holderpo_megatron.trainer.config import ConfigError, RunConfig, from_dict
        from holderpo_megatron.trainer.plan import arch_for_plan
        for hf, rev in (("tiny-org/tiny-llama", "v1"), ("tiny-org/tiny-llama", None), ("Qwen/Qwen2.5-32B", None),
                        ("other-org/absent", None)):
            try:
                print(arch_for_plan(from_dict(RunConfig, {"model": {"hf_path": hf, "revision": rev}})).num_layers)
            except ConfigError as e:
                print(e)
    """, env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[:3] == ["3", str(layers), "64"], lines  # v1 has 3 layers; Qwen2.5-32B from the known configs
    assert lines[3].startswith("model: the Hub id model.hf_path='other-org/absent' is not in the Hugging Face cache")

"""The embedded (in-process) SGLang engine on CPU against transformers, and weight sync into it.

One engine for the whole module (start-up ~20-40 s on CPU). The model is a tiny random Llama in
float32, so greedy decoding and log-probs must match transformers closely.
"""

import os
import time

import pytest
import torch

from tests.integration.tiny_llama import (EOS, hf_greedy, hf_model, hf_sequence_logprobs, require_sglang,
                                          save_tiny_llama)

pytestmark = pytest.mark.integration
require_sglang()

from holderpo_megatron.rollout import SamplingParams, SGLangEngine, SGLangEngineConfig  # noqa: E402

PROMPTS = [[1, 5, 6, 7], [1, 9, 10], [1, 200, 31, 77, 12, 19], [44]]
CPU_THREADS = 3  # not this process's count, so the test sees it reach the engine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def engine(model_dir):
    t0 = time.perf_counter()
    omp_before = os.environ.get("OMP_NUM_THREADS")
    eng = SGLangEngine(SGLangEngineConfig(model_path=str(model_dir), dtype="float32", cpu_threads=CPU_THREADS))
    print(f"embedded SGLang engine started in {time.perf_counter() - t0:.1f} s")
    # the engine's OMP_NUM_THREADS is its children's, not ours
    assert os.environ.get("OMP_NUM_THREADS") == omp_before
    # SGLang's scheduler publishes its load in a /dev/shm file named after this engine and never
    # removes it; our shutdown does (and only that one)
    snapshots = [b.load_snapshot_path() for b in eng._backends]
    assert snapshots and all(p and os.path.exists(p) for p in snapshots), snapshots
    yield eng
    eng.shutdown()
    assert not any(os.path.exists(p) for p in snapshots), snapshots


@pytest.fixture(scope="module")
def reference(model_dir):
    return hf_model(model_dir)


def test_cpu_engine_processes_get_their_thread_count(engine):
    envs = []
    for pid in engine._backends[0]._engine_pids:
        with open(f"/proc/{pid}/environ", "rb") as f:
            envs.append(dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv))
    assert envs and all(e.get(b"OMP_NUM_THREADS") == str(CPU_THREADS).encode() for e in envs), \
        [e.get(b"OMP_NUM_THREADS") for e in envs]


def test_greedy_tokens_and_logprobs_equal_transformers(engine, reference):
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=12))
    for prompt, (s,) in zip(PROMPTS, out):
        want = hf_greedy(reference, prompt, 12)
        assert s.output_ids == want, f"prompt {prompt}: engine {s.output_ids} vs transformers {want}"
        ref = hf_sequence_logprobs(reference, prompt + s.output_ids)[len(prompt) - 1:]
        err = (s.logprobs.double() - ref).abs().max().item()
        assert err <= 1e-3, f"prompt {prompt}: log-prob max abs diff {err:.2e}"
        assert s.finish_reason == ("stop" if want[-1] == EOS else "length")
        assert s.weight_version == engine.weight_version


def test_sampled_logprobs_are_the_models_and_n_samples_per_prompt(engine, reference):
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=6, ignore_eos=True)
    out = engine.generate(PROMPTS[:2], params)
    assert [len(row) for row in out] == [3, 3]
    for i, row in enumerate(out):
        for j, s in enumerate(row):
            assert (s.prompt_index, s.sample_index) == (i, j)
            assert len(s.output_ids) == 6 and s.finish_reason == "length"
            ref = hf_sequence_logprobs(reference, s.prompt_ids + s.output_ids)[len(s.prompt_ids) - 1:]
            assert (s.logprobs.double() - ref).abs().max().item() <= 1e-3
            assert s.timing["latency_s"] > 0


def test_stop_token_ends_a_sample_with_finish_reason_stop(engine, reference):
    prompt = PROMPTS[0]
    greedy = hf_greedy(reference, prompt, 8)
    stop_at = greedy[2]
    (s,), = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=(stop_at,)))
    first = greedy.index(stop_at)
    assert s.finish_reason == "stop"
    # the matched stop token (EOS likewise) stays in output_ids with its log-prob: the trainer's
    # sequence is prompt + output_ids, and a policy learns to stop only if that token is trained on
    assert s.output_ids == greedy[: first + 1] and s.logprobs.numel() == first + 1
    ref = hf_sequence_logprobs(reference, prompt + s.output_ids)[len(prompt) - 1:]
    assert (s.logprobs.double() - ref).abs().max().item() <= 1e-3


def test_text_prompts_go_through_the_tokenizer(engine):
    (by_text,), = engine.generate(["w5 w6 w7"], SamplingParams(temperature=0.0, max_new_tokens=5))
    (by_ids,), = engine.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_new_tokens=5))
    assert by_text.prompt_ids == [5, 6, 7]
    assert by_text.output_ids == by_ids.output_ids
    assert isinstance(by_text.text, str)


def test_score_equals_transformers(engine, reference):
    seqs = [[1, 5, 6, 7, 8, 9, 100, 3], [1, 300, 301]]
    for seq, lp in zip(seqs, engine.score(seqs)):
        assert (lp.double() - hf_sequence_logprobs(reference, seq)).abs().max().item() <= 1e-3


@pytest.mark.parametrize("transport", ["tensor", "distributed", "disk"])
def test_weight_sync_from_a_state_dict_every_transport(engine, reference, model_dir, transport):
    """New weights through each transport: the engine holds them exactly, generates like transformers
    with them, and stamps the new version on its samples."""
    from holderpo_megatron.models import ModelArch
    from holderpo_megatron.weight_sync import StateDictSource, make_weight_synchronizer

    arch = ModelArch.from_pretrained_dir(model_dir)
    version = engine.weight_version + 1
    g = torch.Generator().manual_seed(version)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in reference.state_dict().items()}
    sync = make_weight_synchronizer(StateDictSource(new, arch), engine, dtype=torch.float32, transport=transport,
                                    bucket_bytes=64 * 1024)
    try:
        report = sync.sync(version)
    finally:
        sync.close()
    assert report.tensors == len(new) and report.buckets > 1
    assert engine.weight_version == version
    for name in ("model.embed_tokens.weight", "model.layers.3.self_attn.k_proj.weight", "lm_head.weight",
                 "model.layers.0.mlp.up_proj.weight", "model.norm.weight"):
        assert torch.equal(engine.get_weight(name), new[name]), name
    updated = hf_model(model_dir)
    updated.load_state_dict(new)
    (s,), = engine.generate([PROMPTS[2]], SamplingParams(temperature=0.0, max_new_tokens=8))
    assert s.weight_version == version and not s.is_stale(version)
    assert s.output_ids == hf_greedy(updated, PROMPTS[2], 8)
    ref = hf_sequence_logprobs(updated, PROMPTS[2] + s.output_ids)[len(PROMPTS[2]) - 1:]
    assert (s.logprobs.double() - ref).abs().max().item() <= 1e-3


@pytest.mark.parametrize("zero_copy", [True, False], ids=["in-place", "packed"])
def test_repeated_syncs_deliver_memory_changed_in_place(engine, reference, model_dir, zero_copy):
    """Three syncs from the same tensors, changed in place between them as an optimizer changes
    parameters. The engine's loader (``rollout/engine_weights.py``) keeps each sync's mappings of
    the trainer's shared memory for the next one, so later syncs reuse them: every sync must still
    deliver the current values exactly, sent in place (zero copy) or packed into the reused buckets."""
    from holderpo_megatron.models import ModelArch
    from holderpo_megatron.weight_sync import StateDictSource, make_weight_synchronizer

    arch = ModelArch.from_pretrained_dir(model_dir)
    g = torch.Generator().manual_seed(11)
    src = StateDictSource({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in reference.state_dict().items()},
                          arch)
    sync = make_weight_synchronizer(src, engine, dtype=torch.float32, transport="tensor", bucket_bytes=64 * 1024,
                                    zero_copy=zero_copy)
    names = ("model.embed_tokens.weight", "model.layers.3.self_attn.k_proj.weight", "model.norm.weight")
    try:
        for k in range(3):
            if k:
                for t in src.state.values():
                    t.mul_(-1.5 if k == 1 else 0.5)  # the same memory, new values
            sync.sync(engine.weight_version + 1)
            for name in names:
                assert torch.equal(engine.get_weight(name), src.state[name]), f"sync {k}: {name}"
    finally:
        sync.close()


def test_bad_requests_are_refused(engine):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], SamplingParams())
    with pytest.raises(ValueError, match="SamplingParams.top_p=0"):
        SamplingParams(top_p=0)

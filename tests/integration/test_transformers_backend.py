"""``rollout.backend: transformers``: the HF model under our decode loop behind the engine interface (the
sampler of bench/learning_vs_trl.py's parity variants), against an independent transformers forward of the
same weights (log-probs, greedy paths, the draw's frequencies),
and inside the real loop (Megatron TP2 under gloo), where the engine's log-probs after every sync must
equal Megatron's re-scoring."""

import json

import pytest
import torch

from holderpo_megatron.rollout.config import SGLangEngineConfig
from holderpo_megatron.rollout.interface import SamplingParams
from holderpo_megatron.rollout.sglang_engine import SGLangEngine

from .test_train_loop import _recipe, _train
from .tiny_llama import EOS, hf_greedy, hf_model, hf_sequence_logprobs, save_tiny_llama

pytestmark = pytest.mark.integration


def _engine(path, seed=0):
    return SGLangEngine(SGLangEngineConfig(model_path=str(path), backend="transformers", device="cpu",
                                           dtype="float32", random_seed=seed))


def test_samples_logprobs_greedy_scores_and_weight_updates(tmp_path):
    a, b = save_tiny_llama(tmp_path / "a", seed=0), save_tiny_llama(tmp_path / "b", seed=1)
    ref_a, ref_b = hf_model(a), hf_model(b)
    prompts = [[5, 17, 33, 4], [9, 101, 7]]
    eng = _engine(a)
    rng_before = torch.random.get_rng_state()
    out = eng.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=10))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the trainer's RNG is not drawn from
    assert [len(g) for g in out] == [4, 4]
    distinct = set()
    for i, group in enumerate(out):
        for s in group:
            assert s.prompt_ids == prompts[i] and 1 <= len(s.output_ids) <= 10
            assert (s.finish_reason == "stop") == (s.output_ids[-1] == EOS)
            assert EOS not in s.output_ids[:-1]
            want = hf_sequence_logprobs(ref_a, prompts[i] + s.output_ids)[len(prompts[i]) - 1:]
            torch.testing.assert_close(s.logprobs.double(), want, atol=1e-5, rtol=0)
            distinct.add(tuple(s.output_ids))
    assert len(distinct) > 2  # sampled, not greedy
    # the same engine seed draws the same samples again; another seed draws others
    again = _engine(a).generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=10))
    assert [[s.output_ids for s in g] for g in again] == [[s.output_ids for s in g] for g in out]
    other = _engine(a, seed=1).generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=10))
    assert [[s.output_ids for s in g] for g in other] != [[s.output_ids for s in g] for g in out]

    # rows leave the batch at different steps (a stop set of half the vocabulary): the rest still score right
    stops = tuple(range(3, 160))
    early = eng.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=10, stop_token_ids=stops))
    lengths = {len(s.output_ids) for g in early for s in g}
    assert len(lengths) > 2, lengths
    for i, group in enumerate(early):
        for s in group:
            assert (s.finish_reason == "stop") == (s.output_ids[-1] in stops + (EOS,))
            assert not set(s.output_ids[:-1]) & set(stops + (EOS,))
            want = hf_sequence_logprobs(ref_a, prompts[i] + s.output_ids)[len(prompts[i]) - 1:]
            torch.testing.assert_close(s.logprobs.double(), want, atol=1e-5, rtol=0)

    # the draw: first-token frequencies over 4000 samples against the model's softmax (at T 0.7, and
    # renormalised over the top 5), each frequent token within 4.5 standard errors
    with torch.no_grad():
        logits = ref_a(torch.tensor([prompts[0]])).logits[0, -1].double()
    for sp, probs in ((SamplingParams(n=4000, temperature=0.7, max_new_tokens=1), torch.softmax(logits / 0.7, -1)),
                      (SamplingParams(n=4000, temperature=1.0, top_k=5, max_new_tokens=1),
                       torch.zeros_like(logits).scatter(0, logits.topk(5).indices, torch.softmax(logits.topk(5).values, -1)))):
        drawn = torch.tensor([s.output_ids[0] for s in eng.generate(prompts[:1], sp)[0]])
        freq = torch.bincount(drawn, minlength=len(probs)).double() / len(drawn)
        assert freq[probs == 0].sum() == 0
        big = probs * len(drawn) >= 20  # tokens expected 20+ times each, the rest as one bin
        want, got = torch.cat([probs[big], probs[~big].sum()[None]]), torch.cat([freq[big], freq[~big].sum()[None]])
        se = (want * (1 - want) / len(drawn)).sqrt()
        assert big.sum() >= 3 and ((got - want).abs() <= 4.5 * se).all(), ((got - want).abs() / se).max()

    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    assert [g[0].output_ids for g in eng.generate(prompts, greedy)] == [hf_greedy(ref_a, p, 8) for p in prompts]
    # one-token prompts: no prefill, the first decode step builds the cache
    assert [g[0].output_ids for g in eng.generate([[5], [9]], greedy)] == [hf_greedy(ref_a, p, 8) for p in ([5], [9])]
    # a group shares its prompt's prefill: every sample of it is still the greedy one; so is top-k 1, and a
    # nucleus smaller than the top token's probability
    for sp in (SamplingParams(n=3, temperature=0.0, max_new_tokens=8),
               SamplingParams(n=3, temperature=1.0, top_k=1, max_new_tokens=8),
               SamplingParams(n=3, temperature=1.0, top_p=1e-6, max_new_tokens=8)):
        assert [[s.output_ids for s in g] for g in eng.generate(prompts, sp)] == \
            [[hf_greedy(ref_a, p, 8)] * 3 for p in prompts]
    fixed = eng.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=6, ignore_eos=True))
    assert all(len(s.output_ids) == 6 and s.finish_reason == "length" for g in fixed for s in g)

    # weights by HF name, as weight sync sends them: the engine then samples and scores model b
    eng.update_weights_from_tensors(list(ref_b.state_dict().items()), flush_cache=True)
    eng.set_weight_version(3)
    for name, t in ref_b.state_dict().items():
        assert torch.equal(eng.get_weight(name), t.float())
    after = eng.generate(prompts, greedy)
    assert [g[0].output_ids for g in after] == [hf_greedy(ref_b, p, 8) for p in prompts]
    assert all(g[0].weight_version == 3 for g in after)
    seq = prompts[0] + [11, 12, 13]
    torch.testing.assert_close(eng.score([seq])[0].double(), hf_sequence_logprobs(ref_b, seq), atol=1e-5, rtol=0)
    with pytest.raises(Exception, match="no tensor named 'nope'"):
        eng.update_weights_from_tensors([("nope", torch.zeros(1))])
    eng.shutdown()


def test_refused_outside_embedded_mode(tmp_path):
    with pytest.raises(ValueError, match=r"SGLangEngineConfig.backend='transformers' is invalid.*embedded"):
        SGLangEngineConfig(model_path=str(tmp_path), backend="transformers", mode="servers")
    with pytest.raises(ValueError, match=r"backend='nope' is invalid; allowed: sglang \| transformers"):
        SGLangEngineConfig(model_path=str(tmp_path), backend="nope")


def test_run_config_refuses_what_the_backend_cannot_do(tmp_path):
    from holderpo_megatron.trainer.config import RolloutSection

    with pytest.raises(ValueError, match=r"rollout.backend=transformers .*weight_sync=distributed"):
        RolloutSection(backend="transformers", weight_sync="distributed")
    with pytest.raises(ValueError, match=r"rollout.backend=transformers .*mode=servers"):
        RolloutSection(backend="transformers", mode="servers")
    assert RolloutSection(backend="transformers").weight_sync == "auto"


def test_loop_syncs_weights_into_the_transformers_sampler(tmp_path):
    model = save_tiny_llama(tmp_path / "model", seed=0)
    out = tmp_path / "runs"
    _train(_recipe(tmp_path, model, 2, out), "rollout.backend=transformers", "checkpoint.every=0",
           "checkpoint.export_hf_at_end=false")
    engine = json.loads((out / "loop" / "sglang_logs" / "engine_config.json").read_text())
    assert engine["backend"] == "transformers"
    records = [json.loads(line) for line in (out / "loop" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["rollout/weight_version_min"] == 1  # step 2 sampled the weights step 1 trained
    for r in records:  # the engine's log-probs are Megatron's (step 2: after the first sync)
        assert r["logprob_drift_max"] < 1e-4, r["logprob_drift_max"]

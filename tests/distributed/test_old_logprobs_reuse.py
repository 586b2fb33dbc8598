"""Skipping the redundant scoring pass is exact, and the drift guard refuses before any update.

Real Megatron under gloo (2 ranks; a PP2 layout and a DP2 layout), the loop's own functions
(``minibatch_parts`` -> ``old_logprobs`` -> ``train_minibatches``) on one rollout batch of a tiny
Llama: with ``reuse`` (minibatch 1's old log-probs from its own training forward, only minibatches
2..k scored) the gradients and the updated weights equal those of a full scoring pass (``score``),
for k = 1 and k = 2, and the drift metric covers the same tokens with the same value. With the
engine's log-probs (``rollout``) a drift above ``rollout.drift_max`` raises on every rank, naming the
measured drift and the threshold, and leaves the weights untouched; ``drift_action: warn`` trains on.
"""

import pytest
import torch

from tests.distributed.gloo_spawn import run_gloo
from tests.distributed.megatron_fixtures import actor_settings, hf_logprobs, make_hf_model, ragged_sequences

pytestmark = pytest.mark.distributed

ENGINE_NOISE = 0.05  # the "engine's" log-probs: the reference's plus this much noise (nats), so drift > 0


def _setup(layout_kw, arch_cfg, sd, run_kw):
    from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

    enable_cpu_megatron()
    from holderpo_megatron.checkpoint.mapping import load_hf_weights_into_model
    from holderpo_megatron.models import ModelArch
    from holderpo_megatron.parallel.layout import ParallelLayout, initialize_model_parallel
    from holderpo_megatron.trainer.actor import MegatronActor, OptimizerSettings

    arch = ModelArch.from_hf_config(arch_cfg)
    layout = ParallelLayout(**layout_kw)
    initialize_model_parallel(layout)
    # adam_eps 1: an update ~ lr * gradient, so float noise in tiny gradients is not blown up to +-lr
    # (Adam's g / (|g| + eps) at eps 1e-8) and the updated weights can be compared tightly
    actor = MegatronActor(arch, layout, actor_settings("holder", {"p": 2.0}, **run_kw),
                          optimizer=OptimizerSettings(lr=0.05, adam_eps=1.0, clip_grad=0.0))
    load_hf_weights_into_model(actor.unwrapped(), arch, sd)
    return arch, actor


def _state(actor, arch, of):
    from holderpo_megatron.checkpoint.mapping import export_hf_weights

    return {name: t.detach().double().clone() for name, t in export_hf_weights(actor.unwrapped(), arch, tensor_of=of)}


def _run(layout_kw, run_kw, cfg, sd, samples, k, source, rollout):
    """One step's training on this rank's share: (metrics, final weights, last minibatch's grads, old)."""
    from megatron.core import parallel_state as ps

    from holderpo_megatron.trainer.loop import minibatch_parts, old_logprobs, train_minibatches

    arch, actor = _setup(layout_kw, cfg, sd, run_kw)
    grads = []  # each minibatch's gradient, read just before its optimizer step (which then runs as is)
    step = actor.optimizer_step

    def recording_step():
        grads.append(_state(actor, arch, lambda p: p.main_grad))
        return step()

    actor.optimizer_step = recording_step
    mine = samples.share(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    parts = minibatch_parts(mine.units(), k, seed=7, step=0)
    old, drift = old_logprobs(actor, mine, parts, source)
    batch = mine.to_batch(old, None, measure_drift=source != "score")
    m = train_minibatches(actor, batch, parts, 2.0, step=0, drift=drift, rollout=rollout,
                          dp_group=ps.get_data_parallel_group())
    return m, _state(actor, arch, lambda p: p), grads, old, parts


def _worker(rank, world, cfg, sd, samples, initial):
    from holderpo_megatron.parallel.layout import destroy_model_parallel
    from holderpo_megatron.trainer.config import RolloutSection

    rollout = RolloutSection()  # no guard: drift measured, never judged
    for layout_kw, run_kw in [(dict(pp=2), dict(token_budget=96, max_sequences_per_microbatch=2)),
                              (dict(tp=1), dict(token_budget=80, pack=True))]:
        for k in (1, 2):
            runs = {}
            for source in ("score", "reuse"):
                m, w, g, old, parts = _run(layout_kw, run_kw, cfg, sd, samples, k, source, rollout)
                runs[source] = (m, w, g)
                destroy_model_parallel()
                first = {i for u in parts[0] for i in u}
                if source == "reuse":  # minibatch 1 never scored; the others all scored
                    assert [i for i, o in enumerate(old) if o is None] == sorted(first), (layout_kw, k)
                else:
                    assert all(o is not None for o in old)
            (ms, ws, gs), (mr, wr, gr) = runs["score"], runs["reuse"]
            where = f"{layout_kw} k={k}"
            assert ws.keys() == wr.keys() and ws and len(gs) == len(gr) == k, where
            for u, (a, b) in enumerate(zip(gs, gr)):  # every minibatch's gradient
                for name in a:
                    rel = (a[name] - b[name]).abs().max().item() / a[name].abs().max().clamp_min(1e-30).item()
                    assert rel <= 1e-5, f"{where}: minibatch {u + 1}'s gradient of {name}: max rel err {rel:.2e}"
            moved = max((ws[n] - initial[n]).abs().max().item() for n in ws)
            assert moved > 1e-3, f"{where}: the weights barely moved ({moved:.2e}): the test would prove nothing"
            for name in ws:
                err = (ws[name] - wr[name]).abs().max().item()
                assert err <= 1e-5 * moved, f"{where}: updated {name} differs by {err:.2e} (largest move {moved:.2e})"
            # the same tokens measured, from the scoring pass or the training forward
            assert ms["logprob_drift_tokens"] == mr["logprob_drift_tokens"] > 0, (where, ms, mr)
            assert abs(ms["logprob_drift_mean"] - mr["logprob_drift_mean"]) <= 1e-6, (where, ms, mr)
            assert 0.5 * ENGINE_NOISE < mr["logprob_drift_mean"] < 1.5 * ENGINE_NOISE, (where, mr)
            assert ms.keys() == mr.keys(), (where, ms, mr)
            for key in ms:  # loss, ratios, clipping, entropy, grad norm: the same step
                assert abs(ms[key] - mr[key]) <= 1e-5 * max(1.0, abs(ms[key])), (where, key, ms[key], mr[key])
            if k == 1:  # a ratio of 1: old = this forward's log-probs, detached
                assert abs(mr["rho_min"] - 1) <= 1e-6 and abs(mr["rho_max"] - 1) <= 1e-6, (where, mr)

    # the engine's log-probs as old ones (no scoring pass): a drift above drift_max refuses the step
    # on every rank after minibatch 1's forward-backward, before any update
    from megatron.core import parallel_state as ps

    from holderpo_megatron.checkpoint.mapping import export_hf_weights
    from holderpo_megatron.trainer.loop import minibatch_parts, old_logprobs, train_minibatches

    layout_kw, run_kw = dict(pp=2), dict(token_budget=96, max_sequences_per_microbatch=2)
    arch, actor = _setup(layout_kw, cfg, sd, run_kw)
    mine = samples.share(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    parts = minibatch_parts(mine.units(), 2, seed=7, step=0)
    old, drift = old_logprobs(actor, mine, parts, "rollout")
    assert drift.sums == {} and all(o.numel() == len(q) - 1 for o, q in zip(old, mine.sequences))
    strict = RolloutSection(use_rollout_logprobs=True, drift_max=0.01, drift_action="error")
    with pytest.raises(RuntimeError, match=r"mean \|logp_train - logp_rollout\| = 0\.0\d+ nats over \d+ response "
                                           r"tokens .*exceeds rollout\.drift_max=0\.01; the step is refused"):
        train_minibatches(actor, mine.to_batch(old, None, measure_drift=True), parts, 2.0, step=0, drift=drift,
                          rollout=strict, dp_group=ps.get_data_parallel_group())
    for name, t in export_hf_weights(actor.unwrapped(), arch):
        assert torch.equal(t.double(), initial[name]), f"the refused step changed {name}"
    destroy_model_parallel()
    lenient = RolloutSection(use_rollout_logprobs=True, drift_max=0.01, drift_action="warn")
    m, w, *_ = _run(layout_kw, run_kw, cfg, sd, samples, 2, "rollout", lenient)
    assert m["logprob_drift_mean"] > 0.01 and any(not torch.equal(w[n], initial[n]) for n in w), m
    destroy_model_parallel()


def test_reused_training_logprobs_equal_a_scoring_pass_and_drift_guard_refuses():
    from holderpo_megatron.trainer.batch import StepSamples

    model = make_hf_model("llama")
    seqs = ragged_sequences(model.config.vocab_size, 8, seed=4, lo=12, hi=40)
    with torch.no_grad():
        ref = hf_logprobs(model, seqs)
    g = torch.Generator().manual_seed(5)
    starts = [int(torch.randint(2, len(s) - 4, (1,), generator=g)) for s in seqs]
    engine = [(lp[s - 1:] + ENGINE_NOISE * torch.randn(lp[s - 1:].shape, generator=g, dtype=lp.dtype)).float()
              for lp, s in zip(ref, starts)]
    adv = torch.randn(len(seqs), generator=g).tolist()
    samples = StepSamples(seqs, starts, engine, adv)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    initial = {k: v.double() for k, v in sd.items()}
    run_gloo(_worker, 2, model.config.to_dict(), sd, samples, initial)

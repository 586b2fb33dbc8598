"""Policy losses against float64 references, exact microbatch combination, registry, bad input."""

import math
from dataclasses import dataclass

import pytest
import torch

from holderpo_megatron.algorithms import (
    HOLDER_VARIANTS,
    LossOptions,
    LossOutput,
    compute_policy_loss,
    ClipOptions,
    get_policy_loss,
    policy_loss_names,
    register_policy_loss,
)
from tests.references import ref_grpo_loss, ref_holder_loss, random_batch

def holder_policy_loss(logp, old, adv, mask, p, clip_low=0.2, clip_high=0.2, variant="seq", **kw):
    return compute_policy_loss("holder", logp, old, adv, mask, p=p, clip_low=clip_low, clip_high=clip_high,
                               variant=variant, **kw)


P_VALUES = [-4.0, -1.0, -1e-6, 0.0, 1e-6, 0.5, 1.0, 2.0, 4.0]


def _grad(fn, logp):
    x = logp.clone().requires_grad_(True)
    fn(x).backward()
    return x.grad


@pytest.mark.parametrize("variant", HOLDER_VARIANTS)
@pytest.mark.parametrize("p", P_VALUES)
def test_holder_loss_value_and_grad_match_float64(variant, p):
    logp, old, adv, mask = random_batch(8, 40, seed=11, spread=0.3)
    out = holder_policy_loss(logp, old, adv, mask, p, 0.2, 0.28, variant)
    ref = ref_holder_loss(logp, old, adv, mask, p, 0.2, 0.28, variant)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    g = _grad(lambda x: holder_policy_loss(x, old, adv, mask, p, 0.2, 0.28, variant).loss, logp)
    g_ref = _grad(lambda x: ref_holder_loss(x, old.double(), adv, mask, p, 0.2, 0.28, variant), logp.double())
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-6)
    assert torch.all(g[~mask] == 0)


def test_holder_bf16_inputs():
    logp, old, adv, mask = random_batch(6, 64, seed=2, spread=0.2)
    out = holder_policy_loss(logp.bfloat16(), old.bfloat16(), adv, mask, 2.0)
    ref = ref_holder_loss(logp.bfloat16().double(), old.bfloat16().double(), adv, mask, 2.0)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_grpo_matches_reference(aggregation):
    logp, old, adv, mask = random_batch(8, 30, seed=4, spread=0.4)
    out = compute_policy_loss("grpo", logp, old, adv, mask, clip_low=0.2, clip_high=0.3, aggregation=aggregation)
    ref = ref_grpo_loss(logp, old, adv, mask, 0.2, 0.3, aggregation)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    g = _grad(lambda x: compute_policy_loss("grpo", x, old, adv, mask, clip_high=0.3, aggregation=aggregation).loss, logp)
    g_ref = _grad(lambda x: ref_grpo_loss(x, old.double(), adv, mask, 0.2, 0.3, aggregation), logp.double())
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-7)


def test_dr_grpo_divides_token_sum_by_constant_length():
    logp, old, adv, mask = random_batch(6, 20, seed=5, spread=0.3)
    out = compute_policy_loss("dr_grpo", logp, old, adv, mask, max_len=50)
    r = torch.exp(logp.double() - old.double())
    a = adv.double().unsqueeze(-1)
    per_tok = torch.maximum(-a * r, -a * r.clamp(0.8, 1.2)) * mask
    ref = (per_tok.sum(-1) / 50)[mask.any(-1)].mean()
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-7)


def test_gspo_equals_holder_at_p0_and_gmpo_equals_token_variant_at_p0():
    logp, old, adv, mask = random_batch(10, 25, seed=6, spread=0.5)
    gspo = compute_policy_loss("gspo", logp, old, adv, mask)
    hold = compute_policy_loss("holder", logp, old, adv, mask, p=0.0)
    torch.testing.assert_close(gspo.loss, hold.loss, rtol=1e-6, atol=1e-7)
    gmpo = compute_policy_loss("gmpo", logp, old, adv, mask)
    tok = compute_policy_loss("holder", logp, old, adv, mask, p=0.0, variant="token")
    torch.testing.assert_close(gmpo.loss, tok.loss, rtol=1e-6, atol=1e-7)
    for a, b in ((gspo, hold), (gmpo, tok)):
        ga = _grad(lambda x: compute_policy_loss("gspo" if a is gspo else "gmpo", x, old, adv, mask).loss, logp)
        gb = _grad(lambda x: compute_policy_loss("holder", x, old, adv, mask, p=0.0,
                                                 variant="seq" if a is gspo else "token").loss, logp)
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


def test_holder_p0_is_trl_gspo_sequence_level_loss():
    """The peer of bench/e2e_vs_trl.py: TRL's GRPOTrainer with importance_sampling_level="sequence",
    loss_type="grpo", beta=0, written as TRL 1.16's _compute_loss computes it (coef = exp of the
    masked mean log-ratio per sequence, broadcast over tokens, min with the clipped coef, token mean per
    sequence, mean over sequences). Our holder loss at p = 0 gives the same value and gradient."""
    logp, old, adv, mask = random_batch(16, 24, seed=11, spread=0.4)
    mask[:, 0] = True  # a TRL completion holds at least its EOS (ours leaves empty rows out of the mean)

    def trl_gspo(lp):
        m = mask.to(lp.dtype)
        log_w = ((lp - old.to(lp.dtype)) * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        coef_1 = torch.exp(log_w).unsqueeze(-1)
        coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.2)
        a = adv.to(lp.dtype).unsqueeze(1)
        per_token = -torch.min(coef_1 * a, coef_2 * a)
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()

    ours = compute_policy_loss("holder", logp, old, adv, mask, p=0.0, variant="seq", clip_low=0.2, clip_high=0.2)
    torch.testing.assert_close(ours.loss.double(), trl_gspo(logp.double()), rtol=1e-6, atol=1e-7)
    g = _grad(lambda x: compute_policy_loss("holder", x, old, adv, mask, p=0.0, variant="seq").loss, logp)
    torch.testing.assert_close(g.double(), _grad(trl_gspo, logp.double()), rtol=1e-5, atol=1e-8)
    r = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1))
    assert ((r < 0.8) & (adv < 0)).any() or ((r > 1.2) & (adv > 0)).any()  # the clip branch is exercised


@pytest.mark.parametrize("name,kwargs", [
    ("holder", {"p": 2.0}), ("holder", {"p": -1.0, "variant": "token"}), ("holder", {"p": 0.5, "variant": "seq_tokclip"}),
    ("grpo", {}), ("grpo", {"aggregation": "seq-mean-token-mean"}), ("dr_grpo", {"max_len": 40}), ("gspo", {}), ("gmpo", {}),
])
def test_microbatches_combine_exactly(name, kwargs):
    """sum(loss_sum)/sum(loss_count) over microbatches == full-batch loss; with the global
    denominator each microbatch's loss sums to the full loss and so do the gradients."""
    logp, old, adv, mask = random_batch(12, 40, seed=9, spread=0.3)
    full = compute_policy_loss(name, logp, old, adv, mask, **kwargs)
    parts = [slice(0, 5), slice(5, 6), slice(6, 12)]
    outs = [compute_policy_loss(name, logp[s], old[s], adv[s], mask[s], **kwargs) for s in parts]
    total = sum(o.loss_sum for o in outs) / sum(o.loss_count for o in outs)
    torch.testing.assert_close(total, full.loss, rtol=1e-6, atol=1e-7)
    denom = sum(o.loss_count for o in outs)
    x = logp.clone().requires_grad_(True)
    sum(compute_policy_loss(name, x[s], old[s], adv[s], mask[s], denominator=denom, **kwargs).loss for s in parts).backward()
    g_full = _grad(lambda y: compute_policy_loss(name, y, old, adv, mask, **kwargs).loss, logp)
    torch.testing.assert_close(x.grad, g_full, rtol=1e-5, atol=1e-8)
    merged = outs[0].metrics.merge(outs[1].metrics).merge(outs[2].metrics).to_dict()
    for k, v in full.metrics.to_dict().items():
        assert math.isclose(merged[k], v, rel_tol=1e-6, abs_tol=1e-9) or (math.isnan(v) and math.isnan(merged[k])), k


def test_seq_clip_metrics_on_constructed_batch():
    # 4 sequences of 2 tokens: rho = e^0.5 (A>0 -> clipped), e^-0.5 (A<0 -> clipped),
    # 1.0 (A>0, inside), e^0.5 with A=0 (zero gradient, not clipped).
    d = torch.tensor([[0.5, 0.5], [-0.5, -0.5], [0.0, 0.0], [0.5, 0.5]])
    old = torch.zeros(4, 2)
    adv = torch.tensor([1.0, -1.0, 1.0, 0.0])
    out = holder_policy_loss(d, old, adv, torch.ones(4, 2, dtype=torch.bool), p=1.0)
    m = out.metrics.to_dict()
    assert m["clip_frac"] == pytest.approx(0.5)
    assert m["zero_grad_frac"] == pytest.approx(0.75)
    assert m["rho_max"] == pytest.approx(math.exp(0.5), rel=1e-6)
    assert m["rho_min"] == pytest.approx(math.exp(-0.5), rel=1e-6)
    assert m["p"] == 1.0 and m["num_seqs"] == 4


@pytest.mark.parametrize("variant", ["token", "seq_tokclip"])
def test_token_clip_values_gradient_and_clip_fraction_on_constructed_batch(variant):
    # log1p(0.25) and log1p(-0.2) sit exactly on the bounds: kept, with gradient, as torch.clamp does
    hi, lo = math.log1p(0.25), math.log1p(-0.2)
    d = torch.tensor([[0.5, hi, 0.0, -0.5], [-0.5, lo, 0.5, 0.1], [0.5, -0.5, 0.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0, 0.0])
    x = d.clone().requires_grad_(True)
    out = holder_policy_loss(x, torch.zeros(3, 4), adv, mask, p=1.0, clip_low=0.2, clip_high=0.25, variant=variant)
    out.loss.backward()
    if variant == "token":  # A > 0 clips above only, A < 0 below only, A = 0 not at all
        clipped = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
        ref_d = torch.where(adv.unsqueeze(1) > 0, d.clamp(max=hi), torch.where(adv.unsqueeze(1) < 0, d.clamp(min=lo), d))
    else:
        clipped = torch.tensor([[1, 0, 0, 1], [1, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
        ref_d = d.clamp(lo, hi)
    assert out.metrics.to_dict()["token_clip_frac"] == pytest.approx(clipped.sum().item() / 11)
    x64 = d.double().requires_grad_(True)
    d64 = torch.where(clipped, ref_d.double(), x64)  # clipped tokens carry no gradient
    rho = torch.stack([torch.exp(d64[i][mask[i]]).mean() for i in range(3)])
    ref_loss = torch.maximum(-adv.double() * rho, -adv.double() * rho.clamp(0.8, 1.25)) if variant == "seq_tokclip" else -adv.double() * rho
    ref_loss.mean().backward()
    torch.testing.assert_close(out.loss.double(), ref_loss.mean().detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(x.grad[clipped] == 0) and x.grad[0, 1] != 0


def test_nonfinite_logprobs_exclude_sequence_and_are_counted():
    logp, old, adv, mask = random_batch(6, 10, seed=3, spread=0.3)
    bad = logp.clone()
    bad[0, 0] = float("nan")
    bad[2, 1] = float("-inf")
    bad[4, 9] = float("inf") if not mask[4, 9] else bad[4, 9]  # padded position: harmless
    keep = torch.tensor([False, True, False, True, True, True])
    for name, kw in (("holder", {"p": 2.0}), ("grpo", {}), ("gspo", {})):
        x = bad.clone().requires_grad_(True)
        out = compute_policy_loss(name, x, old, adv, mask, **kw)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        assert torch.isfinite(x.grad).all() and torch.all(x.grad[~keep] == 0)
        m = out.metrics.to_dict()
        assert m["nonfinite_seqs"] == 2
        clean = compute_policy_loss(name, logp[keep], old[keep], adv[keep], mask[keep], **kw)
        torch.testing.assert_close(out.loss, clean.loss)
        with pytest.raises(ValueError, match=r"non-finite .* sequences \[0, 2\]"):
            compute_policy_loss(name, bad, old, adv, mask, strict=True, **kw)


def test_nonfinite_at_padding_is_ignored_even_when_strict():
    logp, old, adv, mask = random_batch(4, 8, seed=1)
    assert not mask.all()
    bad = torch.where(mask, logp, torch.full_like(logp, float("nan")))
    out = holder_policy_loss(bad, old, adv, mask, 1.0, strict=True)
    torch.testing.assert_close(out.loss, holder_policy_loss(logp, old, adv, mask, 1.0).loss)


def test_empty_batch_gives_zero_loss():
    logp, old, adv, _ = random_batch(3, 4)
    out = holder_policy_loss(logp.requires_grad_(True), old, adv, torch.zeros(3, 4, dtype=torch.bool), 2.0)
    assert out.loss.item() == 0.0 and out.loss_count.item() == 0
    out.loss.backward()


@pytest.mark.parametrize("call,match", [
    (lambda b: holder_policy_loss(b[0], b[1][:, :3], b[2], b[3], 1.0), "old_logp shape"),
    (lambda b: holder_policy_loss(b[0], b[1], b[2][:2], b[3], 1.0), "advantages must have shape"),
    (lambda b: holder_policy_loss(b[0], b[1], b[2], b[3][:, :2], 1.0), "mask must have"),
    (lambda b: holder_policy_loss(b[0][0], b[1], b[2], b[3], 1.0), "logp must be"),
    (lambda b: holder_policy_loss(*b, 1.0, variant="tok"), "variant must be one of"),
    (lambda b: holder_policy_loss(*b, 1.0, clip_low=0.0), "clip_low must be in"),
    (lambda b: holder_policy_loss(*b, 1.0, clip_low=1.0), "clip_low must be in"),
    (lambda b: holder_policy_loss(*b, 1.0, clip_high=-0.1), "clip_high must be"),
    (lambda b: holder_policy_loss(*b, float("nan")), "p must be a finite"),
    (lambda b: compute_policy_loss("ppo", *b), "unknown policy loss 'ppo'"),
    (lambda b: compute_policy_loss("grpo", *b, p=1.0), "does not take option 'p'; it takes: clip_low, clip_high, dual_clip, aggregation"),
    (lambda b: compute_policy_loss("grpo", *b, aggregation="sum"), "aggregation must be one of"),
    (lambda b: compute_policy_loss("dr_grpo", *b, max_len=0), "max_len must be"),
    (lambda b: compute_policy_loss("holder", *b, p=1.0, denominator=0), "denominator must be"),
    (lambda b: compute_policy_loss("gspo", *b, dual_clip=0.5), "dual_clip must be"),
    (lambda b: compute_policy_loss("gmpo", *b, dual_clip=3.0), "does not take option 'dual_clip'"),
    (lambda b: compute_policy_loss("gspo", *b, ClipOptions(), clip_low=0.1), "not both"),
    (lambda b: compute_policy_loss("grpo", *b, ClipOptions()), "takes GRPOOptions, got ClipOptions"),
])
def test_bad_input_raises_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(random_batch(4, 6))


def test_registry_adds_a_loss_with_one_function():
    name = "test_only_neg_mean_logp"

    @dataclass(frozen=True)
    class ScaleOptions(LossOptions):
        scale: float = 1.0

    @register_policy_loss(name, options=ScaleOptions)
    def _loss(logp, old_logp, advantages, mask, options, *, denominator=None, strict=False, reducer=None):
        s = -(logp * mask).sum() * options.scale
        c = mask.sum().float()
        from holderpo_megatron.algorithms import LossMetrics
        return LossOutput(s / c, s, c, "token", LossMetrics())

    assert name in policy_loss_names() and get_policy_loss(name) is _loss
    logp, old, adv, mask = random_batch(2, 3)
    assert compute_policy_loss(name, logp, old, adv, mask, scale=2.0).loss_count == mask.sum()
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss(name)(_loss)


def test_dual_clip_bounds_negative_advantage_loss():
    d = torch.tensor([[3.0]])
    out = holder_policy_loss(d, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1, dtype=torch.bool), 1.0, dual_clip=3.0)
    assert out.loss.item() == pytest.approx(3.0)


def test_grpo_token_metrics_on_constructed_batch():
    # valid ratios all above 1 (padding, whose d is 0, must not pull the min to 1) and all below 1
    d = torch.tensor([[0.5, 0.3, 7.0], [-0.4, -0.1, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, 1.0])
    m = compute_policy_loss("grpo", d, torch.zeros(2, 3), adv, mask, clip_low=0.2, clip_high=0.2).metrics.to_dict()
    assert m["rho_min"] == pytest.approx(math.exp(-0.4), rel=1e-6)
    assert m["rho_max"] == pytest.approx(math.exp(0.5), rel=1e-6)
    assert m["rho_mean"] == pytest.approx((math.exp(0.5) + math.exp(0.3) + math.exp(-0.4) + math.exp(-0.1)) / 4, rel=1e-6)
    assert m["clip_frac"] == pytest.approx(0.5)  # e^0.5 and e^0.3 > 1.2 with A > 0
    empty = compute_policy_loss("grpo", d, torch.zeros(2, 3), adv, torch.zeros(2, 3, dtype=torch.bool)).metrics.to_dict()
    assert empty["rho_min"] == math.inf and empty["rho_max"] == -math.inf

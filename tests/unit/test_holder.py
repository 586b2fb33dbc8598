"""holder_log_ratio against float64 references, limits, monotonicity and its gradient."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from holderpo_megatron.algorithms import holder_log_ratio, masked_mean
from tests.references import ref_holder_log_ratio

P_VALUES = [-4.0, -1.0, -1e-6, 0.0, 1e-6, 0.5, 1.0, 2.0, 4.0]


def _extreme_batch(b, t, seed, lo=-60.0, hi=60.0):
    g = torch.Generator().manual_seed(seed)
    d = lo + (hi - lo) * torch.rand(b, t, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = torch.arange(t) < lengths.unsqueeze(1)
    d = torch.where(mask, d, torch.full_like(d, float("nan")))  # garbage at padding must not leak
    return d, mask


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("t", [1, 7, 4096])
def test_matches_float64_reference_on_extremes(p, t):
    d, mask = _extreme_batch(6, t, seed=t)
    got = holder_log_ratio(d.float(), mask, p).double()
    ref = ref_holder_log_ratio(torch.nan_to_num(d), mask, p)
    assert torch.isfinite(got).all()
    # float32 compute: error ~ eps32 * |d| (|d| <= 60) plus log T / |p| rounding.
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("p", P_VALUES)
def test_bfloat16_inputs_computed_in_float32(p):
    d, mask = _extreme_batch(8, 300, seed=3, lo=-3, hi=3)
    d_bf16 = torch.nan_to_num(d).to(torch.bfloat16)
    got = holder_log_ratio(d_bf16, mask, p)
    assert got.dtype == torch.float32
    ref = ref_holder_log_ratio(d_bf16.double(), mask, p)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=2e-6)


def test_float64_input_stays_float64():
    d, mask = _extreme_batch(4, 50, seed=1, lo=-2, hi=2)
    got = holder_log_ratio(torch.nan_to_num(d), mask, 1.5)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref_holder_log_ratio(torch.nan_to_num(d), mask, 1.5), rtol=1e-12, atol=1e-12)


def test_p1_is_arithmetic_mean_of_ratios_and_p0_geometric():
    d, mask = _extreme_batch(5, 64, seed=2, lo=-1, hi=1)
    d = torch.nan_to_num(d)
    arith = torch.log(masked_mean(torch.exp(d), mask))
    torch.testing.assert_close(holder_log_ratio(d.float(), mask, 1.0).double(), arith, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(holder_log_ratio(d.float(), mask, 0.0).double(), masked_mean(d, mask), rtol=1e-6, atol=1e-6)


def test_continuous_through_zero():
    d, mask = _extreme_batch(4, 512, seed=5, lo=-20, hi=20)
    d = torch.nan_to_num(d).float()
    at0 = holder_log_ratio(d, mask, 0.0).double()
    var = ref_holder_log_ratio(torch.zeros_like(d), mask, 0)  # zeros, just for shape
    var = torch.stack([d[i][mask[i]].double().var(unbiased=False) for i in range(d.shape[0])])
    for p in [1e-8, -1e-8, 1e-7, 1e-6, -1e-5, 1e-4, 1e-3, -1e-2, 1e-2]:
        got = holder_log_ratio(d, mask, p).double()
        # d/dp log rho at 0 is var/2: the change must follow it, with no jump.
        expected = at0 + p * var / 2
        assert torch.allclose(got, expected, atol=2e-5 + 50 * p * p * var.max()), (p, got - expected)
        torch.testing.assert_close(got, ref_holder_log_ratio(d, mask, p), rtol=1e-6, atol=2e-5)


def test_huge_p_times_d_is_finite_and_tends_to_max_and_min():
    t = 100
    g = torch.Generator().manual_seed(0)
    d = (torch.rand(3, t, generator=g) * 40 - 20)
    mask = torch.ones(3, t, dtype=torch.bool)
    for p in (50.0, -50.0):  # |p * d| up to 1000
        got = holder_log_ratio(d, mask, p)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref_holder_log_ratio(d, mask, p), rtol=1e-6, atol=1e-4)
    big = holder_log_ratio(d, mask, 1e4)
    small = holder_log_ratio(d, mask, -1e4)
    torch.testing.assert_close(big, d.amax(-1), atol=1e-3, rtol=0)
    torch.testing.assert_close(small, d.amin(-1), atol=1e-3, rtol=0)


def test_empty_rows_give_zero_and_no_gradient():
    d = torch.randn(3, 5, requires_grad=True)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    for p in (0.0, 2.0, -1.0):
        d.grad = None
        out = holder_log_ratio(d, mask, p)
        assert out[1].item() == 0.0
        out.sum().backward()
        assert torch.all(d.grad[1] == 0)


@pytest.mark.parametrize("p", P_VALUES)
def test_gradient_is_softmax_of_p_d(p):
    d, mask = _extreme_batch(5, 33, seed=7, lo=-4, hi=4)
    d = torch.nan_to_num(d)
    x = d.float().requires_grad_(True)
    upstream = torch.randn(5, dtype=torch.float32)
    (holder_log_ratio(x, mask, p) * upstream).sum().backward()
    # autograd through the float64 naive reference
    x64 = d.clone().requires_grad_(True)
    (ref_holder_log_ratio(x64, mask, p) * upstream.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)
    # analytic: softmax over valid tokens of p * d
    w = torch.softmax(torch.where(mask, p * d, torch.full_like(d, float("-inf"))), -1) * upstream.double().unsqueeze(-1)
    torch.testing.assert_close(x.grad.double(), w, rtol=1e-5, atol=1e-7)


def test_gradient_bf16_input_returns_bf16_grad():
    d = torch.randn(2, 9).to(torch.bfloat16).requires_grad_(True)
    holder_log_ratio(d, torch.ones(2, 9, dtype=torch.bool), 2.0).sum().backward()
    assert d.grad.dtype == torch.bfloat16
    torch.testing.assert_close(d.grad.float().sum(-1), torch.ones(2), atol=1e-2, rtol=0)


def test_bad_inputs_raise_value_error_naming_argument():
    with pytest.raises(ValueError, match="mask shape"):
        holder_log_ratio(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="log_ratio must be"):
        holder_log_ratio(torch.zeros(3), torch.ones(3, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="p must be finite"):
        holder_log_ratio(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), float("inf"))


# ---- property tests --------------------------------------------------------------------------

_rows = st.integers(1, 4)
_cols = st.integers(1, 40)


@st.composite
def _batches(draw):
    b, t = draw(_rows), draw(_cols)
    vals = draw(st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=b * t, max_size=b * t))
    lengths = draw(st.lists(st.integers(1, t), min_size=b, max_size=b))
    d = torch.tensor(vals, dtype=torch.float32).view(b, t)
    mask = torch.arange(t) < torch.tensor(lengths).unsqueeze(1)
    return d, mask


@settings(max_examples=60, deadline=None)
@given(_batches(), st.floats(-6, 6, allow_nan=False))
def test_property_matches_reference_and_bounded_by_min_max(batch, p):
    d, mask = batch
    got = holder_log_ratio(d, mask, p).double()
    ref = ref_holder_log_ratio(d, mask, p)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=5e-5)
    lo = torch.where(mask, d, torch.full_like(d, float("inf"))).amin(-1).double()
    hi = torch.where(mask, d, torch.full_like(d, float("-inf"))).amax(-1).double()
    assert torch.all(got >= lo - 1e-4) and torch.all(got <= hi + 1e-4)


@settings(max_examples=40, deadline=None)
@given(_batches(), st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=6))
def test_property_monotone_in_p(batch, ps):
    d, mask = batch
    ps = sorted(ps)
    vals = [holder_log_ratio(d, mask, p).double() for p in ps]
    for a, b in zip(vals, vals[1:]):
        assert torch.all(b >= a - 5e-5), (ps, a, b)


@settings(max_examples=40, deadline=None)
@given(_batches(), st.floats(-4, 4, allow_nan=False))
def test_property_gradient_weights_are_a_distribution(batch, p):
    d, mask = batch
    x = d.clone().requires_grad_(True)
    holder_log_ratio(x, mask, p).sum().backward()
    assert torch.all(x.grad >= 0) and torch.all(x.grad[~mask] == 0)
    torch.testing.assert_close(x.grad.sum(-1), torch.ones(d.shape[0]), rtol=1e-5, atol=1e-5)


# ---- the per-sequence choice of form (expm1 near 0, shifted exp far from it) ---------------------

def _rows_by_form(forms, t=64, seed=11):
    """One row per entry of ``forms``: "near" keeps max p*(d - mean) <= 1 (expm1 form), "far" puts
    it well above 1 (shifted form), "empty" has no valid token. Padding holds NaN."""
    g = torch.Generator().manual_seed(seed)
    scale = {"near": 0.05, "far": 5.0, "empty": 1.0}
    d = torch.stack([scale[f] * torch.randn(t, generator=g, dtype=torch.float64) for f in forms])
    lengths = torch.randint(t // 2, t + 1, (len(forms),), generator=g)
    lengths[[i for i, f in enumerate(forms) if f == "empty"]] = 0
    mask = torch.arange(t) < lengths.unsqueeze(1)
    return torch.where(mask, d, torch.full_like(d, float("nan"))), mask


@pytest.mark.parametrize("forms", [
    ("near", "near", "empty"), ("far", "far", "empty"), ("near", "far", "empty", "far", "near"),
])
@pytest.mark.parametrize("p", [-3.0, 2.0])
def test_each_form_and_their_mix_match_float64_value_and_gradient(forms, p):
    d, mask = _rows_by_form(forms)
    x = d.float().requires_grad_(True)
    upstream = torch.randn(len(forms), dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    got = holder_log_ratio(x, mask, p)
    (got * upstream).sum().backward()
    clean = torch.nan_to_num(d)
    x64 = clean.clone().requires_grad_(True)
    ref = ref_holder_log_ratio(x64, mask, p)
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(x.grad[~mask] == 0)
    empty = torch.tensor([f == "empty" for f in forms])
    assert torch.all(got[empty] == 0)


@pytest.mark.parametrize("p", [-3.0, 0.0, 2.0])
def test_packed_layout_matches_padded_in_every_form(p):
    from holderpo_megatron.parallel.aggregation import PackedSequenceReducer

    d, mask = _rows_by_form(("near", "far", "empty", "near"))
    x = torch.nan_to_num(d).float().requires_grad_(True)
    padded = holder_log_ratio(x, mask, p)
    padded.sum().backward()
    # pack the valid tokens of every row back to back, with 3 tokens of no sequence at the end
    seg = torch.cat([torch.full((int(n),), i) for i, n in enumerate(mask.sum(-1))] + [torch.full((3,), -1)])
    vals = torch.cat([x.detach()[mask], torch.full((3,), float("nan"))]).requires_grad_(True)
    packed = holder_log_ratio(vals, torch.ones_like(seg, dtype=torch.bool), p, PackedSequenceReducer(seg, 4))
    packed.sum().backward()
    torch.testing.assert_close(packed, padded, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vals.grad[:-3], x.grad[mask], rtol=1e-6, atol=1e-8)
    assert torch.all(vals.grad[-3:] == 0)


def test_padding_garbage_and_inf_at_padding_do_not_leak():
    d, mask = _rows_by_form(("near", "far"))
    d = d.float()
    d[0, ~mask[0]] = float("inf")  # row 1 keeps NaN padding
    x = d.clone().requires_grad_(True)
    out = holder_log_ratio(x, mask, 2.0)
    out.sum().backward()
    torch.testing.assert_close(out.double(), ref_holder_log_ratio(torch.nan_to_num(d.double(), posinf=0.0), mask, 2.0),
                               rtol=1e-6, atol=1e-5)
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[~mask] == 0)

import math

import pytest
import torch

from holderpo_megatron.algorithms import entropy_from_logits, group_advantages, kl_penalty


def test_grpo_advantages_against_loop():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 0.0, 3.0])
    adv = group_advantages(r, 4)
    for g in range(3):
        x = r[4 * g: 4 * g + 4].double()
        std = x.std(unbiased=True)
        exp = (x - x.mean()) / (std + 1e-6) if std > 0 else torch.zeros(4, dtype=torch.float64)
        torch.testing.assert_close(adv[4 * g: 4 * g + 4].double(), exp, rtol=1e-6, atol=1e-7)
    assert torch.all(adv[4:8] == 0)  # identical rewards -> exactly 0


def test_dr_grpo_advantages_do_not_divide_and_identical_groups_zero():
    r = torch.tensor([3.0, 1.0, 2.0, 7.0, 7.0, 7.0])
    torch.testing.assert_close(group_advantages(r, 3, "dr_grpo")[:3], torch.tensor([1.0, -1.0, 0.0]))
    assert torch.all(group_advantages(r[3:], 3, "dr_grpo") == 0)
    assert torch.all(group_advantages(torch.tensor([0.3, 5.0]), 1) == 0)


@pytest.mark.parametrize("call,match", [
    (lambda: group_advantages(torch.zeros(5), 2), "not a multiple of group_size"),
    (lambda: group_advantages(torch.zeros(4), 0), "group_size must be"),
    (lambda: group_advantages(torch.zeros(4), 2, "ppo"), "advantage estimator must be one of"),
    (lambda: group_advantages(torch.zeros(2, 2), 2), "rewards must be"),
    (lambda: kl_penalty(torch.zeros(2), torch.zeros(2), "k4"), "KL estimator must be one of"),
    (lambda: kl_penalty(torch.zeros(2), torch.zeros(3)), "ref_logp shape"),
    (lambda: entropy_from_logits(torch.zeros(2, 3), temperature=0), "temperature must be"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5, -30.0])
    ref = torch.tensor([-1.5, -1.0, -0.5, -1.0])
    l = (logp - ref).double()
    torch.testing.assert_close(kl_penalty(logp, ref, "k1").double(), l)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2").double(), 0.5 * l**2)
    k3 = kl_penalty(logp, ref, "k3").double()
    exp = (torch.exp(-l) - 1 + l)
    torch.testing.assert_close(k3[:3], exp[:3], rtol=1e-6, atol=1e-7)
    assert k3[3] == 10.0  # far-off token: clamped, finite
    assert torch.all(kl_penalty(logp, ref, "k3") >= 0)


def test_kl_k3_unbiased_on_samples():
    # E_{x~pi}[k3] = KL(pi || ref) for two categorical distributions.
    g = torch.Generator().manual_seed(0)
    pi = torch.softmax(torch.randn(6, generator=g), 0).double()
    ref = torch.softmax(torch.randn(6, generator=g), 0).double()
    x = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    est = kl_penalty(torch.log(pi[x]), torch.log(ref[x]), "k3", clamp=50).double().mean()
    true = (pi * (pi / ref).log()).sum()
    assert abs(est - true) < 0.01


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_entropy_against_float64(temperature):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 97, generator=g) * 4
    got = entropy_from_logits(logits.bfloat16(), temperature, chunk_size=4)
    z = logits.bfloat16().double() / temperature
    p = torch.softmax(z, -1)
    ref = -(p * torch.log_softmax(z, -1)).sum(-1)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    uniform = entropy_from_logits(torch.zeros(2, 50))
    torch.testing.assert_close(uniform, torch.full((2,), math.log(50)))

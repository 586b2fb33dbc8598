"""Token log-probs / entropy from (unsharded) logits on one process: float64 reference, chunking,
the no-grad scoring path, gradient flags and bad inputs. TP > 1 is in tests/distributed."""

import pytest
import torch

from holderpo_megatron.parallel.logprobs import vocab_parallel_logprobs


def _case(n=10, v=17, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    return logits, target


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_matches_float64_log_softmax_and_entropy(temperature):
    logits, target = _case()
    ls = torch.log_softmax(logits.double() / temperature, -1)
    out = vocab_parallel_logprobs(logits, target, temperature=temperature, entropy=True)
    torch.testing.assert_close(out.logprobs.double(), ls.gather(1, target[:, None]).squeeze(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.entropy.double(), -(ls.exp() * ls).sum(-1), rtol=1e-6, atol=1e-6)


def test_large_logits_do_not_overflow_and_entropy_has_no_cancellation():
    logits, target = _case(v=50)
    logits = logits + 1e4  # a large common offset: exp would overflow without the max shift
    ls = torch.log_softmax(logits.double(), -1)
    out = vocab_parallel_logprobs(logits, target, entropy=True)
    torch.testing.assert_close(out.entropy.double(), -(ls.exp() * ls).sum(-1), rtol=0, atol=1e-5)


def test_chunk_size_does_not_change_results_and_any_leading_shape_works():
    logits, target = _case(n=24)
    outs = [vocab_parallel_logprobs(logits.reshape(2, 3, 4, -1), target.reshape(2, 3, 4), entropy=True, chunk_size=c)
            for c in (1, 5, 24, None)]
    for o in outs[1:]:
        torch.testing.assert_close(o.logprobs, outs[0].logprobs, rtol=1e-6, atol=1e-6)
        assert o.logprobs.shape == (2, 3, 4)


def test_gradients_flags_and_no_grad_path():
    logits, target = _case(dtype=torch.bfloat16)
    x = logits.clone().requires_grad_(True)
    out = vocab_parallel_logprobs(x, target, entropy=True)
    assert out.logprobs.requires_grad and not out.entropy.requires_grad
    out.logprobs.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    # (onehot - softmax) rows sum to 0
    assert x.grad.float().sum(-1).abs().max() < 2e-2
    y = logits.clone().requires_grad_(True)
    out = vocab_parallel_logprobs(y, target, entropy_grad=True)
    assert out.entropy.requires_grad
    out.entropy.sum().backward()
    ref = logits.double().requires_grad_(True)
    ls = torch.log_softmax(ref, -1)
    (-(ls.exp() * ls).sum()).backward()
    torch.testing.assert_close(y.grad.double(), ref.grad, rtol=1e-2, atol=2e-3)
    with torch.no_grad():
        fast = vocab_parallel_logprobs(x, target)
    assert fast.logprobs.grad_fn is None and fast.entropy is None


def test_vocab_padding_columns_are_excluded():
    logits, target = _case(v=20)
    target = target.clamp(max=14)
    padded = logits.clone()
    padded[:, 15:] = 1e9
    x = padded.clone().requires_grad_(True)
    out = vocab_parallel_logprobs(x, target, vocab_size=15, entropy=True)
    ref = vocab_parallel_logprobs(logits[:, :15], target, entropy=True)
    torch.testing.assert_close(out.logprobs, ref.logprobs)
    torch.testing.assert_close(out.entropy, ref.entropy)
    out.logprobs.sum().backward()
    assert torch.all(x.grad[:, 15:] == 0)


@pytest.mark.parametrize("kwargs,match", [
    ({"target": torch.zeros(9, dtype=torch.long)}, r"target shape \(9,\) does not match logits shape \(10, 17\)"),
    ({"target": torch.full((10,), 17)}, r"target id 17 is out of range \[0, vocab_size=17\)"),
    ({"target": torch.full((10,), -1)}, r"target id -1 is out of range"),
    ({"vocab_size": 12}, r"target id 1[2-6] is out of range \[0, vocab_size=12\)"),
    ({"target": torch.zeros(10)}, "target must be an integer tensor"),
    ({"temperature": 0.0}, r"temperature must be a finite number > 0, got 0.0"),
    ({"temperature": float("nan")}, r"temperature must be a finite number > 0, got nan"),
    ({"temperature": -1}, r"temperature must be a finite number > 0, got -1"),
    ({"vocab_size": 18}, r"vocab_size must be an int in \[1, vocab_local \* tp_size = 17\], got 18"),
    ({"vocab_start": -2}, r"vocab_start must be an int >= 0, got -2"),
    ({"chunk_size": 0}, r"chunk_size must be an int >= 1, got 0"),
    ({"logits": torch.zeros(3, dtype=torch.long)}, "logits must be a floating tensor"),
])
def test_bad_inputs_raise_value_error_naming_the_value(kwargs, match):
    logits, target = _case()
    target = target.clone()
    target[0] = 16  # so that vocab_size=12 names an id in range 12..16
    args = {"logits": logits, "target": target, **kwargs}
    with pytest.raises(ValueError, match=match):
        vocab_parallel_logprobs(args.pop("logits"), args.pop("target"), **args)

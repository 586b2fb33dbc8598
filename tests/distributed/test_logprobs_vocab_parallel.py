"""Vocab-parallel log-probs and entropy over real gloo TP groups (TP = 1, 2, 4) against a float64
full-vocabulary reference: values and gradients, temperature, TP padding columns, bf16 logits."""

import pytest
import torch
import torch.distributed as dist

from holderpo_megatron.parallel.logprobs import vocab_parallel_logprobs
from tests.distributed.gloo_spawn import AllReduceRecorder, run_gloo

pytestmark = pytest.mark.distributed

VOCAB_PADDED = 32  # divisible by every TP size tested
VOCAB = 23  # real vocabulary: 9 padding columns; at TP=4 the last shard is all padding
SHAPE = (3, 7)  # [batch, tokens]


def _full_case(seed: int, dtype):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(*SHAPE, VOCAB_PADDED, generator=g, dtype=torch.float64)
    logits[..., VOCAB:] = 1e4  # garbage in the padding columns: must never be read
    target = torch.randint(0, VOCAB, SHAPE, generator=g)
    target[0, 0], target[0, 1] = 0, VOCAB - 1  # first and last real ids
    g_lp = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    g_ent = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return logits.to(dtype), target, g_lp, g_ent


def _reference(logits, target, temperature, g_lp, g_ent):
    """float64 log_softmax over the real vocabulary, gathered; entropy; autograd gradients of
    sum(g_lp * logp) and of sum(g_lp * logp + g_ent * entropy)."""
    x = logits.double().requires_grad_(True)
    ls = torch.log_softmax(x[..., :VOCAB] / temperature, -1)
    logp = ls.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ent = -(ls.exp() * ls).sum(-1)
    (grad_lp,) = torch.autograd.grad((g_lp * logp).sum(), x, retain_graph=True)
    (grad_both,) = torch.autograd.grad((g_lp * logp + g_ent * ent).sum(), x)
    return logp.detach(), ent.detach(), grad_lp, grad_both


def _check_tp(rank: int, tp: int, group) -> None:
    width = VOCAB_PADDED // tp
    cols = slice(rank * width, (rank + 1) * width)
    for dtype in (torch.float32, torch.bfloat16):
        # bf16: the reference sees the same bf16 values, so logp/entropy differ only by float32
        # arithmetic; the gradient is rounded to bf16 on return.
        tol = dict(rtol=1e-5, atol=1e-5)
        gtol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=4e-3)
        for seed, temperature in ((0, 1.0), (1, 0.7)):
            logits, target, g_lp, g_ent = _full_case(seed, dtype)
            ref_lp, ref_ent, ref_g_lp, ref_g_both = _reference(logits, target, temperature, g_lp, g_ent)
            for chunk in (None, 4):
                kw = dict(vocab_size=VOCAB, temperature=temperature, group=group, chunk_size=chunk)
                shard = logits[..., cols].clone().requires_grad_(True)
                with AllReduceRecorder() as rec:
                    out = vocab_parallel_logprobs(shard, target, entropy=True, **kw)
                # O(tokens) communication: a MAX of [N] and one SUM of [3, N]
                n_tok = target.numel()
                assert rec.numels == ([n_tok, 3 * n_tok] if tp > 1 else []), rec.numels
                assert out.logprobs.dtype == torch.float32 and out.entropy.dtype == torch.float32
                torch.testing.assert_close(out.logprobs.double(), ref_lp, **tol)
                torch.testing.assert_close(out.entropy.double(), ref_ent, **tol)
                assert not out.entropy.requires_grad  # detached unless asked for
                with AllReduceRecorder() as rec:
                    (g_lp.float() * out.logprobs).sum().backward()
                assert rec.numels == []  # backward needs no communication
                assert shard.grad.dtype == dtype
                torch.testing.assert_close(shard.grad.double(), ref_g_lp[..., cols], **gtol)

                shard2 = logits[..., cols].clone().requires_grad_(True)
                out2 = vocab_parallel_logprobs(shard2, target, entropy_grad=True, **kw)
                (g_lp.float() * out2.logprobs + g_ent.float() * out2.entropy).sum().backward()
                torch.testing.assert_close(shard2.grad.double(), ref_g_both[..., cols], **gtol)
                # padding columns: no gradient at all
                pad_from = max(0, min(width, VOCAB - rank * width))
                assert torch.all(shard2.grad[..., pad_from:] == 0)

                with torch.no_grad():  # scoring path: same numbers, no graph
                    fast = vocab_parallel_logprobs(logits[..., cols], target, entropy=True, **kw)
                assert fast.logprobs.grad_fn is None
                assert torch.equal(fast.logprobs, out.logprobs.detach())
                assert torch.equal(fast.entropy, out.entropy)


def _worker(rank: int, world: int) -> None:
    if world == 2:
        _check_tp(0, 1, None)  # TP=1: full vocab on each process, no group
    _check_tp(rank, world, dist.group.WORLD)


def test_tp1_and_tp2_match_float64_reference():
    run_gloo(_worker, 2)


def test_tp4_with_an_all_padding_shard_matches_float64_reference():
    run_gloo(_worker, 4)

"""The fused output layer + vocab-parallel log-softmax at TP = 2 over real gloo groups, with the
output layer's input-side communication from Megatron's own mappings (``output_layer_input``):
without sequence parallelism (identity forward, all-reduce of grad_h) and with it (all-gather of
the sequence, reduce-scatter of grad_h). Against plain torch in float64 on one process: full
logits ``h @ W.T``, log_softmax, gather, entropy; gradients of the hidden states and of W."""

import pytest
import torch
import torch.distributed as dist

from holderpo_megatron.parallel.logprobs import output_layer_input, output_layer_logprobs
from tests.distributed.gloo_spawn import run_gloo

pytestmark = pytest.mark.distributed

S, B, H = 8, 2, 10  # [sequence, batch, hidden] as Megatron's decoder hands them over
V_PADDED, V = 32, 27  # 5 padding rows of W: the second shard's last ones


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(S, B, H, generator=g, dtype=torch.float64)
    w = torch.randn(V_PADDED, H, generator=g, dtype=torch.float64)
    w[V:] = 1e3  # padding rows: never read
    index = torch.randperm(S * B, generator=g)[:11]  # the positions the loss reads, any order
    target = torch.randint(0, V, (11,), generator=g)
    g_lp = torch.randn(11, generator=g, dtype=torch.float64)
    g_ent = torch.randn(11, generator=g, dtype=torch.float64)
    return hid, w, index, target, g_lp, g_ent


def _reference(hid, w, index, target, temperature, g_lp, g_ent):
    hid = hid.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    picked = hid.transpose(0, 1).reshape(-1, H)[index]
    ls = torch.log_softmax(picked @ w[:V].t() / temperature, -1)
    logp = ls.gather(1, target[:, None]).squeeze(1)
    ent = -(ls.exp() * ls).sum(-1)
    gh, gw = torch.autograd.grad((g_lp * logp + g_ent * ent).sum(), (hid, w))
    return logp.detach(), ent.detach(), gh, gw


def _worker(rank: int, world: int) -> None:
    from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

    enable_cpu_megatron()  # Megatron's mappings on gloo (reduce-scatter, all-gather into a tensor)
    group = dist.group.WORLD
    rows = slice(rank * V_PADDED // world, (rank + 1) * V_PADDED // world)
    seq = slice(rank * S // world, (rank + 1) * S // world)
    for seed, temperature, sp, entropy_grad in ((0, 1.0, False, True), (1, 0.7, True, True), (2, 1.3, True, False)):
        hid, w, index, target, g_lp, g_ent = _case(seed)
        if not entropy_grad:
            g_ent = torch.zeros_like(g_ent)
        ref_lp, ref_ent, ref_gh, ref_gw = _reference(hid, w, index, target, temperature, g_lp, g_ent)
        mine = (hid[seq] if sp else hid).float().clone().requires_grad_(True)
        w_shard = w[rows].float().clone().requires_grad_(True)
        x = output_layer_input(mine, sequence_parallel=sp, group=group)
        assert x.shape == (S, B, H)
        picked = x.transpose(0, 1).reshape(-1, H).index_select(0, index)
        out = output_layer_logprobs(picked, w_shard, target, vocab_size=V, temperature=temperature, group=group,
                                    entropy=True, entropy_grad=entropy_grad, chunk_size=4)
        tol = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.logprobs.double(), ref_lp, **tol)
        torch.testing.assert_close(out.entropy.double(), ref_ent, **tol)
        assert out.entropy.requires_grad == entropy_grad
        loss = (g_lp.float() * out.logprobs).sum()
        if entropy_grad:
            loss = loss + (g_ent.float() * out.entropy).sum()
        loss.backward()
        gtol = dict(rtol=1e-4, atol=1e-5)
        # the input's gradient: summed over the vocab shards (all-reduce) or, under SP, this
        # rank's sequence chunk of that sum (reduce-scatter)
        torch.testing.assert_close(mine.grad.double(), ref_gh[seq] if sp else ref_gh, **gtol)
        torch.testing.assert_close(w_shard.grad.double(), ref_gw[rows], **gtol)


def test_tp2_with_and_without_sequence_parallel_matches_float64_reference():
    run_gloo(_worker, 2)

"""The fused, chunked output layer + log-softmax (``output_layer_logprobs``) on one process against
plain torch in float64: full logits ``h @ W.T``, log_softmax, gather; gradients of h and W with
temperature, padding rows and the entropy's gradient; nothing of ``[tokens, vocab]`` saved for
backward. TP = 2 (with and without sequence parallelism) is in tests/distributed."""

import contextlib

import pytest
import torch

from holderpo_megatron.parallel.logprobs import output_layer_logprobs, vocab_parallel_logprobs

N, H, V_PADDED, V = 40, 12, 37, 31  # rows 31.. of W are TP padding: never read


def _case(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V_PADDED, H, generator=g, dtype=torch.float64)
    w[V:] = 1e3  # garbage in the padding rows
    target = torch.randint(0, V, (N,), generator=g)
    g_lp = torch.randn(N, generator=g, dtype=torch.float64)
    g_ent = torch.randn(N, generator=g, dtype=torch.float64)
    return h.to(dtype), w.to(dtype), target, g_lp, g_ent


def _reference(h, w, target, temperature, g_lp, g_ent):
    """(logp, entropy, d/dh and d/dW of sum(g_lp logp + g_ent entropy)) in float64, plain torch."""
    h = h.detach().double().clone().requires_grad_(True)
    w = w.detach().double().clone().requires_grad_(True)
    ls = torch.log_softmax((h @ w[:V].t()) / temperature, -1)
    logp = ls.gather(1, target[:, None]).squeeze(1)
    ent = -(ls.exp() * ls).sum(-1)
    gh, gw = torch.autograd.grad((g_lp * logp + g_ent * ent).sum(), (h, w))
    return logp.detach(), ent.detach(), gh, gw


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [None, 1, 7, N])
def test_values_and_gradients_match_full_logits_reference(temperature, chunk):
    h64, w64, target, g_lp, g_ent = _case()
    ref_lp, ref_ent, ref_gh, ref_gw = _reference(h64, w64, target, temperature, g_lp, g_ent)
    h = h64.float().requires_grad_(True)
    w = w64.float().requires_grad_(True)
    out = output_layer_logprobs(h, w, target, vocab_size=V, temperature=temperature, entropy_grad=True,
                                chunk_size=chunk)
    torch.testing.assert_close(out.logprobs.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref_ent, rtol=1e-5, atol=1e-5)
    (g_lp.float() * out.logprobs + g_ent.float() * out.entropy).sum().backward()
    torch.testing.assert_close(h.grad.double(), ref_gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), ref_gw, rtol=1e-4, atol=1e-5)
    assert torch.all(w.grad[V:] == 0)  # padding rows: no gradient


def test_entropy_without_its_gradient_and_no_grad_path():
    h64, w64, target, g_lp, _ = _case(seed=1)
    zero = torch.zeros_like(g_lp)
    ref_lp, ref_ent, ref_gh, ref_gw = _reference(h64, w64, target, 1.3, g_lp, zero)
    h, w = h64.float().requires_grad_(True), w64.float().requires_grad_(True)
    out = output_layer_logprobs(h, w, target, vocab_size=V, temperature=1.3, entropy=True)
    assert not out.entropy.requires_grad
    torch.testing.assert_close(out.entropy.double(), ref_ent, rtol=1e-5, atol=1e-5)
    (g_lp.float() * out.logprobs).sum().backward()
    torch.testing.assert_close(h.grad.double(), ref_gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), ref_gw, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        fast = output_layer_logprobs(h, w, target, vocab_size=V, temperature=1.3)
    assert fast.logprobs.grad_fn is None and fast.entropy is None
    torch.testing.assert_close(fast.logprobs, out.logprobs.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("ddp_flag", [True, False])
@pytest.mark.parametrize("hooked", [False, True])
def test_gradient_accumulation_fusion_adds_into_main_grad(ddp_flag, hooked):
    """Megatron's protocol: the weight gradient is added into ``main_grad`` in place, over two
    microbatches; autograd gets an unread placeholder only where DDP's flag exists (which is then
    set, on the parameter itself even when saved-tensor hooks hand back other objects), else None."""
    h64, w64, target, g_lp, g_ent = _case(seed=2)
    _, _, _, ref_gw = _reference(h64, w64, target, 0.7, g_lp, g_ent)
    w = torch.nn.Parameter(w64.float())
    before = torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    w.main_grad = before.clone()
    if ddp_flag:
        w.grad_added_to_main_grad = False
    for _ in range(2):  # two microbatches accumulate
        h = h64.float().requires_grad_(True)
        hooks = (torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t) if hooked
                 else contextlib.nullcontext())
        with hooks:
            out = output_layer_logprobs(h, w, target, vocab_size=V, temperature=0.7, entropy_grad=True,
                                        chunk_size=7, gradient_accumulation_fusion=True)
        (g_lp.float() * out.logprobs + g_ent.float() * out.entropy).sum().backward()
        assert (w.grad is not None) == ddp_flag and (not ddp_flag or w.grad_added_to_main_grad)
        w.grad = None
    torch.testing.assert_close(w.main_grad.double(), before.double() + 2 * ref_gw, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"gradient_accumulation_fusion needs weight.main_grad, a float32 tensor"):
        output_layer_logprobs(h, torch.nn.Parameter(w64.float()), target, gradient_accumulation_fusion=True)


def test_bf16_matches_the_unfused_path_on_bf16_logits():
    # bf16: the chunk's logits are rounded to bf16 as Megatron's output layer rounds them, so the
    # values equal the unfused path's on the same bf16 logits
    h64, w64, target, g_lp, _ = _case(seed=2)
    h, w = h64.bfloat16().requires_grad_(True), w64.bfloat16().requires_grad_(True)
    out = output_layer_logprobs(h, w, target, vocab_size=V, entropy=True)
    ref = vocab_parallel_logprobs(h.detach() @ w.detach().t(), target, vocab_size=V, entropy=True)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=0, atol=1e-6)
    (g_lp.float() * out.logprobs).sum().backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    _, _, ref_gh, ref_gw = _reference(h.detach(), w.detach(), target, 1.0, g_lp, torch.zeros_like(g_lp))
    torch.testing.assert_close(h.grad.double(), ref_gh, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w.grad.double(), ref_gw, rtol=2e-2, atol=2e-2)


def test_over_several_chunks_no_saved_tensor_has_a_vocab_sized_row_per_token():
    # what autograd keeps for backward over several chunks: h [N, H], W (the parameter itself) and
    # [N] vectors; the [N, vocab] logits the unfused path saves (and their gradient) never exist
    n, hid, v = 512, 16, 4096
    g = torch.Generator().manual_seed(3)
    h = torch.randn(n, hid, generator=g).requires_grad_(True)
    w = torch.nn.Parameter(torch.randn(v, hid, generator=g) / 4)
    target = torch.randint(0, v, (n,), generator=g)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t is w or t.data_ptr() == w.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = output_layer_logprobs(h, w, target, entropy_grad=True, chunk_size=64)
    (out.logprobs + out.entropy).sum().backward()
    assert saved, "the op saved nothing: the hook did not see it"
    for shape, is_weight in saved:
        if not is_weight:
            assert all(d < v for d in shape), f"a saved tensor of shape {shape} has a vocab-sized dim"
    # the same hook sees the unfused path's logits
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vocab_parallel_logprobs(h @ w.t(), target)
    assert any(shape == (n, v) for shape, _ in saved)


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_one_chunk_keeps_its_buffer_for_backward_and_a_second_backward_agrees(entropy_grad):
    # tokens that fit one chunk: the forward's working buffer [N, V] (real columns only) is saved for
    # backward instead of multiplying h W^T again; it is the only vocab-sized tensor saved, and a
    # second backward over the same graph gives the same gradients (the buffer is not consumed)
    h64, w64, target, g_lp, g_ent = _case(seed=4)
    g_ent = g_ent if entropy_grad else torch.zeros_like(g_ent)
    _, _, ref_gh, ref_gw = _reference(h64, w64, target, 0.7, g_lp, g_ent)
    h, w = h64.float().requires_grad_(True), w64.float().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = output_layer_logprobs(h, w, target, vocab_size=V, temperature=0.7, entropy_grad=entropy_grad,
                                    entropy=True)
    assert sorted(s for s in saved if V in s or V_PADDED in s) == [(V_PADDED, H), (N, V)]  # weight, kept buffer
    loss = (g_lp.float() * out.logprobs + g_ent.float() * out.entropy).sum()
    gh1, gw1 = torch.autograd.grad(loss, (h, w), retain_graph=True)
    gh2, gw2 = torch.autograd.grad(loss, (h, w))
    torch.testing.assert_close(gh1.double(), ref_gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw1.double(), ref_gw, rtol=1e-4, atol=1e-5)
    assert torch.equal(gh1, gh2) and torch.equal(gw1, gw2)


@pytest.mark.parametrize("kwargs,match", [
    ({"hidden": torch.zeros(4, 3, 2)}, r"hidden must be a floating tensor \[tokens, hidden_size\]"),
    ({"weight": torch.zeros(9, 5)}, r"weight must be a \[vocab_local >= 1, 6\] tensor of dtype torch.float32"),
    ({"weight": torch.zeros(9, 6, dtype=torch.float64)}, r"weight must be .* got tensor of shape \(9, 6\) and dtype torch.float64"),
    ({"target": torch.zeros(3, dtype=torch.long)}, r"target shape \(3,\) does not match hidden's tokens \(4,\)"),
    ({"target": torch.full((4,), 9)}, r"target id 9 is out of range \[0, vocab_size=9\)"),
    ({"temperature": 0.0}, r"temperature must be a finite number > 0, got 0.0"),
    ({"chunk_size": 0}, r"chunk_size must be an int >= 1, got 0"),
])
def test_bad_inputs_raise_value_error_naming_the_value(kwargs, match):
    args = dict(hidden=torch.zeros(4, 6), weight=torch.zeros(9, 6), target=torch.zeros(4, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        output_layer_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("target"), **args)

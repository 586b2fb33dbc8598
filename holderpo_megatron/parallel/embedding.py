"""The word embedding's weight gradient straight into Megatron's ``main_grad``.

Megatron's ``VocabParallelEmbedding`` looks tokens up with ``F.embedding``, whose backward makes a
dense ``[vocab / TP, H]`` gradient (zeros plus the few rows the batch touched) that DDP's hook then
adds into ``main_grad``: three passes over the whole table per microbatch for a few hundred rows
(SmolLM2-135M: 113 MB each; 1.5 s of a 28 s CPU train phase). Where the model's linear layers use
``gradient_accumulation_fusion``, :func:`fuse_embedding_wgrad` gives the embedding the same
protocol: its backward adds the touched rows into ``main_grad`` in place (``index_add_``), hands
autograd an unread placeholder and sets ``grad_added_to_main_grad`` so DDP's hook does not add it.

A weight tied to the output layer on the same pipeline stage (``pp = 1``) has two users; both then
write ``main_grad`` themselves (the output layer: ``parallel.logprobs.output_layer_logprobs``), and
only the embedding, the last to run backward, hands autograd the placeholder
(``weight.wgrad_from_embedding``): the output layer returns none, so no two placeholders are summed
and Megatron's ``zero_out_wgrad`` (zero placeholders, for users that do not write ``main_grad``
themselves) is not needed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fuse_embedding_wgrad"]


class _EmbeddingWgradFusion(torch.autograd.Function):
    """``F.embedding(ids, weight)``; backward: ``weight.main_grad[ids] += grad`` (float32)."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.param = weight  # the parameter object itself: DDP's flag lives on it
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        param = ctx.param
        main = param.main_grad
        main.index_add_(0, ids.reshape(-1), grad.reshape(-1, main.shape[1]).to(main.dtype))
        param.grad_added_to_main_grad = True
        # unread: DDP's hook skips a parameter whose flag is set (zero_out_wgrad is cleared)
        return None, torch.empty(param.shape, dtype=param.dtype, device=param.device)


def _fused_forward(self, input_):
    fuse = torch.is_grad_enabled() and self.weight.requires_grad and getattr(self.weight, "main_grad", None) is not None
    if not fuse:
        return self._unfused_forward(input_)
    tp = self.tp_group.size()
    if tp > 1:
        outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
        ids = (input_ - self.vocab_start_index).masked_fill(outside, 0)
    else:
        ids = input_
    out = _EmbeddingWgradFusion.apply(ids, self.weight)
    if tp == 1:
        return out
    from megatron.core.tensor_parallel.mappings import (
        reduce_from_tensor_model_parallel_region,
        reduce_scatter_to_sequence_parallel_region,
    )

    out = out.masked_fill(outside.unsqueeze(-1), 0.0)
    if self.reduce_scatter_embeddings:  # [b, s, h] -> [s, b, h], as Megatron's layer
        return reduce_scatter_to_sequence_parallel_region(out.transpose(0, 1).contiguous(), group=self.tp_group)
    return reduce_from_tensor_model_parallel_region(out, group=self.tp_group)


_FUSED: dict[type, type] = {}


def fuse_embedding_wgrad(gpt) -> bool:
    """Give ``gpt``'s word embedding (a first-stage ``GPTModel``, after DDP gave its weight a
    ``main_grad``) the gradient-accumulation fusion above; returns whether it did (False on a
    stage without the embedding). The layer keeps its parameters and names (its class becomes a
    subclass), and its own forward wherever no gradient is taken."""
    if not getattr(gpt, "pre_process", False):
        return False
    layer = gpt.embedding.word_embeddings
    weight = layer.weight
    if getattr(weight, "main_grad", None) is None:
        raise ValueError("fuse_embedding_wgrad: the embedding weight has no main_grad (wrap the model in Megatron DDP first)")
    cls = type(layer)
    if cls not in _FUSED.values():
        if cls not in _FUSED:
            _FUSED[cls] = type(f"WgradFused{cls.__name__}", (cls,),
                               {"forward": _fused_forward, "_unfused_forward": cls.forward})
        layer.__class__ = _FUSED[cls]
    if gpt.post_process and gpt.share_embeddings_and_output_weights:
        weight.wgrad_from_embedding = True  # the output layer on this stage returns no placeholder
        weight.zero_out_wgrad = False  # no placeholder is read: both users write main_grad themselves
    return True

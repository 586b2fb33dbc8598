"""How per-token tensors map to sequences: the one seam between the losses and the token layout.

Every loss in :mod:`.losses` needs only a handful of per-sequence reductions of per-token tensors
(sums, a max, counts) and a way to send per-sequence values back to the tokens. A
:class:`SequenceReducer` provides exactly those, so the same loss code runs on

* padded ``[B, T]`` rows, one sequence per row (:class:`PaddedReducer`, the default, here),
* packed rows (THD: several sequences per row, by segment id) and
* context-parallel shards (one sequence's tokens split over ranks)

(the last two live in ``parallel/aggregation``; this package stays pure torch on local tensors).

Reporting convention (what makes microbatches and ranks add up exactly): per-token sums are always
over this shard's tokens; per-sequence values go through :meth:`SequenceReducer.total`, which counts
each sequence on exactly one rank (its *owner*) while still giving every rank the gradient of its own
tokens. So the sum over all ranks and microbatches of ``loss_sum`` / ``loss_count`` / metric sums is
the global one, with no double counting under context parallelism.
"""

from __future__ import annotations

import torch

__all__ = ["SequenceReducer", "PaddedReducer"]


class SequenceReducer:
    """Per-sequence reductions over a layout of token tensors (the interface).

    "Token-shaped" means the layout's token tensor shape (``[B, T]`` padded, ``[N]`` or ``[1, N]``
    packed). Per-sequence tensors are ``[S]`` with ``S = num_sequences``; under context parallelism
    they are the *global* per-sequence values, identical on every rank of the group.
    """

    num_sequences: int
    #: The generation budget implied by the layout (Dr. GRPO's default divisor), or None if the layout
    #: does not imply one (packed and context-parallel layouts).
    default_max_len: int | None = None

    def check_tokens(self, name: str, t: torch.Tensor) -> None:
        """Raise ValueError unless ``t`` is a token-shaped tensor of this layout."""
        raise NotImplementedError

    def token_member(self) -> torch.Tensor | None:
        """Bool token-shaped tensor, False at tokens that belong to no sequence (packing padding);
        None if every token belongs to a sequence."""
        return None

    def seq_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``[S]`` per-sequence sum of token-shaped ``x``; differentiable (the gradient of a token is
        the upstream gradient of its sequence)."""
        raise NotImplementedError

    def seq_sums(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Several :meth:`seq_sum` at once (one collective where the layout needs one)."""
        return tuple(self.seq_sum(x) for x in xs)

    def seq_max(self, x: torch.Tensor) -> torch.Tensor:
        """``[S]`` per-sequence max of token-shaped ``x`` (-inf for a sequence with no token); no
        gradient (only used as a numerical shift)."""
        raise NotImplementedError

    def broadcast(self, s: torch.Tensor) -> torch.Tensor:
        """Per-sequence ``[S]`` values as a tensor that broadcasts against token-shaped tensors
        (each token gets its sequence's value); differentiable."""
        raise NotImplementedError

    def owns_sequences(self) -> bool:
        """Whether this rank reports the per-sequence values (True except on the non-owning ranks of
        a context-parallel group)."""
        return True

    def total(self, per_seq: torch.Tensor) -> torch.Tensor:
        """Sum over sequences of ``[S]`` ``per_seq`` as this rank reports it: the full sum on the
        owning rank, exactly 0 elsewhere; the gradient is that of the full sum on every rank (each
        rank back-propagates it into its own tokens only)."""
        s = per_seq.sum()
        if self.owns_sequences():
            return s
        # value 0, gradient d(sum)/d(per_seq) = 1: the replicated loss reaches this rank's tokens.
        return s - s.detach()


class PaddedReducer(SequenceReducer):
    """One sequence per row of ``[B, T]`` tensors; reductions along the last dim."""

    def __init__(self, shape: torch.Size | tuple[int, int]):
        if len(shape) != 2:
            raise ValueError(f"PaddedReducer needs a [batch, tokens] shape, got {tuple(shape)}")
        self.shape = torch.Size(shape)
        self.num_sequences = int(shape[0])
        self.default_max_len = int(shape[1])

    def check_tokens(self, name: str, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.shape != self.shape:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must have the padded layout's shape {tuple(self.shape)}, got {got}")

    def seq_sum(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(-1)

    def seq_max(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 0:
            return torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)
        return x.detach().amax(-1)

    def broadcast(self, s: torch.Tensor) -> torch.Tensor:
        return s.unsqueeze(-1)

"""Token entropy from full (unsharded) logits. The vocab-parallel version lives in ``parallel/``."""

from __future__ import annotations

import torch

__all__ = ["entropy_from_logits"]


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy in nats of softmax(logits / temperature) over the last dim.

    ``logits``: ``[..., vocab]``; returns ``[...]`` float32. Processed in chunks of rows so the
    float32 working copy is at most ``chunk_size x vocab``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for chunk in flat.split(chunk_size):
        z = chunk.float() / temperature
        logz = torch.logsumexp(z, -1, keepdim=True)
        prob = torch.exp(z - logz)
        out.append(logz.squeeze(-1) - (prob * z).sum(-1))
    return torch.cat(out).reshape(logits.shape[:-1]) if out else flat.new_zeros(logits.shape[:-1], dtype=torch.float32)

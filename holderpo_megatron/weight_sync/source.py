"""Where the weights come from: full HF-named tensors of this rank's pipeline stage.

:class:`MegatronWeightSource` streams a Megatron model through ``checkpoint.export_hf_weights``
(each stage converts only its own layers); at TP > 1 it hands out buckets whose tensor-parallel
shards are gathered to the stage's sender only (``tp_gather``). :class:`StateDictSource` serves an
in-memory HF state dict (one process, no Megatron: tools, benchmarks, tests of engines).
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch

from ..checkpoint.mapping import expected_hf_shapes, export_hf_weights, export_params
from .buckets import group_into_buckets, share_all
from .tp_gather import GatheredBucket, PeerShards, TPGroup, gathered_buckets

__all__ = ["WeightSource", "MegatronWeightSource", "StateDictSource"]


class WeightSource:
    """What a synchroniser needs from the trainer side.

    ``participates``: this rank must iterate :meth:`buckets` (every TP rank of the stage, in
    step: at TP > 1 the peers send their shards to the sender). ``is_sender``: this rank's tensors are the ones sent
    (one rank per pipeline stage). ``stage_senders[s]``: global rank of stage ``s``'s sender; stage
    0's sender owns the engine handle.
    """

    expected: dict[str, tuple[int, ...]]
    stage_expected: dict[str, tuple[int, ...]]
    pp_rank: int = 0
    pp_size: int = 1
    tp_size: int = 1  # >1: exported tensors are TP-gathered copies, never views of parameters
    participates: bool = True
    is_sender: bool = True
    stage_senders: list[int] = [0]
    sender_group = None  # a process group joining exactly the stage senders (None: one stage)
    device: torch.device = torch.device("cpu")

    @property
    def is_owner(self) -> bool:
        return self.is_sender and self.pp_rank == 0

    def named_tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def buckets(self, dtype: torch.dtype, bucket_bytes: int
                ) -> Iterator[list[tuple[str, torch.Tensor]] | GatheredBucket]:
        """This rank's stage in buckets of at most ``bucket_bytes``: groups of named tensors, or
        (TP > 1) :class:`GatheredBucket` s, which the sender packs and its TP peers send."""
        return group_into_buckets(self.named_tensors(dtype), bucket_bytes)

    def share_memory(self) -> None:
        """Move the tensors this rank sends into shared memory (CPU, once), so a colocated engine
        reads them in place: the tensor transport then copies only what the export creates."""


class MegatronWeightSource(WeightSource):
    """``model``: the Actor's model chunks (``actor.unwrapped()``); ``arch``: its ModelArch.
    ``feeds``: this rank's data-parallel replica feeds an engine (a fleet: every replica with an
    engine of its own); None: only the first replica does (one engine). ``hosts``: every global
    rank's host identity, as the launch names it (None: one host). ``tp_gather`` (TP > 1): how a
    stage's TP peers hand their shards to its sender: ``"shared"`` as shared-memory handles (CPU,
    the TP group on one host), ``"p2p"`` as bytes sent point to point over the TP group (NCCL on
    GPU), ``"auto"`` the first where it can. Construct on every rank after model-parallel
    initialisation."""

    TP_GATHERS = ("auto", "shared", "p2p")

    def __init__(self, model, arch, feeds: bool | None = None, hosts=None, tp_gather: str = "auto"):
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        if tp_gather not in self.TP_GATHERS:
            raise ValueError(f"tp_gather={tp_gather!r} is invalid; allowed: {' | '.join(map(repr, self.TP_GATHERS))}")

        self.model = model
        self.arch = arch
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        if feeds is None:
            feeds = ps.get_data_parallel_rank() == 0
        feeds = feeds and ps.get_context_parallel_rank() == 0  # CP ranks hold copies: one sends
        self.participates = feeds
        self.is_sender = feeds and ps.get_tensor_model_parallel_rank() == 0
        # Megatron's pipeline group of this rank; on the senders it joins exactly the stage senders
        self.sender_group = ps.get_pipeline_model_parallel_group()
        self.stage_senders = dist.get_process_group_ranks(self.sender_group)
        self.expected = expected_hf_shapes(arch)
        chunks = model if isinstance(model, (list, tuple)) else [model]
        layers = []
        for c in chunks:
            while hasattr(c, "module") and not hasattr(c, "decoder"):
                c = c.module
            if getattr(c, "decoder", None) is not None:
                layers += [layer.layer_number - 1 for layer in c.decoder.layers]
        self.stage_expected = expected_hf_shapes(
            arch, sorted(layers), embedding=ps.is_pipeline_first_stage(ignore_virtual=True),
            head=ps.is_pipeline_last_stage(ignore_virtual=True))
        p = next(iter(chunks[0].parameters()))
        self.device = p.device
        tp_group = ps.get_tensor_model_parallel_group()
        self.tp = TPGroup(tuple(dist.get_process_group_ranks(tp_group)), ps.get_tensor_model_parallel_rank(),
                          tp_group) if self.tp_size > 1 else None
        self.tp_gather = "p2p"
        if self.tp is not None and tp_gather != "p2p":
            one_host = hosts is None or len({hosts[r] for r in self.tp.ranks}) == 1
            if tp_gather == "shared" and not (one_host and self.device.type == "cpu"):
                where = "on GPU" if self.device.type != "cpu" else \
                    "across hosts " + str(sorted({hosts[r] for r in self.tp.ranks}))
                raise ValueError(f"tp_gather='shared' needs the TP group's CPU tensors on one host, but it runs {where}; "
                                 "allowed there: 'p2p' or 'auto'")
            if one_host and self.device.type == "cpu":
                self.tp_gather = "shared"
        self._peer_shards = PeerShards() if self.tp_gather == "shared" else None
        if self._peer_shards is not None and self.participates and not self.is_sender:
            # a peer's parameters move into shared memory now, in place (one copy, once), so its
            # sender can read them without a copy of its own
            share_all(p.local for p in export_params(model, arch) if p.mapping.tp_dim is not None)

    def named_tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """Every TP rank yields the full tensors (all-gathered); syncs use :meth:`buckets`."""
        return export_hf_weights(self.model, self.arch, dtype=dtype)

    def buckets(self, dtype: torch.dtype, bucket_bytes: int):
        if self.tp is None:
            return super().buckets(dtype, bucket_bytes)
        return gathered_buckets(export_params(self.model, self.arch), dtype, bucket_bytes, self.tp, self.arch,
                                self._peer_shards)

    def share_memory(self) -> None:
        # In place: the parameters' storages move to shared memory (one copy, once); the optimizer
        # and DDP keep the same Parameter objects. With the non-distributed optimizer (the CPU
        # case) every parameter owns its storage.
        chunks = self.model if isinstance(self.model, (list, tuple)) else [self.model]
        share_all(p.data for c in chunks for p in c.parameters())


class StateDictSource(WeightSource):
    """An HF state dict in this process (``lm_head.weight`` of a tied model is dropped, as the
    export does). ``expected`` defaults to the dict's own names and shapes."""

    def __init__(self, state: Mapping[str, torch.Tensor], arch=None):
        state = dict(state)
        if arch is not None and arch.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        self.state = state
        self.expected = expected_hf_shapes(arch) if arch is not None else {k: tuple(v.shape) for k, v in state.items()}
        self.stage_expected = self.expected
        self.stage_senders = [0]
        self.device = next(iter(state.values())).device

    def named_tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.expected:
            yield name, self.state[name].detach().to(dtype).contiguous()

    def share_memory(self) -> None:
        share_all(self.state.values())

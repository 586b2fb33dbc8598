"""Which transport, from where the senders and the engine run: :class:`SyncTopology`,
:func:`choose_transport`, :func:`make_weight_synchronizer`.

=================  ===========================================  ==============================================
transport          engine call                                  stage relay to the owner
=================  ===========================================  ==============================================
``tensor``         ``update_weights_from_tensor`` per bucket    shared-memory handles (CPU; no data copied)
``distributed``    ``update_weights_from_distributed`` per      point-to-point send over the trainer world
                   bucket, broadcast over a weights-update group
``disk``           ``update_weights_from_disk`` once            none: each sender writes its own safetensors
=================  ===========================================  ==============================================

The rule for ``auto``: ``tensor`` (shared memory / CUDA IPC handles, which only a process on the
same host can open) when every stage sender is on the engine's host and the engine is not
remote; otherwise ``distributed``, which reaches an engine anywhere. ``disk`` only when asked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence
from urllib.parse import urlsplit

import torch

from ..rollout.interface import RolloutEngine
from .base import WeightSynchronizer
from .buckets import DEFAULT_BUCKET_BYTES
from .disk_transport import DiskTransport
from .distributed_transport import DistributedTransport
from .source import WeightSource
from .tensor_transport import TensorTransport

__all__ = ["TRANSPORTS", "SyncTopology", "choose_transport", "make_weight_synchronizer"]

log = logging.getLogger(__name__)

TRANSPORTS: dict[str, type[WeightSynchronizer]] = {
    "tensor": TensorTransport, "distributed": DistributedTransport, "disk": DiskTransport,
}

# URL hosts that mean "the owner's own host" (the owner is the process that talks to the servers)
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0"})


@dataclass(frozen=True)
class SyncTopology:
    """Where the ranks feeding the engine run, relative to the engine.

    ``sender_hosts``: the host identity of each pipeline stage's sender, in stage order (stage 0's
    sender is the owner); any string naming a machine (a hostname, a node rank), compared only for
    equality. ``engine_host``: the host identity where the engine's processes run. ``tp_size``: the
    trainer's tensor-parallel size (TP peers export in step with their stage's sender; they feed
    the engine through it). ``engine_remote``: the engine is reached over the network on a host not
    known to be ``engine_host`` (SGLang servers given as URLs elsewhere).

    Build it with :meth:`from_layout` (global ranks and the torchrun node layout) or
    :meth:`from_hosts` (host identities)."""

    sender_hosts: tuple[str, ...]
    engine_host: str
    tp_size: int = 1
    engine_remote: bool = False

    def __post_init__(self):
        hosts = tuple(self.sender_hosts)
        if not hosts or not all(isinstance(h, str) and h for h in hosts):
            raise ValueError(f"sender_hosts={self.sender_hosts!r} is invalid; allowed: one non-empty str per "
                             "pipeline stage")
        if not isinstance(self.engine_host, str) or not self.engine_host:
            raise ValueError(f"engine_host={self.engine_host!r} is invalid; allowed: a non-empty str")
        if isinstance(self.tp_size, bool) or not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise ValueError(f"tp_size={self.tp_size!r} is invalid; allowed: an int >= 1")
        object.__setattr__(self, "sender_hosts", hosts)

    @property
    def pp_size(self) -> int:
        return len(self.sender_hosts)

    @property
    def senders_on_engine_host(self) -> bool:
        return all(h == self.engine_host for h in self.sender_hosts)

    @property
    def reason(self) -> str:
        """Why :func:`choose_transport` picks what it picks, in words."""
        shape = f"pp={self.pp_size}, tp={self.tp_size}"
        if self.engine_remote:
            return f"the engine is remote (reached over the network; {shape})"
        away = [f"stage {s} on {h!r}" for s, h in enumerate(self.sender_hosts) if h != self.engine_host]
        if away:
            return f"not every stage sender is on the engine's host {self.engine_host!r}: {', '.join(away)} ({shape})"
        return f"every stage sender is on the engine's host {self.engine_host!r} ({shape})"

    @classmethod
    def from_hosts(cls, sender_hosts: Sequence[str], engine_host: str, *, tp: int = 1,
                   server_urls: Sequence[str] = ()) -> "SyncTopology":
        """From host identities. ``server_urls``: the engine's SGLang servers when given as URLs;
        the engine is remote if any of them is on neither a loopback address nor ``engine_host``."""
        remote = any((urlsplit(u).hostname or "") not in _LOOPBACK | {engine_host} for u in server_urls)
        return cls(tuple(sender_hosts), engine_host, tp_size=tp, engine_remote=remote)

    @classmethod
    def from_layout(cls, *, stage_senders: Sequence[int], nproc_per_node: int, tp: int = 1,
                    server_urls: Sequence[str] = (), hosts: Mapping[int, str] | Sequence[str] | None = None,
                    engine_rank: int | None = None) -> "SyncTopology":
        """From global ranks, no Megatron needed. ``stage_senders``: the global rank of each stage's
        sender (``WeightSource.stage_senders``); the engine runs with ``engine_rank`` (default:
        stage 0's sender, the owner). A rank's host is ``hosts[rank]`` when given (e.g. every
        rank's hostname, gathered), else its torchrun node: ``f"node{rank // nproc_per_node}"``
        (torchrun places ranks node by node)."""
        if isinstance(nproc_per_node, bool) or not isinstance(nproc_per_node, int) or nproc_per_node < 1:
            raise ValueError(f"nproc_per_node={nproc_per_node!r} is invalid; allowed: an int >= 1")
        if not stage_senders:
            raise ValueError("stage_senders is empty; allowed: one global rank per pipeline stage")

        def host(rank: int) -> str:
            return str(hosts[rank]) if hosts is not None else f"node{rank // nproc_per_node}"

        engine = stage_senders[0] if engine_rank is None else engine_rank
        return cls.from_hosts([host(r) for r in stage_senders], host(engine), tp=tp, server_urls=server_urls)


def choose_transport(topology: SyncTopology) -> str:
    """``"tensor"`` when every sender can open the engine's memory handles (same host, local
    engine), else ``"distributed"``. Never ``"disk"``: that one is asked for by name."""
    if not topology.engine_remote and topology.senders_on_engine_host:
        return "tensor"
    return "distributed"


def make_weight_synchronizer(source: WeightSource, engine: RolloutEngine | None, *, dtype: torch.dtype,
                             transport: str = "auto", topology: SyncTopology | None = None,
                             bucket_bytes: int = DEFAULT_BUCKET_BYTES, **transport_kwargs) -> WeightSynchronizer:
    """The synchroniser for ``transport`` ("auto": picked from ``topology`` by :func:`choose_transport`).
    Call on every trainer rank; ``engine`` on the owner rank only, None elsewhere. ``dtype``: the
    engine's weight dtype (``SGLangEngineConfig.torch_dtype``), known on every rank. ``topology``:
    derived by the caller (:meth:`SyncTopology.from_layout`); None is read as one host (a warning
    says so). ``transport_kwargs``: the transport class's own options. The owner logs the choice
    and its reason once."""
    if transport != "auto" and transport not in TRANSPORTS:
        raise ValueError(f"transport={transport!r} is invalid; allowed: 'auto' | {' | '.join(map(repr, TRANSPORTS))}")
    assumed = topology is None
    if assumed:
        topology = SyncTopology(("local",) * source.pp_size, "local", tp_size=source.tp_size)
    if transport == "auto":
        name, why = choose_transport(topology), f"auto: {topology.reason}"
    else:
        name, why = transport, "asked for"
        if name == "tensor" and choose_transport(topology) != "tensor":
            raise ValueError(f"transport='tensor' needs every stage sender on the engine's host, but "
                             f"{topology.reason}; use 'distributed' (or 'auto')")
    sync = TRANSPORTS[name](source, engine, dtype=dtype, bucket_bytes=bucket_bytes, **transport_kwargs)
    if source.is_owner:
        if assumed and transport == "auto":
            log.warning("weight sync: no topology given; assuming every stage sender shares the engine's host "
                        "(pass topology=SyncTopology.from_layout(...) on a multi-node run)")
        log.info("weight sync: transport=%s (%s)", name, why)
    return sync

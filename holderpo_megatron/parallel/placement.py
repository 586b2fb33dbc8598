"""Where the rollout engines run and who feeds them weights: pure data, computed before any worker starts.

    p = plan_placement(nnodes=1, gpus_per_node=8, tp=2, engine_tp=2)
    p.engines[1]      # EngineSlot(index=1, node=0, gpus=(2, 3), owner_rank=2, replica=1, feed='local', ...)
    print(p.describe())

Ranks follow Megatron-Core's default order ``tp-cp-ep-dp-pp`` (tp fastest, pp slowest):

    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

and torchrun puts global rank ``r`` on node ``r // gpus_per_node``, local GPU ``r % gpus_per_node``.
A DP replica is every rank with one ``dp_rank``; it holds the full model (its cp ranks hold copies).

colocated: ``gpus_per_node / engine_tp`` engines per node on the trainer's own GPUs. An engine's owner
  (the rank that starts it) is the lowest rank on its GPUs; it is fed by the lowest DP replica with a
  rank on its GPUs: ``local`` when that replica lives entirely on the engine's node (shared memory /
  CUDA IPC, no traffic beyond the TP gather), else ``broadcast`` from the replica's stage senders.
separate: engines on GPUs the trainer does not use: ``engine_gpus_per_node`` extra GPUs on each trainer
  node (owner: the node's lowest rank), or on ``engine_nodes`` dedicated nodes (no owner: started on
  their node by whoever runs it), or servers at ``server_urls`` someone else runs. They are fed by
  ``broadcast`` from replica 0's stage senders over a weights-update group.

No torch or Megatron import: ``holderpo plan`` and config validation use it on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

__all__ = ["EngineSlot", "Placement", "RankCoords", "plan_placement", "rank_coords", "replica_ranks",
           "PLACEMENTS", "FEEDS"]

PLACEMENTS = ("colocated", "separate")
FEEDS = ("local", "broadcast")


@dataclass(frozen=True)
class RankCoords:
    tp: int
    cp: int
    dp: int
    pp: int


def _check_sizes(**sizes: int) -> None:
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")


def rank_coords(rank: int, *, tp: int, cp: int, dp: int, pp: int) -> RankCoords:
    """(tp, cp, dp, pp) ranks of a global rank under Megatron's default order tp-cp-ep-dp-pp."""
    if not 0 <= rank < tp * cp * dp * pp:
        raise ValueError(f"rank {rank} is outside the world of tp*cp*dp*pp = {tp * cp * dp * pp} ranks")
    return RankCoords(tp=rank % tp, cp=rank // tp % cp, dp=rank // (tp * cp) % dp, pp=rank // (tp * cp * dp))


def _rank(tp_rank: int, cp_rank: int, dp_rank: int, pp_rank: int, tp: int, cp: int, dp: int) -> int:
    return tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))


def replica_ranks(dp_rank: int, *, tp: int, cp: int, dp: int, pp: int) -> tuple[int, ...]:
    """Every global rank of DP replica ``dp_rank`` (all its tp, cp and pp ranks), ascending."""
    return tuple(sorted(_rank(t, c, dp_rank, s, tp, cp, dp) for s in range(pp) for c in range(cp) for t in range(tp)))


@dataclass(frozen=True)
class EngineSlot:
    """One rollout engine.

    node: its node index (trainer nodes first, then dedicated engine nodes); None for a URL.
    gpus: local GPU ids on that node (CPU runs: the ranks' device slots); () for a URL.
    owner_rank: the trainer rank that starts it; None where no trainer rank lives on its node.
    replica: the DP replica that feeds it; feeding_ranks: that replica's ranks at cp rank 0 (one copy of
    every weight, gathered over TP); senders: per pipeline stage, its tp-0/cp-0 rank, which pushes the
    stage's tensors. feed: ``local`` (the replica lives on the engine's node) or ``broadcast``.
    """

    index: int
    node: int | None
    gpus: tuple[int, ...]
    owner_rank: int | None
    replica: int
    feeding_ranks: tuple[int, ...]
    senders: tuple[int, ...]
    feed: Literal["local", "broadcast"]
    url: str | None = None


@dataclass(frozen=True)
class Placement:
    placement: Literal["colocated", "separate"]
    nnodes: int  # trainer nodes
    gpus_per_node: int  # trainer ranks (GPUs) per trainer node
    tp: int
    pp: int
    cp: int
    dp: int
    engine_tp: int
    engine_gpus_per_node: int  # separate: engine GPUs per node (extra on trainer nodes, or on engine nodes)
    engine_nodes: int  # separate: dedicated engine nodes after the trainer's
    engines: tuple[EngineSlot, ...]

    @property
    def world_size(self) -> int:
        return self.nnodes * self.gpus_per_node

    @property
    def total_gpus(self) -> int:
        """GPUs the run occupies (trainer and engines); servers at URLs are not counted."""
        if self.placement == "colocated":
            return self.world_size
        if self.engine_nodes:
            return self.world_size + self.engine_nodes * self.engine_gpus_per_node
        return self.nnodes * (self.gpus_per_node + self.engine_gpus_per_node)

    def owned_by(self, rank: int) -> tuple[EngineSlot, ...]:
        """The engines trainer rank ``rank`` starts (colocated: at most one)."""
        return tuple(e for e in self.engines if e.owner_rank == rank)

    def fed_by(self, rank: int) -> tuple[EngineSlot, ...]:
        """The engines whose weights rank ``rank`` takes part in sending."""
        return tuple(e for e in self.engines if rank in e.feeding_ranks)

    def describe(self) -> str:
        """A readable table: one row per engine, then what the feed modes mean."""
        head = (f"placement: {self.placement}, {len(self.engines)} engine(s) of TP{self.engine_tp}; trainer "
                f"{self.nnodes} node(s) x {self.gpus_per_node} GPU(s), TP{self.tp} x PP{self.pp} x CP{self.cp} "
                f"x DP{self.dp}")
        if self.placement == "separate" and not self.engines[0].url:
            where = (f"{self.engine_nodes} engine node(s) x {self.engine_gpus_per_node} GPU(s)" if self.engine_nodes
                     else f"{self.engine_gpus_per_node} extra GPU(s) on each trainer node")
            head += f"; engines on {where}; {self.total_gpus} GPUs in all"
        rows = [("engine", "node", "GPUs", "owner", "fed by", "feed")]
        for e in self.engines:
            if e.url:
                node, gpus = e.url, "-"
            else:
                node = str(e.node) + (" (engines only)" if e.node >= self.nnodes else "")
                gpus = _span(e.gpus)
            fed = f"replica {e.replica} (ranks {_span(e.feeding_ranks)}; senders {_span(e.senders)})"
            owner = "rank " + str(e.owner_rank) if e.owner_rank is not None else "external"
            rows.append((str(e.index), node, gpus, owner, fed, e.feed))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head] + ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        feeds = {e.feed for e in self.engines}
        if "local" in feeds:
            lines.append("  local: the replica lives on the engine's node; shared memory / CUDA IPC, "
                         "no traffic beyond the TP gather")
        if "broadcast" in feeds:
            lines.append("  broadcast: each stage sender broadcasts its stage's buckets over a weights-update "
                         "group (NCCL; gloo on CPU)")
        if any(e.owner_rank is None for e in self.engines):
            lines.append("  external: no trainer rank lives on its node; it is started there by its operator")
        return "\n".join(lines)


def _span(ids: Sequence[int]) -> str:
    """(0, 1, 2, 5, 6) -> '0-2,5-6'."""
    out, ids = [], sorted(ids)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


def plan_placement(*, nnodes: int, gpus_per_node: int, tp: int = 1, pp: int = 1, cp: int = 1, engine_tp: int = 1,
                   placement: str = "colocated", engines_per_node: int | None = None, engine_gpus_per_node: int = 0,
                   engine_nodes: int = 0, server_urls: Sequence[str] = ()) -> Placement:
    """The engines of a run; a ValueError (one line, naming the values and what is allowed) when impossible.

    ``gpus_per_node`` is the trainer's ranks per node (torchrun's nproc_per_node). ``engines_per_node``
    caps the engines per node (None: every slot); fewer leaves GPUs without an engine (a CPU demo: 1).
    """
    _check_sizes(nnodes=nnodes, gpus_per_node=gpus_per_node, tp=tp, pp=pp, cp=cp, engine_tp=engine_tp)
    world = nnodes * gpus_per_node
    if world % (tp * pp * cp):
        raise ValueError(f"world size nnodes*gpus_per_node = {nnodes}*{gpus_per_node} = {world} is not divisible by "
                         f"tp*pp*cp = {tp}*{pp}*{cp} = {tp * pp * cp}")
    dp = world // (tp * pp * cp)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r} is not one of {PLACEMENTS}")
    for name, v in (("engine_gpus_per_node", engine_gpus_per_node), ("engine_nodes", engine_nodes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if engines_per_node is not None:
        _check_sizes(engines_per_node=engines_per_node)
    server_urls = tuple(server_urls)

    def replica_feed(replica: int, engine_node: int | None, local_ok: bool):
        ranks = replica_ranks(replica, tp=tp, cp=cp, dp=dp, pp=pp)
        feeding = tuple(r for r in ranks if rank_coords(r, tp=tp, cp=cp, dp=dp, pp=pp).cp == 0)
        senders = tuple(_rank(0, 0, replica, s, tp, cp, dp) for s in range(pp))
        local = local_ok and {r // gpus_per_node for r in ranks} == {engine_node}
        return dict(replica=replica, feeding_ranks=feeding, senders=senders, feed="local" if local else "broadcast")

    def per_node(gpus: int, what: str) -> int:
        if engine_tp > gpus:
            raise ValueError(f"engine_tp={engine_tp} exceeds the {gpus} {what} of a node: an engine may not span "
                             f"nodes; allowed engine_tp: {_divisors(gpus)}")
        if gpus % engine_tp:
            raise ValueError(f"engine_tp={engine_tp} does not divide the {gpus} {what} of a node; allowed "
                             f"engine_tp: {_divisors(gpus)}")
        slots = gpus // engine_tp
        if engines_per_node is not None and engines_per_node > slots:
            raise ValueError(f"engines_per_node={engines_per_node} exceeds the {slots} engine(s) of TP{engine_tp} "
                             f"that fit on the {gpus} {what} of a node; allowed: 1..{slots}")
        return engines_per_node or slots

    engines: list[EngineSlot] = []
    if placement == "colocated":
        if engine_gpus_per_node or engine_nodes or server_urls:
            raise ValueError(f"colocated engines run on the trainer's GPUs; engine_gpus_per_node="
                             f"{engine_gpus_per_node}, engine_nodes={engine_nodes}, server_urls={list(server_urls)} "
                             "are only for placement 'separate'")
        n = per_node(gpus_per_node, "GPUs")
        for node in range(nnodes):
            for k in range(n):
                gpus = tuple(range(k * engine_tp, (k + 1) * engine_tp))
                ranks = [node * gpus_per_node + g for g in gpus]
                replica = min(rank_coords(r, tp=tp, cp=cp, dp=dp, pp=pp).dp for r in ranks)
                engines.append(EngineSlot(len(engines), node, gpus, min(ranks), **replica_feed(replica, node, True)))
    elif server_urls:
        if engine_gpus_per_node or engine_nodes or engines_per_node:
            raise ValueError(f"separate engines are given either as server_urls ({len(server_urls)}) or as "
                             f"engine_gpus_per_node={engine_gpus_per_node} / engine_nodes={engine_nodes} / "
                             f"engines_per_node={engines_per_node}, not both")
        for url in server_urls:
            engines.append(EngineSlot(len(engines), None, (), None, url=url, **replica_feed(0, None, False)))
    else:
        if not engine_gpus_per_node:
            raise ValueError(f"separate placement needs engine GPUs: engine_gpus_per_node >= 1 (extra GPUs on each "
                             f"trainer node, or on each of engine_nodes={engine_nodes} dedicated nodes) or server_urls")
        n = per_node(engine_gpus_per_node, "engine GPUs")
        nodes = range(nnodes, nnodes + engine_nodes) if engine_nodes else range(nnodes)
        first_gpu = 0 if engine_nodes else gpus_per_node  # on trainer nodes: the GPUs after the trainer's
        for node in nodes:
            owner = None if engine_nodes else node * gpus_per_node
            for k in range(n):
                gpus = tuple(range(first_gpu + k * engine_tp, first_gpu + (k + 1) * engine_tp))
                engines.append(EngineSlot(len(engines), node, gpus, owner, **replica_feed(0, node, False)))
    return Placement(placement, nnodes, gpus_per_node, tp, pp, cp, dp, engine_tp, engine_gpus_per_node, engine_nodes,
                     tuple(engines))


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)

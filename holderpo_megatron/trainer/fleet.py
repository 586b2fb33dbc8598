"""The rollout side of a run, as each trainer rank holds it: the engines it starts, the driver's view
of every engine, the client its DP replica feeds weights through, and the memory handover.

    placement (parallel/placement.py: each engine's node, GPUs, owner rank, feeding replica)
      -> one engine: an in-process ``sglang.Engine`` on rank 0 (``rollout.mode: embedded``)
         a fleet: each owner rank starts one SGLang server per slot, on the slot's GPUs
      -> every rank learns every engine's URL (one all-gather)
      -> rank 0 holds the *driver*, a client over every engine: generation spreads prompt groups over
         them; each feeding replica's first rank (its pipeline stage 0 sender) holds a *feed*, a
         client over the engines its replica feeds: weights and memory release/resume go there

On CPU the same code runs with CPU SGLang servers; only SGLang's memory saver (``enable_memory_saver``,
CUDA-only) and the GPU ids differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
from pathlib import Path

import torch.distributed as dist

from holderpo_megatron.parallel.placement import Placement, rank_coords

__all__ = ["RolloutFleet", "MemoryHandover", "host_identity", "sync_topology", "without_torchrun_env"]

log = logging.getLogger("holderpo")

#: names this machine for the run (a launcher may set it; two nodes on one machine in tests)
HOST_ID_ENV = "HOLDERPO_HOST_ID"
#: the address other nodes reach this node's engines at (default: its hostname)
NODE_ADDR_ENV = "HOLDERPO_NODE_ADDR"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def host_identity() -> str:
    """This process's host: ``$HOLDERPO_HOST_ID`` when the launch sets it, else the hostname."""
    return os.environ.get(HOST_ID_ENV) or socket.gethostname()


@contextlib.contextmanager
def without_torchrun_env():
    """SGLang's scheduler processes inherit our environment; torchrun's variables (RANK, WORLD_SIZE,
    TORCHELASTIC_USE_AGENT_STORE, ...) make their own torch.distributed join ours and die."""
    keys = [k for k in os.environ if k.startswith(("TORCHELASTIC_", "TORCH_ELASTIC", "ROLE_", "GROUP_"))
            or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")]
    saved = {k: os.environ.pop(k) for k in keys}
    try:
        yield
    finally:
        os.environ.update(saved)


def sync_topology(fed, stage_senders: list[int], hosts: list[str], tp: int):
    """Where a replica's stage senders and the engines it feeds (placement slots) run, by the hosts the
    launch names (``hosts[rank]``): shared memory / CUDA IPC only when all of them share one host.
    With several engines the one that needs the most general transport decides."""
    from holderpo_megatron.weight_sync import SyncTopology, choose_transport

    senders = [hosts[k] for k in stage_senders]
    options = [SyncTopology.from_hosts(senders, hosts[e.owner_rank] if e.owner_rank is not None else
                                       f"engine node {e.node}", tp=tp, server_urls=[e.url] if e.url else ())
               for e in fed] or [SyncTopology.from_hosts(senders, senders[0], tp=tp)]
    return next((t for t in options if choose_transport(t) != "tensor"), options[0])


class RolloutFleet:
    """This rank's part of the run's engines.

    ``driver``: rank 0's client over every engine (generation), else None. ``feed``: the client over the
    engines this rank's replica feeds, on the replica's first rank (stage 0's sender), else None.
    ``processes``: the SGLang servers this rank started (killed by :meth:`close`). ``urls``: every
    engine's URL by placement index (a fleet), or ``[]`` (one embedded engine).
    """

    def __init__(self, placement: Placement, engine_cfg, *, rank: int, embedded: bool):
        from holderpo_megatron.rollout.sglang_engine import SGLangEngine

        self.placement = placement
        self.rank = rank
        c = rank_coords(rank, tp=placement.tp, cp=placement.cp, dp=placement.dp, pp=placement.pp)
        self.replica = c.dp
        self.is_replica_owner = c.tp == 0 and c.cp == 0 and c.pp == 0
        self.fed = [e for e in placement.engines if e.replica == self.replica]
        self.processes: list = []
        self.urls: list[str] = []
        self.driver = self.feed = None
        if embedded:
            if len(placement.engines) != 1:
                raise ValueError(f"an embedded engine is one engine; this placement has {len(placement.engines)}")
            if rank == 0:
                with without_torchrun_env():
                    self.driver = self.feed = SGLangEngine(engine_cfg)
            return
        try:
            key = self._run_key()
            self._start_owned(engine_cfg, key)
            self.urls = self._exchange_urls()
            servers = self._servers_cfg = dataclasses.replace(
                engine_cfg, mode="servers", num_servers=1,
                api_key=key if any(e.owner_rank is not None for e in placement.engines) else engine_cfg.api_key)
            if rank == 0:
                self.driver = SGLangEngine(dataclasses.replace(servers, server_urls=tuple(self.urls)))
            if self.is_replica_owner and self.fed:
                self.feed = SGLangEngine(dataclasses.replace(
                    servers, server_urls=tuple(self.urls[e.index] for e in self.fed)))
        except BaseException:
            self.close()
            raise
        if rank == 0:
            log.info("rollout fleet: %d engine(s): %s", len(self.urls), ", ".join(self.urls))

    @staticmethod
    def _run_key() -> str:
        """One random API key for every server this run launches (drawn on rank 0, shared, never
        written down): their weight-update endpoints unpickle payloads, so only we may call them."""
        import secrets

        box = [secrets.token_hex(32) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _start_owned(self, engine_cfg, key: str) -> None:
        # one node: the loopback; several: every interface, advertised at this node's address
        advertise = os.environ.get(NODE_ADDR_ENV) or (engine_cfg.host if self.placement.nnodes == 1
                                                      else socket.gethostname())
        bind = engine_cfg.host if advertise == engine_cfg.host or advertise in _LOOPBACK else "0.0.0.0"
        if engine_cfg.resolved_device == "cpu":
            # in turn: a CPU SGLang engine sizes its KV cache from the host's free memory while it loads,
            # so a neighbour loading at the same moment can leave it none (each GPU engine has its own GPU)
            for turn in range(dist.get_world_size()):
                if turn == self.rank:
                    self._launch(engine_cfg, key, bind, advertise)
                dist.barrier()
        else:
            self._launch(engine_cfg, key, bind, advertise)

    def _launch(self, engine_cfg, key: str, bind: str, advertise: str) -> None:
        from holderpo_megatron.rollout.sglang_launcher import SGLangServerProcess

        for slot in self.placement.owned_by(self.rank):
            args = engine_cfg.server_args_dict()
            if engine_cfg.resolved_device == "cuda":
                args["base_gpu_id"] = slot.gpus[0]  # the slot's first local GPU; tp_size GPUs from there
            with without_torchrun_env():
                proc = SGLangServerProcess(args, host=bind, log_dir=engine_cfg.log_dir,
                                           startup_timeout_s=engine_cfg.startup_timeout_s, api_key=key)
            self.processes.append((slot.index, proc, f"http://{advertise}:{proc.port}"))

    def _exchange_urls(self) -> list[str]:
        mine = {i: url for i, _, url in self.processes}
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        known = {e.index: e.url for e in self.placement.engines if e.url}
        for part in gathered:
            known.update(part)
        missing = [e.index for e in self.placement.engines if e.index not in known]
        if missing:
            raise RuntimeError(f"rollout fleet: no URL for engine(s) {missing}: no trainer rank started them and "
                               f"no rollout.server_urls names them")
        return [known[e.index] for e in self.placement.engines]

    def verify(self, source, dtype) -> int:
        """After a sync: every tensor this rank's pipeline stage exports equals, bit for bit, what each
        engine its replica feeds holds (read back through the engine). Every rank of a feeding replica
        calls it together (the export gathers over TP); the stage's sender compares. Returns the number
        of tensors it compared; raises naming the engine and the tensor on a difference. A stage whose
        sender has no way to read an engine (an embedded engine lives in rank 0's process) is skipped."""
        import torch

        if not source.participates:
            return 0
        readers = self._readers(source)
        n = 0
        for name, t in source.named_tensors(dtype):
            for url, eng in readers:
                got = eng.get_weight(name)
                if got.shape != t.shape or not torch.equal(got.float(), t.float().cpu()):
                    raise RuntimeError(f"weight check: engine {url} holds another {name} than rank {self.rank} "
                                       f"(shape {tuple(got.shape)} vs {tuple(t.shape)})")
            n += bool(readers)
        return n

    def _readers(self, source) -> list:
        if not source.is_sender:
            return []
        if self.feed is not None:
            return list(zip(self.feed.engine_names, [self.feed] * len(self.fed)))
        if not self.urls:
            return []
        if getattr(self, "_reader", None) is None:
            from holderpo_megatron.rollout.sglang_engine import SGLangEngine

            self._reader = SGLangEngine(dataclasses.replace(
                self._servers_cfg, server_urls=tuple(self.urls[e.index] for e in self.fed)))
        return [(u, self._reader) for u in self._reader.engine_names]

    def close(self) -> None:
        errors = []
        clients = (self.driver, self.feed, getattr(self, "_reader", None))
        for client in {id(c): c for c in clients if c is not None}.values():
            try:
                client.shutdown()
            except Exception as e:  # every engine still gets its shutdown
                errors.append(repr(e))
        for _, p, _ in self.processes:
            try:
                p.kill()
            except Exception as e:
                errors.append(repr(e))
        self.driver = self.feed = None
        self.processes = []
        if errors:
            log.error("rollout fleet: errors while shutting down: %s", "; ".join(errors))


class MemoryHandover:
    """Colocated engines give their GPU memory to training and take it back, in this order each step:

        rollout -> release engine memory (weights, KV) [-> onload optimizer + grads] -> score, train
        [-> offload optimizer + grads] -> resume engine weights -> sync -> resume KV -> next rollout

    ``engine``: the feed client (its engines), or None on ranks without one; ``actor``: offloads
    Megatron's optimizer state and grad buffers when ``offload`` is set. Where an engine cannot release
    (CPU: SGLang's memory saver is CUDA-only) it says so once and the calls are skipped, but recorded.
    ``calls``: this step's calls, in order (rank 0 writes them to ``handover.jsonl``)."""

    def __init__(self, engine, actor, *, release: bool, offload: bool, run_dir: Path | None):
        self.engine = engine
        self.actor = actor
        self.release = release
        self.offload = offload
        self.run_dir = run_dir
        self.calls: list[str] = []
        self._said_cannot = False

    def _engine_call(self, what: str, fn_name: str, tags: list[str] | None) -> None:
        if not self.release:
            return
        if self.engine is not None and self.engine.device == "cpu":
            if not self._said_cannot:
                log.info("memory handover: CPU engines cannot release memory (SGLang's memory saver is CUDA-only); "
                         "release/resume calls are skipped (and recorded)")
                self._said_cannot = True
            self.calls.append(f"{what} (skipped: cpu)")
            return
        if self.engine is not None:
            getattr(self.engine, fn_name)(tags=tags)
        self.calls.append(what)

    def start_step(self) -> None:
        self.calls = []
        if self.offload and not self.actor.offloaded:  # the first step: nothing offloaded it yet
            self.actor.offload()
            self.calls.append("offload")

    def after_rollout(self) -> None:
        self._engine_call("release_memory", "release_memory", None)
        if self.offload:
            self.actor.onload()
            self.calls.append("onload")

    def after_train(self) -> None:
        self.calls.append("train")
        if self.offload:
            self.actor.offload()
            self.calls.append("offload")

    def before_sync(self) -> None:
        self._engine_call("resume_weights", "resume_memory", ["weights"])
        self.calls.append("sync")

    def after_sync(self, step: int) -> None:
        self._engine_call("resume_kv_cache", "resume_memory", ["kv_cache"])
        if self.run_dir is not None:
            with open(self.run_dir / "handover.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "calls": self.calls}) + "\n")

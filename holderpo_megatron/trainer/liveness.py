"""Which node failed: every worker beats into the rendezvous store; a worker whose collective fails
names the ranks (and their nodes and hosts) that stopped beating, so every surviving node ends with
a message that names the dead one instead of a bare "connection closed by peer".

torchrun puts global rank ``r`` on node ``r // nproc_per_node``. The store lives with node 0's
torchrun agent: when node 0 itself is gone, the survivors say that instead.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

import torch.distributed as dist

__all__ = ["PeerHeartbeat"]

log = logging.getLogger("holderpo")


class PeerHeartbeat:
    """A daemon thread writing ``time.time()`` under ``holderpo/hb/<rank>`` every ``period_s``.

    ``hosts``: every rank's host identity (gathered at start-up); ``nproc_per_node``: ranks per node.
    Without a default store (a test's file store, one process) it does nothing."""

    def __init__(self, rank: int, hosts: list[str], nproc_per_node: int, period_s: float = 2.0):
        self.rank = rank
        self.hosts = hosts
        self.nproc_per_node = nproc_per_node
        self.period_s = period_s
        self._stop = threading.Event()
        self.store = self._store()
        self._thread = None
        if self.store is not None:
            self._beat()
            self._thread = threading.Thread(target=self._run, name="holderpo-heartbeat", daemon=True)
            self._thread.start()

    @staticmethod
    def _store():
        try:
            base = dist.distributed_c10d._get_default_store()
        except (RuntimeError, AttributeError, ValueError):
            return None
        return dist.PrefixStore("holderpo/hb/", base)

    def _beat(self) -> None:
        self.store.set(str(self.rank), repr(time.time()))

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._beat()
            except Exception:  # the store's host is gone: explain() says so when a collective fails
                return

    def stopped_peers(self, grace_s: float | None = None) -> list[tuple[int, float]]:
        """``[(rank, seconds since its last beat)]`` of the ranks silent for more than ``grace_s``
        (default: three periods). Raises RuntimeError when the store itself cannot be reached."""
        grace = 3 * self.period_s if grace_s is None else grace_s
        self.store.set_timeout(timedelta(seconds=5))
        now = time.time()
        out = []
        for r in range(len(self.hosts)):
            last = float(self.store.get(str(r)).decode())
            if now - last > grace:
                out.append((r, now - last))
        return out

    def explain(self, error: BaseException) -> str:
        """A line naming the node(s) that stopped, for an error raised by a collective."""
        if self.store is None:
            return ""
        time.sleep(min(3 * self.period_s + 1, 10))  # a peer that just died has not been silent for long yet
        try:
            stopped = self.stopped_peers()
        except Exception as e:
            return (f"the rendezvous store on node 0 ({self.hosts[0]}) cannot be reached ({type(e).__name__}): "
                    f"node 0 failed")
        if not stopped:
            return ""
        nodes = sorted({r // self.nproc_per_node for r, _ in stopped})
        who = ", ".join(f"rank {r} (node {r // self.nproc_per_node}, host {self.hosts[r]}, silent {age:.0f} s)"
                        for r, age in stopped)
        return f"node(s) {', '.join(map(str, nodes))} stopped: {who}"

    def close(self) -> None:
        self._stop.set()

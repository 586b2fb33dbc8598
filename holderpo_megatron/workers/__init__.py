"""Subprocess workers with per-request deadlines (imports nothing else of ours).

    pool = SubprocessPool(MyProgram(), size=4, name="verifier", log=log)
    pool.submit(pool.workers[0], request, tag="call 0", timeout_s=5.0)
    for event in pool.wait(pool.waiting()): ...   # Reply | Lost

``subprocess_pool``: the worker processes, their bootstrap and main loop, deadlines, kill and
replacement; the policies (which call goes where, what a lost worker costs) stay with the callers:
``envs.pool.EnvPool`` and ``rewards.pool.TimeoutPool``.
"""

from holderpo_megatron.workers.subprocess_pool import (Lost, Reply, SubprocessPool, WorkerProcess, WorkerProgram,
                                                       error_text)

__all__ = ["Lost", "Reply", "SubprocessPool", "WorkerProcess", "WorkerProgram", "error_text"]

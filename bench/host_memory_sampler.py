"""Sample the RSS of a command's whole process tree from outside, to calibrate `holderpo plan`'s CPU terms.

    python bench/host_memory_sampler.py --out RSS.json -- holderpo train --config R.yaml

Every ``--interval`` seconds it reads each descendant's RSS (psutil) and names it: ``rank<R>`` (a torchrun
worker: RANK in its environment), ``sglang:<name>`` (an SGLang subprocess, by its process title), the
launcher, or other. It keeps each process's peak, the peak of each role summed over its processes, and the
node's peak (the sum over the tree at one instant; shared pages count once per process, as the OOM killer
sees them). The command's exit status is this script's exit status. On a shared machine
``--min-available-gib`` ends the command's process group (SIGKILL) before the kernel's OOM killer
picks a victim elsewhere; the output then says ``"stopped_low_memory": true``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import psutil

GIB = 2**30


def _role(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline())
        name = p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    if "sglang" in name.lower() or "sglang" in cmd.lower().split(" ")[0]:
        return f"sglang:{name}"
    try:
        env = p.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        env = {}
    if "RANK" in env and "LOCAL_RANK" in env and "torchrun" not in cmd and "torch.distributed.run" not in cmd:
        # SGLang's scheduler/detokenizer are forked from rank 0 and inherit RANK: their title says sglang
        return f"rank{env['RANK']}"
    if "alfworld" in cmd or "multiprocessing" in cmd:
        return f"worker:{name}"
    return f"other:{name}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--min-available-gib", type=float, default=0.0)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    proc = subprocess.Popen(cmd, start_new_session=True)  # its own process group, to stop it whole
    stopped = False
    root = psutil.Process(proc.pid)
    per_pid: dict[int, dict] = {}
    role_peak: dict[str, float] = {}
    node_peak, node_peak_t, node_peak_parts = 0.0, 0.0, {}
    sys_used0 = psutil.virtual_memory().total - psutil.virtual_memory().available
    sys_used_peak = 0.0
    series = []  # (seconds, system available GiB, {role: RSS GiB}) every ~2 s: when the engine sized its cache
    t0 = time.time()
    last_series = -1e9
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        parts: dict[str, float] = {}
        total = 0.0
        for p in procs:
            try:
                rss = p.memory_info().rss / GIB
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rec = per_pid.get(p.pid)
            if rec is None:
                rec = per_pid[p.pid] = {"role": _role(p), "peak_gib": 0.0}
            rec["peak_gib"] = max(rec["peak_gib"], rss)
            parts[rec["role"]] = parts.get(rec["role"], 0.0) + rss
            total += rss
        for r, v in parts.items():
            role_peak[r] = max(role_peak.get(r, 0.0), v)
        if total > node_peak:
            node_peak, node_peak_t, node_peak_parts = total, time.time() - t0, parts
        vm = psutil.virtual_memory()
        if time.time() - last_series >= 2.0:
            last_series = time.time()
            series.append((round(last_series - t0, 1), round(vm.available / GIB, 3),
                           {k: round(v, 3) for k, v in parts.items()}))
        sys_used_peak = max(sys_used_peak, (vm.total - vm.available) / GIB)
        if vm.available / GIB < a.min_available_gib:
            stopped = True
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(a.interval)
    rc = proc.wait()
    out = {
        "command": cmd, "rc": rc, "seconds": time.time() - t0,
        "node_peak_gib": node_peak, "node_peak_at_s": node_peak_t, "node_peak_parts_gib": node_peak_parts,
        "role_peak_gib": role_peak, "per_pid": per_pid,
        "system_used_before_gib": sys_used0 / GIB, "system_used_peak_gib": sys_used_peak,
        "stopped_low_memory": stopped, "series": series,
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out[k] for k in ("rc", "seconds", "node_peak_gib", "node_peak_parts_gib", "role_peak_gib",
                                          "system_used_peak_gib", "stopped_low_memory")}, indent=1), file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())

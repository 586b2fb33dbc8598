"""Sample the memory of a command's whole process tree from outside, to calibrate `holderpo plan`'s CPU terms.

    python bench/host_memory_sampler.py --out RSS.json [--min-available-gib 1] -- holderpo train --config R.yaml

Every ``--interval`` seconds it reads each descendant's RSS and PSS and names its role (again at every
sample: SGLang sets its process titles after the fork): ``launcher`` (the command and torchrun's agent),
``rank<R>`` (a child of the agent; RANK from its environment), ``engine`` (a process titled ``sglang*``),
``worker`` (any other descendant of a rank: environment and reward workers, helper forks). It keeps
each process's peak RSS, each role's peak summed RSS, and the node's peak twice: summed RSS (shared
pages once per process, as each process's OOM score sees them) and summed PSS (shared pages split: what
the node really holds). The command's exit status is this script's. ``--min-available-gib`` ends the
command's process group (SIGKILL) when the machine's available memory falls below it, before the
kernel's OOM killer picks a victim elsewhere on a shared machine (``"stopped_low_memory": true``).
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


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def _roles(root: psutil.Process) -> dict[int, tuple[str, psutil.Process]]:
    out: dict[int, tuple[str, psutil.Process]] = {root.pid: ("launcher", root)}

    def walk(p: psutil.Process, parent_role: str):
        try:
            kids = p.children()
        except psutil.NoSuchProcess:
            return
        for k in kids:
            try:
                name, cmd = k.name(), " ".join(k.cmdline())
                if name.startswith("sglang"):
                    role = "engine"
                elif parent_role == "launcher" and ("torch.distributed.run" in cmd or name == "pt_elastic"
                                                    or "torchrun" in cmd):
                    role = "launcher"
                elif parent_role == "launcher":
                    role = f"rank{k.environ().get('RANK', '?')}"
                else:
                    role = "engine" if parent_role == "engine" else "worker"
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            out[k.pid] = (role, k)
            walk(k, role)

    walk(root, "launcher")
    return out


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
    node_rss_peak, node_pss_peak, node_peak_t, node_peak_parts = 0.0, 0.0, 0.0, {}
    vm0 = psutil.virtual_memory()
    sys_used0 = (vm0.total - vm0.available) / GIB
    sys_used_peak = 0.0
    series = []  # (seconds, system available GiB, {role: RSS GiB}) every ~2 s: when the engine sized its cache
    t0 = time.time()
    last_series = -1e9
    while proc.poll() is None:
        parts: dict[str, float] = {}
        rss_sum = pss_sum = 0.0
        for pid, (role, p) in _roles(root).items():
            try:
                rss = p.memory_info().rss / GIB
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            pss_sum += _pss_bytes(pid) / GIB
            rec = per_pid.setdefault(pid, {"role": role, "peak_gib": 0.0})
            rec["role"] = role  # the latest name wins (SGLang retitles its processes)
            rec["peak_gib"] = max(rec["peak_gib"], rss)
            parts[role] = parts.get(role, 0.0) + rss
            rss_sum += rss
        for r, v in parts.items():
            role_peak[r] = max(role_peak.get(r, 0.0), v)
        if rss_sum > node_rss_peak:
            node_rss_peak, node_peak_t, node_peak_parts = rss_sum, time.time() - t0, parts
        node_pss_peak = max(node_pss_peak, pss_sum)
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
        "node_rss_peak_gib": node_rss_peak, "node_pss_peak_gib": node_pss_peak, "node_rss_peak_at_s": node_peak_t,
        "node_rss_peak_parts_gib": node_peak_parts, "role_peak_gib": role_peak, "per_pid": per_pid,
        "system_used_before_gib": sys_used0, "system_used_peak_gib": sys_used_peak,
        "stopped_low_memory": stopped, "series": series,
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out[k] for k in ("rc", "seconds", "node_rss_peak_gib", "node_pss_peak_gib",
                                          "node_rss_peak_parts_gib", "role_peak_gib", "system_used_peak_gib",
                                          "stopped_low_memory")}, indent=1), file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())

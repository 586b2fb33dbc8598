"""Start SGLang HTTP servers as child processes and wait until they answer.

A server that does not come up raises :class:`EngineStartError` with the tail of its log; a
server that dies later is noticed by :meth:`SGLangServerProcess.exit_code` and reported with
the same log tail.

Each server gets a fresh random API key (``api_key``): its weight-update endpoints unpickle
payloads and load any path, so on a shared node no other local user may reach them. The key
travels in a private (0600) config file, never on the command line (which every local user can
read), and our client sends it as ``Authorization: Bearer <key>``. A server ends when the process
that started it dies (``PR_SET_PDEATHSIG``, set by the server itself before SGLang loads): a
killed trainer never leaves an engine behind. Start servers from a long-lived thread (the
signal follows the starting thread's exit).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .interface import EngineStartError

__all__ = ["SGLangServerProcess", "free_port", "log_tail", "sglang_env", "module_command_dying_with_us"]

# `python -c` bootstrap: die with the parent (PID argv[1]) first, then run module argv[2] as
# `python -m` would. Plain Python: the child's interpreter may not find our package.
_BOOTSTRAP = (
    "import ctypes, os, runpy, signal, sys\n"
    "parent, module = int(sys.argv[1]), sys.argv[2]\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != parent:\n"
    "    sys.exit('the process that started ' + module + ' is gone')\n"
    "sys.argv = [module] + sys.argv[3:]\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)


def module_command_dying_with_us(module: str, *args: str) -> list[str]:
    """The command running ``python -m module args`` in a child that the kernel kills (SIGKILL)
    when this process dies (Linux ``PR_SET_PDEATHSIG``, set by the child itself: no
    ``preexec_fn`` in a process with threads). Start it from a long-lived thread: the signal
    follows the exit of the thread that started the child."""
    return [sys.executable, "-c", _BOOTSTRAP, str(os.getpid()), module, *args]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: str | os.PathLike | None, lines: int = 40) -> str:
    if not path or not os.path.exists(path):
        return "(no log)"
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def sglang_env(device: str, base: dict | None = None, cpu_threads: int | None = None) -> dict:
    """Environment for a process running SGLang on ``device``: on CPU, the CPU engine switch, the
    stand-in modules (see :mod:`.sglang_cpu_shims`) on ``PYTHONPATH`` and ``cpu_threads`` OpenMP
    threads (None: inherited)."""
    env = dict(os.environ if base is None else base)
    if device == "cpu":
        from .sglang_cpu_shims import SITE, needed

        env["SGLANG_USE_CPU_ENGINE"] = "1"
        if cpu_threads is not None:
            env["OMP_NUM_THREADS"] = str(cpu_threads)
        if needed():
            parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != SITE]
            env["PYTHONPATH"] = os.pathsep.join([SITE] + parts)
    return env


def _cli_args(server_args: dict) -> list[str]:
    out = []
    for k, v in server_args.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            if v:
                out.append(flag)
        elif v is None:
            continue
        elif isinstance(v, dict):
            out += [flag, json.dumps(v)]
        elif isinstance(v, (list, tuple)):  # SGLang's list options take their values one by one (nargs)
            out += [flag, *map(str, v)]
        else:
            out += [flag, str(v)]
    return out


def _session_load_snapshots(sid: int) -> list[str]:
    """The /dev/shm files where the schedulers of session ``sid`` (a server we started) publish their
    load. SGLang creates one per scheduler, named after that server's instance id, and never removes
    it; recorded at start-up, they are removed when the server is stopped or found dead."""
    import psutil

    out = set()
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                out.update(f.path for f in proc.open_files() if f.path.startswith("/dev/shm/sglang_loads_"))
        except (psutil.Error, OSError):
            pass
    return sorted(out)


class SGLangServerProcess:
    """One ``python -m sglang.launch_server`` child, its URL and its log file."""

    def __init__(self, server_args: dict, *, host: str = "127.0.0.1", port: int = 0,
                 log_dir: str | None = None, startup_timeout_s: float = 300.0, api_key: str | None = None,
                 cpu_threads: int | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        log_dir = log_dir or tempfile.mkdtemp(prefix="sglang-logs-")
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.log_path = os.path.join(log_dir, f"sglang-{self.port}.log")
        device = server_args.get("device", "cpu")
        if "api_key" in server_args:
            raise ValueError("pass the API key as api_key=, not in server_args")
        # several processes sharing one server set (ranks of a run) agree on a key and pass it; else a fresh one
        self.api_key = api_key or secrets.token_hex(32)
        secret_dir = tempfile.mkdtemp(prefix="holderpo-sglang-")  # 0700
        key_file = os.path.join(secret_dir, "server.yaml")
        with open(os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump({"api-key": self.api_key}, f)  # JSON is YAML; keys are the flags
        cmd = module_command_dying_with_us("sglang.launch_server", "--config", key_file, *_cli_args(server_args),
                                           "--host", host, "--port", str(self.port))
        self._log = open(self.log_path, "ab")
        self.load_snapshots: list[str] = []  # see _wait_ready
        try:
            self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=sglang_env(device, cpu_threads=cpu_threads),
                                         start_new_session=True)
            self._wait_ready(startup_timeout_s)
        finally:  # read at start-up: a key file on disk is a key another process could read later
            import shutil

            shutil.rmtree(secret_dir, ignore_errors=True)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise EngineStartError(
                    f"SGLang server {self.url} exited with code {code} during start-up; "
                    f"log {self.log_path}, last lines:\n{log_tail(self.log_path)}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        self.load_snapshots = _session_load_snapshots(self.proc.pid)
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise EngineStartError(
                    f"SGLang server {self.url} did not answer /health within {timeout_s:.0f} s; "
                    f"log {self.log_path}, last lines:\n{log_tail(self.log_path)}"
                )
            time.sleep(0.5)

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def describe_death(self, grace_s: float = 5.0) -> str:
        """State, exit code and log tail. A server that stopped answering is usually mid-exit:
        give it ``grace_s`` to be reaped so the exit code can be reported."""
        try:
            code = self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            code = None
        state = "is running" if code is None else f"exited with code {code}"
        return f"server {self.url} {state}; log {self.log_path}, last lines:\n{log_tail(self.log_path)}"

    def kill(self, timeout_s: float = 30.0) -> None:
        """Stop the server and every process it started (its own session)."""
        if self.proc.poll() is None:
            import signal

            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        self._log.close()
        for path in self.load_snapshots:  # this server's own (named after its instance id)
            Path(path).unlink(missing_ok=True)
        self.load_snapshots = []

"""Typed configuration of the SGLang rollout engine, validated once at construction."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import torch

from .engine_weights import HOLDING_LOADER

__all__ = ["SGLangEngineConfig"]

_MODES = ("embedded", "servers")
_BACKENDS = ("sglang", "transformers")
_DEVICES = ("auto", "cpu", "cuda")
_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class SGLangEngineConfig:
    """How to run SGLang for rollouts.

    mode ``"embedded"``: one in-process ``sglang.Engine`` (the default; colocated training on one
    node). mode ``"servers"``: SGLang HTTP servers, either given as ``server_urls`` or started by
    our launcher (``num_servers`` of them on ports from ``base_port``); requests are spread across
    them, or sent to ``router_url`` (an sglang-router in front of the servers) when given.

    ``mem_fraction_static``/``attention_backend`` default per device (CPU: 0.3 / torch_native;
    GPU: 0.7 / SGLang's choice). On CPU SGLang sizes the KV cache as (free memory now) - (1 -
    fraction) x (free memory before loading), so memory taken by *other* processes while it loads
    counts against it: a small fraction (0.05) fails start-up on a busy machine; 0.3 leaves room
    (the KV pages are reserved, not touched, until used). ``server_args`` passes any other
    ``sglang`` ServerArgs field (e.g. ``max_total_tokens`` to cap the KV cache).

    ``api_key``: sent as ``Authorization: Bearer`` to given servers (``server_urls``/``router_url``)
    and set on the servers our launcher starts; unset, each server we start gets a fresh random key.
    """

    model_path: str
    mode: str = "embedded"
    # what generates: "sglang", or "transformers" (the HF model in this process, sampled by our decode loop;
    # embedded mode, one engine, no TP: rollout/transformers_backend.py)
    backend: str = "sglang"
    device: str = "auto"
    dtype: str = "auto"
    tp_size: int = 1
    mem_fraction_static: float | None = None
    attention_backend: str | None = None
    context_length: int | None = None
    skip_tokenizer_init: bool = False
    random_seed: int = 0
    enable_memory_saver: bool = False
    server_urls: tuple[str, ...] = ()
    num_servers: int = 1
    router_url: str | None = None
    host: str = "127.0.0.1"
    base_port: int = 0  # 0: pick free ports
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 600.0
    max_retries: int = 2
    max_inflight_per_server: int = 64
    log_level: str = "warning"
    log_dir: str | None = None
    server_args: dict = field(default_factory=dict)
    # CPU: OpenMP threads of the engine's scheduler process (OMP_NUM_THREADS); None: its starter's count
    # (a trainer rank's cores / ranks). More threads help only on a quiet machine: on a loaded one an
    # OpenMP team spins waiting for its descheduled threads.
    cpu_threads: int | None = None
    api_key: str | None = field(default=None, repr=False)  # given servers' key; None: a random one per launch

    def __post_init__(self):
        object.__setattr__(self, "server_urls", tuple(u.rstrip("/") for u in self.server_urls))

        def bad(name, allowed):
            raise ValueError(f"SGLangEngineConfig.{name}={getattr(self, name)!r} is invalid; allowed: {allowed}")

        if not isinstance(self.model_path, str) or not self.model_path:
            bad("model_path", "a non-empty path to an HF model directory")
        if not self.server_urls and not os.path.isdir(self.model_path):
            bad("model_path", "an existing directory (config.json + safetensors)")
        if self.mode not in _MODES:
            bad("mode", " | ".join(_MODES))
        if self.backend not in _BACKENDS:
            bad("backend", " | ".join(_BACKENDS))
        if self.backend == "transformers" and (self.mode != "embedded" or self.tp_size != 1):
            bad("backend", f"'sglang' with mode={self.mode!r} tp_size={self.tp_size} "
                           "('transformers' runs embedded, tp_size 1)")
        if self.device not in _DEVICES:
            bad("device", " | ".join(_DEVICES))
        if self.device == "cuda" and not torch.cuda.is_available():
            bad("device", "'cpu' or 'auto' on a machine without CUDA")
        if self.dtype not in _DTYPES:
            bad("dtype", " | ".join(_DTYPES))
        if not isinstance(self.tp_size, int) or self.tp_size < 1:
            bad("tp_size", "an int >= 1")
        if self.mem_fraction_static is not None and not (0 < self.mem_fraction_static < 1):
            bad("mem_fraction_static", "None or a float in (0, 1)")
        if self.context_length is not None and (not isinstance(self.context_length, int) or self.context_length < 1):
            bad("context_length", "None or an int >= 1")
        if self.server_urls and self.mode != "servers":
            bad("server_urls", "empty unless mode='servers'")
        for u in self.server_urls + ((self.router_url,) if self.router_url else ()):
            p = urlparse(u)
            if p.scheme not in ("http", "https") or not p.netloc:
                raise ValueError(f"SGLangEngineConfig: server URL {u!r} is invalid; allowed: http(s)://host:port")
        if self.router_url and self.mode != "servers":
            bad("router_url", "None unless mode='servers'")
        if not isinstance(self.num_servers, int) or self.num_servers < 1:
            bad("num_servers", "an int >= 1")
        if not isinstance(self.base_port, int) or not (self.base_port == 0 or 1024 <= self.base_port <= 65535):
            bad("base_port", "0 (pick free ports) or 1024..65535")
        for name in ("startup_timeout_s", "request_timeout_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                bad(name, "a finite number of seconds > 0")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            bad("max_retries", "an int >= 0")
        if not isinstance(self.max_inflight_per_server, int) or self.max_inflight_per_server < 1:
            bad("max_inflight_per_server", "an int >= 1")
        if self.log_level not in _LOG_LEVELS:
            bad("log_level", " | ".join(_LOG_LEVELS))
        if self.cpu_threads is not None and (not isinstance(self.cpu_threads, int) or self.cpu_threads < 1):
            bad("cpu_threads", "None (the starter's count) or an int >= 1")
        if not isinstance(self.server_args, dict):
            bad("server_args", "a dict of sglang ServerArgs fields")
        if "api_key" in self.server_args:
            raise ValueError("SGLangEngineConfig.server_args must not set api_key: the key goes in api_key")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("SGLangEngineConfig.api_key is invalid; allowed: None or a non-empty string")

    # -- resolved values ------------------------------------------------------------------------
    @property
    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype the engine holds weights in: ``dtype``, or for "auto" the model's config dtype."""
        if _DTYPES[self.dtype] is not None:
            return _DTYPES[self.dtype]
        import json

        try:
            cfg = json.loads(open(os.path.join(self.model_path, "config.json")).read())
        except OSError:
            return torch.bfloat16
        name = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
        dt = _DTYPES.get(name)
        if dt is None:
            return torch.bfloat16
        # SGLang serves float32 checkpoints in bfloat16 on GPU under "auto"
        return torch.bfloat16 if (dt == torch.float32 and self.resolved_device == "cuda") else dt

    def server_args_dict(self) -> dict:
        """Keyword arguments for ``sglang.Engine`` / ``sglang.srt.server_args.ServerArgs``."""
        cpu = self.resolved_device == "cpu"
        dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.torch_dtype]
        kw = dict(
            model_path=self.model_path,
            device=self.resolved_device,
            dtype=dtype_name,
            tp_size=self.tp_size,
            mem_fraction_static=self.mem_fraction_static or (0.3 if cpu else 0.7),
            random_seed=self.random_seed,
            skip_tokenizer_init=self.skip_tokenizer_init,
            log_level=self.log_level,
        )
        if not cpu:  # SGLang's memory saver is CUDA-only
            kw["enable_memory_saver"] = self.enable_memory_saver
        if cpu:
            # sleep_on_idle: an idle scheduler waits on its sockets instead of polling, so it does not
            # take a core from the trainer ranks during score/train (bench/e2e_vs_trl.py: scheduler
            # CPU 42-55 -> 13-14 s per step on 2 cores)
            kw.update(attention_backend=self.attention_backend or "torch_native", disable_overlap_schedule=True,
                      sleep_on_idle=True)
        elif self.attention_backend:
            kw["attention_backend"] = self.attention_backend
        if self.context_length:
            kw["context_length"] = self.context_length
        kw.update(self.server_args)
        # our loader for update_weights_from_tensor (engine_weights: CPU mappings kept between syncs),
        # beside any the caller names
        kw["custom_weight_loader"] = list(dict.fromkeys([HOLDING_LOADER, *(kw.get("custom_weight_loader") or [])]))
        return kw

    def to_dict(self) -> dict:
        d = asdict(self)
        d["api_key"] = None if self.api_key is None else "<redacted>"
        return d

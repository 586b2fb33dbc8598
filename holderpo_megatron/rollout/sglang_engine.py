"""The SGLang rollout engine: in-process (``mode="embedded"``) or HTTP servers (``mode="servers"``).

Servers mode spreads requests over the live servers (least in-flight first), retries a request
whose server stopped answering on another server (at most ``max_retries`` times), and raises
:class:`EngineDiedError` (with the dead server's log tail) when a request cannot be completed:
:meth:`SGLangEngine.generate` returns every requested sample or raises, never a partial batch.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Sequence

import torch

from .config import SGLangEngineConfig
from .interface import (EngineDiedError, RolloutEngine, RolloutEngineError, Sample, SamplingParams, TensorBucket,
                        TensorMeta)
from .sglang_backends import EmbeddedBackend, ServerBackend, ServerUnreachable

__all__ = ["SGLangEngine", "assign_groups"]

log = logging.getLogger(__name__)


def _version_int(v) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0  # SGLang's initial "default"


def assign_groups(costs: Sequence[int], n_engines: int) -> list[int]:
    """The engine of each prompt group: largest expected cost first, onto the engine with the least
    assigned so far (ties: the lower index). ``costs``: expected tokens per group."""
    if n_engines < 1:
        raise ValueError(f"n_engines must be >= 1, got {n_engines}")
    load = [0] * n_engines
    home = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        e = min(range(n_engines), key=lambda k: (load[k], k))
        home[i] = e
        load[e] += costs[i]
    return home


def _embedded_backend(name: str):
    """The in-process backend class of ``SGLangEngineConfig.backend``."""
    if name == "transformers":
        from .transformers_backend import TransformersBackend

        return TransformersBackend
    return EmbeddedBackend


class SGLangEngine(RolloutEngine):
    """See the module docstring. Construct with a validated :class:`SGLangEngineConfig`."""

    def __init__(self, config: SGLangEngineConfig):
        self.config = config
        if config.log_dir:  # what this engine runs with, beside its logs (a user compares runs by it)
            os.makedirs(config.log_dir, exist_ok=True)
            with open(os.path.join(config.log_dir, "engine_config.json"), "w") as f:
                json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
        self.dtype = config.torch_dtype
        self.device = config.resolved_device
        self._version = 0
        self._tokenizer = None
        self._router: ServerBackend | None = None
        self._inflight: dict[str, int] = {}
        self._dead: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False
        if config.mode == "embedded":
            self._backends = [_embedded_backend(config.backend)(config.server_args_dict(), cpu_threads=config.cpu_threads)]
        else:
            self._backends = self._start_servers(config)
            if config.router_url:
                self._router = ServerBackend(config.router_url, timeout_s=config.request_timeout_s,
                                             api_key=config.api_key)
        for b in self._backends:
            self._inflight[b.name] = 0

    @staticmethod
    def _start_servers(cfg: SGLangEngineConfig) -> list[ServerBackend]:
        if cfg.server_urls:
            return [ServerBackend(u, timeout_s=cfg.request_timeout_s, tp_size=cfg.tp_size, api_key=cfg.api_key)
                    for u in cfg.server_urls]
        from .sglang_launcher import SGLangServerProcess

        procs = []
        try:
            for i in range(cfg.num_servers):
                procs.append(SGLangServerProcess(
                    cfg.server_args_dict(), host=cfg.host, port=(cfg.base_port + i if cfg.base_port else 0),
                    log_dir=cfg.log_dir, startup_timeout_s=cfg.startup_timeout_s, api_key=cfg.api_key,
                    cpu_threads=cfg.cpu_threads))
        except BaseException:
            for p in procs:
                p.kill()
            raise
        return [ServerBackend(p.url, process=p, timeout_s=cfg.request_timeout_s, tp_size=cfg.tp_size, api_key=p.api_key)
                for p in procs]

    @property
    def server_urls(self) -> list[str]:
        return [b.url for b in self._backends if isinstance(b, ServerBackend)]

    # ------------------------------------------------------------------ generation
    def _tokenize(self, text: str) -> list[int]:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.config.model_path)
        return self._tokenizer(text, add_special_tokens=True)["input_ids"]

    def _prompt_ids(self, prompts) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise ValueError("prompts must be a list of token-id lists or a list of strings")
        out = []
        for i, p in enumerate(prompts):
            ids = self._tokenize(p) if isinstance(p, str) else [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            out.append(ids)
        return out

    @staticmethod
    def _sampling_dict(params: SamplingParams, seed: int | None) -> dict:
        sp = dict(temperature=float(params.temperature), top_p=float(params.top_p), top_k=int(params.top_k),
                  max_new_tokens=int(params.max_new_tokens), ignore_eos=bool(params.ignore_eos),
                  skip_special_tokens=False)
        if params.stop:
            sp["stop"] = list(params.stop)
        if params.stop_token_ids:
            sp["stop_token_ids"] = list(params.stop_token_ids)
        if seed is not None:
            sp["sampling_seed"] = int(seed)
        return sp

    def generate(self, prompts, params: SamplingParams) -> list[list[Sample]]:
        if self._closed:
            raise RolloutEngineError("generate() on an engine that was shut down")
        if params.stop and self.config.skip_tokenizer_init:
            raise ValueError("SamplingParams.stop (strings) needs the engine's tokenizer; "
                             "skip_tokenizer_init=True allows stop_token_ids only")
        ids = self._prompt_ids(prompts)
        # whole prompt groups per engine (they share a prefix in its cache), balanced by expected tokens
        home = assign_groups([params.n * (len(p) + params.max_new_tokens) for p in ids], len(self._backends))
        items = [dict(input_ids=p, sampling_params=self._sampling_dict(params, params.sample_seed(i, j)), key=(i, j),
                      home=home[i])
                 for i, p in enumerate(ids) for j in range(params.n)]
        t0 = time.perf_counter()
        raw, where, done = self._run_items(items)
        batch_s = time.perf_counter() - t0
        out: list[list[Sample]] = [[None] * params.n for _ in ids]  # type: ignore[list-item]
        for it, r, w, d in zip(items, raw, where, done):
            i, j = it["key"]
            out[i][j] = self._parse(r, it, w, batch_s, d - t0)
        return out

    @property
    def engine_names(self) -> list[str]:
        """The engines requests go to, in order (``Sample.engine`` is one of these)."""
        return [self._router.name] if self._router is not None else [b.name for b in self._backends]

    def score(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The engine's log p(x_t | x_<t), t = 1..n-1, float32 ``[n-1]`` per sequence (prefill only)."""
        items = [dict(input_ids=[int(t) for t in s], logprob_start_len=0, key=(k, 0),
                      sampling_params=dict(temperature=0.0, max_new_tokens=1))
                 for k, s in enumerate(sequences)]
        raw, _, _ = self._run_items(items)
        out = []
        for s, r in zip(sequences, raw):
            lps = r["meta_info"]["input_token_logprobs"]
            vals = [lp[0] for lp in lps[1:]]
            if len(vals) != len(s) - 1:
                raise RolloutEngineError(f"engine returned {len(vals)} prompt log-probs for a {len(s)}-token sequence")
            out.append(torch.tensor(vals, dtype=torch.float32))
        return out

    def _parse(self, r: dict, item: dict, where: str, batch_s: float, done_s: float) -> Sample:
        meta = r["meta_info"]
        fr = meta.get("finish_reason") or {}
        kind = fr.get("type") if isinstance(fr, dict) else str(fr)
        if kind not in ("length", "stop"):
            raise RolloutEngineError(f"{where}: request for prompt {item['key'][0]} sample {item['key'][1]} "
                                     f"ended with finish_reason={fr!r}")
        out_ids = list(r.get("output_ids") or [])
        lps = [lp[0] for lp in meta.get("output_token_logprobs") or []]
        if len(lps) != len(out_ids):
            raise RolloutEngineError(f"{where}: {len(out_ids)} output tokens but {len(lps)} log-probs")
        spans = [(_version_int(s["version"]), int(s["start"]), int(s["end"])) for s in meta.get("weight_versions") or []]
        return Sample(
            prompt_index=item["key"][0], sample_index=item["key"][1], prompt_ids=list(item["input_ids"]),
            output_ids=out_ids, logprobs=torch.tensor(lps, dtype=torch.float32), finish_reason=kind,
            weight_version=_version_int(meta.get("weight_version")), weight_versions=spans, text=r.get("text"),
            timing={"latency_s": float(meta.get("e2e_latency") or 0.0), "batch_s": batch_s, "done_s": done_s},
            engine=where,
        )

    # ------------------------------------------------------------------ request routing
    def _run_items(self, items: list[dict]) -> tuple[list[dict], list[str], list[float]]:
        """Results, the engine of each and its completion time (``time.perf_counter()``)."""
        if self.config.mode == "embedded" or self._router is not None:
            b = self._backends[0] if self._router is None else self._router
            res = b.generate(items)
            return res, [b.name] * len(items), [time.perf_counter()] * len(items)
        results: list = [None] * len(items)
        where: list = [None] * len(items)
        done: list = [None] * len(items)
        workers = max(1, len(self._backends) * self.config.max_inflight_per_server)
        with ThreadPoolExecutor(max_workers=min(workers, len(items) or 1)) as pool:
            futs = {pool.submit(self._one_with_retries, it): k for k, it in enumerate(items)}
            finished, _ = wait(futs)
            errors = []
            for f in finished:
                k = futs[f]
                if f.exception() is not None:
                    errors.append((k, f.exception()))
                else:
                    results[k], where[k], done[k] = f.result()
        if errors:
            errors.sort(key=lambda e: e[0])
            first = errors[0][1]
            msg = (f"{len(errors)} of {len(items)} generation requests failed; no partial batch is returned. "
                   f"First failure (request {errors[0][0]}): {first}")
            raise (EngineDiedError if isinstance(first, EngineDiedError) else RolloutEngineError)(msg) from first
        return results, where, done

    def _pick(self, exclude: set[str], home: int | None = None) -> ServerBackend | None:
        """The item's home engine while it is live and untried, else the least-loaded live one."""
        with self._lock:
            live = [b for b in self._backends if b.name not in self._dead and b.name not in exclude]
            if not live:
                return None
            b = self._backends[home] if home is not None and self._backends[home] in live else \
                min(live, key=lambda b: self._inflight[b.name])
            self._inflight[b.name] += 1
            return b

    def _one_with_retries(self, item: dict):
        tried: set[str] = set()
        failures = []
        for _ in range(self.config.max_retries + 1):
            b = self._pick(tried, item.get("home"))
            if b is None:
                break
            try:
                return b.generate([item])[0], b.name, time.perf_counter()
            except ServerUnreachable as e:
                tried.add(b.name)
                alive = b.health()
                if not alive:
                    with self._lock:
                        first = b.name not in self._dead
                        self._dead.add(b.name)
                    if first:
                        log.error("SGLang server %s stopped answering: %s", b.name, b.describe())
                failures.append(f"{b.name}: {e} ({'dead' if not alive else 'alive but timed out'})")
                if alive:
                    raise RolloutEngineError(f"request timed out on a live server: {e}") from e
            finally:
                with self._lock:
                    self._inflight[b.name] -= 1
        dead = [b.describe() for b in self._backends if b.name in self._dead]
        raise EngineDiedError(
            "no live SGLang server could complete the request; attempts: " + "; ".join(failures or ["none"])
            + ("\n" + "\n".join(dead) if dead else ""))

    # ------------------------------------------------------------------ weights
    @property
    def weight_version(self) -> int:
        return self._version

    def _each(self, fn_name: str, *args):
        for b in self._backends:
            if b.name in self._dead:
                raise EngineDiedError(f"{fn_name}: {b.describe()}")
            getattr(b, fn_name)(*args)

    def set_weight_version(self, version: int) -> None:
        self._each("set_weight_version", str(int(version)))
        self._version = int(version)

    def begin_weight_update(self) -> None:
        self._each("begin_weight_update")

    def end_weight_update(self) -> None:
        self._each("end_weight_update")

    def update_weights_from_bucket(self, bucket: TensorBucket, *, flush_cache: bool = False) -> None:
        self._each("update_weights_from_bucket", bucket, flush_cache)

    def update_weights_from_tensors(self, named_tensors, *, flush_cache: bool = False) -> None:
        self._each("update_weights_from_tensors", list(named_tensors), flush_cache)

    @property
    def weights_update_world_size(self) -> int:
        return sum(b.tp_size for b in self._backends)

    def _concurrently(self, fn_name: str, args_per_backend: list[tuple]) -> None:
        """Calls that block until the whole process group acts (group init, broadcasts): one thread
        per backend, so every server joins at once."""
        with ThreadPoolExecutor(max_workers=len(self._backends)) as pool:
            futs = [pool.submit(getattr(b, fn_name), *a) for b, a in zip(self._backends, args_per_backend)]
            for f in futs:
                f.result()

    def init_weights_update_group(self, master_address: str, master_port: int, group_name: str, backend: str) -> None:
        world = 1 + self.weights_update_world_size
        args, offset = [], 1
        for b in self._backends:
            args.append((master_address, master_port, offset, world, group_name, backend))
            offset += b.tp_size
        self._concurrently("init_weights_update_group", args)

    def update_weights_from_distributed(self, metas: Sequence[TensorMeta], group_name: str, *,
                                        flush_cache: bool = False) -> None:
        self._concurrently("update_weights_from_distributed",
                           [(list(metas), group_name, flush_cache)] * len(self._backends))

    def destroy_weights_update_group(self, group_name: str) -> None:
        self._each("destroy_weights_update_group", group_name)

    def update_weights_from_disk(self, path: str) -> None:
        self._each("update_weights_from_disk", str(path))

    def get_weight(self, hf_name: str) -> torch.Tensor:
        b = next(b for b in self._backends if b.name not in self._dead)
        value = b.get_weight(hf_name)
        if value is None:
            raise RolloutEngineError(f"{b.name}: no weight named {hf_name!r}")
        return torch.tensor(value, dtype=torch.float32)

    # ------------------------------------------------------------------ scheduling, memory, lifecycle
    def pause_generation(self) -> None:
        self._each("pause_generation")

    def continue_generation(self) -> None:
        self._each("continue_generation")

    def flush_cache(self) -> None:
        self._each("flush_cache")

    def release_memory(self, tags: list[str] | None = None) -> None:
        """GPU: SGLang frees its weights and/or KV cache (``tags``: ``["weights"]``, ``["kv_cache"]``;
        None: both; needs ``enable_memory_saver=True``). CPU: a no-op (SGLang's memory saver is
        CUDA-only; CPU memory is not the contended resource)."""
        if self.device == "cpu":
            return
        self._each("release_memory", tags)

    def resume_memory(self, tags: list[str] | None = None) -> None:
        """Inverse of :meth:`release_memory`; re-sync weights after resuming them (SGLang discarded them)."""
        if self.device == "cpu":
            return
        self._each("resume_memory", tags)

    def health(self) -> dict[str, bool]:
        return {b.name: (b.name not in self._dead and b.health()) for b in self._backends}

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        errors = []
        for b in self._backends:
            try:
                b.shutdown()
            except Exception as e:  # keep shutting the others down, then report
                errors.append(f"{b.name}: {e!r}")
        if errors:
            raise RolloutEngineError("shutdown failed for " + "; ".join(errors))

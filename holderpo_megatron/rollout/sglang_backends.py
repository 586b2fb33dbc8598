"""The two ways :class:`~.sglang_engine.SGLangEngine` reaches SGLang: an in-process ``sglang.Engine``
(:class:`EmbeddedBackend`) or one HTTP server (:class:`ServerBackend`). Both speak SGLang's request
objects / endpoints and return SGLang's raw answers; parsing lives in :mod:`.sglang_engine`.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import torch

from .engine_weights import HOLDING_LOADER
from .interface import EngineStartError, RolloutEngineError, TensorBucket, TensorMeta
from .shared_memory import file_system_sharing

__all__ = ["EmbeddedBackend", "ServerBackend", "ServerUnreachable", "bucket_payload"]


class ServerUnreachable(RolloutEngineError):
    """The server did not answer (connection refused / reset / timed out)."""


def bucket_payload(bucket: TensorBucket, tp_size: int) -> list[bytes]:
    """A :class:`TensorBucket` as SGLang's ``flattened_bucket`` payload, one per engine TP rank.
    On CPU the flat buffer travels as a shared-memory handle (no copy of the data)."""
    from sglang.srt.utils.common import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

    metas = [FlattenedTensorMetadata(name=m.name, shape=torch.Size(m.shape), dtype=m.dtype, start_idx=m.offset,
                                     end_idx=m.offset + m.nbytes, numel=m.nbytes) for m in bucket.metas]
    with file_system_sharing():
        data = MultiprocessingSerializer.serialize({"flattened_tensor": bucket.flat, "metadata": metas})
    return [data] * tp_size


def tensors_payload(named_tensors, tp_size: int) -> list[bytes]:
    """Named tensors as SGLang's plain ``update_weights_from_tensor`` payload. CPU tensors travel
    as shared-memory handles (tensors not yet in shared memory are moved there: a copy)."""
    from sglang.srt.utils.common import MultiprocessingSerializer

    with file_system_sharing():
        data = MultiprocessingSerializer.serialize([(n, t) for n, t in named_tensors])
    return [data] * tp_size


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _check(result, what: str, where: str):
    """SGLang answers control calls with ``(success, message[, ...])`` or an object with ``.success``."""
    if isinstance(result, tuple):
        ok, msg = result[0], result[1]
    elif isinstance(result, dict):
        ok, msg = result.get("success", True), result.get("message", "")
    else:
        ok, msg = getattr(result, "success", True), getattr(result, "message", "")
    if not ok:
        raise RolloutEngineError(f"{where}: {what} failed: {msg}")
    return result


class EmbeddedBackend:
    """``sglang.Engine`` in this process (its scheduler and detokenizer are child processes)."""

    def __init__(self, server_args: dict, cpu_threads: int | None = None):
        from .sglang_launcher import sglang_env

        device = server_args.get("device", "cpu")
        self.name = f"embedded:{server_args['model_path']}"
        self.tp_size = int(server_args.get("tp_size", 1))
        if device == "cpu":
            from .sglang_cpu_shims import activate

            os.environ.update({k: v for k, v in sglang_env("cpu").items() if k == "SGLANG_USE_CPU_ENGINE"})
            activate()
        try:
            import sglang
        except ImportError as e:
            raise EngineStartError(
                f"sglang is not importable ({e}); on CPU install it with tools/install_sglang_cpu.sh") from e
        before = _child_pids()
        # The scheduler process reads OMP_NUM_THREADS when it starts: on CPU it gets cpu_threads (None:
        # ours); ours is restored after.
        omp_before = os.environ.get("OMP_NUM_THREADS")
        if device == "cpu" and cpu_threads is not None:
            os.environ["OMP_NUM_THREADS"] = str(cpu_threads)
        try:
            self.engine = sglang.Engine(**server_args)
            # the processes this engine started (scheduler, detokenizer, ...), to stop only them
            self._engine_pids = sorted(_child_pids() - before)
        except BaseException as e:  # SGLang raises SystemExit / RuntimeError from its children
            raise EngineStartError(
                f"sglang.Engine failed to start for {server_args['model_path']!r} on {device}: {e!r}. "
                "Its scheduler's log lines are above this error on stderr."
            ) from e
        finally:
            if omp_before is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = omp_before

    # -- requests -------------------------------------------------------------------------------
    def generate(self, items: list[dict]) -> list[dict]:
        out = self.engine.generate(
            input_ids=[it["input_ids"] for it in items],
            sampling_params=[it["sampling_params"] for it in items],
            return_logprob=True,
            logprob_start_len=[it.get("logprob_start_len", -1) for it in items],
        )
        return out if isinstance(out, list) else [out]

    def _run(self, coro):
        return self.engine.loop.run_until_complete(coro)

    @property
    def _tm(self):
        return self.engine.tokenizer_manager

    def begin_weight_update(self):
        from sglang.srt.managers.io_struct import BeginWeightUpdateReqInput

        _check(self._run(self._tm.begin_weight_update(BeginWeightUpdateReqInput(), None)), "begin_weight_update", self.name)

    def end_weight_update(self):
        from sglang.srt.managers.io_struct import EndWeightUpdateReqInput

        _check(self._run(self._tm.end_weight_update(EndWeightUpdateReqInput(), None)), "end_weight_update", self.name)

    def update_weights_from_bucket(self, bucket: TensorBucket, flush_cache: bool = False):
        from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqInput

        if bucket.flat.device.type == "cpu":  # views of the shared bucket, to our holding loader
            return self.update_weights_from_tensors(list(bucket.tensors()), flush_cache=flush_cache)
        obj = UpdateWeightsFromTensorReqInput(serialized_named_tensors=bucket_payload(bucket, self.tp_size),
                                              load_format="flattened_bucket", flush_cache=flush_cache)
        _check(self._run(self._tm.update_weights_from_tensor(obj, None)), "update_weights_from_tensor", self.name)

    def update_weights_from_tensors(self, named_tensors, flush_cache: bool = False):
        from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqInput

        obj = UpdateWeightsFromTensorReqInput(serialized_named_tensors=tensors_payload(named_tensors, self.tp_size),
                                              load_format=HOLDING_LOADER, flush_cache=flush_cache)
        _check(self._run(self._tm.update_weights_from_tensor(obj, None)), "update_weights_from_tensor", self.name)

    def init_weights_update_group(self, master_address, master_port, rank_offset, world_size, group_name, backend):
        from sglang.srt.managers.io_struct import InitWeightsUpdateGroupReqInput

        obj = InitWeightsUpdateGroupReqInput(master_address=master_address, master_port=master_port,
                                             rank_offset=rank_offset, world_size=world_size,
                                             group_name=group_name, backend=backend)
        _check(self._run(self._tm.init_weights_update_group(obj, None)), "init_weights_update_group", self.name)

    def update_weights_from_distributed(self, metas: list[TensorMeta], group_name: str, flush_cache: bool = False):
        from sglang.srt.managers.io_struct import UpdateWeightsFromDistributedReqInput

        obj = UpdateWeightsFromDistributedReqInput(
            names=[m.name for m in metas], dtypes=[_dtype_name(m.dtype) for m in metas],
            shapes=[list(m.shape) for m in metas], group_name=group_name, flush_cache=flush_cache,
            load_format="flattened_bucket")
        _check(self._run(self._tm.update_weights_from_distributed(obj, None)), "update_weights_from_distributed", self.name)

    def destroy_weights_update_group(self, group_name: str):
        from sglang.srt.managers.io_struct import DestroyWeightsUpdateGroupReqInput

        _check(self._run(self._tm.destroy_weights_update_group(DestroyWeightsUpdateGroupReqInput(group_name=group_name), None)),
               "destroy_weights_update_group", self.name)

    def update_weights_from_disk(self, path: str):
        from sglang.srt.managers.io_struct import UpdateWeightFromDiskReqInput

        _check(self._run(self._tm.update_weights_from_disk(UpdateWeightFromDiskReqInput(model_path=path), None)),
               "update_weights_from_disk", self.name)

    def set_weight_version(self, version: str):
        from sglang.srt.managers.io_struct import UpdateWeightVersionReqInput

        self._run(self._tm.update_weight_version(UpdateWeightVersionReqInput(new_version=version, abort_all_requests=False)))

    def get_weight(self, name: str):
        return self.engine.get_weights_by_name(name, truncate_size=1 << 62)

    def flush_cache(self):
        _check(self.engine.flush_cache(), "flush_cache", self.name)

    def pause_generation(self):
        # generate() on the embedded engine is synchronous: nothing is in flight when the caller
        # (the same thread) syncs weights. SGLang supports pausing only in its server.
        pass

    def continue_generation(self):
        pass

    def release_memory(self, tags=None):
        self.engine.release_memory_occupation(tags=tags)

    def resume_memory(self, tags=None):
        self.engine.resume_memory_occupation(tags=tags)

    def health(self) -> bool:
        tm = self.engine.tokenizer_manager
        return not getattr(tm, "gracefully_exit", False)

    def shutdown(self):
        # sglang.Engine.shutdown kills *every* child of this process (kill_process_tree(getpid)):
        # torch's shared-memory manager, servers and workers started by others included. Narrow
        # it to the processes this engine started.
        import sglang.srt.entrypoints.engine as engine_module

        original = engine_module.kill_process_tree
        own = list(self._engine_pids)

        def kill_engine_processes(parent_pid, include_parent=True, **kw):
            if parent_pid in (None, os.getpid()) and not include_parent:
                for pid in own:
                    original(pid, include_parent=True, **kw)
            else:
                original(parent_pid, include_parent=include_parent, **kw)

        engine_module.kill_process_tree = kill_engine_processes
        try:
            self.engine.shutdown()
        finally:
            engine_module.kill_process_tree = original
            self._unlink_load_snapshot()

    def load_snapshot_path(self) -> str | None:
        """The file in /dev/shm where this engine's scheduler publishes its load (SGLang names it
        after the engine's own ``instance_id``), or None where this SGLang has none."""
        try:
            from sglang.srt.managers.load_snapshot import shm_path_for
        except ImportError:
            return None
        instance_id = getattr(getattr(self.engine, "port_args", None), "instance_id", None)
        return shm_path_for(instance_id) if instance_id else None

    def _unlink_load_snapshot(self) -> None:
        # SGLang's scheduler creates it and never unlinks it (its close only unmaps; its own CI
        # sweeps /dev/shm). The name is this engine's alone, so removing it touches nothing else.
        path = self.load_snapshot_path()
        if path:
            Path(path).unlink(missing_ok=True)


# helpers of this process that may first start while an engine starts, and are never the engine's:
# torch's shared-memory manager, and multiprocessing's resource tracker (killed with the engine, it
# is relaunched at exit and prints a KeyError traceback for every shared-memory name it lost)
_NOT_ENGINE = ("torch_shm_manager", "multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _child_pids() -> set[int]:
    """Direct children of this process, less the helpers in ``_NOT_ENGINE``."""
    import psutil

    out = set()
    for c in psutil.Process().children():
        try:
            cmd = " ".join(c.cmdline())
            if not any(name in cmd for name in _NOT_ENGINE):
                out.add(c.pid)
        except psutil.Error:
            pass
    return out


class ServerBackend:
    """One SGLang HTTP server (started by us: ``process`` set; or given by URL)."""

    def __init__(self, url: str, *, process=None, timeout_s: float = 600.0, tp_size: int = 1,
                 api_key: str | None = None):
        self.url = url.rstrip("/")
        self.name = self.url
        self.process = process
        self.timeout_s = timeout_s
        self.tp_size = tp_size
        self._headers = {"Content-Type": "application/json"}
        self._holding: bool | None = None  # see _has_holding_loader
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    # -- transport ------------------------------------------------------------------------------
    def _request(self, path: str, payload: dict | None = None, *, timeout: float | None = None, method=None):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method or ("GET" if data is None else "POST"),
                                     headers=self._headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout_s) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:2000]
            if e.code == 401:
                detail += (" (the server wants an API key: set rollout.api_key or $HOLDERPO_SGLANG_API_KEY to the "
                           "server's --api-key)" if "Authorization" not in self._headers else
                           " (the API key sent is not the server's)")
            raise RolloutEngineError(f"{self.url}{path} answered HTTP {e.code}: {detail}") from e
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            raise ServerUnreachable(f"{self.url}{path}: {getattr(e, 'reason', e)}") from e
        if not body:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return body.decode(errors="replace")

    def describe(self) -> str:
        return self.process.describe_death() if self.process is not None else f"server {self.url}"

    # -- requests -------------------------------------------------------------------------------
    def generate(self, items: list[dict]) -> list[dict]:
        payload = {
            "input_ids": [it["input_ids"] for it in items],
            "sampling_params": [it["sampling_params"] for it in items],
            "return_logprob": True,
            "logprob_start_len": [it.get("logprob_start_len", -1) for it in items],
        }
        out = self._request("/generate", payload)
        return out if isinstance(out, list) else [out]

    def _has_holding_loader(self) -> bool:
        """The server was started with our weight loader: one we launched, or (asked once) one a fleet
        rank launched; a server someone else started keeps SGLang's own."""
        if self._holding is None:
            self._holding = self.process is not None
            if not self._holding:
                for path in ("/server_info", "/get_server_info"):  # the newer name, then the older
                    try:
                        info = self._request(path, timeout=30.0)
                    except (RolloutEngineError, ServerUnreachable):
                        continue
                    self._holding = isinstance(info, dict) and HOLDING_LOADER in (info.get("custom_weight_loader") or [])
                    break
        return self._holding

    def begin_weight_update(self):
        _check(self._request("/begin_weight_update", {}), "begin_weight_update", self.name)

    def end_weight_update(self):
        _check(self._request("/end_weight_update", {}), "end_weight_update", self.name)

    def update_weights_from_bucket(self, bucket: TensorBucket, flush_cache: bool = False):
        if bucket.flat.device.type == "cpu" and self._has_holding_loader():  # as the embedded engine does
            return self.update_weights_from_tensors(list(bucket.tensors()), flush_cache=flush_cache)
        payload = {"serialized_named_tensors": [base64.b64encode(p).decode() for p in bucket_payload(bucket, self.tp_size)],
                   "load_format": "flattened_bucket", "flush_cache": flush_cache}
        _check(self._request("/update_weights_from_tensor", payload), "update_weights_from_tensor", self.name)

    def update_weights_from_tensors(self, named_tensors, flush_cache: bool = False):
        payload = {"serialized_named_tensors": [base64.b64encode(p).decode()
                                                for p in tensors_payload(named_tensors, self.tp_size)],
                   "flush_cache": flush_cache}
        if self._has_holding_loader():
            payload["load_format"] = HOLDING_LOADER
        _check(self._request("/update_weights_from_tensor", payload), "update_weights_from_tensor", self.name)

    def init_weights_update_group(self, master_address, master_port, rank_offset, world_size, group_name, backend):
        _check(self._request("/init_weights_update_group", dict(
            master_address=master_address, master_port=master_port, rank_offset=rank_offset,
            world_size=world_size, group_name=group_name, backend=backend)), "init_weights_update_group", self.name)

    def update_weights_from_distributed(self, metas: list[TensorMeta], group_name: str, flush_cache: bool = False):
        _check(self._request("/update_weights_from_distributed", dict(
            names=[m.name for m in metas], dtypes=[_dtype_name(m.dtype) for m in metas],
            shapes=[list(m.shape) for m in metas], group_name=group_name, flush_cache=flush_cache,
            load_format="flattened_bucket")), "update_weights_from_distributed", self.name)

    def destroy_weights_update_group(self, group_name: str):
        _check(self._request("/destroy_weights_update_group", {"group_name": group_name}),
               "destroy_weights_update_group", self.name)

    def update_weights_from_disk(self, path: str):
        _check(self._request("/update_weights_from_disk", {"model_path": path}), "update_weights_from_disk", self.name)

    def set_weight_version(self, version: str):
        self._request("/update_weight_version", {"new_version": version, "abort_all_requests": False})

    def get_weight(self, name: str):
        return self._request("/get_weights_by_name", {"name": name, "truncate_size": 1 << 62})

    def flush_cache(self):
        self._request("/flush_cache", {})

    def pause_generation(self):
        # retract: running requests go back to the queue and are recomputed with the new weights
        # after continue (their samples then carry both versions in weight_versions)
        self._request("/pause_generation", {"mode": "retract"})

    def continue_generation(self):
        self._request("/continue_generation", {})

    def release_memory(self, tags=None):
        self._request("/release_memory_occupation", {"tags": tags})

    def resume_memory(self, tags=None):
        self._request("/resume_memory_occupation", {"tags": tags})

    def health(self) -> bool:
        if self.process is not None and self.process.exit_code() is not None:
            return False
        try:
            self._request("/health", timeout=10)
            return True
        except RolloutEngineError:
            return False

    def shutdown(self):
        if self.process is not None:
            self.process.kill()

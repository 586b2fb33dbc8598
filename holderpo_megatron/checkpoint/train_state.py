"""Atomic training-state checkpoints: model, optimizer, RNG, step and trainer state, resumable.

Layout of a checkpoint root::

    root/
      step_00000040/            a complete state (the marker train_state.json is written last)
      step_00000050/
      latest                    "step_00000050": the commit point, replaced atomically (os.replace)
      .incomplete.step_00000060/   being written (or its writer died): never loaded, removed
      .holderpo-root-id         this root's identity: which states its own writer made

A save (collective: every rank calls :func:`save_train_state`) writes into
``.incomplete.step_N`` inside the root: Megatron's ``dist_checkpointing`` files for the model's and
the optimizer's sharded state dicts (layout independent), one RNG file per rank, then rank 0 writes
the marker (step, extra trainer state, saved layout, a manifest of file sizes), fsyncs every file
and the directory, renames it to ``step_N``, fsyncs the root and replaces ``latest``. Only then is
the state committed: a crash at any earlier point leaves the previous ``latest`` in force.

On resume (:func:`load_latest_train_state`) rank 0 first removes what this root's own writer left
unfinished (its stamped ``.incomplete.*`` directories, its states half-deleted by a rotation) and
nothing else: a directory it did not write (copied in by hand, another tool's) is left where it is.
A step directory newer than the state to resume from is ambiguous (a state placed by hand, or a
rolled-back ``latest``): the resume is refused (:class:`AmbiguousTrainState`) naming it, with
what to do. The one exception is a save interrupted between its rename and the move of ``latest``
(the newest directory is this root's own complete state and ``latest`` is older than it): that
commit is completed. Without a ``latest`` file (lost, or a root written by hand) the newest
complete step directory is used. To roll back, move the newer step directories out of the root
and write the older step's name into ``latest``. Rotation deletes only this root's own states.

The model and optimizer load at any layout (the distributed optimizer's state is saved in
Megatron's fully reshardable form); the RNG states are per rank and are restored only when the
layout is the one saved (otherwise a warning says so). The root must be on a filesystem every
rank sees, as for any Megatron ``torch_dist`` checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from .dist_ckpt import _barrier, _chunks, _on_rank0, _quiet_dcp, _rank, _sharded_state_dict
from .safe_metadata import safe_dcp_metadata_reads

__all__ = [
    "TRAIN_STATE_MARKER", "TRAIN_STATE_FORMAT", "LATEST", "TrainStateInfo", "TrainStateDirectory",
    "save_train_state", "load_latest_train_state", "load_train_state", "capture_rng_state",
    "restore_rng_state", "step_dir_name", "AmbiguousTrainState",
]

log = logging.getLogger(__name__)

TRAIN_STATE_MARKER = "train_state.json"
TRAIN_STATE_FORMAT = "holderpo/train-state"
TRAIN_STATE_VERSION = 1
LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".incomplete."
_DELETING_PREFIX = ".deleting."
_RNG_DIR = "rng"
_ROOT_ID = ".holderpo-root-id"
_WRITER_STAMP = ".holderpo-writer.json"  # in a staging directory: whose it is (kept out of the manifest)


class AmbiguousTrainState(ValueError):
    """The checkpoint root holds a step directory this run cannot account for; nothing was changed."""


class TrainStateInfo(NamedTuple):
    """What a resume returns (unpacks as ``step, extra``)."""

    step: int
    extra: dict


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    return step


# --------------------------------------------------------------------------- durable file operations
def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open a directory; nothing to sync there
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory bottom-up (so the entries are durable)."""
    dirs = []
    for d, _, files in os.walk(root):
        dirs.append(Path(d))
        for name in files:
            _fsync_path(Path(d) / name)
    for d in reversed(dirs):
        _fsync_path(d, directory=True)


def _remove_tree(path: Path) -> None:
    """Delete a directory so a crash midway never leaves something that looks complete: rename it
    out of the ``step_*`` namespace first (atomic), then delete."""
    if not path.exists():
        return
    if not path.name.startswith((_DELETING_PREFIX, _TMP_PREFIX)):
        doomed = path.parent / f"{_DELETING_PREFIX}{path.name}"
        if doomed.exists():
            shutil.rmtree(doomed)
        path.rename(doomed)
        path = doomed
    shutil.rmtree(path)


# --------------------------------------------------------------------------- the on-disk protocol (rank 0)
class TrainStateDirectory:
    """The checkpoint root's file protocol, independent of what a state holds (single process).

    :func:`save_train_state` / :func:`load_latest_train_state` run it on rank 0; tests drive it
    directly with any payload: ``tmp = d.staging(step)``, write files into ``tmp``,
    ``d.commit(tmp, step, marker)``.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()

    # ---- identity: which directories this root's own writer made
    def root_id(self, create: bool = False) -> str | None:
        """The identity written into every state this root's writer saves (None: never saved here)."""
        f = self.root / _ROOT_ID
        if f.is_file():
            return f.read_text().strip() or None
        if not create:
            return None
        import uuid

        self.root.mkdir(parents=True, exist_ok=True)
        _write_durable(f, uuid.uuid4().hex + "\n")
        _fsync_path(self.root, directory=True)
        return f.read_text().strip()

    def _owned(self, directory: Path) -> bool:
        """Whether ``directory`` (a staging, step or half-deleted directory) was written here: its
        writer stamp or marker carries this root's identity. A marker from before identities were
        recorded counts as this root's (what earlier versions of this code wrote)."""
        mine = self.root_id()
        if mine is None:
            return False
        for name in (_WRITER_STAMP, TRAIN_STATE_MARKER):
            f = directory / name
            if f.is_file():
                try:
                    data = json.loads(f.read_text())
                except (ValueError, OSError):
                    continue
                if not isinstance(data, dict):
                    continue
                if name == TRAIN_STATE_MARKER and data.get("format") == TRAIN_STATE_FORMAT and "root_id" not in data:
                    return True
                if data.get("root_id") == mine:
                    return True
        return False

    # ---- reading
    def step_dirs(self) -> dict[int, Path]:
        """Every ``step_N`` directory, complete or not."""
        if not self.root.is_dir():
            return {}
        out = {}
        for p in self.root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir():
                out[int(m.group(1))] = p
        return dict(sorted(out.items()))

    def is_complete(self, step_dir: Path) -> bool:
        try:
            self.read_marker(step_dir)
            return True
        except ValueError:
            return False

    def complete_steps(self) -> list[int]:
        return [s for s, p in self.step_dirs().items() if self.is_complete(p)]

    def read_marker(self, step_dir: str | os.PathLike) -> dict:
        """The marker of a complete state; ValueError (saying why) for anything else."""
        p = Path(step_dir)
        m = p / TRAIN_STATE_MARKER
        if not m.is_file():
            raise ValueError(f"{str(p)!r} has no {TRAIN_STATE_MARKER}: incomplete (its writer stopped) "
                             "or not a training state")
        try:
            marker = json.loads(m.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{m} is not valid JSON: {e}") from e
        if marker.get("format") != TRAIN_STATE_FORMAT or marker.get("version") != TRAIN_STATE_VERSION:
            raise ValueError(f"{m}: format {marker.get('format')!r} version {marker.get('version')!r} is not "
                             f"{TRAIN_STATE_FORMAT!r} version {TRAIN_STATE_VERSION}")
        for rel, size in marker.get("files", {}).items():
            f = p / rel
            if not f.is_file() or f.stat().st_size != size:
                got = f.stat().st_size if f.is_file() else "missing"
                raise ValueError(f"{str(p)!r}: {rel} is {got} bytes, its marker says {size}: the state is damaged")
        return marker

    def latest_pointer(self) -> str | None:
        p = self.root / LATEST
        if not p.is_file():
            return None
        return p.read_text().strip() or None

    # ---- cleaning
    def cleanup_incomplete(self) -> list[Path]:
        """Remove what this root's own writer left unfinished: its stamped ``.incomplete.*``
        directories, its states half-deleted by a rotation (``.deleting.*``), its temporary
        ``latest`` files. Anything else is left in place (logged). Returns what was removed."""
        removed = []
        if not self.root.is_dir():
            return removed
        for p in sorted(self.root.iterdir()):
            if p.is_dir() and p.name.startswith((_TMP_PREFIX, _DELETING_PREFIX)):
                if self._owned(p) or not any(p.iterdir()):  # an empty one holds nothing to lose
                    shutil.rmtree(p)
                    removed.append(p)
                else:
                    log.warning("train state %s was not written by this checkpoint root's writer: left in place "
                                "(never loaded)", p)
        for p in self.root.glob(f".{LATEST}.*.tmp"):
            p.unlink()
            removed.append(p)
        return removed

    def _pointed_step(self) -> int | None:
        name = self.latest_pointer()
        if name is None:
            return None
        m = _STEP_RE.match(name)
        if not m:
            raise ValueError(f"{self.root / LATEST} names {name!r}, not a step_NNNNNNNN directory")
        return int(m.group(1))

    def _interrupted_commit(self, step: int) -> bool:
        """``step_N`` is this root's own complete state, renamed into place, and ``latest`` was last
        written before its marker: the save stopped between the rename and the pointer move."""
        p = self.root / step_dir_name(step)
        if not (self.is_complete(p) and self._owned(p)):
            return False
        return (self.root / LATEST).stat().st_mtime <= (p / TRAIN_STATE_MARKER).stat().st_mtime

    def _refuse_newer(self, newer: list[int], base: int | None) -> None:
        steps = self.step_dirs()
        what = []
        for s in newer:
            p = steps[s]
            why = "is complete" if self.is_complete(p) else f"has no valid {TRAIN_STATE_MARKER} (incomplete or not a state)"
            what.append(f"{p.name} ({why}{'' if self._owned(p) else ', not written by this root'})")
        if base is None:
            where = "there is no committed state to resume from"
            todo = "move them out of the root to start this run from step 0"
        else:
            where = (f"{LATEST} names {step_dir_name(base)}" if self.latest_pointer() is not None
                     else f"the newest complete state is {step_dir_name(base)}")
            todo = (f"move them out of the root to resume from {step_dir_name(base)}, or write the name of a "
                    f"complete one into {self.root / LATEST} to resume from it")
        raise AmbiguousTrainState(
            f"cannot resume from {self.root}: {where}, but newer step directories are there: {'; '.join(what)}. "
            f"They may have been placed by hand or left by a rolled-back run; nothing was changed: {todo}")

    def resolve_latest(self, finish_interrupted: bool = True) -> Path | None:
        """The directory to resume from: the one ``latest`` names when it is complete; without
        ``latest``, the newest complete one; None when there is none (logged when ``latest``
        names a state that is gone). Raises :class:`AmbiguousTrainState` when a step directory
        newer than that state is there, except for an interrupted commit of this root's own
        (completed here: ``latest`` is moved to it, unless ``finish_interrupted=False``: a check
        that changes nothing). Call after :meth:`cleanup_incomplete`."""
        steps = self.step_dirs()
        complete = [s for s, p in steps.items() if self.is_complete(p)]
        pointed = self._pointed_step()
        if pointed is None:
            base = complete[-1] if complete else None
            newer = [s for s in steps if base is None or s > base]
            if newer:
                self._refuse_newer(newer, base)
            if base is not None:
                log.warning("%s is missing: resuming from %s, the newest complete state", self.root / LATEST,
                            step_dir_name(base))
            return None if base is None else self.root / step_dir_name(base)
        newer = [s for s in steps if s > pointed]
        if newer and newer[-1] == max(steps) and len(newer) == 1 and self._interrupted_commit(newer[0]):
            name = step_dir_name(newer[0])
            if finish_interrupted:
                log.warning("train state %s was renamed into place but %s still names %s (the save stopped before "
                            "moving it): completing that commit", self.root / name, LATEST, step_dir_name(pointed))
                self._write_latest(name)
            return self.root / name
        if newer:
            self._refuse_newer(newer, pointed)
        if pointed in complete:
            return self.root / step_dir_name(pointed)
        gone = "is missing" if pointed not in steps else "is incomplete or damaged"
        older = [s for s in complete if s < pointed]
        if older:
            log.warning("%s names %s, which %s: resuming from %s, the newest complete state, instead",
                        self.root / LATEST, step_dir_name(pointed), gone, step_dir_name(older[-1]))
            return self.root / step_dir_name(older[-1])
        log.warning("%s names %s, which %s, and no other complete state is there: this run starts from step 0 "
                    "(its first save replaces %s)", self.root / LATEST, step_dir_name(pointed), gone, LATEST)
        return None

    # ---- writing
    def staging(self, step: int) -> Path:
        """A fresh, empty temporary directory for ``step`` inside the root (a leftover is removed)."""
        _check_step(step)
        root_id = self.root_id(create=True)
        tmp = self.root / f"{_TMP_PREFIX}{step_dir_name(step)}"
        if tmp.exists():
            if self._owned(tmp) or not any(tmp.iterdir()):
                shutil.rmtree(tmp)
            else:  # not ours (another tool's, an older version's): kept, under another name
                self._displace(tmp, step)
        tmp.mkdir()
        import socket

        _write_durable(tmp / _WRITER_STAMP, json.dumps({"root_id": root_id, "pid": os.getpid(),
                                                         "host": socket.gethostname()}) + "\n")
        return tmp

    def commit(self, tmp: Path, step: int, marker: dict) -> Path:
        """Finish ``tmp``: marker (with a manifest of file sizes), fsync, rename to ``step_N``,
        replace ``latest``. Returns the final directory."""
        _check_step(step)
        files = {}
        for d, _, names in os.walk(tmp):
            for n in names:
                f = Path(d) / n
                rel = str(f.relative_to(tmp))
                if rel != _WRITER_STAMP:
                    files[rel] = f.stat().st_size
        full = {"format": TRAIN_STATE_FORMAT, "version": TRAIN_STATE_VERSION, "step": step,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **marker, "files": files,
                "root_id": self.root_id(create=True)}
        _write_durable(tmp / TRAIN_STATE_MARKER, json.dumps(full, indent=2, sort_keys=True) + "\n")
        _fsync_tree(tmp)
        final = self.root / step_dir_name(step)
        if final.exists():
            if self._owned(final):  # the same step saved again (e.g. after a resume): the new one wins
                _remove_tree(final)
            else:  # not ours (put there during the run): kept, under another name
                self._displace(final, step)
        tmp.rename(final)
        _fsync_path(self.root, directory=True)
        self._write_latest(final.name)
        return final

    def _displace(self, path: Path, step: int) -> None:
        """Move a directory this root's writer did not make out of the way of saving ``step``."""
        aside = path.with_name(f"{path.name}.displaced-{time.strftime('%Y%m%dT%H%M%S')}")
        path.rename(aside)
        log.warning("train state %s was not written by this run: moved to %s to save step %d", path, aside.name, step)

    def _write_latest(self, name: str) -> None:
        tmp = self.root / f".{LATEST}.{os.getpid()}.tmp"
        _write_durable(tmp, name + "\n")
        os.replace(tmp, self.root / LATEST)
        _fsync_path(self.root, directory=True)

    def rotate(self, keep_last: int | None) -> list[int]:
        """Delete complete states older than the newest ``keep_last`` (never the one ``latest``
        names); returns the deleted steps. ``None`` keeps everything."""
        if keep_last is None:
            return []
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
        steps = [s for s in self.complete_steps() if self._owned(self.root / step_dir_name(s))]
        pointed = self._pointed_step()
        doomed = [s for s in steps[:-keep_last] if s != pointed] if len(steps) > keep_last else []
        for s in doomed:
            _remove_tree(self.root / step_dir_name(s))
        return doomed


# --------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict:
    """This process's RNG states: python, numpy, torch CPU, CUDA (when present) and Megatron's
    model-parallel RNG tracker (on CPU the compatibility layer keeps its states as CPU generator
    states). Stored as tensors and plain values so ``torch.load(weights_only=True)`` reads it."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": {},
    }
    for name, s in get_cuda_rng_tracker().get_states().items():
        state["tracker"][name] = (s.get_state() if isinstance(s, torch.Generator) else s).clone()
    return state


def restore_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None:
        if not torch.cuda.is_available():
            log.warning("the saved state has CUDA RNG states but CUDA is not available: not restored")
        else:
            torch.cuda.set_rng_state_all(state["cuda"])
    tracker = get_cuda_rng_tracker()
    current = tracker.get_states()
    if state["tracker"]:
        restored = {}
        for name, s in state["tracker"].items():
            cur = current.get(name)
            if isinstance(cur, torch.Generator):  # a tracker that keeps generators: set them in place
                cur.set_state(s)
                restored[name] = cur
            else:
                restored[name] = s.clone()
        tracker.set_states(restored)


def _rng_file(rank: int) -> str:
    return f"{_RNG_DIR}/rank_{rank:05d}.pt"


# --------------------------------------------------------------------------- collective save / load
def _layout() -> dict:
    out = {"world_size": dist.get_world_size() if dist.is_initialized() else 1}
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            out.update(tensor_parallel=ps.get_tensor_model_parallel_world_size(),
                       pipeline_parallel=ps.get_pipeline_model_parallel_world_size(),
                       context_parallel=ps.get_context_parallel_world_size(),
                       virtual_pipeline_parallel=ps.get_virtual_pipeline_model_parallel_world_size())
    except ImportError:
        pass
    return out


def _unwrap(model) -> list:
    """The bare model chunks under Megatron's DDP / Float16Module wrappers: the parameter keys are
    then those of a model checkpoint (dist_ckpt), and the optimizer's parameters are the same objects."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    out = []
    for c in _chunks(model):
        while isinstance(c, (DistributedDataParallel, Float16Module)):
            c = c.module
        out.append(c)
    return out


# How Megatron shapes the optimizer's sharded state: the distributed optimizer's state in the
# fully reshardable form (loads at any TP/PP/DP; gathered per DP group while saving), and no
# per-optimizer key prefix in a ChainedOptimizer. Stored in the marker; a load uses the saved one.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def _allocate_distributed_optimizer_state(optimizer) -> None:
    """A fresh DistributedOptimizer has no Adam state yet, and without Apex/TE its
    ``sharded_state_dict`` reads the (missing) step first; Megatron's own remedy is one step with
    zero gradients, whose values the load then overwrites."""
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(o, "_init_optimizer_states_with_dummy_values", None)
        inner = getattr(o, "optimizer", None)
        if init is not None and inner is not None and len(inner.state) == 0:
            init()


@contextlib.contextmanager
def _per_param_step_filled_in(optimizer):
    """Megatron 0.16.1's DistributedOptimizer over torch's Adam (its fallback without Apex/TE)
    keeps a per-parameter ``step`` tensor that its reshardable loaders never hand over (the step
    travels in the param groups), and then fails copying it (KeyError 'step'). While loading,
    each optimizer instance gets the step its own ``load_state_dict`` has just restored; with
    Apex/TE's FusedAdam there is no per-parameter step and this changes nothing."""
    patched = []
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        setter = getattr(o, "_set_main_param_and_optimizer_states", None)
        if setter is None or not hasattr(o, "model_param_group_index_map"):
            continue

        def fill(model_param, tensors, _o=o, _setter=setter):
            if "step" not in tensors:
                gi, go = _o.model_param_group_index_map[model_param]
                state = _o.optimizer.state.get(_o.optimizer.param_groups[gi]["params"][go], {})
                if "step" in state:
                    tensors = {**tensors, "step": state["step"].clone()}
            return _setter(model_param, tensors)

        o._set_main_param_and_optimizer_states = fill  # this instance only, removed below
        patched.append(o)
    try:
        yield
    finally:
        for o in patched:
            del o._set_main_param_and_optimizer_states
    # The same loader gives every parameter one shared step tensor, which torch's Adam would then
    # advance once per parameter per step: give each its own.
    for o in patched:
        for st in o.optimizer.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()


def _state_dict_to_save(model, optimizer, is_loading: bool, optimizer_metadata: dict) -> dict:
    model_sd = _sharded_state_dict(_unwrap(model))
    out = {"model": model_sd}
    if optimizer is not None:
        if is_loading:
            _allocate_distributed_optimizer_state(optimizer)
        out["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                        metadata=dict(optimizer_metadata))
    return out


def _json_extra(extra) -> dict:
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict of JSON-able trainer state, got {type(extra).__name__}")
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra must be JSON-able (data-loader position, p-schedule state, ...): {e}") from e
    return extra


def save_train_state(root: str | os.PathLike, step: int, *, model, optimizer, extra: dict | None = None,
                     keep_last: int | None = 2, before_commit: Callable[[Path], None] | None = None) -> Path:
    """Save the training state at ``step`` under ``root`` atomically; every rank calls this.

    model: the Megatron model of this rank (a module or the list of virtual-pipeline chunks,
    DDP-wrapped or not); optimizer: its ``MegatronOptimizer`` (None saves no optimizer state);
    extra: JSON-able trainer state of rank 0 (data-loader position, p-schedule state, counters);
    keep_last: complete states to keep after this one is committed (None: all);
    before_commit: called on rank 0 with the staging directory once every file is written, just
    before the commit (the trainer's fault injection kills the run there in tests).
    Returns ``root/step_{step:08d}``.
    """
    from megatron.core import dist_checkpointing

    _check_step(step)
    extra = _json_extra(extra)
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
    d = TrainStateDirectory(root)
    tmp = Path(_on_rank0(lambda: str(d.staging(step))))
    _barrier()
    dist_checkpointing.save(_state_dict_to_save(model, optimizer, False, OPTIMIZER_METADATA), str(tmp))
    rank = _rank()
    rng_path = tmp / _rng_file(rank)
    rng_path.parent.mkdir(exist_ok=True)
    buf = io.BytesIO()
    torch.save(capture_rng_state(), buf)
    with open(rng_path, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    _barrier()
    marker = {"extra": extra, "layout": _layout(), "has_optimizer": optimizer is not None,
              "optimizer_metadata": OPTIMIZER_METADATA}

    def finish():
        if before_commit is not None:
            before_commit(tmp)
        final = d.commit(tmp, step, marker)
        removed = d.rotate(keep_last)
        if removed:
            log.info("train state: removed old steps %s (keep_last=%s)", removed, keep_last)
        return str(final)

    final = Path(_on_rank0(finish))
    _barrier()
    return final


def load_train_state(step_dir: str | os.PathLike, *, model, optimizer) -> TrainStateInfo:
    """Load one complete state directory into ``model`` / ``optimizer`` (collective) and restore
    the RNG states when the saved layout equals the current one. Refuses an incomplete directory."""
    from megatron.core import dist_checkpointing

    step_dir = Path(step_dir)
    marker = TrainStateDirectory(step_dir.parent).read_marker(step_dir)
    if optimizer is not None and not marker.get("has_optimizer", False):
        raise ValueError(f"{str(step_dir)!r} holds no optimizer state; pass optimizer=None to load the model only")
    request = _state_dict_to_save(model, optimizer, True, marker.get("optimizer_metadata", OPTIMIZER_METADATA))
    with _quiet_dcp(), safe_dcp_metadata_reads():
        state = dist_checkpointing.load(request, str(step_dir))
    chunks = _unwrap(model)
    if len(chunks) == 1:
        chunks[0].load_state_dict(state["model"], strict=True)
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(state["model"][f"model{i}"], strict=True)
    if optimizer is not None:
        with _per_param_step_filled_in(optimizer):
            optimizer.load_state_dict(state["optimizer"])

    saved, now = marker.get("layout", {}), _layout()
    if saved == now:
        restore_rng_state(torch.load(step_dir / _rng_file(_rank()), weights_only=True))
    elif _rank() == 0:
        log.warning("train state %s was saved at layout %s, this run is %s: model and optimizer loaded, "
                    "RNG states not restored (they are per rank)", step_dir, saved, now)
    return TrainStateInfo(int(marker["step"]), dict(marker.get("extra", {})))


def load_latest_train_state(root: str | os.PathLike, *, model, optimizer) -> TrainStateInfo | None:
    """Resume from the committed state under ``root`` (collective); None when there is none.

    Rank 0 first removes incomplete or uncommitted directories (never loading them). Returns
    ``(step, extra)`` as :class:`TrainStateInfo`.
    """
    d = TrainStateDirectory(root)

    def resolve():
        removed = d.cleanup_incomplete()
        if removed:
            log.warning("train state: removed %d incomplete or uncommitted entries under %s: %s",
                        len(removed), d.root, [p.name for p in removed])
        p = d.resolve_latest()
        return None if p is None else str(p)

    found = _on_rank0(resolve)
    _barrier()
    if found is None:
        return None
    info = load_train_state(found, model=model, optimizer=optimizer)
    _barrier()
    return info

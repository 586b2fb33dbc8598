"""Reading a torch distributed checkpoint's ``.metadata`` without running code from it.

torch's ``FileSystemReader.read_metadata`` is a plain ``pickle.load``: a crafted ``.metadata`` in
a checkpoint someone hands over (``holderpo convert megatron-to-hf``, ``model.megatron_load``, a
resumed run) can run anything. :func:`read_dcp_metadata` unpickles it with an allow-list: the
classes torch's own metadata is made of (the dataclasses and enums of
``torch.distributed.checkpoint.metadata`` / ``.planner``, the filesystem's ``_StorageInfo``),
``torch.Size``, dtypes, layouts and memory formats, and paths; anything else is refused with
:class:`UnsafeCheckpointError` naming the file and the global it asked for.
:func:`safe_dcp_metadata_reads` makes every ``FileSystemReader`` read metadata this way while it is
active (Megatron's ``dist_checkpointing.load`` reads it through torch).
"""

from __future__ import annotations

import contextlib
import enum
import io
import os
import pickle
from pathlib import Path

import torch

__all__ = ["UnsafeCheckpointError", "read_dcp_metadata", "safe_dcp_metadata_reads", "METADATA_FILE"]

METADATA_FILE = ".metadata"
_CLASS_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
_EXTRA = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # how torch pickles a layout: by name, from a fixed table
    ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file asks for something its format never holds (refused, nothing run)."""


def _allowed(module: str, name: str):
    """The object ``module.name`` when the allow-list admits it, else None."""
    import importlib

    if module == "torch" and name != "Size":  # dtypes, layouts, memory formats: values, not callables
        obj = getattr(torch, name, None)
        return obj if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)) else None
    if (module, name) in _EXTRA:
        return getattr(importlib.import_module(module), name)
    if module in _CLASS_MODULES:
        obj = getattr(importlib.import_module(module), name, None)
        # a class defined there and holding data (a dataclass or an enum): never a function
        if isinstance(obj, type) and obj.__module__ == module and (
                hasattr(obj, "__dataclass_fields__") or issubclass(obj, enum.Enum)):
            return obj
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, path: str):
        super().__init__(f)
        self.path = path

    def find_class(self, module: str, name: str):
        obj = _allowed(module, name)
        if obj is None:
            raise UnsafeCheckpointError(
                f"{self.path}: refused to load: it asks for {module}.{name}, which a torch distributed checkpoint's "
                "metadata never holds (a crafted or foreign file; nothing from it was run)")
        return obj

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self.path}: refused to load: persistent id {pid!r} in checkpoint metadata")


def _unpickle(data: bytes, path: str):
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        md = _MetadataUnpickler(io.BytesIO(data), path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise ValueError(f"{path}: not a readable torch distributed checkpoint metadata file "
                         f"({type(e).__name__}: {e}); the checkpoint is damaged or incomplete") from None
    if not isinstance(md, Metadata):
        raise ValueError(f"{path}: holds a {type(md).__name__}, not torch distributed checkpoint metadata")
    return md


def read_dcp_metadata(ckpt_dir: str | os.PathLike):
    """The ``Metadata`` of a torch distributed checkpoint directory, unpickled with the allow-list.
    ValueError (one line, naming the file) for a missing, truncated or unsafe file."""
    path = Path(ckpt_dir) / METADATA_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: {str(ckpt_dir)!r} is not a complete torch_dist checkpoint") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read: {e.strerror}") from None
    return _unpickle(data, str(path))


@contextlib.contextmanager
def safe_dcp_metadata_reads():
    """While active, torch's ``FileSystemReader.read_metadata`` (which Megatron's loader uses)
    unpickles through the allow-list; restored afterwards."""
    from torch.distributed.checkpoint import filesystem
    from torch.distributed.checkpoint.metadata import StorageMeta

    original = filesystem.FileSystemReader.read_metadata

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            md = _unpickle(f.read(), str(path))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    filesystem.FileSystemReader.read_metadata = read_metadata
    try:
        yield
    finally:
        filesystem.FileSystemReader.read_metadata = original

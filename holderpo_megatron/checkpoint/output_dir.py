"""Output directories written atomically, and the HF files that make a checkpoint describe itself.

Everything is written into ``<parent>/.<name>.incomplete`` and renamed to ``<name>`` at the end,
so a reader never sees a half-written directory under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

__all__ = ["SIDE_FILES", "copy_side_files", "check_output_dir", "check_output_location", "staging_dir", "publish",
           "read_json"]

# Config, generation config and tokenizer files copied beside the weights in both directions.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike, *, config_dtype: str | None = None) -> list[str]:
    """Copy the :data:`SIDE_FILES` that exist in ``src`` to ``dst``; returns their names.

    ``config_dtype`` ("bfloat16", ...): the dtype the weights beside config.json now have. When
    config.json states another one (``dtype``, or ``torch_dtype`` before transformers 5) that field
    is rewritten; otherwise config.json is copied byte for byte.
    """
    copied = []
    for name in SIDE_FILES:
        p = Path(src) / name
        if not p.is_file():
            continue
        if name == "config.json" and config_dtype is not None:
            cfg = read_json(p)
            stale = [k for k in ("dtype", "torch_dtype") if k in cfg and cfg[k] != config_dtype]
            if stale:
                cfg.update({k: config_dtype for k in stale})
                (Path(dst) / name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
                copied.append(name)
                continue
        shutil.copyfile(p, Path(dst) / name)
        copied.append(name)
    return copied


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an existing non-empty output directory unless ``overwrite``."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"output path {str(p)!r} exists and is not a directory")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise ValueError(f"output directory {str(p)!r} exists and is not empty (pass --overwrite to replace it)")


def check_output_location(path: str | os.PathLike, inputs: dict[str, str | os.PathLike], overwrite: bool) -> None:
    """Everything about an output directory that can be known before any input is read: it is
    not, does not contain and is not inside an input (``inputs``: what each is called, e.g.
    ``{"--hf-path": ...}``; an overwrite would delete it), it is empty unless ``overwrite``, and
    it can be written (its nearest existing ancestor is writable)."""
    out = Path(path).resolve()
    for what, src in inputs.items():
        if src is None:
            continue
        inp = Path(src).resolve()
        relation = ("is" if out == inp else "contains" if inp.is_relative_to(out)
                    else "is inside" if out.is_relative_to(inp) else None)
        if relation:
            raise ValueError(f"output {str(path)!r} {relation} the input {what} {str(src)!r}: writing there would "
                             "replace or mix with what is read; choose an output directory outside it")
    check_output_dir(out, overwrite)
    where = out if out.exists() else out.parent
    while not where.exists():
        where = where.parent
    # the staging directory is a sibling of the output, and the output replaces it by a rename
    writable = where.parent if where == out else where
    if not os.access(writable, os.W_OK | os.X_OK):
        raise ValueError(f"output {str(path)!r} cannot be written: {writable} is not writable")


def staging_dir(path: str | os.PathLike) -> Path:
    """The temporary sibling directory a checkpoint is written into (emptied if left over)."""
    p = Path(path).absolute()
    tmp = p.parent / f".{p.name}.incomplete"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, path: str | os.PathLike, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``path`` (replacing it when ``overwrite``)."""
    p = Path(path).absolute()
    old = None
    if p.exists():
        check_output_dir(p, overwrite)
        old = p.parent / f".{p.name}.replaced"
        if old.exists():
            shutil.rmtree(old)
        p.rename(old)
    tmp.rename(p)
    if old is not None:
        shutil.rmtree(old)

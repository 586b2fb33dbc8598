"""Hugging Face Hub model ids (``model.hf_path: Qwen/Qwen2.5-7B-Instruct``) as local directories.

Resolution goes through ``huggingface_hub`` and its cache, so ``HF_HOME`` / ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE`` and ``HF_TOKEN`` mean what they mean everywhere else. ``holderpo train``
downloads once per node, before torchrun starts (one process per node, the workers not yet
running); the workers then only read the cache (``download=False``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["HUB_MODEL_FILES", "is_hub_id", "resolve_hub_model", "cached_hub_file"]

# what conversion, the tokenizer and SGLang read; not *.bin / *.pth / GGUF / original/ duplicates
HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "tokenizer*"]


def is_hub_id(spec: str) -> bool:
    """``org/name`` that is not a local directory and is a valid Hub repo id."""
    if not spec or spec.startswith(("builtin:", "/", ".", "~")) or spec.count("/") != 1 or os.path.isdir(spec):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def _describe(repo_id: str, revision: str | None) -> str:
    return f"model.hf_path {repo_id!r}" + (f" (model.revision {revision!r})" if revision else "")


def resolve_hub_model(repo_id: str, revision: str | None = None, *, download: bool = True) -> Path:
    """The snapshot directory of ``repo_id`` at ``revision`` (None: the default branch).

    ``download=False``: the cache only. Every failure is a one-line ``ValueError`` naming the id,
    the cache and what to do.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    what = _describe(repo_id, revision)
    cache = constants.HF_HUB_CACHE
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_MODEL_FILES,
                                      local_files_only=not download))
    except LocalEntryNotFoundError as e:
        if not download:
            raise ValueError(f"{what} is not in the Hugging Face cache {cache}: `holderpo train` downloads it "
                             "before the workers start; run that, or download it into this cache") from None
        if constants.HF_HUB_OFFLINE:
            raise ValueError(f"{what} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE=1 forbids "
                             "downloading it: download it once with network access (or point HF_HOME at a cache "
                             "that has it), or set model.hf_path to a local directory") from None
        raise ValueError(f"{what}: not in the Hugging Face cache {cache} and the Hub could not be reached "
                         f"({' '.join(str(e).split())[:200]})") from None
    except GatedRepoError:
        raise ValueError(f"{what} is gated: accept its licence on huggingface.co and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{what}: no such model on the Hugging Face Hub (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ValueError(f"{what}: the model has no such revision (a branch, tag or commit hash)") from None
    except HfHubHTTPError as e:
        raise ValueError(f"{what}: the Hub answered {' '.join(str(e).split())[:200]}") from None
    if not (path / "config.json").is_file():
        raise ValueError(f"{what}: the snapshot {path} has no config.json (not a transformers model)")
    return path


def cached_hub_file(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """``filename`` of ``repo_id`` if the cache has it (never a download), else None."""
    from huggingface_hub import try_to_load_from_cache

    got = try_to_load_from_cache(repo_id, filename, revision=revision)
    return Path(got) if isinstance(got, str) else None

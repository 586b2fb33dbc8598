"""Hugging Face <-> Megatron parameter mappings, declared per family as data, applied by one engine.

A family is a tuple of mapping objects. Each mapping names one Megatron parameter (``*`` stands for
the global layer index) and the HF tensor(s) it is made of, and its kind says how the HF tensors
fuse into Megatron's layout and how that layout splits over tensor parallelism:

=====================  ==========================================  ==============================
kind                   fuse (HF -> Megatron, full TP1 tensor)       tensor-parallel split
=====================  ==========================================  ==============================
``ReplicatedMapping``  identity (norms, qk-norm)                     none: every TP rank holds it
``ColumnMapping``      identity                                      dim 0 in tp chunks
``RowMapping``         identity (o_proj, down_proj)                  dim 1 in tp chunks
``VocabMapping``       rows padded with zeros to the padded vocab    dim 0 in tp chunks
``QKVMapping``         per query group: its q heads, then k, then v  dim 0 (whole query groups)
``GatedMLPMapping``    [gate; up]                                    [gate_r; up_r] on TP rank r
=====================  ==========================================  ==============================

The "full" tensor is the one Megatron's ``torch_dist`` checkpoints store (they are layout
independent: the TP1 layout, plus a leading layer axis for ``decoder.layers.*``), so the same
mapping serves in-memory models at any TP/PP layout and checkpoint files.

Public entry points: :func:`mappings_for`, :func:`expected_hf_shapes`, :func:`check_hf_tensors`,
:func:`load_hf_weights_into_model`, :func:`export_hf_weights`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Mapping, Sequence

import torch

from ..models import ModelArch

__all__ = [
    "ParamMapping", "ReplicatedMapping", "ColumnMapping", "RowMapping", "VocabMapping", "QKVMapping",
    "GatedMLPMapping", "FAMILY_MAPPINGS", "mappings_for", "expected_hf_shapes", "check_hf_tensors",
    "load_hf_weights_into_model", "export_hf_weights", "hf_names_for_stage", "hf_shape", "ExportParam",
    "export_params",
]

# Symbols used in the declared HF shapes, and the config fields that fix them (for error messages).
_DIM_FIELDS = {
    "vocab": "vocab_size",
    "hidden": "hidden_size",
    "ffn": "intermediate_size",
    "head_dim": "head_dim",
    "q": "num_attention_heads*head_dim",
    "kv": "num_key_value_heads*head_dim",
}


def hf_shape(arch: ModelArch, symbols: Sequence[str]) -> tuple[int, ...]:
    """A declared HF shape (e.g. ``("q", "hidden")``) in numbers for ``arch``."""
    return tuple(_dim(arch, s) for s in symbols)


def _dim(arch: ModelArch, sym: str) -> int:
    return {
        "vocab": arch.vocab_size,
        "hidden": arch.hidden_size,
        "ffn": arch.intermediate_size,
        "head_dim": arch.head_dim,
        "q": arch.num_heads * arch.head_dim,
        "kv": arch.num_kv_heads * arch.head_dim,
    }[sym]


# ----------------------------------------------------------------------------------------------
# Mapping kinds
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamMapping:
    """One Megatron parameter <- one or more HF tensors.

    ``megatron`` is the name in Megatron checkpoints and in the Transformer Engine layer spec;
    ``local_name`` is the name in Megatron's local (non-TE) spec where it differs (the two
    layernorms TE fuses into the following linear). ``hf`` are HF names; ``*`` is the layer index.
    ``hf_shapes`` declares each HF tensor's shape in symbols of :data:`_DIM_FIELDS`.
    ``when`` restricts the mapping to architectures with that feature; ``export=False`` marks the
    tied output layer (a copy of the embedding, loaded but never exported twice).
    """

    megatron: str
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[str, ...], ...]
    local_name: str | None = None
    when: str | None = None  # "qkv_bias" | "qk_norm" | "tied" | "untied"
    export: bool = True

    tp_dim: ClassVar[int | None] = None
    padded: ClassVar[bool] = False

    # -- names --------------------------------------------------------------------------------
    @property
    def per_layer(self) -> bool:
        return "*" in self.megatron

    @property
    def checkpoint_key(self) -> str:
        """Key in a ``torch_dist`` checkpoint (layers stacked on a leading axis)."""
        return self.megatron.replace("layers.*.", "layers.")

    def hf_names(self, layer: int | None) -> tuple[str, ...]:
        return tuple(n.replace("*", str(layer)) for n in self.hf)

    @property
    def is_embedding(self) -> bool:
        """Held by the first pipeline stage (and read before the layers)."""
        return self.megatron.startswith("embedding.")

    def applies(self, arch: ModelArch) -> bool:
        if self.when is None:
            return True
        return {
            "qkv_bias": arch.qkv_bias,
            "qk_norm": arch.qk_norm,
            "tied": arch.tie_word_embeddings,
            "untied": not arch.tie_word_embeddings,
        }[self.when]

    # -- layout (full TP1 tensor <-> HF) ---------------------------------------------------------
    def fuse(self, hf: Sequence[torch.Tensor], arch: ModelArch, full_shape: torch.Size) -> torch.Tensor:
        """HF tensors -> the full (TP1) Megatron tensor of ``full_shape``."""
        (t,) = hf
        return t

    def split(self, full: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, ...]:
        """The full (TP1) Megatron tensor -> the HF tensors, in the order of ``self.hf``."""
        return (full,)

    # -- tensor parallelism ----------------------------------------------------------------------
    def shard(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        if self.tp_dim is None or size == 1:
            return full
        return full.chunk(size, dim=self.tp_dim)[rank]

    def unshard(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.tp_dim is None or len(pieces) == 1:
            return pieces[0]
        return torch.cat(list(pieces), dim=self.tp_dim)

    # -- export at TP > 1, gathered to one rank (see ``weight_sync.tp_gather``) --------------------
    def export_pieces(self, local: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The contiguous pieces of this rank's shard that every TP rank sends to the gathering
        rank, in order (none for a replicated parameter: the gathering rank holds it whole)."""
        return () if self.tp_dim is None else (local,)

    def gather_plan(self, local: torch.Tensor, outs: Sequence[torch.Tensor], arch: ModelArch, size: int,
                    stage: Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
                    ) -> tuple[list[list[torch.Tensor]], Callable[[], None]]:
        """On the gathering rank: where each TP rank's pieces land, and how they become HF tensors.

        ``local``: this rank's shard; ``outs``: the HF tensors' places (in ``self.hf`` order, their
        final dtype), usually views of a bucket; ``stage(shape, dtype)``: scratch memory for pieces
        that cannot land in place. Returns ``targets`` (``targets[i][r]``: where piece ``i`` of TP
        rank ``r`` is received, each contiguous and of the piece's shape and dtype) and ``finish``,
        called once every piece has arrived, which writes whatever did not land in place."""
        (out,) = outs
        if self.tp_dim is None:
            return [], lambda: out.copy_(local)
        if self.tp_dim == 0 and out.dtype == local.dtype:  # dim-0 chunks of the output are contiguous
            return [list(out.chunk(size, dim=0))], lambda: None
        st = stage((size,) + tuple(local.shape), local.dtype)
        if self.tp_dim == 0:
            return [list(st)], lambda: out.copy_(st.reshape(out.shape))
        # dim 1: rank r's [rows, cols] lands at columns r*cols..; one strided copy
        rows, cols = local.shape
        return [list(st)], lambda: out.view(rows, size, cols).copy_(st.transpose(0, 1))

    def load_shard(self, param: torch.Tensor, hf: Sequence[torch.Tensor], arch: ModelArch, rank: int, size: int) -> None:
        """Write TP rank ``rank``'s shard of the fused HF tensors into ``param`` (in place)."""
        full_shape = list(param.shape)
        if self.tp_dim is not None:
            full_shape[self.tp_dim] *= size
        local = self.shard(self.fuse(hf, arch, torch.Size(full_shape)), rank, size)
        if local.shape != param.shape:
            raise ValueError(f"Megatron parameter {self.megatron!r}: mapped shape {tuple(local.shape)} "
                             f"!= parameter shape {tuple(param.shape)}")
        param.copy_(local)


class ReplicatedMapping(ParamMapping):
    """Held whole by every TP rank: RMSNorm weights, q/k norms."""


class ColumnMapping(ParamMapping):
    tp_dim = 0


class RowMapping(ParamMapping):
    tp_dim = 1


class VocabMapping(ColumnMapping):
    """Embedding / output layer: Megatron pads the vocab rows (with zeros here) to split evenly."""

    padded = True  # the full Megatron tensor has more rows than the HF one

    def fuse(self, hf, arch, full_shape):
        (t,) = hf
        pad = full_shape[0] - t.shape[0]
        if pad < 0:
            raise ValueError(f"{self.megatron}: padded vocab {full_shape[0]} < vocab_size {t.shape[0]}")
        return torch.cat([t, t.new_zeros((pad,) + tuple(t.shape[1:]))]) if pad else t

    def split(self, full, arch):
        return (full[: arch.vocab_size],)

    def load_shard(self, param, hf, arch, rank, size):
        # Row copy straight into the shard: no padded full-vocab temporary.
        (t,) = hf
        rows = param.shape[0]
        if rows * size < t.shape[0]:
            raise ValueError(f"{self.megatron}: padded vocab {rows * size} < vocab_size {t.shape[0]}")
        start = rank * rows
        real = max(0, min(rows, t.shape[0] - start))
        param[:real].copy_(t[start:start + real])
        param[real:].zero_()

    def gather_plan(self, local, outs, arch, size, stage):
        # ``out`` may extend past the real rows over room for the padding (the weight sync puts this
        # tensor last in its bucket, the padding in the buffer's spare bytes): every shard lands
        # in place. Otherwise the shard(s) holding padding rows are staged, their real rows copied.
        (out,) = outs
        rows, vocab = local.shape[0], out.shape[0]
        if out.dtype == local.dtype and vocab == rows * size:
            return [list(out.chunk(size, dim=0))], lambda: None
        targets, staged = [], []
        for r in range(size):
            lo = r * rows
            if out.dtype == local.dtype and lo + rows <= vocab:
                targets.append(out[lo:lo + rows])
            else:
                st = stage(tuple(local.shape), local.dtype)
                targets.append(st)
                staged.append((lo, st))

        def finish():
            for lo, st in staged:
                n = max(0, min(rows, vocab - lo))
                out[lo:lo + n].copy_(st[:n])

        return [targets], finish


class QKVMapping(ColumnMapping):
    """q, k, v -> linear_qkv, grouped as Megatron expects: for each query group (KV head), its
    ``num_heads/num_kv_heads`` q heads, then its k head, then its v head. Works for weights
    ``[.., hidden]`` and biases ``[..]`` alike. TP splits whole groups, so a plain dim-0 chunk."""

    def fuse(self, hf, arch, full_shape):
        q, k, v = hf
        g, hd = arch.num_kv_heads, arch.head_dim
        rest = tuple(q.shape[1:])
        q = q.reshape((g, arch.num_heads // g, hd) + rest)
        k = k.reshape((g, 1, hd) + rest)
        v = v.reshape((g, 1, hd) + rest)
        return torch.cat([q, k, v], dim=1).reshape((-1,) + rest)

    def split(self, full, arch):
        g, hd, qpg = arch.num_kv_heads, arch.head_dim, arch.num_heads // arch.num_kv_heads
        rest = tuple(full.shape[1:])
        grouped = full.reshape((g, qpg + 2, hd) + rest)
        q = grouped[:, :qpg].reshape((-1,) + rest)
        k = grouped[:, qpg].reshape((-1,) + rest)
        v = grouped[:, qpg + 1].reshape((-1,) + rest)
        return q.contiguous(), k.contiguous(), v.contiguous()

    def gather_plan(self, local, outs, arch, size, stage):
        # a shard interleaves q, k and v per query group: staged whole, then one strided copy per
        # HF tensor (rank-major order of the staged shards is the full tensor's group order)
        g, hd, qpg = arch.num_kv_heads, arch.head_dim, arch.num_heads // arch.num_kv_heads
        rest = tuple(local.shape[1:])
        st = stage((size,) + tuple(local.shape), local.dtype)
        q, k, v = outs

        def finish():
            grouped = st.view((g, qpg + 2, hd) + rest)
            q.view((g, qpg, hd) + rest).copy_(grouped[:, :qpg])
            k.view((g, hd) + rest).copy_(grouped[:, qpg])
            v.view((g, hd) + rest).copy_(grouped[:, qpg + 1])

        return [list(st)], finish


class GatedMLPMapping(ColumnMapping):
    """gate_proj, up_proj -> linear_fc1 = [gate; up]. On TP rank r the shard is
    ``[gate_r; up_r]``, not a chunk of the TP1 tensor."""

    def fuse(self, hf, arch, full_shape):
        gate, up = hf
        return torch.cat([gate, up], dim=0)

    def split(self, full, arch):
        gate, up = full.chunk(2, dim=0)
        return gate.contiguous(), up.contiguous()

    def shard(self, full, rank, size):
        if size == 1:
            return full
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)

    def unshard(self, pieces):
        if len(pieces) == 1:
            return pieces[0]
        halves = [p.chunk(2, dim=0) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)

    def export_pieces(self, local):
        return tuple(local.chunk(2, dim=0))  # gate_r, up_r: each a contiguous half of the shard

    def gather_plan(self, local, outs, arch, size, stage):
        gate, up = outs
        if gate.dtype == local.dtype:  # gate_r and up_r land straight in their HF tensors
            return [list(gate.chunk(size, dim=0)), list(up.chunk(size, dim=0))], lambda: None
        st = stage((2, size, local.shape[0] // 2) + tuple(local.shape[1:]), local.dtype)

        def finish():
            gate.copy_(st[0].reshape(gate.shape))
            up.copy_(st[1].reshape(up.shape))

        return [list(st[0]), list(st[1])], finish


# ----------------------------------------------------------------------------------------------
# Families, as data
# ----------------------------------------------------------------------------------------------

_L = "decoder.layers.*."
_H = "model.layers.*."

# Llama-style decoder: shared by every family we support; features switch entries on and off.
LLAMA_STYLE: tuple[ParamMapping, ...] = (
    VocabMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), (("vocab", "hidden"),)),
    ReplicatedMapping(_L + "self_attention.linear_qkv.layer_norm_weight", (_H + "input_layernorm.weight",),
                      (("hidden",),), local_name=_L + "input_layernorm.weight"),
    QKVMapping(_L + "self_attention.linear_qkv.weight",
               (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
               (("q", "hidden"), ("kv", "hidden"), ("kv", "hidden"))),
    QKVMapping(_L + "self_attention.linear_qkv.bias",
               (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
               (("q",), ("kv",), ("kv",)), when="qkv_bias"),
    ReplicatedMapping(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",),
                      (("head_dim",),), when="qk_norm"),
    ReplicatedMapping(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",),
                      (("head_dim",),), when="qk_norm"),
    RowMapping(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), (("hidden", "q"),)),
    ReplicatedMapping(_L + "mlp.linear_fc1.layer_norm_weight", (_H + "post_attention_layernorm.weight",),
                      (("hidden",),), local_name=_L + "pre_mlp_layernorm.weight"),
    GatedMLPMapping(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
                    (("ffn", "hidden"), ("ffn", "hidden"))),
    RowMapping(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), (("hidden", "ffn"),)),
    ReplicatedMapping("decoder.final_layernorm.weight", ("model.norm.weight",), (("hidden",),)),
    VocabMapping("output_layer.weight", ("lm_head.weight",), (("vocab", "hidden"),), when="untied"),
    # Tied: the last pipeline stage holds a copy of the embedding as its output layer.
    VocabMapping("output_layer.weight", ("model.embed_tokens.weight",), (("vocab", "hidden"),),
                 when="tied", export=False),
)

FAMILY_MAPPINGS: dict[str, tuple[ParamMapping, ...]] = {
    "llama": LLAMA_STYLE,
    "mistral": LLAMA_STYLE,
    "qwen2": LLAMA_STYLE,
    "qwen3": LLAMA_STYLE,
}

# HF tensors that carry no weights (old checkpoints saved rotary caches); accepted and skipped.
IGNORED_HF_TENSORS = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)


def mappings_for(arch: ModelArch) -> tuple[ParamMapping, ...]:
    """The mappings that apply to ``arch`` (its family's list, filtered by its features)."""
    if arch.family not in FAMILY_MAPPINGS:
        raise ValueError(f"no parameter mapping for family {arch.family!r}; known: {sorted(FAMILY_MAPPINGS)}")
    return tuple(m for m in FAMILY_MAPPINGS[arch.family] if m.applies(arch))


# ----------------------------------------------------------------------------------------------
# Expected HF tensors: names, shapes, and the refusals
# ----------------------------------------------------------------------------------------------


def expected_hf_shapes(arch: ModelArch, layers: Sequence[int] | None = None,
                       *, embedding: bool = True, head: bool = True) -> dict[str, tuple[int, ...]]:
    """HF name -> shape for ``arch``, in HF order: embedding, each layer's tensors, norm, lm_head.

    ``layers`` restricts the layers (default all); ``embedding``/``head`` include the non-layer
    tensors of the first / last pipeline stage.
    """
    maps = [m for m in mappings_for(arch) if m.export]
    layers = range(arch.num_layers) if layers is None else layers
    out: dict[str, tuple[int, ...]] = {}

    def add(m: ParamMapping, layer: int | None):
        for n, syms in zip(m.hf_names(layer), m.hf_shapes):
            out[n] = hf_shape(arch, syms)

    for m in maps:
        if embedding and not m.per_layer and m.is_embedding:
            add(m, None)
    for i in layers:
        for m in maps:
            if m.per_layer:
                add(m, i)
    for m in maps:
        if head and not m.per_layer and not m.is_embedding:
            add(m, None)
    return out


def _explain(arch: ModelArch, sym: str) -> str:
    hd = f"head_dim={arch.head_dim}"
    if arch.head_dim * arch.num_heads == arch.hidden_size:
        hd += f" (hidden_size/num_attention_heads={arch.hidden_size}/{arch.num_heads} unless set)"
    return {
        "q": f"num_attention_heads={arch.num_heads} x {hd}",
        "kv": f"num_key_value_heads={arch.num_kv_heads} x {hd}",
        "head_dim": hd,
    }.get(sym, f"{_DIM_FIELDS[sym]}={_dim(arch, sym)}")


def _shape_reason(arch: ModelArch, name: str) -> str:
    for m in mappings_for(arch):
        for pattern, syms in zip(m.hf, m.hf_shapes):
            if re.fullmatch(re.escape(pattern).replace(r"\*", r"\d+"), name):
                return ", ".join(_explain(arch, s) for s in dict.fromkeys(syms))
    return ""


def check_hf_tensors(arch: ModelArch, shapes: Mapping[str, Sequence[int]], source: str = "checkpoint") -> None:
    """Refuse an HF checkpoint whose tensors disagree with its config: missing, extra, wrong shape.

    ``shapes`` maps every tensor name in the checkpoint to its shape. A tied model may carry a
    redundant ``lm_head.weight`` of the embedding's shape; it is accepted (and ignored).
    """
    expected = expected_hf_shapes(arch)
    present = {n: tuple(s) for n, s in shapes.items() if not any(p.fullmatch(n) for p in IGNORED_HF_TENSORS)}
    if arch.tie_word_embeddings and "lm_head.weight" in present:
        if present["lm_head.weight"] != expected["model.embed_tokens.weight"]:
            raise ValueError(
                f"{source}: tensor 'lm_head.weight' has shape {present['lm_head.weight']} but the config ties it "
                f"to model.embed_tokens.weight {expected['model.embed_tokens.weight']}"
            )
        del present["lm_head.weight"]
    missing = [n for n in expected if n not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{source}: tensor {missing[0]!r} is missing{more}; the config "
                         f"({arch.architecture}, num_hidden_layers={arch.num_layers}, "
                         f"tie_word_embeddings={arch.tie_word_embeddings}) requires it")
    extra = [n for n in present if n not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ValueError(f"{source}: unexpected tensor {extra[0]!r}{more}: not part of {arch.architecture} "
                         f"with num_hidden_layers={arch.num_layers}, tie_word_embeddings={arch.tie_word_embeddings}")
    for n, want in expected.items():
        if present[n] != want:
            raise ValueError(f"{source}: tensor {n!r} has shape {present[n]} but the config "
                             f"({_shape_reason(arch, n)}) implies {want}")


def hf_names_for_stage(arch: ModelArch, layers: Sequence[int], *, pre_process: bool, post_process: bool) -> list[str]:
    """HF names a pipeline stage reads (tied last stage: the embedding too)."""
    names = list(expected_hf_shapes(arch, layers, embedding=pre_process, head=post_process))
    if post_process and arch.tie_word_embeddings and not pre_process:
        names.insert(0, "model.embed_tokens.weight")
    return names


# ----------------------------------------------------------------------------------------------
# The engine: one Megatron model chunk <-> HF tensors
# ----------------------------------------------------------------------------------------------


def _unwrap(module):
    # DDP / Float16Module wrappers keep the GPTModel in .module
    while hasattr(module, "module") and not hasattr(module, "decoder"):
        module = module.module
    return module


def _pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(name).replace(r"\*", r"(\d+)"))


def _resolver(arch: ModelArch) -> Callable[[str], tuple[ParamMapping, int | None] | None]:
    """Megatron parameter name (TE or local spec, local layer index) -> (mapping, local layer)."""
    table = []
    for m in mappings_for(arch):
        for n in (m.megatron, m.local_name):
            if n:
                table.append((_pattern(n), m))

    def resolve(name: str):
        for pat, m in table:
            hit = pat.fullmatch(name)
            if hit:
                return m, (int(hit.group(1)) if hit.groups() else None)
        return None

    return resolve


def _mapped_params(chunk, arch: ModelArch):
    """(name, param, mapping, global layer index) for every parameter of one model chunk.

    The global layer index comes from the layer's own ``layer_number`` (1-based, global), so
    pipeline stage and virtual-pipeline offsets need no arithmetic here.
    """
    resolve = _resolver(arch)
    layers = chunk.decoder.layers if getattr(chunk, "decoder", None) is not None else []
    out = []
    for name, p in chunk.named_parameters():
        hit = resolve(name)
        if hit is None:
            raise ValueError(f"Megatron parameter {name!r} has no mapping for family {arch.family!r}")
        m, local = hit
        glob = None if local is None else layers[local].layer_number - 1
        out.append((name, p, m, glob))
    return out


def _tp():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1, None
    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_group())


@torch.no_grad()
def load_hf_weights_into_model(model, arch: ModelArch, hf_state: Mapping[str, torch.Tensor]) -> int:
    """Fill this rank's pipeline stage and tensor-parallel shard of a Megatron GPTModel.

    ``model``: one GPTModel (or a wrapper with ``.module``), or a list of them (virtual pipeline).
    ``hf_state``: HF name -> full tensor; a dict or a lazy reader (e.g. :class:`SafetensorsReader`)
    so each rank reads only the tensors its stage needs. Every parameter of the model is written
    (an error names any that has no mapping or whose HF tensor has the wrong shape); padded vocab
    rows are zero; dtypes are cast to the parameter's. Returns the number of parameters written.
    No communication: each rank reads what it needs.
    """
    tp_rank, tp_size, _ = _tp()
    chunks = model if isinstance(model, (list, tuple)) else [model]
    written = 0
    for chunk in chunks:
        chunk = _unwrap(chunk)
        for name, p, m, layer in _mapped_params(chunk, arch):
            names = m.hf_names(layer)
            tensors = []
            for n, syms in zip(names, m.hf_shapes):
                if n not in hf_state:
                    raise ValueError(f"HF tensor {n!r} (for Megatron {name!r}) is missing")
                t = hf_state[n]
                want = hf_shape(arch, syms)
                if tuple(t.shape) != want:
                    raise ValueError(f"HF tensor {n!r} has shape {tuple(t.shape)} but the config "
                                     f"({_shape_reason(arch, n)}) implies {want}")
                tensors.append(t)
            m.load_shard(p.data, tensors, arch, tp_rank, tp_size)
            del tensors
            written += 1
    return written


@dataclass(frozen=True)
class ExportParam:
    """One exported parameter of this rank: its mapping, this rank's shard (a view of the
    parameter), and the HF tensors it becomes (names and full shapes, in ``mapping.hf`` order)."""

    mapping: ParamMapping
    local: torch.Tensor
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]


def export_params(model, arch: ModelArch) -> list[ExportParam]:
    """The parameters of this rank's pipeline stage that export to HF tensors, in the order
    :func:`export_hf_weights` yields them; no communication (every TP rank lists the same ones)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    out = []
    for chunk in chunks:
        for _, p, m, layer in _mapped_params(_unwrap(chunk), arch):
            if m.export:
                out.append(ExportParam(m, p.detach(), m.hf_names(layer),
                                       tuple(hf_shape(arch, syms) for syms in m.hf_shapes)))
    return out


def _gather(local: torch.Tensor, m: ParamMapping, tp_size: int, group) -> torch.Tensor:
    if m.tp_dim is None or tp_size == 1:
        return local
    import torch.distributed as dist

    local = local.contiguous()
    pieces = [torch.empty_like(local) for _ in range(tp_size)]
    dist.all_gather(pieces, local, group=group)
    return m.unshard(pieces)


@torch.no_grad()
def export_hf_weights(model, arch: ModelArch, *, dtype: torch.dtype | None = None,
                      tensor_of: Callable[[torch.nn.Parameter], torch.Tensor] | None = None,
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` for the parameters of this rank's pipeline stage.

    Every rank of the stage's tensor-parallel group must iterate in step: each parameter is
    all-gathered over the TP group as it is reached (one parameter in flight), and every TP rank
    yields the same full tensors. Vocab padding is removed, QKV and gate/up are un-fused. The
    tied output layer of a last stage is not yielded (the first stage yields the embedding).
    ``dtype`` casts the yielded tensors (default: the parameter's dtype). ``tensor_of`` picks what
    to export per parameter (default its data; e.g. ``lambda p: p.main_grad`` for gradients).
    """
    _, tp_size, group = _tp()
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        chunk = _unwrap(chunk)
        for _, p, m, layer in _mapped_params(chunk, arch):
            if not m.export:
                continue
            full = _gather((p if tensor_of is None else tensor_of(p)).detach(), m, tp_size, group)
            for n, t in zip(m.hf_names(layer), m.split(full, arch)):
                yield n, (t if dtype is None else t.to(dtype)).contiguous()

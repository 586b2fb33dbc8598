"""The rollout engine interface: what the trainer and weight sync may ask of any generation engine.

Pure Python + torch (no Megatron, no SGLang): the trainer loop, ``weight_sync`` and ``eval`` talk
to a :class:`RolloutEngine`; :mod:`.sglang_engine` is the one implementation today.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = [
    "SamplingParams", "Sample", "TensorMeta", "TensorBucket", "RolloutEngine",
    "RolloutEngineError", "EngineStartError", "EngineDiedError", "step_seed",
]


class RolloutEngineError(RuntimeError):
    """An engine call failed (the message names the engine / server and what it answered)."""


class EngineStartError(RolloutEngineError):
    """An engine or server did not come up; the message carries the tail of its log."""


class EngineDiedError(RolloutEngineError):
    """A server stopped answering while requests were in flight and none could be retried."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature=0`` is greedy. ``seed``: prompt i, sample j is sent with seed
    ``seed + i * n + j`` (each sample its own stream); SGLang honours per-request seeds only when
    started with ``enable_deterministic_inference`` (pass it in ``SGLangEngineConfig.server_args``;
    not verified on CPU), otherwise sampling draws from the engine's global generator
    (``SGLangEngineConfig.random_seed``). ``stop_token_ids`` / ``stop`` (strings; they need the
    engine's tokenizer) end a sample with finish reason ``"stop"``; the engine's EOS does too
    unless ``ignore_eos``."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self):
        def bad(name, allowed):
            raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid; allowed: {allowed}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "an int >= 1")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            bad("temperature", "a finite float >= 0 (0 = greedy)")
        if not (0 < self.top_p <= 1):
            bad("top_p", "a float in (0, 1]")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            bad("top_k", "-1 (off) or an int >= 1")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", "an int >= 1")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad("seed", "None or an int >= 0")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def sample_seed(self, prompt_index: int, sample_index: int) -> int | None:
        return None if self.seed is None else self.seed + prompt_index * self.n + sample_index


def step_seed(run_seed: int, step: int) -> int:
    """The ``SamplingParams.seed`` of training step ``step`` (from 0) of a run seeded ``run_seed``.

    A step's requests use ``seed + prompt * n + sample`` (agents add ``turn * 1_000_003``), so step
    bases are 2**32 apart and no two steps of a run share a request seed. (A base of ``run_seed * c +
    step`` made step s+1 reuse all but one of step s's seeds; SGLang's deterministic sampler draws its
    noise from (seed, position), so those samples repeated the previous step's noise.) < 2**62: int64.
    """
    return ((run_seed * 100_003 + step) % (1 << 30)) << 32


@dataclass
class Sample:
    """One generated response.

    ``prompt_ids`` / ``output_ids``: token ids. ``logprobs``: float32 ``[len(output_ids)]``, the
    engine's log p(token) in nats under the sampling distribution: log_softmax(logits / T) at the
    request's temperature T (SGLang's default; before top-p / top-k truncation). ``finish_reason``: ``"length"`` (hit max_new_tokens) or
    ``"stop"`` (EOS, a stop token or a stop string). ``weight_version``: the engine's weight
    version when the sample finished; ``weight_versions``: ``[(version, start, end)]`` spans of
    output tokens if weights changed mid-sample (then the sample is stale / mixed). ``timing``:
    seconds (``latency_s``: the request's end-to-end time; ``done_s``: from the start of the
    ``generate`` call to this sample's completion). ``engine``: the name of the engine that made it.
    """

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: torch.Tensor
    finish_reason: str
    weight_version: int
    weight_versions: list[tuple[int, int, int]] = field(default_factory=list)
    text: str | None = None
    timing: dict[str, float] = field(default_factory=dict)
    engine: str = ""

    @property
    def is_mixed_version(self) -> bool:
        return len({v for v, _, _ in self.weight_versions}) > 1

    def is_stale(self, current_version: int) -> bool:
        return self.weight_version != current_version or self.is_mixed_version


@dataclass(frozen=True)
class TensorMeta:
    """One tensor inside a :class:`TensorBucket`: bytes ``[offset, offset + nbytes)`` of the flat buffer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class TensorBucket:
    """HF-named tensors packed back to back (no padding) in one flat ``uint8`` buffer.

    ``buffer`` may be longer than the packed bytes (a reused buffer); :attr:`flat` is the used part.
    All tensors of a bucket share one dtype, so every offset is aligned for it.
    """

    buffer: torch.Tensor
    metas: list[TensorMeta]

    @property
    def nbytes(self) -> int:
        return self.metas[-1].offset + self.metas[-1].nbytes if self.metas else 0

    @property
    def flat(self) -> torch.Tensor:
        return self.buffer[: self.nbytes]

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Views into the buffer (no copies)."""
        return [(m.name, self.buffer[m.offset: m.offset + m.nbytes].view(m.dtype).view(m.shape)) for m in self.metas]


class RolloutEngine(abc.ABC):
    """A generation engine the trainer drives: generate, take new weights, make room for training.

    Weight updates happen between :meth:`pause_generation` and :meth:`continue_generation`; the
    tensor and distributed paths between :meth:`begin_weight_update` and :meth:`end_weight_update`.
    Every :class:`Sample` carries the weight version set by :meth:`set_weight_version`.
    """

    #: the dtype the engine holds weights in (weight sync casts to it)
    dtype: torch.dtype

    # -- generation ---------------------------------------------------------------------------
    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]] | Sequence[str], params: SamplingParams) -> list[list[Sample]]:
        """``prompts``: token-id lists or strings (through the engine's tokenizer).
        Returns ``[len(prompts)][params.n]`` samples, all of them or an exception."""

    # -- weights ------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def weight_version(self) -> int: ...

    @abc.abstractmethod
    def set_weight_version(self, version: int) -> None: ...

    @abc.abstractmethod
    def begin_weight_update(self) -> None: ...

    @abc.abstractmethod
    def end_weight_update(self) -> None: ...

    @abc.abstractmethod
    def update_weights_from_bucket(self, bucket: TensorBucket, *, flush_cache: bool = False) -> None:
        """Colocated: load one bucket of full HF tensors (shared memory on CPU, IPC on GPU).
        ``flush_cache``: drop the KV / prefix cache after loading (pass it with the last bucket)."""

    @abc.abstractmethod
    def update_weights_from_tensors(self, named_tensors: Sequence[tuple[str, torch.Tensor]], *,
                                    flush_cache: bool = False) -> None:
        """Colocated, zero-copy: load full HF tensors that already live in shared memory (CPU: the
        trainer's own parameters moved there, sent as handles; each tensor may be a view)."""

    @abc.abstractmethod
    def init_weights_update_group(self, master_address: str, master_port: int, group_name: str,
                                  backend: str) -> None:
        """Join a weights-update process group of ``1 + weights_update_world_size`` ranks whose
        rank 0 is the trainer. Blocks until every member joined (call it from a thread while the
        trainer joins)."""

    @property
    @abc.abstractmethod
    def weights_update_world_size(self) -> int:
        """Ranks this engine contributes to a weights-update group (its tensor-parallel size, summed over servers)."""

    @abc.abstractmethod
    def update_weights_from_distributed(self, metas: Sequence[TensorMeta], group_name: str, *,
                                        flush_cache: bool = False) -> None:
        """Receive one bucket broadcast from group rank 0 and load it (blocks until the broadcast
        arrives: call it from a helper thread while the trainer broadcasts)."""

    @abc.abstractmethod
    def destroy_weights_update_group(self, group_name: str) -> None: ...

    @abc.abstractmethod
    def update_weights_from_disk(self, path: str) -> None:
        """Reload all weights from an HF directory (safetensors) readable by the engine; flushes
        the KV / prefix cache."""

    @abc.abstractmethod
    def get_weight(self, hf_name: str) -> torch.Tensor:
        """The engine's current value of one HF-named tensor (float32; for checks, slow)."""

    # -- scheduling and memory ----------------------------------------------------------------
    @abc.abstractmethod
    def pause_generation(self) -> None: ...

    @abc.abstractmethod
    def continue_generation(self) -> None: ...

    @abc.abstractmethod
    def flush_cache(self) -> None:
        """Drop the KV / prefix cache (it holds activations of the old weights)."""

    @abc.abstractmethod
    def release_memory(self) -> None:
        """Colocated training: give the accelerator memory (weights, KV cache) back."""

    @abc.abstractmethod
    def resume_memory(self) -> None: ...

    # -- lifecycle ----------------------------------------------------------------------------
    @abc.abstractmethod
    def health(self) -> dict[str, bool]:
        """``{engine or server name: healthy}``."""

    @abc.abstractmethod
    def shutdown(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
        return False

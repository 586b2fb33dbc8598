"""Rollout engines: the :class:`RolloutEngine` interface and its SGLang implementation.

No Megatron imports here (see shared/DESIGN.md). SGLang itself is imported lazily, when an
engine is constructed, so this package imports on machines without SGLang.
"""

from .config import SGLangEngineConfig
from .drift import LogprobDrift, logprob_drift
from .interface import (EngineDiedError, EngineStartError, RolloutEngine, RolloutEngineError, Sample, SamplingParams,
                        TensorBucket, TensorMeta, step_seed)

__all__ = [
    "EngineDiedError", "EngineStartError", "LogprobDrift", "RolloutEngine", "RolloutEngineError", "SGLangEngine",
    "SGLangEngineConfig", "Sample", "SamplingParams", "TensorBucket", "TensorMeta", "logprob_drift",
    "step_seed",
]


def __getattr__(name):
    # the SGLang implementation pulls in no SGLang at import, but keep the interface import light
    if name == "SGLangEngine":
        from .sglang_engine import SGLangEngine

        return SGLangEngine
    raise AttributeError(name)

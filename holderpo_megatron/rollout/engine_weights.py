"""Runs inside the SGLang engines we start: the weight loader they are started with
(``custom_weight_loader``), used by ``update_weights_from_tensor`` (``load_format=HOLDING_LOADER``).

It loads the named tensors as SGLang's default does (``model.load_weights``), then, for CPU tensors,
keeps them until the same update call of the next sync has arrived. On CPU those tensors are
mappings of the trainer's shared memory (its parameters, or its reused bucket buffers), and torch
looks a handle up in its storage cache before mapping it: held, the next sync's handles find their
mapping there, so a sync neither maps the memory again nor faults every page in, and no sync ends
unmapping it (together about as long as the copy itself: ``bench/shared_memory_mapping.py``). Device
tensors (CUDA IPC) are not held: a held IPC mapping would keep the trainer's buffers from being
freed while it trains.
"""

from __future__ import annotations

HOLDING_LOADER = "holderpo_megatron.rollout.engine_weights.load_and_hold"

# first tensor name of an update call -> that call's CPU tensors (each sync cuts the same calls)
_HELD: dict[str, list] = {}


def load_and_hold(model, named_tensors) -> None:
    named_tensors = list(named_tensors)
    model.load_weights(named_tensors)
    cpu = [t for _, t in named_tensors if t.device.type == "cpu"]
    if named_tensors and cpu:
        _HELD[named_tensors[0][0]] = cpu  # the previous sync's call of the same name is released now

"""Weight sync: Megatron shards -> HF-named tensors (``checkpoint.export_hf_weights``) -> rollout engine.

One interface (:class:`WeightSynchronizer`), one class per transport (``tensor``, ``distributed``,
``disk``), and :func:`make_weight_synchronizer`, which picks one from the topology.
"""

from .buckets import DEFAULT_BUCKET_BYTES, SyncLedger
from .source import MegatronWeightSource, StateDictSource, WeightSource
from .synchronizer import (TRANSPORTS, DiskTransport, DistributedTransport, SyncReport, SyncTopology, TensorTransport,
                           WeightSynchronizer, choose_transport, make_weight_synchronizer)

__all__ = [
    "DEFAULT_BUCKET_BYTES", "DiskTransport", "DistributedTransport", "MegatronWeightSource", "StateDictSource",
    "SyncLedger", "SyncReport", "SyncTopology", "TRANSPORTS", "TensorTransport", "WeightSource",
    "WeightSynchronizer", "choose_transport", "make_weight_synchronizer",
]

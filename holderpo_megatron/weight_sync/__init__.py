"""Weight sync: Megatron shards -> HF-named tensors (``checkpoint.export_hf_weights``) -> rollout engine.

One interface (:class:`WeightSynchronizer` in ``base``: roles, bucket streaming, the ledger, the
engine protocol), one module per transport (``tensor_transport``, ``distributed_transport``,
``disk_transport``), and ``factory``: :class:`SyncTopology` (where the senders and the engine run)
and :func:`make_weight_synchronizer`, which picks a transport from it.

    topology = SyncTopology.from_layout(stage_senders=source.stage_senders, nproc_per_node=8, tp=2)
    sync = make_weight_synchronizer(source, engine, dtype=torch.bfloat16, topology=topology)
    report = sync.sync(version)          # SyncReport; report.to_dict() -> weight_sync/* metrics
"""

from .base import SyncReport, WeightSynchronizer
from .buckets import DEFAULT_BUCKET_BYTES, SyncLedger
from .disk_transport import DiskTransport
from .distributed_transport import DistributedTransport
from .factory import TRANSPORTS, SyncTopology, choose_transport, make_weight_synchronizer
from .source import MegatronWeightSource, StateDictSource, WeightSource
from .tensor_transport import TensorTransport

__all__ = [
    "DEFAULT_BUCKET_BYTES", "DiskTransport", "DistributedTransport", "MegatronWeightSource", "StateDictSource",
    "SyncLedger", "SyncReport", "SyncTopology", "TRANSPORTS", "TensorTransport", "WeightSource",
    "WeightSynchronizer", "choose_transport", "make_weight_synchronizer",
]

"""The HölderPO algorithm in pure torch on local tensors: no distributed code, no imports of ours."""

from .advantages import ADVANTAGE_ESTIMATORS, group_advantages
from .entropy import entropy_from_logits
from .holder import holder_log_ratio, masked_mean
from .kl import KL_ESTIMATORS, kl_penalty
from .losses import (
    GRPO_AGGREGATIONS,
    HOLDER_VARIANTS,
    ClipOptions,
    DrGRPOOptions,
    GMPOOptions,
    GRPOOptions,
    HolderOptions,
    LossOptions,
    LossOutput,
    compute_policy_loss,
    get_policy_loss,
    holder_policy_loss,
    make_loss_options,
    policy_loss_names,
    policy_loss_options,
    register_policy_loss,
)
from .metrics import LossMetrics
from .reducers import PaddedReducer, SequenceReducer
from .schedules import SCHEDULE_KINDS, PSchedule

__all__ = [
    "ADVANTAGE_ESTIMATORS", "GRPO_AGGREGATIONS", "HOLDER_VARIANTS", "KL_ESTIMATORS", "SCHEDULE_KINDS",
    "ClipOptions", "DrGRPOOptions", "GMPOOptions", "GRPOOptions", "HolderOptions", "LossOptions",
    "LossMetrics", "LossOutput", "PSchedule", "PaddedReducer", "SequenceReducer", "compute_policy_loss", "entropy_from_logits",
    "get_policy_loss", "group_advantages", "holder_log_ratio", "holder_policy_loss", "kl_penalty",
    "make_loss_options", "masked_mean", "policy_loss_names", "policy_loss_options", "register_policy_loss",
]

"""holderpo_megatron: Hölder Policy Optimisation at Megatron scale."""

__version__ = "0.1.0"

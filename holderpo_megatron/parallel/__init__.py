"""Parallelism-aware pieces between the algorithms and Megatron: vocab-parallel log-probs
(``logprobs``), packed and context-parallel sequence aggregation (``aggregation``), exact global loss
scaling (``loss_scaling``), the process-group layout (``layout``) and the CPU layer for megatron-core
(``cpu_compat``). Import from the submodules; nothing is imported here so that loading one never
loads another."""

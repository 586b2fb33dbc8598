"""Multi-turn text environments (imports nothing else of ours).

    from holderpo_megatron.envs import AlfworldEnv, AlfworldEnvConfig, EnvPool, list_alfworld_games
    with EnvPool(partial(AlfworldEnv, AlfworldEnvConfig()), num_workers=8) as pool:
        firsts = pool.reset(list_alfworld_games("valid_unseen"))

``interface``: what a rollout may ask of an env; ``pool``: envs in worker processes with timeouts;
``alfworld``: the ALFWorld games (textworld is imported when an env is built).
"""

from holderpo_megatron.envs.alfworld import (ALFWORLD_SPLITS, ALFWORLD_TASK_TYPES, AlfworldEnv, AlfworldEnvConfig,
                                             default_data_root, list_alfworld_games, prepare_alfworld_data)
from holderpo_megatron.envs.interface import EnvFactory, EnvObservation, EnvStep, EpisodeSpec, TextEnv
from holderpo_megatron.envs.pool import EnvPool, SerialEnvRunner

__all__ = [
    "EnvFactory", "EnvObservation", "EnvStep", "EpisodeSpec", "TextEnv", "EnvPool", "SerialEnvRunner",
    "ALFWORLD_SPLITS", "ALFWORLD_TASK_TYPES", "AlfworldEnv", "AlfworldEnvConfig", "default_data_root",
    "list_alfworld_games", "prepare_alfworld_data",
]

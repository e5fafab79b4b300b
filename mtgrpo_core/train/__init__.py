"""The training layer: tasks and verifiers, the embedded policy, generation backends, the
RL loop (GRPO, DAPO, MT-GRPO, SEC, Prompt-GDRO, Rollout-GDRO), checkpoints, reports and the
comparison harness. Heavy dependencies (transformers, reasoning-gym, matplotlib) are
imported by the submodules that need them."""
from .config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "load_config", "train", "Trainer"]


def __getattr__(name):
    if name in ("train", "Trainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)

"""A fast seeded multi-task GRPO simulator that drives the real controllers (task weighting,
GDRO) and the ratio-preserving sampler; ``python -m mtgrpo_core.sim --help``."""
from .core import ALGOS, SimConfig, SimResult, run_table, simulate

__all__ = ["ALGOS", "SimConfig", "SimResult", "simulate", "run_table"]

"""verl custom reward for the rows of prepare_data.py: rebuilds the suite (cached per
process) and scores with mtgrpo_core.train.tasks (1.0 correct, 0.1 well-formed but wrong, 0).

    custom_reward_function.path=examples/verl/reward.py custom_reward_function.name=compute_score
"""
from __future__ import annotations

from mtgrpo_core.train.tasks import load_suite

_SUITES: dict = {}


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    if not isinstance(extra_info, dict) or "suite" not in extra_info:
        raise ValueError("extra_info: expected the dict written by examples/verl/prepare_data.py (with 'suite')")
    sizes = tuple(None if extra_info[k] < 0 else int(extra_info[k]) for k in ("train_size", "test_size"))
    key = (extra_info["suite"], int(extra_info["seed"])) + sizes
    suite = _SUITES.get(key)
    if suite is None:
        suite = _SUITES[key] = load_suite(key[0], key[1], train_size=sizes[0], test_size=sizes[1])
    prompt = suite.prompts(data_source, extra_info["split"], indices=[int(extra_info["task_index"])])[0]
    if prompt.answer != ground_truth:
        raise ValueError(f"extra_info: item {extra_info['id']} does not match its ground truth (different "
                         "reasoning-gym version or suite sizes than when the data was prepared)")
    return float(suite.score([prompt], [solution_str])[0])

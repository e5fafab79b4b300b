"""Write reasoning-gym task prompts as verl parquet files (train.parquet, test.parquet).

Each row is verl's RL format: ``data_source`` = the task name (MTGRPOTaskSampler's task key),
``prompt`` = one user message, ``reward_model.ground_truth`` = the reference answer, and
``extra_info`` = {index (unique per row: PromptGDROSampler's prompt id), task_index, split,
suite, seed, train_size, test_size} so that ``reward.py`` can rebuild the exact item and score
it with mtgrpo_core.train.tasks.

    python examples/verl/prepare_data.py --suite mtgrpo-3task --out data/mtgrpo-3task
    python examples/verl/prepare_data.py --suite cpu-3task --train-size 64 --test-size 16 --out /tmp/d
"""
from __future__ import annotations

import argparse
import json
import os

import pandas as pd

from mtgrpo_core.train.tasks import SUITES, load_suite


def rows_of(suite_name: str, seed: int, train_size: int | None, test_size: int | None) -> dict[str, list[dict]]:
    """{"train": rows, "test": rows} in verl's format for every task of the suite."""
    out: dict[str, list[dict]] = {"train": [], "test": []}
    with load_suite(suite_name, seed, train_size=train_size, test_size=test_size) as suite:
        for split in ("train", "test"):
            for task in suite.task_names:
                for p in suite.prompts(task, split):
                    out[split].append({
                        "data_source": task,
                        "prompt": [{"role": "user", "content": p.text}],
                        "ability": "reasoning",
                        "reward_model": {"style": "rule", "ground_truth": p.answer},
                        "extra_info": {"index": len(out[split]), "task_index": int(p.index), "split": split,
                                       "id": p.id, "suite": suite_name, "seed": int(seed),
                                       "train_size": -1 if train_size is None else int(train_size),
                                       "test_size": -1 if test_size is None else int(test_size)},
                    })
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default="mtgrpo-3task", choices=sorted(SUITES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-size", type=int, default=None, help="prompts per task (default: the suite's)")
    ap.add_argument("--test-size", type=int, default=None)
    ap.add_argument("--out", required=True, help="output folder")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    rows = rows_of(a.suite, a.seed, a.train_size, a.test_size)
    counts = {}
    for split, rs in rows.items():
        pd.DataFrame(rs).to_parquet(os.path.join(a.out, f"{split}.parquet"))
        counts[split] = {t: sum(r["data_source"] == t for r in rs) for t in dict.fromkeys(r["data_source"] for r in rs)}
    print(json.dumps({"out": a.out, "suite": a.suite, "rows": counts}))
    return counts


if __name__ == "__main__":
    main()

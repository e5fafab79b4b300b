"""Issue 13's comparison on cpu-3task: GRPO, DAPO, MT-GRPO, SEC-DAPO, Subroutine 2
(mtgrpo-reward-only) and GRPO+RPS (rps-uniform), one process per seed so the seeds run side
by side, then one table over all seeds.

Per seed the warm-up runs once (``OUT/warmup-s{seed}``) and every algorithm starts RL from it
(``mtgrpo_core.train.compare.run_compare``), with the same RL step budget. Usage::

    python bench/experiments/compare_mt13.py --seed 0 --out runs/mt13 --steps 50 [key=value ...] &
    python bench/experiments/compare_mt13.py --seed 1 ... &   # and seed 2
    python bench/experiments/compare_mt13.py --table --seeds 0,1,2 --out runs/mt13

``bench/experiments/compare_mt13.sh`` runs exactly that.
"""
from __future__ import annotations

import argparse
import sys

ALGOS = ("dapo", "mtgrpo", "grpo", "sec-dapo", "mtgrpo-reward-only", "rps-uniform", "prompt-gdro", "rollout-gdro")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--algos", default=",".join(ALGOS))
    p.add_argument("--table", action="store_true", help="only write the table over --seeds")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    from pathlib import Path

    from mtgrpo_core.train.compare import run_compare, write_compare
    from mtgrpo_core.train.config import load_config

    algos = [x for x in a.algos.split(",") if x]
    if a.table:
        print(write_compare(Path(a.out), algos, [int(s) for s in a.seeds.split(",")], None))
        return 0
    cfg = load_config(None, [f"rl.steps={a.steps}", "rl.max_time_s=0", f"eval.every={a.eval_every}", *a.overrides],
                      out=a.out)
    run_compare(cfg, a.out, algos=algos, seeds=[a.seed])
    return 0


if __name__ == "__main__":
    sys.exit(main())

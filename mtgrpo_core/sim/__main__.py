"""``python -m mtgrpo_core.sim``: compare task-weighting / GDRO controllers on the simulator.

Prints, per algorithm (mean over seeds), the final worst-task and average success, the
largest task weight reached, how often the top-weighted task changed and the mean
zero-gradient (zero-advantage group) rate; optionally writes a PNG of per-task success and
weights over steps (first seed).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace

import numpy as np

from .core import ALGOS, SimConfig, run_table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtgrpo_core.sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", nargs="+", default=["uniform", "sec", "reward-only", "iwu"],
                   choices=ALGOS, help="algorithms to compare (default: the four task weightings)")
    p.add_argument("--steps", type=int, default=SimConfig.steps)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. n-1)")
    p.add_argument("--lam", type=float, default=SimConfig.lam, help="IWU lambda")
    p.add_argument("--eta", type=float, default=SimConfig.reward_only_eta, help="reward-only eta")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override any SimConfig field, e.g. --set interference=0.3 batch_size=64")
    p.add_argument("--plot", metavar="PNG", help="write per-task success and weights over steps")
    args = p.parse_args(argv)

    cfg = replace(SimConfig(), steps=args.steps, lam=args.lam, reward_only_eta=args.eta)
    types = {f.name: f.type for f in fields(SimConfig)}
    for kv in args.set:
        k, _, v = kv.partition("=")
        if k not in types:
            p.error(f"--set: unknown field {k!r}")
        cur = getattr(cfg, k)
        val = (tuple(float(x) for x in v.split(",")) if isinstance(cur, tuple) else
               (v.lower() in ("1", "true", "yes")) if isinstance(cur, bool) else type(cur)(v))
        cfg = replace(cfg, **{k: val})
    rows = run_table(args.algo, cfg, range(args.seeds))
    print(f"# {cfg.num_tasks} tasks, {cfg.steps} steps, batch {cfg.batch_size} prompts x {cfg.group_size} "
          f"rollouts, seeds 0..{args.seeds - 1}; batches: " + ", ".join(sorted({r['sampler'] for r in rows})))
    if len({r["sampler"] == "unfiltered" for r in rows}) > 1:
        # issue 14: a filtered group_size-rollout run is not a baseline for unfiltered GDRO runs
        print("# note: filtered task-weighting runs and unfiltered GDRO runs are not matched; compare GDRO "
              "with --algo grpo ... and --set group_size=N n_mean=N (bench/experiments/gdro_sim.py)")
    print(f"{'algo':<15}{'worst':>8}{'average':>9}{'max z':>8}{'switches':>10}{'zero-grad':>11}   final per-task")
    for r in rows:
        final = np.mean([res.success[-1] for res in r["results"]], axis=0)
        print(f"{r['algo']:<15}{r['worst']:>8.3f}{r['average']:>9.3f}{r['max_weight']:>8.2f}{r['switches']:>10.1f}"
              f"{r['zero_grad']:>11.2f}   {np.array2string(final, precision=3)}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, len(rows), figsize=(4 * len(rows), 6), sharex=True, squeeze=False)
        for j, r in enumerate(rows):
            res = r["results"][0]
            for k in range(cfg.num_tasks):
                axes[0, j].plot(res.success[:, k], label=f"task {k}")
                axes[1, j].plot(res.weights[:, k], label=f"task {k}")
            axes[0, j].set_title(f"{r['algo']} (worst {res.worst:.2f})")
            axes[0, j].set_ylim(0, 1)
            axes[1, j].set_ylim(0, 1)
            axes[1, j].set_xlabel("step")
        axes[0, 0].set_ylabel("success probability")
        axes[1, 0].set_ylabel("task weight z")
        axes[0, 0].legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"# wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GDRO on the simulator with matched baselines (issue 14, deliverable 3).

Every run draws the same way (uniform over all prompts, no zero-advantage filter) with the
same mean rollouts per prompt (``group_size == n_mean``), 3 seeds. Writes
``gdro-sim.md`` (table: worst task, average, pass@k, WSE) and ``gdro-sim-q.png`` (Prompt-GDRO's
q over the difficulty bins through training, both signals; Rollout-GDRO sqrt's rollouts per
bin), next to this file unless ``--out`` says otherwise.

    .venv/bin/python bench/experiments/gdro_sim.py            # about 1-2 minutes on one core
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from mtgrpo_core.sim import SimConfig, simulate

RUNS = [  # (label, sim algo, config overrides)
    ("GRPO (matched)", "grpo", {}),
    ("Prompt-GDRO surrogate (paper)", "prompt-gdro", {"gdro_signal": "surrogate"}),
    ("Prompt-GDRO learnability (ours)", "prompt-gdro", {"gdro_signal": "learnability"}),
    ("Prompt-GDRO failure rate", "prompt-gdro", {"gdro_signal": "failure"}),
    ("Prompt-GDRO surrogate, floor 1/G (released)", "prompt-gdro", {"gdro_signal": "surrogate",
                                                                     "gdro_share_floor": 1 / 11}),
    ("Rollout-GDRO sqrt", "rollout-sqrt", {}),
    ("Rollout-GDRO bandit", "rollout-bandit", {}),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rollouts", type=int, default=4, help="group_size = n_mean for every run")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--tag", default="", help="suffix of the output names (gdro-sim{tag}.md)")
    args = ap.parse_args()
    base = replace(SimConfig(), steps=args.steps, group_size=args.rollouts, n_mean=args.rollouts)
    out = Path(args.out)
    t0 = time.time()
    res = {lab: [simulate(algo, replace(base, seed=s, **kw)) for s in range(args.seeds)] for lab, algo, kw in RUNS}
    k = base.pass_k

    def ms(v, scale=100.0, fmt=".1f"):
        v = np.asarray(v, float) * scale
        return f"{v.mean():{fmt}} ± {v.std():{fmt}}"

    lines = [f"# GDRO on the simulator, matched baselines ({time.strftime('%Y-%m-%d')})", "",
             f"{base.num_tasks} tasks (difficulty logits {base.difficulty_means}), {base.steps} steps, "
             f"{base.batch_size} prompts per step drawn uniformly, no zero-advantage filter, "
             f"{args.rollouts} rollouts per prompt on average in every run, seeds 0..{args.seeds - 1} "
             f"(mean ± std over seeds).", "",
             "Command: `.venv/bin/python bench/experiments/gdro_sim.py"
             + ("" if (args.steps, args.seeds, args.rollouts) == (400, 3, 4) else
                f" --steps {args.steps} --seeds {args.seeds} --rollouts {args.rollouts}")
             + (f" --tag {args.tag}" if args.tag else "") + "`", "",
             f"| run | worst task % | average % | worst pass@{k} % | average pass@{k} % | WSE x100 | "
             f"WSE vs uniform n % | q max (last 50 steps) |",
             "|---|---|---|---|---|---|---|---|"]
    for lab, rs in res.items():
        worst = [r.worst for r in rs]
        avg = [r.average for r in rs]
        pk = [r.extra["pass_k"] for r in rs]
        wse = [r.extra["wse"].mean() for r in rs]
        rel = [(r.extra["wse"].mean() / r.extra["wse_uniform"].mean() - 1) for r in rs]
        qm = (ms([r.extra["q_gdro"][-50:].mean(0).max() for r in rs], 1.0, ".3f") if "q_gdro" in rs[0].extra
              else "-")
        lines.append(f"| {lab} | {ms(worst)} | {ms(avg)} | {ms([p.min() for p in pk])} | "
                     f"{ms([p.mean() for p in pk])} | {ms(wse, 100.0, '.2f')} | {ms(rel, 100.0, '+.2f')} | {qm} |")
    # where the adversaries put their mass (seed 0, last 100 steps): bins 0 (hardest) .. 9, 10 = unseen
    lines += ["", "Mean q over the last 100 steps (seed 0), bins 0 = pass@n < 0.1 (hardest) ... 9 = "
              "pass@n >= 0.9, 10 = unseen:", ""]
    for lab, rs in res.items():
        if "q_gdro" in rs[0].extra:
            q = rs[0].extra["q_gdro"][-100:].mean(0)
            lines.append(f"- {lab}: " + " ".join(f"{x:.3f}" for x in q))
    for lab, rs in res.items():
        if "bin_rollouts" in rs[0].extra and lab.startswith("Rollout"):
            br = rs[0].extra["bin_rollouts"][-100:].sum(0)
            # prompts per bin in the same steps: rollouts / prompts = mean n per bin
            lines.append(f"- {lab}: rollout share per bin " + " ".join(f"{x:.3f}" for x in br / br.sum()))
    lines += ["", f"Wall time {time.time() - t0:.0f} s."]
    (out / f"gdro-sim{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [lab for lab in res if "q_gdro" in res[lab][0].extra] + ["Rollout-GDRO sqrt"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, lab in zip(axes[0], panels):
        r = res[lab][0]
        if "q_gdro" in r.extra:
            m, title, cl = r.extra["q_gdro"].T, f"{lab}\nq over bins", "q"
        else:
            br = r.extra["bin_rollouts"]
            m, title, cl = (br / br.sum(1, keepdims=True)).T, f"{lab}\nshare of rollouts per bin", "share"
        im = ax.imshow(m, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("bin (0 hardest, 10 unseen)")
        fig.colorbar(im, ax=ax, label=cl)
    fig.tight_layout()
    fig.savefig(out / f"gdro-sim{args.tag}-q.png", dpi=90)
    print(f"wrote {out / f'gdro-sim{args.tag}.md'} and {out / f'gdro-sim{args.tag}-q.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

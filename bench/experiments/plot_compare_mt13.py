"""Plots of issue 13's comparison from ``compare.json`` and the runs' ``metrics.jsonl``:

- ``compare_mt13_bars.png``: worst task and average, mean@k and pass@k (mean +- std over seeds) per
  algorithm;
- ``compare_mt13_curves.png``: worst-task mean@k over RL steps (evaluations), mean over seeds;
- ``compare_mt13_weights.png``: the task weights z (Prompt-GDRO: its bin weights q) over steps of the
  weighted algorithms (seed 0).

Usage: ``python bench/experiments/plot_compare_mt13.py RUN_DIR OUT_DIR [PREFIX]``; the files are
named ``PREFIX_bars.png`` etc. (default prefix ``compare_mt13``; issue 14 uses ``compare_gdro14``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def main(run_dir: str, out_dir: str, prefix: str = "compare_mt13") -> None:
    run, out = Path(run_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = json.loads((run / "compare.json").read_text())["algos"]
    algos = list(res)
    x = np.arange(len(algos))
    stack = len(algos) > 6  # many settings: mean@k above pass@k, each panel full width
    fig, axes = plt.subplots(2 if stack else 1, 1 if stack else 2,
                             figsize=(max(13.0, 1.2 * len(algos)), 8.0 if stack else 3.8))
    n_seeds = len(res[algos[0]]["worst"])
    for ax, (kp, metric) in zip(axes, (("", "mean@4"), ("pass_", "pass@4"))):
        for off, key, label in ((-0.2, "worst", "worst task"), (0.2, "average", "average")):
            vals = [res[a].get(kp + key) or [np.nan] for a in algos]
            ax.bar(x + off, [100 * np.mean(v) for v in vals], 0.4, yerr=[100 * np.std(v) for v in vals],
                   capsize=3, label=label)
        ax.set_xticks(x, algos, rotation=25, fontsize=8)
        ax.set_ylabel(f"test {metric} (%)")
        ax.set_title(f"cpu-3task {metric}, mean ± std over {n_seeds} seeds")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{prefix}_bars.png", dpi=120)

    fig, ax = plt.subplots(figsize=(9 if stack else 6, 4.2 if stack else 3.6))
    colors = plt.get_cmap("tab20" if len(algos) > 10 else "tab10").colors  # one colour per setting
    for a, color in zip(algos, colors * (len(algos) // len(colors) + 1)):
        curves = []
        for d in sorted(run.glob(f"{a}-s*")):
            ev = [r for r in _records(d / "metrics.jsonl") if r.get("kind") == "eval"]
            curves.append([(r["step"], r["worst_mean_at_k"]) for r in ev])
        if curves:
            n = min(len(c) for c in curves)
            steps = [c[0] for c in curves[0][:n]]
            ax.plot(steps, [100 * np.mean([c[i][1] for c in curves]) for i in range(n)], marker="o", label=a,
                    color=color)
    ax.set_xlabel("RL step")
    ax.set_ylabel("worst-task mean@4 (%)")
    if stack:  # many settings: the legend beside the axes, not over the curves
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{prefix}_curves.png", dpi=120)

    weighted = [a for a in algos if a.startswith(("mtgrpo", "sec-", "prompt-gdro"))]
    n = max(len(weighted), 1)
    cols = min(n, 5)  # wrap into rows of at most 5 panels
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(weighted):]:
        ax.set_visible(False)
    for ax, a in zip(axes.flat, weighted):
        tr = [r for r in _records(run / f"{a}-s0" / "metrics.jsonl") if r.get("kind") == "train"]
        key, what, name = (("gdro_q", "bin weights q", "bin") if tr and "gdro_q" in tr[0]
                           else ("weights", "weights z", "task"))
        if tr:
            z = np.array([r[key] for r in tr])
            ev = next((r for r in _records(run / f"{a}-s0" / "metrics.jsonl") if r.get("kind") == "eval"), {})
            labels = list(ev.get("tasks", {})) if name == "task" else []
            for k in range(z.shape[1]):
                ax.plot([r["step"] for r in tr], z[:, k], label=labels[k] if k < len(labels) else f"{name} {k}")
        ax.set_title(f"{a} (seed 0): {what}")
        ax.set_xlabel("RL step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{prefix}_weights.png", dpi=120)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(*sys.argv[1:])

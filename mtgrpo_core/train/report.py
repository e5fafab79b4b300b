"""``mtgrpo report --run DIR``: PNG plots and a markdown summary from a run's metrics.

Plots (matplotlib, Agg backend): per-task accuracy over steps (evaluation mean@k and the
smoothed training-batch accuracy), task weights over steps, per-task zero-gradient rate,
target vs realised batch shares, and rollouts per difficulty bin (GDRO) or per task.
Summary (``report.md``): per-task accuracy before/after RL, worst-task and average accuracy,
and the relative change Delta% = mean_k (Acc_m(k) - Acc_b(k)) / Acc_b(k) * 100 against a
baseline run when one is given (docs/ALGORITHMS.md section 7).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .trainer import read_metrics


def _smooth(x, w: int = 20):
    x = np.asarray(x, np.float64)
    if len(x) < 2:
        return x
    w = max(1, min(w, len(x)))
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = np.empty_like(x)
    for i in range(len(x)):
        lo = max(0, i - w + 1)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def load_run(run_dir) -> dict:
    run_dir = Path(run_dir)
    recs = read_metrics(run_dir)
    if not recs:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this a run folder?)")
    summ = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    train = [r for r in recs if r.get("kind") == "train" and not r.get("skipped")]
    evals = [r for r in recs if r.get("kind") == "eval"]
    names = summ.get("task_names") or (list(evals[0]["tasks"]) if evals else [])
    return {"dir": run_dir, "records": recs, "train": train, "evals": evals, "summary": summ, "tasks": names}


def final_accuracy(run: dict, metric: str = "mean_at_k", tag: str = "after") -> dict | None:
    ev = [e for e in run["evals"] if e.get("tag") == tag]
    if not ev:
        return None
    return {k: v.get(metric) for k, v in ev[-1]["tasks"].items()}


def relative_change(acc: dict, base: dict) -> float | None:
    vals = [(acc[k] - base[k]) / base[k] * 100 for k in acc if k in base and base[k]]
    return float(np.mean(vals)) if vals else None


def make_plots(run: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names, tr, paths = run["tasks"], run["train"], []
    steps = [r["step"] for r in tr]

    def save(fig, name):
        p = out_dir / name
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    # 1. accuracy
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, n in enumerate(names):
        line = None
        evs = [e for e in run["evals"] if n in e["tasks"]]
        if evs:
            (line,) = ax.plot([e["step"] for e in evs], [100 * e["tasks"][n]["mean_at_k"] for e in evs], "o-",
                              label=f"{n} (test mean@k)")
        if tr:
            ax.plot(steps, 100 * _smooth([r["train_acc"][k] for r in tr]), "--", alpha=0.6,
                    color=line.get_color() if line is not None else None, label=f"{n} (train batch)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("accuracy %")
    ax.set_title("Per-task accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, "accuracy.png")
    # 2. weights
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, n in enumerate(names):
        if tr:
            ax.plot(steps, [r.get("weights_after", r["weights"])[k] for r in tr], label=n)
    ax.set_xlabel("RL step")
    ax.set_ylabel("z_k")
    ax.set_title("Task weights")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, "task_weights.png")
    # 3. zero-gradient rate
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, n in enumerate(names):
        if tr:
            ax.plot(steps, _smooth([r["zero_grad_rate"][k] for r in tr]), label=n)
    ax.set_xlabel("RL step")
    ax.set_ylabel("zero-advantage group share")
    ax.set_title("Zero-gradient rate per task")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, "zero_grad_rate.png")
    # 4. target vs realised shares
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, n in enumerate(names):
        if tr:
            tot_t = [max(sum(r["targets"]), 1e-9) for r in tr]
            tot_r = [max(sum(r["realized"]), 1) for r in tr]
            (l,) = ax.plot(steps, _smooth([r["realized"][k] / t for r, t in zip(tr, tot_r)]), label=f"{n} realised")
            ax.plot(steps, [r["targets"][k] / t for r, t in zip(tr, tot_t)], ":", color=l.get_color(),
                    label=f"{n} target")
    ax.set_xlabel("RL step")
    ax.set_ylabel("batch share")
    ax.set_title("Target vs realised batch shares")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, "batch_shares.png")
    # 5. rollouts per bin (GDRO) or per task
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = [r["bin_rollouts"] for r in tr if r.get("bin_rollouts") is not None]
    if bins:
        b = np.asarray(bins, np.float64)
        nb = b.shape[1]
        labels = [f"b{i}" for i in range(nb - 1)] + ["unseen"] if nb > 1 else ["b0"]
        ax.bar(range(nb), b.sum(0), tick_label=labels)
        ax.set_title("Rollouts per difficulty bin (total over the run; bin 0 = hardest)")
    elif tr:
        rt = np.asarray([r["rollouts_per_task"] for r in tr], np.float64)
        ax.bar(range(len(names)), rt.sum(0), tick_label=names)
        ax.set_title("Rollouts generated per task (all rounds, total over the run)")
    ax.set_ylabel("rollouts")
    save(fig, "rollouts.png")
    return paths


def summary_table(runs: list[dict], baseline: dict | None = None, metric: str = "mean_at_k") -> str:
    """Markdown table: one row per run, before/after per task, worst, average, Delta% vs baseline."""
    names = runs[0]["tasks"]
    head = ["run", "algo"] + [f"{n}" for n in names] + ["worst", "average"]
    if baseline is not None:
        head.append("Δ% vs baseline")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base_acc = final_accuracy(baseline, metric) if baseline is not None else None

    def fmt(b, a):
        if a is None:
            return "-"
        return f"{100 * a:.1f}" if b is None else f"{100 * b:.1f} → {100 * a:.1f}"

    for r in runs:
        before = final_accuracy(r, metric, "before") or {}
        after = final_accuracy(r, metric) or {}
        row = [r["dir"].name, str(r["summary"].get("algo", "?"))]
        row += [fmt(before.get(n), after.get(n)) for n in names]
        bw = min(before.values()) if before else None
        aw = min(after.values()) if after else None
        ba = float(np.mean(list(before.values()))) if before else None
        aa = float(np.mean(list(after.values()))) if after else None
        row += [fmt(bw, aw), fmt(ba, aa)]
        if baseline is not None:
            d = relative_change(after, base_acc) if after and base_acc else None
            row.append("-" if d is None else f"{d:+.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def mismatch_section(train: list[dict]) -> list[str]:
    """Markdown lines: the train/inference mismatch over the run (the generator's sampling
    log-probs against the trainer's recomputed ones; logged per step by the trainer)."""
    recs = [r for r in train if r.get("mismatch_mean_abs") is not None]
    if not recs:
        return []
    mean = np.asarray([r["mismatch_mean_abs"] for r in recs], np.float64)
    mx = np.asarray([r["mismatch_max_abs"] for r in recs], np.float64)
    out = np.asarray([r["mismatch_ratio_out"] for r in recs], np.float64)
    return ["## Train/inference mismatch", "",
            f"Sampling log-probs of the generator vs the trainer's recomputed log-probs, {len(recs)} steps.", "",
            "| figure | mean over steps | worst step |", "|---|---|---|",
            f"| mean abs(Δ log p) | {mean.mean():.3g} | {mean.max():.3g} |",
            f"| max abs(Δ log p) | {mx.mean():.3g} | {mx.max():.3g} |",
            f"| token share with ratio outside [0.5, 2] | {out.mean():.3g} | {out.max():.3g} |", ""]


def write_report(run_dir, baseline_dir=None) -> Path:
    run = load_run(run_dir)
    base = load_run(baseline_dir) if baseline_dir else None
    out = run["dir"] / "report"
    plots = make_plots(run, out)
    s = run["summary"]
    lines = [f"# Run report: {run['dir']}", "",
             f"algorithm **{s.get('algo', '?')}**, seed {s.get('seed', '?')}, {s.get('steps', '?')} RL steps, "
             f"RL wall time {s.get('rl_time_s', 0):.0f} s, mean step {s.get('mean_step_time_s') or 0:.3f} s", ""]
    for metric, title in (("mean_at_k", "sampled accuracy mean@k (%)"), ("greedy", "greedy accuracy (%)"),
                          ("pass_at_k", "pass@k (%)")):
        if final_accuracy(run, metric) is None or None in (final_accuracy(run, metric) or {}).values():
            continue
        lines += [f"## Test {title}, before → after RL", "", summary_table([run], base, metric), ""]
    if run["train"]:
        last = run["train"][-min(50, len(run["train"])):]
        zg = np.mean([r["zero_grad_rate"] for r in last], 0)
        lines += ["## Last 50 steps", "", "| task | zero-grad rate | weight | train acc |", "|---|---|---|---|"]
        for k, n in enumerate(run["tasks"]):
            w = np.mean([r.get("weights_after", r["weights"])[k] for r in last])
            a = np.mean([r["train_acc"][k] for r in last])
            lines.append(f"| {n} | {zg[k]:.2f} | {w:.3f} | {100 * a:.1f} |")
        lines.append("")
    lines += mismatch_section(run["train"])
    vs = s.get("verifier_stats")
    if vs:
        lines += [f"Verifier stats: {vs}", ""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return md

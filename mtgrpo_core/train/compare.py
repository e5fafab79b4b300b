"""``mtgrpo compare``: GRPO vs DAPO vs MT-GRPO (and Prompt-GDRO, Rollout-GDRO) on one suite,
N seeds, the same step budget, and a table like the MT-GRPO paper's (worst-task accuracy,
average, relative change vs DAPO, the worst-task difference to DAPO paired by seed, steps to
reach a worst-task threshold) for mean@k, then
the same per-task / worst / average columns for pass@k.

Per seed the supervised warm-up runs once (``DIR/warmup-s{seed}``) and every algorithm starts
RL from that checkpoint (``run.init_from``), so the algorithms differ only in RL.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..algorithms import COMPARE_ALGOS
from . import config as C
from .report import final_accuracy, load_run, relative_change
from .trainer import train


def steps_to_threshold(run: dict, thr: float) -> int | None:
    for e in run["evals"]:
        if e.get("worst_mean_at_k", -1) >= thr:
            return int(e["step"])
    return None


def run_compare(base_cfg: C.TrainConfig, out: str | Path, *, algos=COMPARE_ALGOS, seeds=(0, 1),
                threshold: float | None = None, console=None) -> str:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        wdir = out / f"warmup-s{seed}"
        if not (wdir / "checkpoint.pt").exists():
            wcfg = C.resolve(replace(base_cfg, run=replace(base_cfg.run, algo="grpo", seed=seed, out=str(wdir),
                                                              init_from=""), rl=replace(base_cfg.rl, steps=0)))
            if console is not None:
                console.print(f"[bold]compare[/]: warm-up for seed {seed} -> {wdir}")
            train(wcfg, console=console)
        for algo in algos:
            rdir = out / f"{algo}-s{seed}"
            if (rdir / "summary.json").exists() and json.loads((rdir / "summary.json").read_text()).get("after"):
                continue
            cfg = C.resolve(replace(base_cfg,
                                    run=replace(base_cfg.run, algo=algo, seed=seed, out=str(rdir),
                                                init_from=str(wdir / "checkpoint.pt")),
                                    loss=replace(base_cfg.loss, clip_eps_low=None, clip_eps_high=None,
                                                 loss_agg=None, filter_zero_adv=None, adv_clip=None)))
            if console is not None:
                console.print(f"[bold]compare[/]: {algo} seed {seed} -> {rdir}")
            train(cfg, console=console)
    return write_compare(out, algos, seeds, threshold)


def mean_std(v, sign: str = "") -> str:
    """Fractions -> ``"mean ± std"`` in percent points (population std, one decimal; ``"-"`` when
    empty, the value alone for one seed); ``sign="+"`` for differences. The docs' tables use it too."""
    v = [x for x in v if x is not None]
    if not v:
        return "-"
    return (f"{100 * np.mean(v):{sign}.1f} ± {100 * np.std(v):.1f}" if len(v) > 1
            else f"{100 * v[0]:{sign}.1f}")


def write_compare(out: Path, algos, seeds, threshold: float | None) -> str:
    rows, seeds_of, accs = {}, {}, {}
    for algo in algos:
        have = [s for s in seeds if (out / f"{algo}-s{s}" / "metrics.jsonl").exists()]
        rows[algo] = [load_run(out / f"{algo}-s{s}") for s in have]
        done = [(s, acc) for s, acc in zip(have, map(final_accuracy, rows[algo])) if acc]
        seeds_of[algo], accs[algo] = [s for s, _ in done], [acc for _, acc in done]
    if not any(rows.values()):
        raise FileNotFoundError(f"no runs of {list(algos)} for seeds {list(seeds)} in {out} "
                                f"(expected folders like {out / f'{algos[0]}-s{seeds[0]}'} with metrics.jsonl)")
    before = [final_accuracy(r, tag="before") for rs in rows.values() for r in rs if final_accuracy(r, tag="before")]
    if threshold is None:  # default: halfway between the warm-up's worst task and 1
        bw = np.mean([min(b.values()) for b in before]) if before else 0.0
        threshold = float(bw + 0.25 * (1 - bw))
    tasks = list(next(iter(a for lst in accs.values() for a in lst)).keys()) if any(accs.values()) else []
    # DAPO's result of the same seed (the same warm-up): the pairs behind the relative change and
    # the paired worst-task difference
    dapo_by_seed = dict(zip(seeds_of.get("dapo", []), accs.get("dapo", [])))

    ms = mean_std
    head = ["algorithm", *tasks, "worst-task", "average", "Δ% vs DAPO", "worst Δ vs DAPO (paired, pts)",
            f"steps to worst ≥ {100 * threshold:.0f}%"]
    lines = [f"Sampled test accuracy mean@k (%), mean ± std over seeds {list(seeds)}; same RL step budget.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if before:
        lines.append("| warm-up (before RL) | " + " | ".join(ms([b[t] for b in before]) for t in tasks)
                     + f" | {ms([min(b.values()) for b in before])} | {ms([np.mean(list(b.values())) for b in before])}"
                     + " | - | - | - |")
    result = {"threshold": threshold, "algos": {}}
    for algo in algos:
        a = accs.get(algo, [])
        if not a:
            continue
        worst = [min(x.values()) for x in a]
        avg = [float(np.mean(list(x.values()))) for x in a]
        pairs = ([(x, dapo_by_seed[s]) for s, x in zip(seeds_of[algo], a) if s in dapo_by_seed]
                 if algo != "dapo" else [])
        rel = [relative_change(x, d) for x, d in pairs]
        # paired worst-task difference: seed-to-seed spread of the warm-up cancels in it
        dworst = [min(x.values()) - min(d.values()) for x, d in pairs]
        st = [steps_to_threshold(r, threshold) for r in rows[algo]]
        st_txt = ", ".join("-" if s is None else str(s) for s in st)
        rel_txt = "0 (ref)" if algo == "dapo" else (f"{np.mean(rel):+.1f}" if rel and None not in rel else "-")
        dw_txt = "0 (ref)" if algo == "dapo" else ms(dworst, "+")
        lines.append(f"| {algo} | " + " | ".join(ms([x[t] for x in a]) for t in tasks)
                     + f" | {ms(worst)} | {ms(avg)} | {rel_txt} | {dw_txt} | {st_txt} |")
        result["algos"][algo] = {"seeds": seeds_of[algo], "per_task": a, "worst": worst, "average": avg,
                                 "rel_vs_dapo": rel, "worst_diff_vs_dapo": dworst, "steps_to_threshold": st}
    # pass@k: the GDRO papers' headline metric (a hard task can rise in pass@k before mean@k)
    pk = {a: [final_accuracy(r, metric="pass_at_k") for r in rs if final_accuracy(r, metric="pass_at_k")]
          for a, rs in rows.items()}
    if any(pk.values()):
        lines += ["", "pass@k (%), mean ± std over the same seeds.", "",
                  "| " + " | ".join(["algorithm", *tasks, "worst-task", "average"]) + " |",
                  "|" + "---|" * (len(tasks) + 3)]
        for algo in algos:
            a = [x for x in pk.get(algo, []) if all(x.get(t) is not None for t in tasks)]
            if not a:
                continue
            worst = [min(x[t] for t in tasks) for x in a]
            avg = [float(np.mean([x[t] for t in tasks])) for x in a]
            lines.append(f"| {algo} | " + " | ".join(ms([x[t] for x in a]) for t in tasks)
                         + f" | {ms(worst)} | {ms(avg)} |")
            if algo in result["algos"]:
                result["algos"][algo].update({"pass_per_task": a, "pass_worst": worst, "pass_average": avg})
    md = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(md)
    (out / "compare.json").write_text(json.dumps(result, indent=2, default=float))
    return md

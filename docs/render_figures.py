"""Render the figures that README.md and docs/ quote from the committed data (one source).

Every quoted benchmark or experiment number lives in ``docs/data/results.json`` (date, commit,
machine, command per row) or in the run files a row names (``summary.json``, ``compare.json``,
``bench/results/*.csv``). The Markdown files hold generated blocks between two markers::

    <!-- figures: NAME -->
    ... generated, do not edit ...
    <!-- /figures -->

``python docs/render_figures.py`` rewrites every block; ``--check`` only compares and exits 1
naming the blocks that differ (``tests/test_docs.py`` runs the check), so two places cannot
quote two different numbers.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "docs" / "data" / "results.json"
BLOCK = re.compile(r"(<!-- figures: ([a-z0-9-]+) -->\n)(.*?)(<!-- /figures -->)", re.S)


def load_data() -> dict:
    return json.loads(DATA.read_text())


def _ms(x: float) -> str:
    return f"{x / 1000:.2f} s" if x >= 1000 else f"{x:.3g} ms"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _mean_std(values) -> str:
    from mtgrpo_core.train.compare import mean_std

    return mean_std(values)


def bench_rows(row: dict) -> dict[str, dict]:
    """The CSV rows of one benchmark run: ``{provider: row}`` for the row's case, git sha and
    thread count (the last such row when a run was repeated at one commit)."""
    found: dict[str, dict] = {}
    with open(ROOT / row["file"], newline="") as f:
        for r in csv.DictReader(f):
            if r["case"] == row["case"] and r["git"] == row["git"] and r["threads"] == row["threads"]:
                found[r["provider"]] = r
    need = [row["fast"], *row["refs"]]
    missing = [p for p in need if p not in found]
    if missing:
        raise ValueError(f"{row['id']}: no rows for {missing} in {row['file']} "
                         f"(case {row['case']!r}, git {row['git']}, threads {row['threads']})")
    return found


def figure(row: dict) -> str:
    """The figure cell of one results row, read from the file the row names."""
    kind = row["kind"]
    if kind == "stated":
        v = row["values"]
        return (f"{_pct(v['worst_before'])} → **{_pct(v['worst_after'])}** "
                f"(spell_backward {_pct(v['spell_backward_before'])} before RL)")
    if kind == "summary":
        s = json.loads((ROOT / row["file"]).read_text())
        b, a = s["before"]["tasks"], s["after"]["tasks"]
        return (f"{_pct(b['countdown-4']['mean_at_k'])} → **{_pct(a['countdown-4']['mean_at_k'])}** "
                f"(spell_backward {_pct(b['spell_backward']['mean_at_k'])} before RL); {row['wall']}")
    if kind == "generation":
        v = row["values"]
        return (f"tokens/s {v['tf_tok_24']:,} vs {v['vllm_tok_24']:,} (24 x 8), {v['tf_tok_256']:,} vs "
                f"{v['vllm_tok_256']:,} (256 x 8); RL step {v['tf_step_24']} vs **{v['vllm_step_24']} s** (24 x 8); "
                f"vLLM engine start {v['engine_start_s']} s")
    if kind == "compare":
        algos = json.loads((ROOT / row["file"]).read_text())["algos"]
        return "; ".join(f"{label} {_mean_std(algos[name][row['metric']])}" for name, label in row["algos"].items())
    if kind == "bench":
        rs = bench_rows(row)
        fast = rs[row["fast"]]
        t_fast, mem_fast = float(fast["median_ms"]), float(fast["peak_mb"])
        first = next(iter(row["refs"]))
        times = ", ".join(f"{float(rs[p]['median_ms']) / t_fast:.1f}x vs {label}" for p, label in row["refs"].items())
        return (f"{_ms(t_fast)}, speedup {times}; peak memory {mem_fast:.3g} MB, "
                f"**{float(rs[first]['peak_mb']) / mem_fast:.1f}x lower** than {row['refs'][first]}")
    raise ValueError(f"{row['id']}: unknown kind {kind!r}")


def _link(path: str, from_file: Path) -> str:
    """A relative link from ``from_file``; inside docs/ a results file links to its experiments page."""
    pages = {e["file"]: f"docs/experiments/{e['page']}.md" for e in load_data()["experiments"]}
    if path in pages and (ROOT / "docs") in from_file.parents:
        path = pages[path]
    target = ROOT / path
    rel = Path(os.path.relpath(target, from_file.parent))
    return f"[{Path(path).stem}]({rel.as_posix()})"


def render_results(from_file: Path, *, commit: bool = True) -> str:
    data = load_data()
    head = ["result", "figure", "date", *(["commit"] if commit else []), "machine", "command", "source"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in data["rows"]:
        if not commit and not row.get("readme", True):   # the README's short table leaves such rows out
            continue
        machine = data["machines"][row["machine"]]["short"]
        cells = [row["what"], figure(row), row["date"], *([f"`{row['commit']}`"] if commit else []),
                 machine, f"`{row['command']}`", _link(row["link"], from_file)]
        lines.append("| " + " | ".join(cells) + " |")
    if commit:   # the long form carries the machines' descriptions
        lines += ["", "Machines: " + "; ".join(f"*{m['short']}*: {m['long']}" for m in data["machines"].values()) + "."]
    return "\n".join(lines) + "\n"


def render_demo_sample(from_file: Path, *, short: bool = False) -> str:
    """The tables ``make demo`` prints, from the committed run's summary.json (rich's layout);
    ``short``: the after-RL table and the closing lines only."""
    from rich.console import Console
    from rich.table import Table

    row = next(r for r in load_data()["rows"] if r["id"] == "demo-dev")
    s = json.loads((ROOT / row["file"]).read_text())
    buf = io.StringIO()
    con = Console(file=buf, width=72, color_system=None, legacy_windows=False)
    con.print("mtgrpo train algo=mtgrpo suite=cpu-3task out=runs/default")
    con.print("[... warm-up: 1,600 supervised steps; the before-RL table ...]" if short
              else "[... warm-up progress bar: 1,600 supervised steps ...]")
    for tag, title in ((("after", "after RL"),) if short else (("before", "before RL"), ("after", "after RL"))):
        if tag == "after":
            con.print(f"[... RL progress: steps 1-{s['steps']}, batch accuracy, task weights z ...]")
        ev = s[tag]
        t = Table(title=f"{title} ({ev['split']}, step {ev['step']}, {ev['eval_time_s']:.1f} s)")
        for col, just in (("task", "left"), ("items", "right"), ("greedy %", "right"),
                          (f"mean@{ev['k']} %", "right"), (f"pass@{ev['k']} %", "right")):
            t.add_column(col, justify=just)
        for name, v in ev["tasks"].items():
            t.add_row(name, str(v["n_items"]), _pct(v["greedy"]), _pct(v["mean_at_k"]), _pct(v["pass_at_k"]))
        con.print(t)
    b, a = s["before"], s["after"]
    con.print("report: runs/default/report/report.md")
    con.print(f"worst-task mean@k: {_pct(b['worst_mean_at_k'])}% -> {_pct(a['worst_mean_at_k'])}%  "
              f"average: {_pct(b['avg_mean_at_k'])}% -> {_pct(a['avg_mean_at_k'])}%")
    text = "\n".join(line.rstrip() for line in buf.getvalue().splitlines())
    return f"```text\n{text}\n```\n"


def _demo_runs() -> tuple[dict, dict]:
    """(this machine's figures, the committed run's summary.json) of the two demo rows."""
    rows = {r["id"]: r for r in load_data()["rows"]}
    return rows["demo-proj"]["values"], json.loads((ROOT / rows["demo-dev"]["file"]).read_text())


def render_repro(from_file: Path) -> str:
    v, s = _demo_runs()
    b, a = s["before"]["tasks"], s["after"]["tasks"]
    return (f"Across CPU models they differ: this project's machine printed countdown-4 {_pct(v['worst_before'])}% -> "
            f"{_pct(v['worst_after'])}% (spell_backward {_pct(v['spell_backward_before'])}% before RL), the committed "
            f"run from another machine, same code, {_pct(b['countdown-4']['mean_at_k'])}% -> "
            f"{_pct(a['countdown-4']['mean_at_k'])}% ({_pct(b['spell_backward']['mean_at_k'])}%).\n")


def render_demo_reading(from_file: Path) -> str:
    _, s = _demo_runs()
    b, a = s["before"]["tasks"], s["after"]["tasks"]
    cd4, cd, sb = "countdown-4", "countdown", "spell_backward"
    return (f"- **{cd4}** is the worst task before RL; MT-GRPO exists to lift the worst task. Its mean@4 goes "
            f"from {_pct(b[cd4]['mean_at_k'])}% to {_pct(a[cd4]['mean_at_k'])}%, its greedy accuracy from "
            f"{_pct(b[cd4]['greedy'])}% to {_pct(a[cd4]['greedy'])}%.\n"
            f"- **{sb}** is learnt in the warm-up (mean@4 {_pct(b[sb]['mean_at_k'])}% before RL, "
            f"{_pct(a[sb]['mean_at_k'])}% after).\n"
            f"- **{cd}**: mean@4 goes from {_pct(b[cd]['mean_at_k'])}% to {_pct(a[cd]['mean_at_k'])}% while pass@4 "
            f"goes from {_pct(b[cd]['pass_at_k'])}% to {_pct(a[cd]['pass_at_k'])}%: the 4 samples of an item agree "
            "more often after RL, so fewer items have at least one correct sample.\n"
            "- The last line gives the worst-task and average mean@4 before -> after.\n")


def render_bench_cpu(from_file: Path) -> str:
    """One table per benchmark run of ``bench_tables``: every (case, provider) row of the CSV at
    that commit and thread count (the last one where the run was repeated)."""
    out = []
    machines = load_data()["machines"]
    for tb in load_data()["bench_tables"]:
        rows: dict[tuple[str, str], dict] = {}
        with open(ROOT / tb["file"], newline="") as f:
            for r in csv.DictReader(f):
                if r["git"] == tb["git"] and r["threads"] == tb["threads"]:
                    rows[(r["case"], r["provider"])] = r
        if not rows:
            raise ValueError(f"{tb['file']}: no rows at git {tb['git']} with {tb['threads']} thread(s)")
        machine = machines[tb["machine"]]["long"]
        out += [f"**{tb['title']}** ({tb['date']}, commit `{tb['commit']}`, {machine}, {tb['threads']} "
                f"thread(s); `{tb['command']}`, rows of `{tb['file']}`)", "",
                "| case | provider | median ms | p20 - p80 ms | GB/s | peak MB above inputs | vs reference |",
                "|---|---|---|---|---|---|---|"]
        for (case, prov), r in rows.items():
            sp = r["speedup_vs_torch_ref"]
            out.append(f"| {case} | {prov} | {float(r['median_ms']):.4g} | {float(r['p20_ms']):.4g} - "
                       f"{float(r['p80_ms']):.4g} | {r['gbps'] or '-'} | {r['peak_mb'] or '-'} | "
                       f"{f'{float(sp):.3g}x' if sp else '-'} |")
        out.append("")
    return "\n".join(out)


def render_experiments(from_file: Path) -> str:
    lines = ["| results file | status | what it holds |", "|---|---|---|"]
    for e in load_data()["experiments"]:
        lines.append(f"| [{Path(e['file']).name}]({e['page']}.md) | **{e['status']}** | {e['note']} |")
    return "\n".join(lines) + "\n"


def render_experiment_status(from_file: Path) -> str:
    """The status box of one experiments page (the page named like ``from_file``)."""
    e = next(e for e in load_data()["experiments"] if e["page"] == from_file.stem)
    kind = "note" if e["status"] == "current" else "warning"
    return (f":::{{{kind}}}\n**{e['status'].capitalize()}.** {e['note']}. The file is `{e['file']}`; it is "
            "included below as committed.\n:::\n")


def render_grid(from_file: Path) -> str:
    """The Triton GRPO loss grid at the long-sequence shape, from the launcher's own plan."""
    import importlib

    g = importlib.import_module("mtgrpo_core.ops.grpo_loss")

    n, t = 64, 32768
    _, _, nchunk, _ = g._grid_plan(n, t)
    return (f"The Triton grid is rows x token chunks, sized to reach about {g._TARGET_PROGRAMS} programs "
            f"(4 per SM on 132 SMs) when the tokens allow it: at {n} x {t} it is {nchunk} chunks per row, "
            f"{n * nchunk} programs.\n")


RENDERERS = {
    "results": render_results,
    "results-short": lambda f: render_results(f, commit=False),
    "demo-sample": render_demo_sample,
    "demo-sample-short": lambda f: render_demo_sample(f, short=True),
    "bench-cpu": render_bench_cpu,
    "repro": render_repro,
    "demo-reading": render_demo_reading,
    "experiments": render_experiments,
    "experiment-status": render_experiment_status,
    "grpo-grid": render_grid,
}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def render_file(path: Path) -> tuple[str, list[str]]:
    """(new text, names of the blocks that changed) for one Markdown file."""
    text = path.read_text()
    changed: list[str] = []

    def sub(m: re.Match) -> str:
        name = m.group(2)
        if name not in RENDERERS:
            raise ValueError(f"{path.relative_to(ROOT)}: unknown figures block {name!r} (known: {sorted(RENDERERS)})")
        new = RENDERERS[name](path)
        if new != m.group(3):
            changed.append(name)
        return m.group(1) + new + m.group(4)

    return BLOCK.sub(sub, text), changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 if a block differs from the data")
    args = p.parse_args(argv)
    stale = []
    for path in doc_files():
        new, changed = render_file(path)
        if changed:
            stale += [f"{path.relative_to(ROOT)}: {name}" for name in changed]
            if not args.check:
                path.write_text(new)
    if stale:
        print(("stale figures blocks (run python docs/render_figures.py):\n  " if args.check else "rewrote:\n  ")
              + "\n  ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())

"""Render one Markdown table per op from ``bench/results/<op>.csv``: the latest row of every
(case, provider, device, threads), with the commit, date and machine it came from.

    python bench/results_table.py            # writes bench/results/<op>.md for every CSV

Rows written before the CSVs had date and machine columns show "not recorded" there.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS, _upgrade_csv  # noqa: E402


def latest_rows(path: Path) -> list[dict]:
    _upgrade_csv(path)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    last: dict[tuple, dict] = {}
    for r in rows:  # appended in time order: a later row replaces an earlier one
        last[(r["case"], r["provider"], r["device"], r["threads"])] = r
    return list(last.values())


def render(op: str, rows: list[dict]) -> str:
    out = [f"# Benchmark results: {op}", "",
           f"Latest row per case, provider, device and thread count in `bench/results/{op}.csv` "
           "(rendered by `python bench/results_table.py`). Times are medians; compare rows only "
           "within one run (same date): the machine was shared and its load varied.", "",
           "| case | provider | device | threads | median ms | GB/s | x torch_ref | of copy | commit | date (UTC) "
           "| machine |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["date"], r["case"], r["provider"])):
        extra = json.loads(r["extra"]) if r["extra"] else {}
        of_copy = f"{100 * extra['of_copy']:.0f}%" if "of_copy" in extra else ""
        out.append(f"| {r['case']} | {r['provider']} | {r['device']} | {r['threads']} | {r['median_ms']} | "
                   f"{r['gbps']} | {r['speedup_vs_torch_ref']} | {of_copy} | {r['git']} | "
                   f"{r['date'] or 'not recorded'} | {r['machine'] or 'not recorded'} |")
    return "\n".join(out) + "\n"


def main() -> None:
    for path in sorted(RESULTS.glob("*.csv")):
        op = path.stem
        (RESULTS / f"{op}.md").write_text(render(op, latest_rows(path)))
        print(f"wrote {RESULTS / f'{op}.md'}")


if __name__ == "__main__":
    main()

"""Compare the metrics.jsonl files of two run.sh trees, ignoring wall-time fields only.

Usage: ``python compare.py BEFORE AFTER``; exit status 0 and "ALL IDENTICAL" when every run's
records are equal after dropping the time fields.
"""
import json
import sys
from pathlib import Path

TIME_KEYS = {"time_s", "gen_time_s", "rl_time_s", "eval_time_s", "encode_time_s", "tokens_per_s"}


def strip(x):
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if k not in TIME_KEYS}
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x


def load(p: Path) -> list:
    return [strip(json.loads(line)) for line in p.read_text().splitlines() if line.strip()]


def main(a: str, b: str) -> int:
    da, db = Path(a), Path(b)
    names = sorted({p.name for p in da.iterdir() if p.is_dir()} | {p.name for p in db.iterdir() if p.is_dir()})
    bad = 0
    for n in names:
        pa, pb = da / n / "metrics.jsonl", db / n / "metrics.jsonl"
        if not pa.exists() or not pb.exists():
            print(f"{n}: missing in {'the first' if not pa.exists() else 'the second'} tree")
            bad += 1
            continue
        ra, rb = load(pa), load(pb)
        if ra == rb:
            print(f"{n}: identical ({len(ra)} records)")
            continue
        bad += 1
        print(f"{n}: DIFFERENT ({len(ra)} vs {len(rb)} records)")
        for i, (x, y) in enumerate(zip(ra, rb)):
            if x != y:
                keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
                print(f"  first difference at record {i} ({x.get('kind')}): keys {keys[:10]}")
                break
    print("ALL IDENTICAL" if not bad else f"{bad} run(s) differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))

"""The ``mtgrpo`` command line: info, bench, demo (and train / eval / report / compare
when the training layer is installed)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# Benchmark groups -> scripts in the repository's bench/ folder.
BENCH_GROUPS = {
    "ops": ["bench_grpo_loss.py", "bench_task_accumulate.py", "bench_linear_logprobs.py"],
    "sampler": ["bench_sampler.py"],
    "controllers": ["bench_controllers.py"],
}


def _bench_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "bench"
    if not here.is_dir():
        raise SystemExit(
            "mtgrpo bench: the bench/ folder was not found next to the package; run it from a "
            "source checkout installed with `make build` (pip install -e .)."
        )
    return here


def cmd_info(args: argparse.Namespace) -> int:
    from . import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    bench = _bench_dir()
    groups = list(BENCH_GROUPS) if args.what == "all" else [args.what]
    rc = 0
    for g in groups:
        for script in BENCH_GROUPS[g]:
            path = bench / script
            if not path.exists():
                print(f"# {script}: not present in this checkout, skipped", file=sys.stderr)
                continue
            print(f"# {script}", flush=True)
            env = dict(os.environ)
            if args.quick:
                env["MTGRPO_BENCH_QUICK"] = "1"
            rc |= subprocess.call([sys.executable, str(path)], env=env)
    return rc


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mtgrpo", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("info", help="build_info(), devices, versions")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_info)
    s = sub.add_parser("bench", help="microbenchmarks, one JSON line per case")
    s.add_argument("what", nargs="?", default="all", choices=["all", *BENCH_GROUPS])
    s.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    s.set_defaults(fn=cmd_bench)
    s = sub.add_parser("demo", help="the main job")
    s.set_defaults(fn=cmd_demo)
    args = p.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

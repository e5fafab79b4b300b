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
    # the demo is `mtgrpo train` with the embedded default config (mtgrpo_core/demo.py
    # documents it); calling main here keeps cli -> demo free of an import cycle
    return main(["train"])


def _console():
    from rich.console import Console

    return Console()


def cmd_train(args: argparse.Namespace) -> int:
    # torch + transformers + reasoning-gym take seconds to import (tens of seconds on a busy
    # machine): say so at once, before paying for them
    print(f"mtgrpo train: starting ({'resuming ' + str(args.out) if args.resume else 'loading torch, transformers'}"
          " and the task suite)...", file=sys.stderr, flush=True)
    from .train.config import ConfigError, load_config
    from .train.trainer import train

    try:
        if args.resume:
            run_dir = Path(args.out or "runs/default")
            saved = run_dir / "config.toml"
            if not saved.exists():
                raise ConfigError(f"--resume: {saved} not found (train into --out DIR first)")
            cfg = load_config(saved, args.overrides, algo=args.algo, out=str(run_dir))
        else:
            cfg = load_config(args.config, args.overrides, algo=args.algo, out=args.out)
    except ConfigError as e:
        print(f"mtgrpo train: config error: {e}", file=sys.stderr)
        return 2
    con = _console()
    con.print(f"[bold]mtgrpo train[/] algo={cfg.run.algo} suite={cfg.tasks.suite} out={cfg.run.out}"
              f"{' (resume)' if args.resume else ''}")
    summary = train(cfg, resume=args.resume, console=con)
    if not args.no_report:
        from .train.report import write_report

        md = write_report(cfg.run.out)
        con.print(f"report: {md}")
    b, a = summary.get("before"), summary.get("after")
    if b and a:
        con.print(f"worst-task mean@k: {100 * b['worst_mean_at_k']:.1f}% -> {100 * a['worst_mean_at_k']:.1f}%  "
                  f"average: {100 * b['avg_mean_at_k']:.1f}% -> {100 * a['avg_mean_at_k']:.1f}%")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train.config import load_config
    from .train.trainer import Trainer

    run_dir = Path(args.run)
    ck = run_dir / "checkpoint.pt"
    if not ck.exists():
        print(f"mtgrpo eval: no checkpoint at {ck}", file=sys.stderr)
        return 2
    overrides = list(args.overrides) + ([f"eval.n_items={args.n_items}"] if args.n_items else [])
    cfg = load_config(run_dir / "config.toml", overrides, out=str(run_dir))
    con = _console()
    tr = Trainer(cfg, console=con)
    st = tr.load_checkpoint(ck, full=False)
    tr.step = int(st["step"])
    ev = tr.evaluate(args.split, tag="cli")
    tr._print_eval(ev, f"{run_dir} ({st['phase']})")
    (run_dir / f"eval-{args.split}.json").write_text(json.dumps(ev, indent=2))
    tr.suite.close()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .train.report import write_report

    for d in (args.run, args.baseline):
        if d is not None and not (Path(d) / "metrics.jsonl").exists():
            print(f"mtgrpo report: no run at {d} (no metrics.jsonl there)", file=sys.stderr)
            return 2
    md = write_report(args.run, args.baseline)
    print(md.read_text())
    print(f"# written: {md} and plots in {md.parent}")
    return 0


def _seed_list(text: str) -> list[int]:
    """``--seeds``: ``N`` (seeds 0 .. N-1) or a comma list (``0,2``)."""
    try:
        seeds = list(range(int(text))) if "," not in text else [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or a comma list of seeds, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected N >= 1 or seeds >= 0, got {text!r}")
    return seeds


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .train.compare import run_compare, write_compare
    from .train.config import ConfigError, load_config

    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    if not algos:
        print("mtgrpo compare: --algos names no algorithm", file=sys.stderr)
        return 2
    if args.table:  # only the table over runs already in --out (e.g. seeds run side by side)
        try:
            print(write_compare(Path(args.out), algos, args.seeds, args.threshold))
        except FileNotFoundError as e:
            print(f"mtgrpo compare --table: --out: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        # the same step budget for every algorithm: no wall-clock cap unless asked for
        budget = [f"rl.steps={args.steps}", "rl.max_time_s=0", f"eval.every={args.eval_every}"]
        cfg = load_config(args.config, [*budget, *args.overrides], out=args.out)
    except ConfigError as e:
        print(f"mtgrpo compare: config error: {e}", file=sys.stderr)
        return 2
    md = run_compare(cfg, args.out, algos=algos, seeds=args.seeds, threshold=args.threshold,
                     console=_console())
    print(md)
    return 0


# ---- gpu-check (issue 11 item 9): one self-contained block ----------------------------------
def _add_gpu_check(sub) -> None:
    def cmd_gpu_check(args: argparse.Namespace) -> int:
        from .gpu_check import main as gpu_check_main

        return gpu_check_main(out=args.out, budget_s=args.budget_s)

    s = sub.add_parser("gpu-check", help="on an NVIDIA GPU: requires_cuda tests + GPU benchmarks -> one "
                                          "markdown table (bench/results/GPU-CHECK.md); exits 2 without a GPU")
    s.add_argument("--out", help="markdown file to write (default: bench/results/GPU-CHECK.md)")
    s.add_argument("--budget-s", type=float, default=480.0, help="time budget in seconds (default 480 = 8 min)")
    s.set_defaults(fn=cmd_gpu_check)


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
    from .algorithms import COMPARE_ALGOS, algorithm_names

    algos = list(algorithm_names(aliases=True))
    s = sub.add_parser("train", help="train a policy (no arguments: the embedded CPU default)")
    s.add_argument("--config", help="TOML config file (default: the embedded default.toml)")
    s.add_argument("--algo", choices=algos)
    s.add_argument("--out", help="run folder (metrics.jsonl, checkpoint.pt, report/)")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    s.add_argument("--no-report", action="store_true", help="skip the plots and report.md at the end")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. rl.steps=100 mtgrpo.lam=0.2")
    s.set_defaults(fn=cmd_train)
    s = sub.add_parser("eval", help="evaluate a run's checkpoint on a split")
    s.add_argument("--run", required=True)
    s.add_argument("--split", default="test", choices=["test", "train"])
    s.add_argument("--n-items", type=int, default=0, help="items per task (default: the run's eval.n_items)")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(fn=cmd_eval)
    s = sub.add_parser("report", help="plots (PNG) + summary table from a run's metrics")
    s.add_argument("--run", required=True)
    s.add_argument("--baseline", help="a baseline run folder for the relative change")
    s.set_defaults(fn=cmd_report)
    s = sub.add_parser("compare", help="GRPO vs DAPO vs MT-GRPO vs the GDRO methods, N seeds, same step budget")
    s.add_argument("--config", help="TOML config (default: the embedded default)")
    s.add_argument("--out", default="runs/compare")
    s.add_argument("--algos", default=",".join(COMPARE_ALGOS), help="comma list (default: %(default)s)")
    s.add_argument("--seeds", type=_seed_list, default=[0, 1],
                   help="N (seeds 0..N-1) or a comma list; one seed per process runs seeds side by side")
    s.add_argument("--table", action="store_true", help="only write the table over the runs already in --out")
    s.add_argument("--steps", type=int, default=400, help="RL steps per run (the shared budget)")
    s.add_argument("--eval-every", type=int, default=50, help="evaluation interval (for steps-to-threshold)")
    s.add_argument("--threshold", type=float, default=None, help="worst-task accuracy to reach (0-1)")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(fn=cmd_compare)
    _add_gpu_check(sub)
    args = p.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The mtgrpo command line: check the build (info), run the demo, train, evaluate, report and
compare algorithms, and benchmark the kernels. 'mtgrpo COMMAND --help' says what each command
does and prints; train / eval / report / compare need the [train] extra."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# Benchmark groups -> scripts in the repository's bench/ folder.
BENCH_GROUPS = {
    "ops": ["bench_grpo_loss.py", "bench_task_accumulate.py", "bench_linear_logprobs.py", "bench_small_calls.py"],
    # the C++ loss's per-token cost model: instruction mix -> port-bound cycles vs measured (x86-64, g++, objdump)
    "cost-model": ["cost_model.py"],
    "sampler": ["bench_sampler.py"],
    "controllers": ["bench_controllers.py"],
    # transformers vs vLLM generation; needs vLLM (.venv-vllm), so `all` leaves it out
    "generation": ["bench_generation.py"],
}
NOT_IN_ALL = ("generation",)


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
    groups = [g for g in BENCH_GROUPS if g not in NOT_IN_ALL] if args.what == "all" else [args.what]
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
                                          "markdown table (bench/results/GPU-CHECK.md); exits 2 without a GPU",
                       description="On a machine with an NVIDIA GPU: run every requires_cuda test, then the GPU "
                                   "benchmarks (GRPO loss against the eager and compiled references, linear "
                                   "log-probs against the naive path, per-task sums against index_add), and write "
                                   "one markdown table to bench/results/GPU-CHECK.md: median time, achieved GB/s "
                                   "or TFLOP/s and the share of the device's peak per row. Prints the table and "
                                   "the test summary. Without a GPU it measures nothing, says why and exits 2.")
    s.add_argument("--out", help="markdown file to write (default: bench/results/GPU-CHECK.md)")
    s.add_argument("--budget-s", type=float, default=480.0, help="time budget in seconds (default 480 = 8 min)")
    s.set_defaults(fn=cmd_gpu_check)


_DESCRIPTIONS = {
    "info": "Print what was built and what this machine offers: the version, whether the C++ extension "
            "imports, whether nvcc compiled the CUDA kernels (and for which architectures), OpenMP and its "
            "thread count, triton, the torch, Python and platform versions. One 'key  value' line each "
            "(--json: one JSON object). Use it as the check after installing.",
    "bench": "Run the microbenchmarks in the checkout's bench/ folder (ops: GRPO loss, per-task sums, "
             "linear log-probs, small calls; sampler; controllers; 'cost-model': the C++ loss's instruction mix "
             "per 16 tokens and the cycles it implies against measured cycles and a copy, printed, no CSV; "
             "'generation': transformers vs vLLM, from the vLLM environment, docs/vllm.md, not part of "
             "'all'). Prints one JSON line per (case, provider) with "
             "median / p20 / p80 time, GB/s, peak memory and the speedup against the pure-PyTorch "
             "reference measured in the same run, and appends a row to bench/results/<op>.csv. Only the "
             "ratios within one run are comparable across machines.",
    "demo": "The embedded CPU default run (the same as 'mtgrpo train' with no arguments; 'make demo' "
            "calls it). No download: it builds a 537k-parameter Llama with a character tokenizer, "
            "warm-starts it with 1,600 supervised steps on the cpu-3task suite (spell_backward, countdown "
            "with 3 and with 4 numbers), prints a per-task test table (300 items per task: greedy, mean@4 "
            "and pass@4 in %), runs 140 MT-GRPO steps (a progress line with the batch accuracy and "
            "task weights z; an evaluation every 20 steps), prints the table again and the worst-task "
            "and average mean@4 before -> after. Writes runs/default/ (metrics.jsonl, checkpoint.pt, "
            "config.toml, summary.json, report/report.md and PNG plots). About 7 minutes on 2 quiet "
            "cores; the figures are the same for any thread count on one machine and differ slightly "
            "between CPU models.",
    "train": "Train a policy and evaluate it before and after RL. With no arguments: the embedded CPU "
             "default (see 'mtgrpo demo --help'). --algo picks a bundle (grpo, dapo, mtgrpo, sec, "
             "prompt-gdro, rollout-gdro, ...), --config a TOML file, and key=value arguments override "
             "single settings (unknown keys are rejected with a did-you-mean). Prints the before/after "
             "test tables (greedy, mean@k, pass@k per task), a progress line per RL step and the "
             "worst-task / average mean@k change; writes --out (default runs/default): metrics.jsonl "
             "(one JSON line per step and evaluation), checkpoint.pt, config.toml, summary.json and "
             "report/. --resume continues a run exactly from its last checkpoint.",
    "eval": "Evaluate a run's checkpoint on its test (or train) split: prints the per-task table "
            "(greedy, mean@k, pass@k) and writes RUN/eval-<split>.json.",
    "report": "Write RUN/report/report.md and its PNG plots (accuracy, task weights, zero-grad rate, "
              "batch shares, rollouts) from RUN/metrics.jsonl and print the markdown: per-task mean@k, "
              "greedy and pass@k before -> after RL, and the last 50 steps' zero-grad rate, weight and "
              "train accuracy per task. --baseline adds a second run for comparison.",
    "compare": "Run several algorithms from one shared supervised warm-up per seed with the same RL step "
               "budget, then print and write a paper-style table (OUT/compare.md, compare.json): per-task "
               "mean@k and pass@k, worst task and average as mean +- std over seeds, the change against "
               "DAPO, and the steps to reach --threshold. --seeds 1, runs one seed (seeds can run side by "
               "side in several processes); --table only joins the runs already in --out.",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``mtgrpo`` argument parser (the docs' CLI reference is generated from it)."""
    p = argparse.ArgumentParser(prog="mtgrpo", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name: str, help: str):
        return sub.add_parser(name, help=help, description=_DESCRIPTIONS[name])

    s = add("info", "what was built (C++ extension, CUDA kernels, OpenMP, triton) and versions")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of 'key  value' lines")
    s.set_defaults(fn=cmd_info)
    s = add("bench", "microbenchmarks: one JSON line per case, a CSV row in bench/results/")
    s.add_argument("what", nargs="?", default="all", choices=["all", *BENCH_GROUPS],
                   help="which group to run (default: all)")
    s.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    s.set_defaults(fn=cmd_bench)
    s = add("demo", "the embedded CPU default run (~7 min on 2 cores): before/after accuracy tables, "
                    "runs/default/report/")
    s.set_defaults(fn=cmd_demo)
    from .algorithms import COMPARE_ALGOS, algorithm_names

    algos = list(algorithm_names(aliases=True))
    s = add("train", "train a policy (no arguments: the embedded CPU default)")
    s.add_argument("--config", help="TOML config file (default: the embedded default.toml)")
    s.add_argument("--algo", choices=algos, help="algorithm bundle (default: the config's run.algo, mtgrpo)")
    s.add_argument("--out", help="run folder (metrics.jsonl, checkpoint.pt, report/)")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    s.add_argument("--no-report", action="store_true", help="skip the plots and report.md at the end")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. rl.steps=100 mtgrpo.lam=0.2")
    s.set_defaults(fn=cmd_train)
    s = add("eval", "evaluate a run's checkpoint on a split (per-task table, eval-<split>.json)")
    s.add_argument("--run", required=True, help="run folder holding checkpoint.pt and config.toml")
    s.add_argument("--split", default="test", choices=["test", "train"], help="split to evaluate (default: test)")
    s.add_argument("--n-items", type=int, default=0, help="items per task (default: the run's eval.n_items)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.k=8")
    s.set_defaults(fn=cmd_eval)
    s = add("report", "plots (PNG) + summary table from a run's metrics")
    s.add_argument("--run", required=True, help="run folder holding metrics.jsonl")
    s.add_argument("--baseline", help="a baseline run folder for the relative change")
    s.set_defaults(fn=cmd_report)
    s = add("compare", "GRPO vs DAPO vs MT-GRPO vs the GDRO methods, N seeds, same step budget")
    s.add_argument("--config", help="TOML config (default: the embedded default)")
    s.add_argument("--out", default="runs/compare", help="folder of the runs and the table (default: %(default)s)")
    s.add_argument("--algos", default=",".join(COMPARE_ALGOS), help="comma list (default: %(default)s)")
    s.add_argument("--seeds", type=_seed_list, default=[0, 1],
                   help="N (seeds 0..N-1) or a comma list; one seed per process runs seeds side by side")
    s.add_argument("--table", action="store_true", help="only write the table over the runs already in --out")
    s.add_argument("--steps", type=int, default=400, help="RL steps per run (the shared budget)")
    s.add_argument("--eval-every", type=int, default=50, help="evaluation interval (for steps-to-threshold)")
    s.add_argument("--threshold", type=float, default=None, help="worst-task accuracy to reach (0-1)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    s.set_defaults(fn=cmd_compare)
    _add_gpu_check(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

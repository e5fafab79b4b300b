"""Benchmark of the ratio-preserving sampler: time per step, C++ core vs pure-Python reference.

A step = start_step + every (next_round, report) pair + finish, through the public
``mtgrpo_core.sampling.RatioPreservingSampler`` (so the Python wrapper's overhead is
included); simulated generation (the accept mask) is computed outside the timed calls.
Cases: B in {256, 1024, 8192} x K in {3, 9, 64}, 10^6 prompts per task, per-task
acceptance rates spread evenly over 0.1..0.9, weights a fixed Dirichlet(5) draw,
oversample 3, max_rounds 10. Both samplers first warm up on the C++ core (rho learns the
rates) and then time the *same* steps: the reference is loaded from the C++ state_dict, so
it draws exactly the same prompts. The reference runs fewer steps (it is slow; the step
counts are in each row's ``extra``). Provider ``torch_ref`` is the pure-Python reference
``mtgrpo_core.reference.sampler.RatioPreservingSamplerRef`` (the harness's name for the oracle).

Then the hard scenario of issue 13 (:func:`hard_scenario`): one task accepts 3% of its
prompts and has weight 0.35, the other two accept 30% (weights 0.325), acceptance cap 2,
2 rounds, B = 256, 200 steps; it prints the shortfall rate (share of steps with a short
batch), the mean batch size and the ratio error (mean over steps of max_k |share_k - z_k|)
of both refill rules: "fill-then-deficit" (the released code, the default) and "deficit"
(the paper's Algorithm 2).

Run: ``mtgrpo bench sampler`` (or ``python bench/bench_sampler.py``); MTGRPO_BENCH_QUICK=1
shrinks it to one small case.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Row, emit, quick  # noqa: E402

from mtgrpo_core.sampling import RatioPreservingSampler  # noqa: E402


def _accept(rates: np.ndarray, step: int, task_ids: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """Deterministic simulated zero-advantage filter (a hash of step, task, prompt)."""
    x = (prompts.astype(np.uint64) << np.uint64(8)) ^ task_ids.astype(np.uint64) ^ np.uint64(step * 0x9E3779B1)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return ((x >> np.uint64(11)).astype(np.float64) / float(2**53)) < rates[task_ids]


def run_steps(s: RatioPreservingSampler, z: np.ndarray, rates: np.ndarray, first: int, n: int):
    """Run n steps; return (per-step wall ms, per-step thread-CPU ms, rounds per step).

    Thread CPU time is reported next to wall time because on a shared machine the wall
    time also counts the time other processes held the core.
    """
    times, cpu, rounds = [], [], []
    clocks = (time.perf_counter, time.thread_time)
    for step in range(first, first + n):
        t, c = 0.0, 0.0
        t0, c0 = (f() for f in clocks)
        s.start_step(z)
        d = s.next_round()
        t, c = t + time.perf_counter() - t0, c + time.thread_time() - c0
        while d is not None:
            acc = _accept(rates, step, d.task_ids, d.prompt_indices)  # "generation": not timed
            t0, c0 = (f() for f in clocks)
            s.report(d.task_ids, d.prompt_indices, acc)
            d = s.next_round()
            t, c = t + time.perf_counter() - t0, c + time.thread_time() - c0
        t0, c0 = (f() for f in clocks)
        b = s.finish()
        t, c = t + time.perf_counter() - t0, c + time.thread_time() - c0
        times.append(t * 1e3)
        cpu.append(c * 1e3)
        rounds.append(b.rounds)
    return times, cpu, rounds


def stats(ms: list[float]) -> tuple[float, float, float]:
    ms = sorted(ms)
    q = statistics.quantiles(ms, n=5) if len(ms) >= 5 else [ms[0], ms[0], ms[-1], ms[-1]]
    return statistics.median(ms), q[0], q[3]


HARD_Z = np.array([0.35, 0.325, 0.325])
HARD_RATES = np.array([0.03, 0.3, 0.3])


def hard_scenario(refill: str, *, steps: int = 200, B: int = 256, seed: int = 11, backend: str = "auto") -> dict:
    """Issue 13's hard case under ``refill``: shortfall rate, mean batch size, ratio error.

    The accept mask is the deterministic hash :func:`_accept` at the rates ``HARD_RATES``;
    the first 10 steps (rho learning the rates) are not counted.
    """
    warm = 10
    s = RatioPreservingSampler([10**6] * 3, B, oversample=3.0, max_rounds=2, acceptance_cap=2.0, seed=seed,
                               refill=refill, backend=backend)
    short, sizes, err = [], [], []
    for step in range(warm + steps):
        s.start_step(HARD_Z)
        while (d := s.next_round()) is not None:
            s.report(d.task_ids, d.prompt_indices, _accept(HARD_RATES, step, d.task_ids, d.prompt_indices))
        b = s.finish()
        if step < warm:
            continue
        short.append(b.shortfall > 0)
        sizes.append(len(b))
        share = b.realized / max(len(b), 1)
        err.append(float(np.max(np.abs(share - HARD_Z))))
    return {"refill": refill, "shortfall_rate": float(np.mean(short)), "mean_batch": float(np.mean(sizes)),
            "ratio_error": float(np.mean(err))}


def print_hard_scenario(steps: int = 200) -> None:
    print(f"\nhard scenario: acceptance {HARD_RATES.tolist()}, weights {HARD_Z.tolist()}, cap 2, 2 rounds, "
          f"B=256, {steps} steps")
    print(f"{'refill':>18} {'shortfall rate':>15} {'mean batch':>11} {'ratio error':>12}")
    for refill in ("fill-then-deficit", "deficit"):
        r = hard_scenario(refill, steps=steps)
        print(f"{refill:>18} {r['shortfall_rate']:>15.3f} {r['mean_batch']:>11.1f} {r['ratio_error']:>12.4f}")


def main() -> None:
    if quick():
        cases, pool, warm, n_cpp, n_ref = [(64, 3)], 10_000, 3, 5, 2
    else:
        cases = [(B, K) for B in (256, 1024, 8192) for K in (3, 9, 64)]
        pool, warm, n_cpp = 10**6, 30, 200
    rows: list[Row] = []
    summary = []
    for B, K in cases:
        if not quick():
            n_ref = {256: 20, 1024: 8, 8192: 3}[B]
        rng = np.random.default_rng(1000 * B + K)
        z = rng.dirichlet(np.full(K, 5.0))
        rates = np.linspace(0.1, 0.9, K)
        s = RatioPreservingSampler([pool] * K, B, seed=7, backend="cpp")
        run_steps(s, z, rates, 0, warm)  # rho learns the acceptance rates
        state = s.state_dict()
        ref = RatioPreservingSampler([pool] * K, B, seed=0, backend="python")
        ref.load_state_dict(state)
        t_ref, c_ref, r_ref = run_steps(ref, z, rates, warm, n_ref)
        t_cpp, c_cpp, r_cpp = run_steps(s, z, rates, warm, n_cpp)
        assert r_cpp[:n_ref] == r_ref, "reference and C++ diverged"
        case = f"B={B},K={K},pool={pool}"
        cpu_c, cpu_r = statistics.median(c_cpp), statistics.median(c_ref)
        extra = {"rounds_mean": round(float(np.mean(r_cpp)), 3), "steps_timed": n_cpp, "cpu_ms": round(cpu_c, 4)}
        med_c, p20_c, p80_c = stats(t_cpp)
        med_r, p20_r, p80_r = stats(t_ref)
        rows.append(Row("sampler", case, "mtgrpo-cpp", "cpu", med_c, p20_c, p80_c, extra=extra))
        rows.append(Row("sampler", case, "torch_ref", "cpu", med_r, p20_r, p80_r,
                        extra={"impl": "pure-python reference", "steps_timed": n_ref, "cpu_ms": round(cpu_r, 4)}))
        summary.append((B, K, med_c, med_r, med_r / med_c, cpu_c, cpu_r, cpu_r / cpu_c, float(np.mean(r_cpp))))
    emit(rows, csv_name="sampler")
    print("\nms per step, median (plan all rounds + report + finish; generation excluded).")
    print("wall = perf_counter, cpu = this thread's CPU time (differs when the machine is shared)")
    print(f"{'B':>6} {'K':>4} {'C++ wall':>10} {'ref wall':>10} {'ratio':>7} {'C++ cpu':>9} {'ref cpu':>9} "
          f"{'ratio':>7} {'rounds':>7}")
    for B, K, c, r, ratio, cc, cr, cratio, rounds in summary:
        print(f"{B:>6} {K:>4} {c:>10.4f} {r:>10.3f} {ratio:>6.0f}x {cc:>9.4f} {cr:>9.3f} {cratio:>6.0f}x "
              f"{rounds:>7.2f}")
    print_hard_scenario(20 if quick() else 200)


if __name__ == "__main__":
    main()

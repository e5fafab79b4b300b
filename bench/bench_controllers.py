"""Controller overhead per training step (driver side, host numpy).

Case: K = 9 tasks, 10 difficulty bins (+1 unseen group), 512 prompts x 8 rollouts (Rollout-GDRO
with n_mean = 8 in [2, 16]), prompt ids drawn from a 14,000-prompt pool whose history is warmed
up first. Parts of one step:
  classify  DifficultyClassifier.bins(prompt ids)                         (before generation)
  weights   TaskRewardTracker.observe + ImprovementAwareWeights.update
            + PromptGDRO.response_weights(4096 responses)
  allocate  RolloutAllocator.allocate (sqrt, and bandit)
  update    DifficultyClassifier.update + PromptGDRO.update + RolloutAllocator.update
  total     all of the above in one step function (including about 0.01 ms of simulated
            reward slicing for the allocated rollouts)
Goal: < 2 ms per step (the GDRO paper reports 0.36-0.45 s of driver-side time per step).
Provider ``mtgrpo-numpy`` is the library; ``baseline-dict-deque`` is the straightforward
per-prompt dict of ``collections.deque`` windows for the classifier parts (what the layout
choice is measured against). ``MTGRPO_BENCH_QUICK=1`` shrinks the case.
"""
from __future__ import annotations

import math
import sys
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Row, emit, quick, time_fn  # noqa: E402

from mtgrpo_core.gdro import DifficultyClassifier, PromptGDRO, RolloutAllocator  # noqa: E402
from mtgrpo_core.weighting import ImprovementAwareWeights, TaskRewardTracker  # noqa: E402


class DequeClassifier:
    """Baseline layout: dict id -> deque window, a Python loop per prompt."""

    def __init__(self, edges=tuple(i / 10 for i in range(1, 10)), window=50, delta=0.03):
        self.edges, self.window, self.delta = list(edges), window, delta
        self.hist: dict = {}
        self.bin: dict = {}
        self.nb = len(self.edges) + 1

    def bins(self, ids):
        get = self.bin.get
        return np.array([get(i, self.nb) for i in ids.tolist()])

    def update(self, ids, ok):
        for i, c in zip(ids.tolist(), ok.tolist()):
            h = self.hist.get(i)
            if h is None:
                h = self.hist[i] = deque(maxlen=self.window)
            h.append(c)
            p = sum(h) / len(h)
            raw = sum(p >= e for e in self.edges)
            b = self.bin.get(i)
            if b is None:
                self.bin[i] = raw
                continue
            lo = self.edges[b - 1] if b > 0 else -math.inf
            hi = self.edges[b] if b < self.nb - 1 else math.inf
            if p >= hi + self.delta or p <= lo - self.delta:
                self.bin[i] = raw


def main() -> None:
    q = quick()
    K, P, G, pool = (9, 64, 8, 2000) if q else (9, 512, 8, 14000)
    repeats = 5 if q else 30
    rng = np.random.default_rng(0)
    p_true = rng.beta(0.6, 0.6, size=pool)
    task_of = rng.integers(0, K, size=pool)

    clf = DifficultyClassifier()
    base = DequeClassifier()
    for _ in range(3 if q else 20):                     # warm the history: most ids seen
        ids = rng.choice(pool, size=P * 2, replace=False)
        ok = rng.random(ids.size) < p_true[ids]
        clf.update(ids, ok)
        base.update(ids, ok)
    iwu = ImprovementAwareWeights(K, lam=1.2, weight_decay=1e-4, improvement_clip=0.2)
    tracker = TaskRewardTracker(K)
    pg = PromptGDRO(clf.num_groups)
    alloc = {m: RolloutAllocator(clf.num_groups, n_min=2, n_max=16, n_mean=G, method=m) for m in ("sqrt", "bandit")}

    # a cycle of realistic batches (fresh ids and outcomes each call), so repeated calls do not
    # drive the same prompts into the extreme bins and understate the per-step cost
    batches = []
    for _ in range(16):
        ids = rng.choice(pool, size=P, replace=False)
        resp_correct = (rng.random(P * G) < np.repeat(p_true[ids], G)).astype(np.float64)
        batches.append(dict(
            ids=ids, resp_tasks=np.repeat(task_of[ids], G), resp_correct=resp_correct,
            any_ok=resp_correct.reshape(P, G).max(axis=1) > 0, loss=rng.standard_normal(P * G) * 0.05,
            improvements=rng.uniform(-0.2, 0.2, K), u=rng.random(P * 16)))
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(batches)
        return batches[state["i"]]

    def rewards_for(bt, n):  # simulated verifier outcome for the allocated rollouts
        return (bt["u"][: int(n.sum())] < np.repeat(p_true[bt["ids"]], n)).astype(np.float64)

    for a in alloc.values():                            # a few steps so the state is not fresh
        for _ in range(5):
            bt = nxt()
            g = clf.bins(bt["ids"])
            nn = a.allocate(g)
            a.update(g, nn, rewards_for(bt, nn))

    def classify():
        return clf.bins(nxt()["ids"])

    def weights():
        bt = nxt()
        J = tracker.observe(bt["resp_tasks"], bt["resp_correct"])
        iwu.update(J, bt["improvements"])
        return pg.response_weights(np.repeat(clf.bins(bt["ids"]), G))

    def allocate(m):
        return alloc[m].allocate(clf.bins(nxt()["ids"]))

    def update(m):
        bt = nxt()
        g = clf.bins(bt["ids"])
        nn = np.full(P, G)
        clf.update(bt["ids"], bt["any_ok"])
        pg.update(np.repeat(g, G), bt["loss"])
        alloc[m].update(g, nn, rewards_for(bt, nn))

    def total(m):
        bt = nxt()
        g = clf.bins(bt["ids"])                                   # classify before generation
        J = tracker.observe(bt["resp_tasks"], bt["resp_correct"])
        iwu.update(J, bt["improvements"])                          # task weights
        nn = alloc[m].allocate(g)                                 # rollouts per prompt
        rg = np.repeat(g, nn)
        pg.response_weights(rg)                                   # advantage multipliers
        r = rewards_for(bt, nn)
        clf.update(bt["ids"], bt["any_ok"])                        # after the step
        pg.update(rg, bt["loss"][: rg.size] if rg.size <= P * G else np.resize(bt["loss"], rg.size))
        alloc[m].update(g, nn, r)
        return nn

    case = f"K{K}_G{clf.num_groups}_P{P}x{G}"
    rows: list[Row] = []

    def add(part, provider, fn):
        med, p20, p80 = time_fn(fn, warmup=3, repeats=repeats)
        rows.append(Row(op="controllers", case=f"{case}/{part}", provider=provider, device="cpu",
                        median_ms=med, p20_ms=p20, p80_ms=p80))

    add("classify", "mtgrpo-numpy", classify)
    add("classify", "baseline-dict-deque", lambda: base.bins(nxt()["ids"]))
    add("classifier_update", "mtgrpo-numpy", lambda: (lambda bt: clf.update(bt["ids"], bt["any_ok"]))(nxt()))
    add("classifier_update", "baseline-dict-deque", lambda: (lambda bt: base.update(bt["ids"], bt["any_ok"]))(nxt()))
    add("weights", "mtgrpo-numpy", weights)
    for m in ("sqrt", "bandit"):
        add(f"allocate_{m}", "mtgrpo-numpy", lambda m=m: allocate(m))
        add(f"update_{m}", "mtgrpo-numpy", lambda m=m: update(m))
        add(f"total_{m}", "mtgrpo-numpy", lambda m=m: total(m))
    emit(rows, csv_name="controllers")
    tot = {r.case.split("/")[-1]: r.median_ms for r in rows if r.provider == "mtgrpo-numpy"}
    print(f"# per-step controller overhead ({case}): " + ", ".join(f"{k} {v:.3f} ms" for k, v in tot.items()),
          flush=True)


if __name__ == "__main__":
    main()

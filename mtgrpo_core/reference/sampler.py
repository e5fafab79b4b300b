"""Pure-Python reference of the ratio-preserving sampler (the oracle of the C++ core).

What: MT-GRPO's ratio-preserving (RP) sampler with acceptance-aware sampling (AAS)
(Ramesh et al., "Multi-Task GRPO", arXiv 2602.05547; spec: ALGORITHMS.md 2.3). A step
builds a batch of ``B`` *accepted* prompts (prompts whose rollout group survived the
zero-advantage filter) whose task counts follow the task weights ``z``.

Algorithm (one step):

1. targets ``n = apportion(z, B)``: largest-remainder rounding (default; sums to ``B``,
   ``|n_k - z_k B| < 1``) or ``Multinomial(B, z)``.
2. inflation ``m_k = min(1 / (1 - min(rho_k, 0.99)), acceptance_cap)`` from the
   filtered-ratio EMA ``rho`` (``m = 1`` when ``acceptance_aware=False``).
3. round 1 draws ``R = floor(oversample * B + 0.5)`` prompts split by ``apportion(z*m, R)``;
   round ``r > 1`` splits ``R`` by ``apportion(deficit*m, R)``, ``deficit_k = max(n_k - c_k, 0)``
   (``c_k`` = accepted so far), except that ``refill="fill-then-deficit"`` (default) keeps
   ``apportion(z*m, R)`` while ``sum(c) < B``; stop when no deficit is left or after
   ``max_rounds``. ``inflation="per-round"`` recomputes ``m`` before every round from the
   current rho. During the first ``warmup_steps`` steps a round draws ``z*m`` and the step
   stops once ``sum(c) >= B`` (ratios not enforced).
   A task never gets more than it has left undrawn this step; what it cannot take goes to
   the others in proportion (water-filling).
4. after each round the caller reports which prompts were accepted; when the round is
   closed, ``rho_k <- d*rho_k + (1-d)*rejected_k/reported_k`` for each task with reports.
5. ``finish``: per task ``min(c_k, n_k)`` accepted prompts uniformly at random (partial
   Fisher-Yates over the accepted list in report order; none during the warm-up steps),
   then a uniform top-up from the remaining accepted prompts of all tasks up to ``B``;
   shortfall = ``B - size``.

Prompts come from a per-task lazy pseudo-random permutation (a keyed Feistel network with
cycle walking; one epoch = one pass over the pool, new keys when exhausted); a step that
wraps an epoch parks its earlier draws at the end of the new epoch so no prompt is drawn
twice in one step.

Randomness: one PCG32 stream (O'Neill 2014, XSH-RR 64/32, stream constant
``0xda3e39cb94b95bdb``), used through ``next_u32``, ``next_double`` (53 bits) and Lemire's
``bounded(n)``; every call is made in the same order as the C++ core, and every float
operation is a single IEEE double operation, so both give bit-identical batches.

Bounds: totals above ``MAX_TOTAL`` = 2**53 are refused (float(total) must be exact for
``|n_k - z_k B| < 1``), and multinomial totals (batch size, prompts a round) above
``MAX_MULTINOMIAL_DRAWS`` = 2**22, since the multinomial costs one draw a prompt; both raise
ValueError naming the argument, here, in the C++ core and on ``load_state_dict``.

Cost: O(K) floats and O(R) integer work a round (Python loops: a few us a prompt); memory
O(K + prompts drawn this step), independent of pool sizes. Use ``mtgrpo_core.sampling``.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import numpy as np

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
STATE_FORMAT = "mtgrpo_core.RatioPreservingSampler/1"
ROUNDINGS = ("largest-remainder", "multinomial")
REFILLS = ("fill-then-deficit", "deficit")
INFLATIONS = ("per-step", "per-round")
#: Largest total apportioned: float(total) must be exact so that |n_k - z_k B| < 1 holds.
MAX_TOTAL = 2**53
#: Largest multinomial total (batch size or prompts a round): the draw costs one PCG32
#: double a prompt, ~5 s for 2**22 in this Python twin (~40 ms in C++); 2**31 took hours.
MAX_MULTINOMIAL_DRAWS = 2**22
_UNREPORTED, _ACCEPTED, _REJECTED = 0, 1, 2


class Pcg32:
    """PCG32 (XSH-RR 64/32), seeded like ``pcg32_srandom_r(seed, 0xda3e39cb94b95bdb)``."""

    MULT = 6364136223846793005
    STREAM = 0xDA3E39CB94B95BDB

    def __init__(self, seed: int = 0):
        self.state = 0
        self.inc = ((self.STREAM << 1) | 1) & _MASK64
        self.next_u32()
        self.state = (self.state + (seed & _MASK64)) & _MASK64
        self.next_u32()

    def next_u32(self) -> int:
        old = self.state
        self.state = (old * self.MULT + self.inc) & _MASK64
        xorshifted = (((old >> 18) ^ old) >> 27) & _MASK32
        rot = old >> 59
        return ((xorshifted >> rot) | (xorshifted << ((32 - rot) & 31))) & _MASK32

    def next_double(self) -> float:
        a = self.next_u32() >> 5
        b = self.next_u32() >> 6
        return (a * 67108864.0 + b) * (1.0 / 9007199254740992.0)

    def bounded(self, n: int) -> int:
        """Uniform integer in [0, n), 1 <= n < 2**32 (Lemire's multiply-and-reject)."""
        m = self.next_u32() * n
        low = m & _MASK32
        if low < n:
            t = ((1 << 32) - n) % n
            while low < t:
                m = self.next_u32() * n
                low = m & _MASK32
        return m >> 32


# ------------------------------------------------------------------------ validation
def check_weights(weights, num_tasks: int, name: str = "weights") -> list[float]:
    """Weights as a list of floats; ValueError naming ``name`` unless they are K finite
    non-negative numbers summing to 1 within 1e-6."""
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a 1-d array of {num_tasks} floats, got {type(weights).__name__}") from None
    if w.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array, got {w.ndim}-d")
    if w.shape[0] != num_tasks:
        raise ValueError(f"{name}: expected {num_tasks} entries (one per task), got {w.shape[0]}")
    out = [float(x) for x in w]
    s = 0.0
    for k, x in enumerate(out):
        if not math.isfinite(x):
            raise ValueError(f"{name}[{k}] = {x} is not finite")
        if x < 0.0:
            raise ValueError(f"{name}[{k}] = {x} is negative")
        s += x
    if s == 0.0:
        raise ValueError(f"{name}: all weights are zero; they must sum to 1")
    if abs(s - 1.0) > 1e-6:
        raise ValueError(f"{name}: must sum to 1 within 1e-6, got sum {s}")
    return out


def _check_total(total: int, method: str, name: str = "batch_size") -> None:
    """ValueError naming ``name`` when ``total`` is above the documented bounds."""
    if total > MAX_TOTAL:
        raise ValueError(f"{name}: at most 2**53, got {total}")
    if method == "multinomial" and total > MAX_MULTINOMIAL_DRAWS:
        raise ValueError(f"{name}: rounding='multinomial' allows at most 2**22 = {MAX_MULTINOMIAL_DRAWS}, got {total} "
                         "(one draw a prompt; use 'largest-remainder' for larger sizes)")


def apportion(w: list[float], total: int, method: str, rng: Pcg32) -> list[int]:
    """Split ``total`` in proportion to ``w`` (non-negative, positive sum); see module doc."""
    K = len(w)
    S = 0.0
    for x in w:  # left to right, like the C++ loop (not math.fsum / sum())
        S += x
    out = [0] * K
    if total <= 0:
        return out
    _check_total(total, method)
    if method == "largest-remainder":
        rem = [0.0] * K
        active = []
        assigned = 0
        for k in range(K):
            if not w[k] > 0.0:
                continue
            x = (w[k] / S) * float(total)
            f = math.floor(x)
            out[k] = int(f)
            rem[k] = x - f
            assigned += out[k]
            active.append(k)
        left = total - assigned
        order = sorted(active, key=lambda k: (-rem[k], k))
        i = 0
        while left > 0:
            out[order[i % len(order)]] += 1
            i += 1
            left -= 1
        # overshoot (normalised weights summing to 1 + K ulp): give back from the smallest
        # remainders, skipping zeros, exactly like the C++ core
        i = 0
        while left < 0:
            k = order[len(order) - 1 - i % len(order)]
            if out[k] > 0:
                out[k] -= 1
                left += 1
            i += 1
        return out
    cum = []
    c = 0.0
    last = -1
    for k in range(K):
        c += w[k] / S
        cum.append(c)
        if w[k] > 0.0:
            last = k
    for _ in range(total):
        u = rng.next_double()
        k = bisect.bisect_right(cum, u)
        if k >= K:
            k = last
        out[k] += 1
    return out


def target_counts_ref(weights, batch_size: int, method: str = "largest-remainder", seed: int = 0) -> np.ndarray:
    """Reference of :func:`mtgrpo_core.sampling.target_counts` (int64[K], sums to B)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.shape[0] == 0:
        raise ValueError("weights: expected a non-empty 1-d array")
    if batch_size <= 0:
        raise ValueError(f"batch_size: must be positive, got {batch_size}")
    if method not in ROUNDINGS:
        raise ValueError(f"rounding: expected 'largest-remainder' or 'multinomial', got {method!r}")
    _check_total(int(batch_size), method)
    ws = check_weights(w, w.shape[0])
    return np.asarray(apportion(ws, int(batch_size), method, Pcg32(seed)), dtype=np.int64)


# ------------------------------------------------------------------------ pools
def _mix32(v: int) -> int:
    v = (v * 0x9E3779B1) & _MASK32
    v ^= v >> 15
    v = (v * 0x85EBCA77) & _MASK32
    v ^= v >> 13
    return v


class LazyPermutation:
    """A pool's order, evaluated one prompt at a time in O(1) memory.

    Epoch order: pi(0), pi(1), ... where pi is a keyed 4-round Feistel network on 2h bits
    (2**(2h) >= n) restricted to [0, n) by cycle walking; the 4 round keys (uint32) come
    from the sampler's PCG32 when the epoch starts. ``parked`` prompts (drawn earlier in the
    step that wrapped the epoch) are skipped by pi and come last in the epoch instead.
    """

    def __init__(self, n: int):
        self.n = n
        self.pos = 0  # prompts returned this epoch
        self.limit = n  # < n only inside the step that wrapped the epoch
        self.cursor = 0  # next index into pi
        self.epoch = 0
        self.keys = [0, 0, 0, 0]
        self.parked: list[int] = []
        self._parked_set: set[int] = set()
        b = 0
        while b < 32 and (1 << b) < n:
            b += 1
        self.h = max(1, (b + 1) // 2)
        self.mask = (1 << self.h) - 1

    def set_keys(self, rng: Pcg32) -> None:
        self.keys = [rng.next_u32() for _ in range(4)]

    def feistel(self, x: int) -> int:
        L, R = x >> self.h, x & self.mask
        for k in self.keys:
            L, R = R, L ^ (_mix32(R ^ k) & self.mask)
        return (L << self.h) | R

    def pi(self, i: int) -> int:
        y = self.feistel(i)
        while y >= self.n:  # cycle walking: terminates at the latest back at i
            y = self.feistel(y)
        return y

    def draw(self) -> int:
        if self.pos >= self.limit:
            raise RuntimeError("LazyPermutation.draw: no prompt left in this step (inconsistent state)")
        d = len(self.parked)
        if self.pos < self.n - d:
            while True:
                if self.cursor >= self.n:
                    raise RuntimeError("LazyPermutation.draw: epoch overrun (inconsistent state)")
                x = self.pi(self.cursor)
                self.cursor += 1
                if x not in self._parked_set:
                    self.pos += 1
                    return x
        x = self.parked[self.pos - (self.n - d)]
        self.pos += 1
        return x

    def new_epoch(self, rng: Pcg32, parked: list[int]) -> None:
        """Next epoch (fresh keys), with this step's earlier draws parked at its end."""
        self.epoch += 1
        self.pos = 0
        self.cursor = 0
        self.set_keys(rng)
        self.parked = list(parked)
        self._parked_set = set(parked)
        self.limit = self.n - len(parked)


# ------------------------------------------------------------------------ sampler
@dataclass
class BatchRef:
    task_ids: np.ndarray
    prompt_indices: np.ndarray
    targets: np.ndarray
    realized: np.ndarray
    rounds: int
    shortfall: int
    num_drawn: int
    num_accepted: int


@dataclass
class _Step:
    z: list[float]
    n: list[int]
    m: list[float]
    rounds: int = 0
    round_open: bool = False
    round_start: int = 0
    rec_task: list[int] = field(default_factory=list)
    rec_prompt: list[int] = field(default_factory=list)
    rec_round: list[int] = field(default_factory=list)
    rec_status: list[int] = field(default_factory=list)
    index: dict = field(default_factory=dict)  # (task, prompt) -> record index
    acc: list = field(default_factory=list)  # per task: accepted prompts in report order


class RatioPreservingSamplerRef:
    """Readable reference of :class:`mtgrpo_core.sampling.RatioPreservingSampler`.

    Same constructor, methods and ``state_dict`` layout; ``next_round`` returns
    ``(task_ids int32[R], prompt_indices int64[R])`` or ``None`` and ``finish`` a
    :class:`BatchRef`. Same seed + same reports -> the same batches as the C++ core.
    """

    def __init__(self, pool_sizes, batch_size: int, *, oversample: float = 3.0, max_rounds: int = 10,
                 acceptance_cap: float = 5.0, rho_decay: float = 0.9, rounding: str = "largest-remainder",
                 seed: int = 0, acceptance_aware: bool = True, refill: str = "fill-then-deficit",
                 inflation: str = "per-step", warmup_steps: int = 0):
        ps = [int(x) for x in np.asarray(pool_sizes, dtype=np.int64).reshape(-1)]
        if len(ps) == 0:
            raise ValueError("pool_sizes: need at least one task, got 0")
        for k, n in enumerate(ps):
            if n < 0 or n > _MASK32:
                raise ValueError(f"pool_sizes[{k}] = {n} is outside [0, 2**32 - 1]")
        if batch_size <= 0:
            raise ValueError(f"batch_size: must be positive, got {batch_size}")
        if not (math.isfinite(oversample) and oversample > 0):
            raise ValueError(f"oversample: must be a finite number > 0, got {oversample}")
        if max_rounds < 1:
            raise ValueError(f"max_rounds: must be >= 1, got {max_rounds}")
        if not (math.isfinite(acceptance_cap) and acceptance_cap >= 1.0):
            raise ValueError(f"acceptance_cap: must be a finite number >= 1, got {acceptance_cap}")
        if not (math.isfinite(rho_decay) and 0.0 <= rho_decay < 1.0):
            raise ValueError(f"rho_decay: must lie in [0, 1), got {rho_decay}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding: expected 'largest-remainder' or 'multinomial', got {rounding!r}")
        if refill not in REFILLS:
            raise ValueError(f"refill: expected one of {REFILLS}, got {refill!r}")
        if inflation not in INFLATIONS:
            raise ValueError(f"inflation: expected one of {INFLATIONS}, got {inflation!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {warmup_steps}")
        _check_total(int(batch_size), rounding)
        r = math.floor(float(oversample) * float(batch_size) + 0.5)
        if r > 2147483647:
            raise ValueError(f"oversample: oversample * batch_size = {r} prompts a round is too many (max 2**31 - 1)")
        if max(r, 1) * max_rounds > _MASK32:
            raise ValueError("max_rounds: oversample * batch_size * max_rounds must stay below 2**32 prompts a step")
        if rounding == "multinomial" and r > MAX_MULTINOMIAL_DRAWS:
            raise ValueError(f"oversample: rounding='multinomial' allows at most 2**22 = {MAX_MULTINOMIAL_DRAWS} "
                             f"prompts a round, oversample * batch_size = {r}")
        self.pool_sizes = ps
        self.batch_size = int(batch_size)
        self.oversample = float(oversample)
        self.max_rounds = int(max_rounds)
        self.acceptance_cap = float(acceptance_cap)
        self.rho_decay = float(rho_decay)
        self.rounding = rounding
        self.acceptance_aware = bool(acceptance_aware)
        self.refill = refill
        self.inflation = inflation
        self.warmup_steps = int(warmup_steps)
        self.round_size = max(1, int(r))
        self.rng = Pcg32(int(seed))
        self.rho = [0.0] * len(ps)
        self.steps_done = 0
        self.perms = [LazyPermutation(n) for n in ps]
        for P in self.perms:  # epoch-0 keys, task by task
            P.set_keys(self.rng)
        self.step: _Step | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.pool_sizes)

    @property
    def filtered_ratios(self) -> np.ndarray:
        return np.asarray(self.rho, dtype=np.float64)

    def _require_step(self, what: str) -> _Step:
        if self.step is None:
            raise RuntimeError(f"{what}: no step in progress; call start_step(weights) first")
        return self.step

    def start_step(self, weights) -> None:
        if self.step is not None:
            raise RuntimeError("start_step: the previous step is not finished; call finish() first")
        K = self.num_tasks
        z = check_weights(weights, K)
        for k in range(K):
            if z[k] > 0.0 and self.pool_sizes[k] == 0:
                raise ValueError(f"pool_sizes[{k}] is 0 but weights[{k}] = {z[k]} > 0: "
                                 "a task with weight needs prompts")
        n = apportion(z, self.batch_size, self.rounding, self.rng)
        self.step = _Step(z=z, n=n, m=self._inflation(), acc=[[] for _ in range(K)])

    def _inflation(self) -> list[float]:
        if not self.acceptance_aware:
            return [1.0] * self.num_tasks
        return [min(1.0 / (1.0 - min(r, 0.99)), self.acceptance_cap) for r in self.rho]

    @property
    def in_warmup(self) -> bool:
        """True during the first ``warmup_steps`` steps (ratios not enforced)."""
        return self.steps_done < self.warmup_steps

    def _close_round(self, st: _Step) -> None:
        if not st.round_open:
            return
        st.round_open = False
        K = self.num_tasks
        reported, rejected = [0] * K, [0] * K
        for i in range(st.round_start, len(st.rec_task)):
            s = st.rec_status[i]
            if s != _UNREPORTED:
                reported[st.rec_task[i]] += 1
                rejected[st.rec_task[i]] += s == _REJECTED
        d = self.rho_decay
        for k in range(K):
            if reported[k]:
                frac = rejected[k] / reported[k]
                self.rho[k] = d * self.rho[k] + (1.0 - d) * frac

    def next_round(self):
        st = self._require_step("next_round")
        self._close_round(st)
        if st.rounds >= self.max_rounds:
            return None
        K = self.num_tasks
        if self.inflation == "per-round":  # rho already holds the rounds closed so far
            st.m = self._inflation()
        from_z = st.rounds == 0
        if not from_z:
            deficit = [max(st.n[k] - len(st.acc[k]), 0) for k in range(K)]
            total_acc = sum(len(a) for a in st.acc)
            if self.in_warmup:  # ratios not enforced: only the batch size counts
                if total_acc >= self.batch_size:
                    return None
                from_z = True
            else:
                if sum(deficit) == 0:
                    return None
                from_z = self.refill == "fill-then-deficit" and total_acc < self.batch_size
            q = [float(deficit[k]) * st.m[k] for k in range(K)]
        if from_z:
            q = [st.z[k] * st.m[k] for k in range(K)]
        drawn = [0] * K
        for t in st.rec_task:
            drawn[t] += 1
        cap = [self.pool_sizes[k] - drawn[k] for k in range(K)]
        q = [q[k] if cap[k] > 0 else 0.0 for k in range(K)]
        if not any(x > 0.0 for x in q):
            return None
        # water-filling: a task short of prompts gives what it has; the rest is re-split
        alloc = [0] * K
        left = self.round_size
        while left > 0 and any(x > 0.0 for x in q):
            part = apportion(q, left, self.rounding, self.rng)
            over = [k for k in range(K) if q[k] > 0.0 and part[k] > cap[k]]
            if not over:
                for k in range(K):
                    if q[k] > 0.0:
                        alloc[k] = part[k]
                break
            for k in over:
                alloc[k] = cap[k]
                left -= cap[k]
                q[k] = 0.0
        st.round_start = len(st.rec_task)
        for k in range(K):
            P = self.perms[k]
            for _ in range(alloc[k]):
                if P.pos == P.n:  # epoch exhausted mid-step
                    P.new_epoch(self.rng, [p for t, p in zip(st.rec_task, st.rec_prompt) if t == k])
                p = P.draw()
                st.index[(k, p)] = len(st.rec_task)
                st.rec_task.append(k)
                st.rec_prompt.append(p)
                st.rec_round.append(st.rounds)
                st.rec_status.append(_UNREPORTED)
        st.rounds += 1
        st.round_open = True
        return (np.asarray(st.rec_task[st.round_start:], dtype=np.int32),
                np.asarray(st.rec_prompt[st.round_start:], dtype=np.int64))

    def report(self, task_ids, prompt_indices, accepted) -> None:
        st = self._require_step("report")
        t = np.asarray(task_ids).reshape(-1)
        p = np.asarray(prompt_indices).reshape(-1)
        a = np.asarray(accepted).reshape(-1)
        if p.shape[0] != t.shape[0]:
            raise ValueError(f"prompt_indices: length {p.shape[0]} does not match task_ids length {t.shape[0]}")
        if a.shape[0] != t.shape[0]:
            raise ValueError(f"accepted: length {a.shape[0]} does not match task_ids length {t.shape[0]}")
        K = self.num_tasks
        seen = set()
        idx = []
        for i in range(t.shape[0]):
            k, q, acc = int(t[i]), int(p[i]), int(a[i])
            if not 0 <= k < K:
                raise ValueError(f"task_ids[{i}] = {k} is outside [0, {K})")
            if acc not in (0, 1):
                raise ValueError(f"accepted[{i}] = {acc} is not a boolean")
            r = st.index.get((k, q))
            if r is None:
                raise ValueError(f"prompt_indices[{i}] = {q} (task {k}) was not drawn in this step")
            if r in seen or st.rec_status[r] != _UNREPORTED:
                where = "earlier in this call" if r in seen else "in this step"
                raise ValueError(f"prompt_indices[{i}] = {q} (task {k}) was already reported {where}")
            seen.add(r)
            idx.append(r)
        for i, r in enumerate(idx):
            if int(a[i]):
                st.rec_status[r] = _ACCEPTED
                st.acc[int(t[i])].append(int(p[i]))
            else:
                st.rec_status[r] = _REJECTED

    def finish(self) -> BatchRef:
        st = self._require_step("finish")
        self._close_round(st)
        K, B = self.num_tasks, self.batch_size
        quota = [0] * K
        for k in range(K):
            a = st.acc[k]
            c = len(a)
            s = 0 if self.in_warmup else min(c, st.n[k])  # warm-up: all from the top-up
            for i in range(s):  # partial Fisher-Yates: a uniform s-subset
                j = i + self.rng.bounded(c - i)
                a[i], a[j] = a[j], a[i]
            quota[k] = s
        rest = [(k, p) for k in range(K) for p in st.acc[k][quota[k]:]]
        t = min(B - sum(quota), len(rest))
        for i in range(t):
            j = i + self.rng.bounded(len(rest) - i)
            rest[i], rest[j] = rest[j], rest[i]
        tasks, prompts = [], []
        for k in range(K):
            picked = st.acc[k][:quota[k]] + [p for kk, p in rest[:t] if kk == k]
            tasks += [k] * len(picked)
            prompts += picked
        realized = np.bincount(np.asarray(tasks, dtype=np.int64), minlength=K).astype(np.int64)
        batch = BatchRef(task_ids=np.asarray(tasks, dtype=np.int32), prompt_indices=np.asarray(prompts, dtype=np.int64),
                         targets=np.asarray(st.n, dtype=np.int64), realized=realized, rounds=st.rounds,
                         shortfall=B - len(tasks), num_drawn=len(st.rec_task),
                         num_accepted=sum(len(a) for a in st.acc))
        for P in self.perms:
            P.limit = P.n
        self.step = None
        self.steps_done += 1
        return batch

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        K = self.num_tasks
        st = self.step
        i64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
        d = {
            "format": STATE_FORMAT, "pool_sizes": i64(self.pool_sizes), "batch_size": self.batch_size,
            "oversample": self.oversample, "max_rounds": self.max_rounds, "acceptance_cap": self.acceptance_cap,
            "rho_decay": self.rho_decay, "rounding": self.rounding, "acceptance_aware": self.acceptance_aware,
            "refill": self.refill, "inflation": self.inflation, "warmup_steps": self.warmup_steps,
            "rng_state": self.rng.state, "rng_inc": self.rng.inc, "rho": np.asarray(self.rho, dtype=np.float64),
            "steps_done": self.steps_done,
            "perm_epoch": i64([P.epoch for P in self.perms]), "perm_pos": i64([P.pos for P in self.perms]),
            "perm_limit": i64([P.limit for P in self.perms]),
            "perm_cursor": i64([P.cursor for P in self.perms]),
            "perm_keys": i64([key for P in self.perms for key in P.keys]),
            "park_task": i64([k for k, P in enumerate(self.perms) for _ in P.parked]),
            "park_prompt": i64([x for P in self.perms for x in P.parked]),
            "step_active": st is not None,
        }
        if st is None:
            st = _Step(z=[], n=[], m=[], acc=[[] for _ in range(K)])
        d.update({
            "step_weights": np.asarray(st.z, dtype=np.float64), "step_inflation": np.asarray(st.m, dtype=np.float64),
            "step_targets": i64(st.n), "step_rounds": st.rounds, "round_open": st.round_open,
            "round_start": st.round_start, "rec_task": np.asarray(st.rec_task, dtype=np.int32),
            "rec_prompt": i64(st.rec_prompt), "rec_round": np.asarray(st.rec_round, dtype=np.int32),
            "rec_status": np.asarray(st.rec_status, dtype=np.int8),
            "acc_task": np.asarray([k for k in range(K) for _ in st.acc[k]], dtype=np.int32),
            "acc_prompt": i64([p for k in range(K) for p in st.acc[k]]),
        })
        return d

    def load_state_dict(self, d: dict) -> None:
        """Restore a state from either implementation. Checks what the C++ core checks
        (lengths, index ranges, rng_inc odd, rho in [0, 1], records consistent with the
        step); on ValueError the sampler is unchanged."""
        if d.get("format") != STATE_FORMAT:
            raise ValueError(f"state_dict['format']: expected {STATE_FORMAT!r}")
        try:
            self._load(d)
        except KeyError as e:
            raise ValueError(f"state_dict: missing key {e}") from None
        except (TypeError, OverflowError) as e:
            raise ValueError(f"state_dict: wrong type ({e})") from None

    @staticmethod
    def _check_state(d: dict, new: RatioPreservingSamplerRef) -> None:
        """ValueError naming the key when ``d`` is inconsistent (mirrors load_state in C++)."""
        K = new.num_tasks
        ps = new.pool_sizes

        def need(key, want):
            got = len(d[key])
            if got != want:
                raise ValueError(f"state_dict['{key}']: expected length {want}, got {got}")

        if int(d["rng_inc"]) % 2 == 0 or not 0 <= int(d["rng_inc"]) < 2**64 or not 0 <= int(d["rng_state"]) < 2**64:
            raise ValueError("state_dict['rng_inc']: must be odd (and both rng words uint64)")
        need("rho", K)
        for k in range(K):
            r = float(d["rho"][k])
            if not (math.isfinite(r) and 0.0 <= r <= 1.0):
                raise ValueError(f"state_dict['rho'][{k}] is outside [0, 1]")
        if int(d["steps_done"]) < 0:
            raise ValueError("state_dict['steps_done']: must be >= 0")
        for key in ("perm_epoch", "perm_pos", "perm_limit", "perm_cursor"):
            need(key, K)
        need("perm_keys", 4 * K)
        need("park_prompt", len(d["park_task"]))
        parked, park_set = [0] * K, set()
        for i, (k, x) in enumerate(zip(d["park_task"], d["park_prompt"])):
            k, x = int(k), int(x)
            if not 0 <= k < K:
                raise ValueError(f"state_dict['park_task'][{i}] is outside [0, {K})")
            if not 0 <= x < ps[k] or (k, x) in park_set:
                raise ValueError(f"state_dict['park_prompt'][{i}]: parked prompts must be distinct pool indices")
            park_set.add((k, x))
            parked[k] += 1
        for k in range(K):
            pos, lim, cur = int(d["perm_pos"][k]), int(d["perm_limit"][k]), int(d["perm_cursor"][k])
            if pos < 0 or lim < pos or lim > ps[k] or cur < 0 or cur > ps[k]:
                raise ValueError(f"state_dict['perm_pos'/'perm_limit'/'perm_cursor'][{k}]: need 0 <= pos <= limit "
                                 "<= pool size, 0 <= cursor <= pool size")
            if int(d["perm_epoch"][k]) < 0:
                raise ValueError(f"state_dict['perm_epoch'][{k}]: must be >= 0")
            if any(not 0 <= int(v) <= _MASK32 for v in d["perm_keys"][4 * k:4 * k + 4]):
                raise ValueError(f"state_dict['perm_keys'][{k}]: keys are uint32")
            if parked[k] > ps[k] or (lim < ps[k] and lim != ps[k] - parked[k]):
                raise ValueError(f"state_dict['perm_limit'][{k}]: inconsistent with the parked prompts")
            if pos < ps[k] - parked[k] and pos > cur:
                raise ValueError(f"state_dict['perm_cursor'][{k}]: behind perm_pos")
        if not bool(d["step_active"]):
            if len(d["rec_task"]) or len(d["acc_task"]):
                raise ValueError("state_dict['rec_task']: records given but no step is active")
            return
        for key in ("step_weights", "step_inflation", "step_targets"):
            need(key, K)
        for k in range(K):
            w, m, n = float(d["step_weights"][k]), float(d["step_inflation"][k]), int(d["step_targets"][k])
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"state_dict['step_weights'][{k}] is invalid")
            if not math.isfinite(m) or m < 1.0:
                raise ValueError(f"state_dict['step_inflation'][{k}] is invalid")
            if n < 0:
                raise ValueError(f"state_dict['step_targets'][{k}] is negative")
        if sum(int(x) for x in d["step_targets"]) != new.batch_size:
            raise ValueError(f"state_dict['step_targets']: must sum to batch_size = {new.batch_size}")
        rounds = int(d["step_rounds"])
        if not 0 <= rounds <= new.max_rounds:
            raise ValueError("state_dict['step_rounds'] is out of range")
        R = len(d["rec_task"])
        for key in ("rec_prompt", "rec_round", "rec_status"):
            need(key, R)
        if not 0 <= int(d["round_start"]) <= R:
            raise ValueError("state_dict['round_start'] is out of range")
        seen, accepted = set(), {}
        for i in range(R):
            k, p = int(d["rec_task"][i]), int(d["rec_prompt"][i])
            if not (0 <= k < K and 0 <= p < ps[k]):
                raise ValueError(f"state_dict['rec_task'/'rec_prompt'][{i}] is out of range")
            if int(d["rec_status"][i]) not in (0, 1, 2):
                raise ValueError(f"state_dict['rec_status'][{i}] must be 0, 1 or 2")
            if not 0 <= int(d["rec_round"][i]) < max(rounds, 1):
                raise ValueError(f"state_dict['rec_round'][{i}] is out of range")
            if (k, p) in seen:
                raise ValueError(f"state_dict['rec_prompt'][{i}]: prompt drawn twice in one step")
            seen.add((k, p))
            if int(d["rec_status"][i]) == _ACCEPTED:
                accepted[(k, p)] = False
        need("acc_prompt", len(d["acc_task"]))
        if len(d["acc_task"]) != len(accepted):
            raise ValueError("state_dict['acc_task']: must list every accepted prompt once")
        for i, (k, p) in enumerate(zip(d["acc_task"], d["acc_prompt"])):
            key = (int(k), int(p))
            if accepted.get(key, True):
                raise ValueError(f"state_dict['acc_prompt'][{i}] is not an accepted prompt of this step, "
                                 "or is listed twice")
            accepted[key] = True

    def _load(self, d: dict) -> None:
        if [int(x) for x in d["pool_sizes"]] != self.pool_sizes:
            raise ValueError("state_dict['pool_sizes']: does not match this sampler's pool_sizes")
        new = RatioPreservingSamplerRef(
            self.pool_sizes, int(d["batch_size"]), oversample=float(d["oversample"]), max_rounds=int(d["max_rounds"]),
            acceptance_cap=float(d["acceptance_cap"]), rho_decay=float(d["rho_decay"]), rounding=str(d["rounding"]),
            acceptance_aware=bool(d["acceptance_aware"]),
            # states written before these options ran the deficit rule, per-step m, no warm-up
            refill=str(d.get("refill", "deficit")), inflation=str(d.get("inflation", "per-step")),
            warmup_steps=int(d.get("warmup_steps", 0)))
        self._check_state(d, new)
        new.rng.state, new.rng.inc = int(d["rng_state"]), int(d["rng_inc"])
        new.rho = [float(x) for x in d["rho"]]
        new.steps_done = int(d["steps_done"])
        for k, P in enumerate(new.perms):
            P.epoch, P.pos, P.limit = int(d["perm_epoch"][k]), int(d["perm_pos"][k]), int(d["perm_limit"][k])
            P.cursor = int(d["perm_cursor"][k])
            P.keys = [int(x) for x in d["perm_keys"][4 * k:4 * k + 4]]
        for k, x in zip(d["park_task"], d["park_prompt"]):
            new.perms[int(k)].parked.append(int(x))
            new.perms[int(k)]._parked_set.add(int(x))
        if bool(d["step_active"]):
            K = new.num_tasks
            st = _Step(z=[float(x) for x in d["step_weights"]], n=[int(x) for x in d["step_targets"]],
                       m=[float(x) for x in d["step_inflation"]], rounds=int(d["step_rounds"]),
                       round_open=bool(d["round_open"]), round_start=int(d["round_start"]),
                       acc=[[] for _ in range(K)])
            st.rec_task = [int(x) for x in d["rec_task"]]
            st.rec_prompt = [int(x) for x in d["rec_prompt"]]
            st.rec_round = [int(x) for x in d["rec_round"]]
            st.rec_status = [int(x) for x in d["rec_status"]]
            st.index = {(t, p): i for i, (t, p) in enumerate(zip(st.rec_task, st.rec_prompt))}
            for k, p in zip(d["acc_task"], d["acc_prompt"]):
                st.acc[int(k)].append(int(p))
            new.step = st
        self.__dict__.update(new.__dict__)

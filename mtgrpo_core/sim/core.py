"""A fast, seeded multi-task GRPO learning simulator that drives the real controllers.

What it models (no language model; a few thousand numbers per step):
- K tasks, each with a pool of prompts of latent difficulty d_i (logits), drawn around a
  per-task mean (easy ... hard).
- A policy whose success probability on prompt i is p_i = sigmoid(a_k + b_i - d_i): a_k is
  a task-level skill (what generalises within task k), b_i a prompt-level term (what is
  memorised about prompt i).
- Each step, the batch's prompts get G Bernoulli(p_i) rollouts (G may vary per prompt under
  Rollout-GDRO), GRPO advantages A = (y - mean) / (std + 1e-6) per group, so all-correct or
  all-wrong groups carry no signal (the zero-gradient rate arises from p_i and G).
- The GRPO gradient on a prompt's logit is g_i = (1/G) sum_j w_j A_j (y_j - p_i)
  (w_j: GDRO response weights, else 1); the update is
    b_i   += lr_prompt * g_i,
    a_k   += lr_task * D_k * sum_j M_kj (sum_{i in task j} g_i / B),
  with M = I - rho / (K - 1) (1 - I) (negative transfer between tasks: learning on task j
  costs the others) and D_k = 1 / (1 + max(a_k, 0) / saturation) (diminishing returns).
- Task k's improvement I_k is measured exactly as the library defines it: the change of
  the sum of task k's per-response clipped surrogate (eps 0.2 / 0.28) from before to after
  the update, at the new / old probability ratio of each sampled response.
- Task weights reach the batch through the ratio-preserving sampler
  (``mtgrpo_core.sampling.RatioPreservingSampler`` when importable; otherwise the mixed
  draw with dynamic sampling of :class:`mtgrpo_core.pools.DynamicSampling`), so the batch
  keeps informative prompts only and holds tasks in proportion to the weights.

Algorithms, by the registry names the trainer and the integrations use too: the task
weightings of :func:`mtgrpo_core.weighting.make_weighting` (``uniform``, ``sec``,
``reward-only`` (Subroutine 2, small eta: the strict worst-task update), ``iwu``; aliases
such as ``mtgrpo`` work), the advantage weighting ``prompt-gdro`` (DifficultyClassifier +
PromptGDRO reweighting, uniform sampling without filtering), ``rollout-<rule>`` for the
rollout allocations of :func:`mtgrpo_core.gdro.make_rollout_allocation` (``rollout-sqrt``,
``rollout-bandit``) and ``grpo``: the MATCHED baseline of the GDRO runs (the same uniform
unfiltered draw, ``group_size`` rollouts per prompt; run it with ``group_size == n_mean``
to compare with Rollout-GDRO at the same mean rollouts). All of these record the WSE of
their allocation and of uniform n on the batch's true per-bin sigma.

Cost: about 1 ms per step at K = 3, B = 48, G = 8 on one core.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..gdro import (DifficultyClassifier, advantage_weighting_names, make_advantage_weighting,
                    make_rollout_allocation, rollout_allocation_names, weighted_standard_error)
from ..groups import group_advantages_np, informative_groups
from ..pools import DynamicSampling
from ..weighting import TaskRewardTracker, TaskStats, canonical_weighting, make_weighting, weighting_names

# The registry names (docs/ARCHITECTURE.md, "Names"): task weightings, advantage weightings,
# "rollout-" + each rollout allocation.
ALGOS = (weighting_names() + advantage_weighting_names()
         + tuple(f"rollout-{n}" for n in rollout_allocation_names()) + ("grpo",))


@dataclass(frozen=True)
class SimConfig:
    """Simulator knobs (defaults: 3 tasks, easy / medium / hard)."""

    num_tasks: int = 3
    difficulty_means: tuple = (-1.0, 1.0, 3.0)   # logits; initial mean success ~0.67 / 0.33 / 0.12
    difficulty_spread: float = 1.2
    pool_size: int = 256
    group_size: int = 8
    batch_size: int = 48
    steps: int = 400
    lr_task: float = 0.1
    lr_prompt: float = 0.1
    interference: float = 0.6
    saturation: float = 3.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    oversample: float = 3.0
    max_rounds: int = 4
    acceptance_cap: float = 5.0
    reward_ema: float = 0.5
    # I_k = -(change of the sum of task k's per-response losses) divided by this many:
    # "prompts" (the batch's prompt count, default), "responses" (its response count) or
    # "none" (the raw sum, as the library defines it). A simulated step moves the policy far
    # more than an LLM step does, so the raw sum would sit at the clip every step; per-prompt
    # units put I_k on the scale where the paper's lambda (0.2) balances I and lambda J.
    improvement_unit: str = "prompts"
    # controller hyperparameters
    lam: float = 0.2
    weight_lr: float = 0.025
    weight_decay: float = 1e-5
    improvement_clip: float = 0.1
    reward_only_eta: float = 1e-5
    sec_lr: float = 0.5
    sec_temperature: float = 0.2
    # GDRO
    gdro_eta: float = 0.65
    gdro_signal: str = "surrogate"       # Prompt-GDRO adversary signal (surrogate | learnability | failure)
    gdro_share_normalize: bool = True
    gdro_share_floor: float = 0.01
    pass_k: int = 8                      # k of the final per-task pass@k (SimResult.extra["pass_k"])
    n_min: int = 2
    n_max: int = 12
    n_mean: float = 4
    seed: int = 0
    use_sampler: bool = True


@dataclass
class SimResult:
    algo: str
    success: np.ndarray            # [steps + 1, K] mean success probability per task
    weights: np.ndarray            # [steps, K] task weights used at each step
    zero_grad_rate: np.ndarray     # [steps, K] share of drawn groups with zero advantage
    sampler: str                   # "rp-sampler", "direct" (fallback) or "unfiltered" (GDRO runs)
    extra: dict = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return float(self.success[-1].min())

    @property
    def average(self) -> float:
        return float(self.success[-1].mean())


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _load_sampler():
    try:
        from ..sampling import RatioPreservingSampler  # noqa: F401
        return RatioPreservingSampler
    except Exception:  # not built yet / not importable: fall back to a direct weighted draw
        return None


def _weighting_kwargs(name: str, cfg: SimConfig) -> dict:
    table = {
        "iwu": dict(lam=cfg.lam, lr=cfg.weight_lr, weight_decay=cfg.weight_decay, optimizer="adam",
                    improvement_clip=cfg.improvement_clip),
        "reward-only": dict(lr=cfg.weight_lr, eta=cfg.reward_only_eta, optimizer="adam"),
        "sec": dict(lr=cfg.sec_lr, temperature=cfg.sec_temperature),
    }
    return table.get(name, {})


def _parse_algo(algo: str) -> tuple[str, str | None, str | None]:
    """(task weighting, advantage weighting or None, rollout allocation or None) of a sim name."""
    if algo == "grpo":
        return "uniform", None, None
    if algo in advantage_weighting_names(aliases=True):
        return "uniform", algo, None
    if isinstance(algo, str) and algo.startswith("rollout-") and algo[8:] in rollout_allocation_names(aliases=True):
        return "uniform", None, algo[8:]
    try:
        return canonical_weighting(algo), None, None
    except ValueError:
        raise ValueError(f"algo: expected one of {ALGOS}, got {algo!r}") from None


def simulate(algo: str, cfg: SimConfig = SimConfig()) -> SimResult:
    """Run one seeded simulation of ``cfg.steps`` steps with weighting / GDRO ``algo``."""
    wname, adv_name, alloc_name = _parse_algo(algo)
    K, P, G, B = cfg.num_tasks, cfg.pool_size, cfg.group_size, cfg.batch_size
    if len(cfg.difficulty_means) != K:
        raise ValueError(f"difficulty_means: expected {K} values, got {len(cfg.difficulty_means)}")
    rng = np.random.default_rng(cfg.seed)
    d = np.asarray(cfg.difficulty_means, float)[:, None] + cfg.difficulty_spread * rng.standard_normal((K, P))
    a = np.zeros(K)
    b = np.zeros((K, P))
    M = np.eye(K) - (cfg.interference / max(K - 1, 1)) * (1.0 - np.eye(K))
    ctrl = make_weighting(wname, K, **_weighting_kwargs(wname, cfg))
    tracker = TaskRewardTracker(K, decay=cfg.reward_ema)
    gdro = adv_name is not None
    rollout = alloc_name is not None
    filtered = not (gdro or rollout or algo == "grpo")
    Sampler = _load_sampler() if (cfg.use_sampler and filtered) else None
    sampler_name = ("rp-sampler" if Sampler is not None else "direct") if filtered else "unfiltered"
    if filtered:
        kw = dict(oversample=cfg.oversample, max_rounds=cfg.max_rounds, acceptance_cap=cfg.acceptance_cap,
                  seed=cfg.seed + 1)
        sampler = (Sampler([P] * K, B, **kw) if Sampler is not None else
                   DynamicSampling([P] * K, B, filtered=True, oversample=cfg.oversample, max_rounds=cfg.max_rounds,
                                   seed=cfg.seed + 1))
    if not filtered:
        clf = DifficultyClassifier()
        pg = make_advantage_weighting(adv_name, clf.num_groups, eta=cfg.gdro_eta, signal=cfg.gdro_signal,
                                      share_normalize=cfg.gdro_share_normalize,
                                      share_floor=cfg.gdro_share_floor) if gdro else None
        ra = (make_rollout_allocation(alloc_name, clf.num_groups, n_min=cfg.n_min, n_max=cfg.n_max,
                                      n_mean=cfg.n_mean, seed=cfg.seed) if rollout else None)
    succ = [_sigmoid(a[:, None] + b - d).mean(axis=1)]
    W, ZG = [], []
    extra: dict[str, list] = {"q_gdro": [], "wse": [], "wse_uniform": [], "mu": [], "alloc_mean": [],
                              "max_weight": [], "bin_rollouts": []}

    for _ in range(cfg.steps):
        z = np.asarray(ctrl.weights, float)
        W.append(z.copy())
        p_all = _sigmoid(a[:, None] + b - d)
        drawn_cnt = np.zeros(K)
        drawn_zero = np.zeros(K)
        drawn_hits = np.zeros(K)
        drawn_rollouts = np.zeros(K)
        if filtered:
            sampler.start_step(z)
            ys: dict[tuple[int, int], np.ndarray] = {}
            while True:
                draw = sampler.next_round()
                if draw is None:
                    break
                t = np.asarray(draw.task_ids, np.int64)
                pi = np.asarray(draw.prompt_indices, np.int64)
                y = (rng.random((t.size, G)) < p_all[t, pi][:, None]).astype(np.float64)
                c = y.sum(axis=1)
                acc = informative_groups(y.reshape(-1), np.repeat(np.arange(t.size), G), t.size)
                sampler.report(draw.task_ids, draw.prompt_indices, acc)
                for k_, i_, row in zip(t.tolist(), pi.tolist(), y):
                    ys[(k_, i_)] = row
                drawn_cnt += np.bincount(t, minlength=K)
                drawn_zero += np.bincount(t, weights=(~acc).astype(float), minlength=K)
                drawn_hits += np.bincount(t, weights=c, minlength=K)
                drawn_rollouts += G * np.bincount(t, minlength=K)
            batch = sampler.finish()
            bt = np.asarray(batch.task_ids, np.int64)
            bp = np.asarray(batch.prompt_indices, np.int64)
            n = np.full(bt.size, G)
            Y = np.concatenate([ys[(k_, i_)] for k_, i_ in zip(bt.tolist(), bp.tolist())]) if bt.size else np.zeros(0)
        else:
            # GDRO runs: uniform draw over all prompts, no filtering (the classifier sees all)
            flat = rng.choice(K * P, size=B, replace=False)
            bt, bp = flat // P, flat % P
            ids = flat
            groups = clf.bins(ids)               # from history up to the previous step
            if rollout:
                n = ra.allocate(groups)
            else:
                n = np.full(B, G)
            Y = (rng.random(int(n.sum())) < np.repeat(p_all[bt, bp], n)).astype(np.float64)
            seg0 = np.repeat(np.arange(B), n)
            c = np.bincount(seg0, weights=Y, minlength=B)
            zero = ~informative_groups(Y, seg0, B)
            drawn_cnt += np.bincount(bt, minlength=K)
            drawn_zero += np.bincount(bt, weights=zero.astype(float), minlength=K)
            drawn_hits += np.bincount(bt, weights=c, minlength=K)
            drawn_rollouts += np.bincount(bt, weights=n.astype(float), minlength=K)
        ZG.append(np.where(drawn_cnt > 0, drawn_zero / np.maximum(drawn_cnt, 1), np.nan))
        J = tracker.update(np.where(drawn_rollouts > 0, drawn_hits / np.maximum(drawn_rollouts, 1), 0.0),
                           present=drawn_rollouts > 0)

        nb = bt.size
        if nb == 0:
            succ.append(succ[-1])
            continue
        seg = np.repeat(np.arange(nb), n)
        A = group_advantages_np(Y, seg)
        resp_w = np.ones(Y.size)
        if gdro:
            resp_groups = np.repeat(groups, n)
            resp_w = pg.response_weights(resp_groups)
        p_old = p_all[bt, bp]
        g = np.bincount(seg, weights=resp_w * A * (Y - p_old[seg]), minlength=nb) / n
        # policy update
        task_sig = np.bincount(bt, weights=g, minlength=K) / B
        damp = 1.0 / (1.0 + np.maximum(a, 0.0) / cfg.saturation)
        a = a + cfg.lr_task * damp * (M @ task_sig)
        np.add.at(b, (bt, bp), cfg.lr_prompt * g)
        # per-response clipped surrogate before / after, at the realised ratio
        p_new = _sigmoid(a[bt] + b[bt, bp] - d[bt, bp])
        pn, po = p_new[seg], p_old[seg]
        r = np.where(Y > 0.5, pn / po, (1.0 - pn) / (1.0 - po))
        loss_after = np.maximum(-A * r, -A * np.clip(r, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high))
        loss_before = -A
        resp_task = bt[seg]
        I = -(np.bincount(resp_task, weights=loss_after - loss_before, minlength=K))
        present = np.bincount(bt, minlength=K) > 0
        I = np.where(present, I, 0.0)
        I = I / {"prompts": nb, "responses": Y.size, "none": 1}[cfg.improvement_unit]
        # controller updates (one per step: the simulated step is one mini-batch)
        mabs = np.bincount(resp_task, weights=np.abs(A), minlength=K) / np.maximum(
            np.bincount(resp_task, minlength=K), 1)
        ctrl.observe(TaskStats.make(K, J, present=present, improvements=I if ctrl.needs_improvement else None,
                                    mean_abs_advantage=mabs))
        if gdro:
            # the adversary's signal: the UNWEIGHTED surrogate after the update, or the rewards
            pg.observe(resp_groups, loss_after, rewards=Y, prompt_of=seg)
            extra["q_gdro"].append(pg.distribution.copy())
        if not filtered:
            clf.update(ids, c > 0)
            if rollout:
                ra.observe(groups, n, Y)
                extra["mu"].append(ra.mu)
            # WSE with the true per-bin sigma of this batch's prompts vs uniform n
            pb = p_old
            cnt_b = np.bincount(groups, minlength=clf.num_groups).astype(float)
            pres = cnt_b > 0
            sig_b = np.sqrt(np.bincount(groups, weights=pb * (1 - pb), minlength=clf.num_groups)
                            / np.maximum(cnt_b, 1))
            n_b = np.bincount(groups, weights=n.astype(float), minlength=clf.num_groups) / np.maximum(cnt_b, 1)
            q_b = cnt_b / cnt_b.sum()
            extra["wse"].append(weighted_standard_error(q_b[pres], sig_b[pres], n_b[pres]))
            extra["wse_uniform"].append(weighted_standard_error(q_b[pres], sig_b[pres],
                                                                np.full(pres.sum(), float(n.mean()))))
            extra["alloc_mean"].append(float(n.mean()))
            extra["bin_rollouts"].append(np.bincount(groups, weights=n.astype(float), minlength=clf.num_groups))
        extra["max_weight"].append(float(np.max(ctrl.weights)))
        succ.append(_sigmoid(a[:, None] + b - d).mean(axis=1))
    out = {k: np.asarray(v) for k, v in extra.items() if len(v)}
    p_fin = _sigmoid(a[:, None] + b - d)
    out["pass_k"] = (1.0 - (1.0 - p_fin) ** cfg.pass_k).mean(axis=1)   # [K] final pass@k per task
    if not filtered:
        out["bin_counts"] = np.bincount(clf.bins(np.arange(K * P)), minlength=clf.num_groups)
    return SimResult(algo, np.asarray(succ), np.asarray(W), np.asarray(ZG), sampler_name, out)


def run_table(algos, cfg: SimConfig, seeds) -> list[dict[str, Any]]:
    """Final worst-task / average success (mean over seeds) per algorithm."""
    rows = []
    for algo in algos:
        res = [simulate(algo, replace(cfg, seed=s)) for s in seeds]
        rows.append({
            "algo": algo,
            "worst": float(np.mean([r.worst for r in res])),
            "average": float(np.mean([r.average for r in res])),
            "max_weight": float(np.mean([r.weights.max(axis=1).max() for r in res])),
            "switches": float(np.mean([int(np.sum(np.diff(np.argmax(r.weights, axis=1)) != 0)) for r in res])),
            "zero_grad": float(np.mean([np.nanmean(r.zero_grad_rate) for r in res])),
            "sampler": res[0].sampler,
            "results": res,
        })
    return rows

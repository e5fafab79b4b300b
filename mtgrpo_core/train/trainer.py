"""The training loop: supervised warm-up, then one of the algorithms of
:mod:`mtgrpo_core.algorithms` on a multi-task suite, with periodic evaluation, metrics and
checkpoints.

One RL step reads top to bottom (:meth:`Trainer.rl_step`; docs/ARCHITECTURE.md):

1. **Weights** z from the task-weighting controller (docs/ALGORITHMS.md sections 3-4).
2. **Collect rollouts** (:meth:`Trainer.collect_rollouts`): sampling rounds from the
   algorithm's sampler (the ratio-preserving sampler, or a mixed draw with task
   probabilities z), each round generating ``n`` completions per prompt (``rl.group_size``,
   or the rollout allocation's choice by difficulty bin), scoring them with the suite's
   verifiers and recording per-task accuracy J_k (before filtering) and the zero-gradient
   rate. With ``filter_zero_adv`` the zero-advantage groups are dropped and redrawn.
3. **Advantages** (group-normalised, ragged groups allowed), times the advantage
   weighting's per-response weights when the algorithm has one (Prompt-GDRO).
4. **Policy update**: ``rl.mini_batches`` optimiser updates of the fused clipped loss
   (:func:`mtgrpo_core.grpo_loss`), with a KL term to the frozen warm-started policy when
   ``loss.kl_coef > 0``. A weighting with ``needs_improvement`` (MT-GRPO's IWU) gets I_k
   measured on every mini-batch (the per-task sum of per-response losses on the same
   samples after the step minus before it, negated) and observes it right there.
5. **Observe**: the other controllers fold the step in (task weighting, advantage
   weighting, rollout allocation, then the difficulty classifier with "any rollout
   correct").

Then metrics (one JSON line per step), evaluation every ``eval.every`` steps and
checkpoints every ``checkpoint.every`` steps (atomic, exact resume).
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..algorithms import get_algorithm
from ..groups import informative_groups, per_task_mean
from ..pools import DynamicSampling
from ..weighting import TaskStats
from . import checkpoint as ckpt
from .config import TrainConfig, to_toml, weighting_kwargs
from .generation import generator_seed, make_generator
from .model import PAD, CharTokenizer, build_model, completion_logprobs


# ------------------------------------------------------------------------------- helpers
def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, torch.Tensor):
        return _jsonable(x.detach().cpu().tolist())
    if isinstance(x, (np.floating,)):
        x = float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def _auto_threads() -> int:
    """torch threads for ``run.threads = 0``: all cores on a quiet machine, one when the
    1-minute load already fills the cores (measured here: a warm-up step of the default model
    took 0.70 s with 2 threads vs 0.19 s with 1 thread at load 9 on 2 cores)."""
    n = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = 0.0
    return n if load < 0.75 * n else 1


@dataclass
class Groups:
    """Generated groups of one or more rounds (prompt-major)."""
    task_ids: np.ndarray        # [P] per prompt
    prompt_indices: np.ndarray  # [P]
    n: np.ndarray               # [P] completions per prompt
    rollouts: object            # generation.Rollouts over all completions
    rewards: np.ndarray         # [N]
    correct: np.ndarray         # [N] bool
    group_of: np.ndarray        # [N] prompt position in this Groups
    bins: np.ndarray | None = None   # [P] difficulty bin per prompt (GDRO algorithms), before generation


def _cat_rollouts(parts):
    from .generation import Rollouts

    if len(parts) == 1:
        return parts[0]

    def padcat(ts, value, left=False):
        L = max(t.shape[1] for t in ts)
        out = []
        for t in ts:
            pad = torch.full((t.shape[0], L - t.shape[1]), value, dtype=t.dtype)
            out.append(torch.cat([pad, t] if left else [t, pad], 1))
        return torch.cat(out, 0)

    off, idx = 0, []
    for p in parts:
        idx.append(p.prompt_index + off)
        off += int(p.prompt_index.max()) + 1 if len(p) else 0
    return Rollouts(torch.cat(idx), padcat([p.prompt_ids for p in parts], PAD, left=True),
                    padcat([p.prompt_mask for p in parts], 0, left=True),
                    padcat([p.completion_ids for p in parts], PAD),
                    padcat([p.completion_mask for p in parts], False),
                    padcat([p.sampling_logprobs for p in parts], 0.0),
                    [t for p in parts for t in p.texts])


# ------------------------------------------------------------------------------- trainer
class Trainer:
    """Runs one configured training job in ``cfg.run.out``.

    ``Trainer(cfg).run()`` does warm-up (unless ``run.init_from`` gives a starting
    checkpoint), evaluation before RL, RL with periodic evaluation and checkpoints, final
    evaluation, and writes ``metrics.jsonl``, ``summary.json`` and ``checkpoint.pt``.
    ``resume=True`` continues from ``out/checkpoint.pt`` exactly.
    """

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, console=None, generator=None):
        from . import tasks as tasks_mod

        self.cfg = cfg
        self.out = Path(cfg.run.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.resume = resume
        self.load0 = _load()
        self.threads = cfg.run.threads or _auto_threads()
        torch.set_num_threads(self.threads)
        dev = cfg.run.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        self.dtype = torch.bfloat16 if cfg.run.dtype == "bfloat16" else torch.float32
        self.console = console
        _seed_all(cfg.run.seed)
        kw = {"verifier": cfg.tasks.verifier}
        if cfg.tasks.train_size:
            kw["train_size"] = cfg.tasks.train_size
        if cfg.tasks.test_size:
            kw["test_size"] = cfg.tasks.test_size
        self.suite = tasks_mod.load_suite(cfg.tasks.suite, seed=cfg.tasks.seed, **kw)
        self.task_names = list(self.suite.task_names)
        self.K = len(self.task_names)
        self.tok = CharTokenizer()
        self.model = build_model(cfg.model, seed=cfg.run.seed, device=str(self.device), dtype=self.dtype)
        # a running generator may be passed in (tests share one vLLM engine across runs); the
        # weights it serves are replaced by the policy's before every generation
        if generator is not None:
            if getattr(generator, "name", None) != cfg.generation.backend:
                raise ValueError(f"generator: a {getattr(generator, 'name', type(generator).__name__)!r} "
                                 f"generator was passed but generation.backend is {cfg.generation.backend!r}")
            generator.reseed(generator_seed(cfg))   # the same draws as a generator built here
            self.generator = generator
        else:
            self.generator = make_generator(cfg, self.model, self.tok, str(self.out / "vllm_model"))
        self._owns_generator = generator is None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.rl.lr, weight_decay=cfg.rl.weight_decay)
        self.pool_sizes = [min(int(self.suite.pool_size(t, "train")), cfg.rl.pool_items) for t in self.task_names]
        self._prompt_cache: dict = {}
        self.step = 0
        self.phase = "warmup"
        self.rl_time = 0.0
        self.metric_lines = 0
        self.algo = get_algorithm(cfg.run.algo)
        self.ref_model = None   # the frozen warm-started policy, the KL reference (only when loss.kl_coef > 0)
        self._build_controllers()

    # ----------------------------------------------------------------- controllers
    def _build_controllers(self) -> None:
        """The algorithm's bundle (:mod:`mtgrpo_core.algorithms`) made concrete from the config."""
        from .. import gdro, weighting

        cfg, K, algo = self.cfg, self.K, self.algo
        m, g = cfg.mtgrpo, cfg.gdro
        self.weighting = weighting.make_weighting(algo.weighting, K, **weighting_kwargs(algo.weighting, cfg))
        self.tracker = weighting.TaskRewardTracker(K, decay=m.reward_ema, init=m.reward_init)
        # mtgrpo.rp_sampler = false swaps the RP sampler for the mixed draw (the IWU-without-RPS ablation)
        if algo.sampler == "ratio-preserving" and m.rp_sampler:
            from ..sampling import RatioPreservingSampler

            self.sampler = RatioPreservingSampler(
                self.pool_sizes, cfg.rl.batch_prompts, oversample=cfg.rl.oversample,
                max_rounds=cfg.rl.max_rounds, acceptance_cap=m.acceptance_cap, seed=cfg.run.seed,
                acceptance_aware=m.acceptance_aware, refill=m.refill, inflation=m.inflation,
                warmup_steps=m.ratio_warmup)
        else:
            self.sampler = DynamicSampling(self.pool_sizes, cfg.rl.batch_prompts, filtered=cfg.loss.filter_zero_adv,
                                           oversample=cfg.rl.oversample, max_rounds=cfg.rl.max_rounds,
                                           seed=cfg.run.seed + 1)
        self.clf = self.adv_weighting = self.alloc = None
        if algo.uses_difficulty_bins:
            self.clf = gdro.DifficultyClassifier(edges=tuple(g.edges), window=g.window, hysteresis=g.hysteresis,
                                                 unseen=g.unseen)
        if algo.advantage_weighting is not None:
            self.adv_weighting = gdro.make_advantage_weighting(algo.advantage_weighting, self.clf.num_groups,
                                                               eta=g.eta, gamma=g.gamma, ema=g.ema, cap=g.cap,
                                                               share_floor=g.share_floor, signal=g.signal)
        if algo.rollout_allocation is not None:   # the rule itself is gdro.allocator (sqrt | bandit)
            self.alloc = gdro.make_rollout_allocation(g.allocator, self.clf.num_groups, n_min=g.n_min,
                                                      n_max=g.n_max, n_mean=g.n_mean, eta=g.eta, gamma=g.gamma)
        self.batch_rng = np.random.default_rng(cfg.run.seed + 2)

    def _optional_controllers(self) -> dict:
        return {name: obj for name, obj in (("clf", self.clf), ("adv_weighting", self.adv_weighting),
                                            ("alloc", self.alloc)) if obj is not None}

    def _controllers_state(self) -> dict:
        d = {"weights": self.weighting.state_dict(), "tracker": self.tracker.state_dict(),
             "sampler": self.sampler.state_dict(), "batch_rng": self.batch_rng.bit_generator.state}
        d.update({name: obj.state_dict() for name, obj in self._optional_controllers().items()})
        return d

    def _load_controllers(self, d: dict) -> None:
        self.weighting.load_state_dict(d["weights"])
        self.tracker.load_state_dict(d["tracker"])
        self.sampler.load_state_dict(d["sampler"])
        self.batch_rng.bit_generator.state = d["batch_rng"]
        for name, obj in self._optional_controllers().items():
            obj.load_state_dict(d[name])

    # ----------------------------------------------------------------- prompts
    def prompts(self, k: int, split: str, indices) -> list:
        key_missing = [int(i) for i in indices if (k, split, int(i)) not in self._prompt_cache]
        if key_missing:
            for p, i in zip(self.suite.prompts(self.task_names[k], split, key_missing), key_missing):
                self._prompt_cache[(k, split, i)] = p
        return [self._prompt_cache[(k, split, int(i))] for i in indices]

    def prompts_mixed(self, task_ids, indices, split="train") -> list:
        out = [None] * len(task_ids)
        for k in range(self.K):
            pos = [j for j, t in enumerate(task_ids) if int(t) == k]
            if pos:
                for j, p in zip(pos, self.prompts(k, split, [indices[j] for j in pos])):
                    out[j] = p
        return out

    def score(self, prompts, texts) -> tuple[np.ndarray, np.ndarray]:
        rewards, correct = self.suite.evaluate(prompts, texts)  # one verifier pass for both
        return np.asarray(rewards, dtype=np.float64), np.asarray(correct, dtype=bool)

    # ----------------------------------------------------------------- metrics / output
    def _log(self, rec: dict) -> None:
        rec = _jsonable(rec)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.metric_lines += 1

    def _print(self, *a, **k) -> None:
        if self.console is not None:
            self.console.print(*a, **k)

    def save_checkpoint(self) -> None:
        state = {
            "format": 1, "config": self.cfg.to_dict(), "step": self.step, "phase": self.phase,
            "rl_time": self.rl_time, "metric_lines": self.metric_lines,
            "model": self.model.state_dict(), "opt": self.opt.state_dict(),
            "controllers": self._controllers_state(), "generator": self.generator.state_dict(),
            "rng": ckpt.rng_state(), "task_names": self.task_names,
            "verifier_stats": dict(getattr(self.suite, "verifier_stats", {})),  # restored on resume
        }
        if self.ref_model is not None:
            state["ref_model"] = self.ref_model.state_dict()
        ckpt.save_atomic(state, self.out / ckpt.CKPT_NAME)

    def load_checkpoint(self, path, *, full: bool = True) -> dict:
        st = ckpt.load(path)
        self.model.load_state_dict(st["model"])
        if full:
            self.opt.load_state_dict(st["opt"])
            self._load_controllers(st["controllers"])
            self.generator.load_state_dict(st["generator"])
            ckpt.set_rng_state(st["rng"])
            if "verifier_stats" in st and hasattr(self.suite, "load_verifier_stats"):
                self.suite.load_verifier_stats(st["verifier_stats"])
            self.step, self.phase = int(st["step"]), st["phase"]
            self.rl_time, self.metric_lines = float(st["rl_time"]), int(st["metric_lines"])
            if "ref_model" in st:
                self._freeze_reference()
                self.ref_model.load_state_dict(st["ref_model"])
            mpath = self.out / "metrics.jsonl"
            lines = mpath.read_text().splitlines(True) if mpath.exists() else []
            ckpt.write_text_atomic(mpath, "".join(lines[:self.metric_lines]))
        return st

    def _freeze_reference(self) -> None:
        """The KL reference: a frozen copy of the policy as it enters RL (after the warm-up or
        ``run.init_from``). Only built when ``loss.kl_coef > 0`` (it costs one forward pass of
        every response per step)."""
        if self.cfg.loss.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)

    # ----------------------------------------------------------------- warm-up
    def warmup(self) -> dict:
        from .warmup import supervised_warmup

        return supervised_warmup(self)

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, split: str = "test", tag: str = "eval") -> dict:
        """Per task: greedy accuracy, mean@k and pass@k of ``eval.k`` samples at
        ``eval.temperature`` on the first ``eval.n_items`` items of ``split``."""
        e, r = self.cfg.eval, self.cfg.rl
        t0 = time.time()
        res = {}
        # evaluation draws from its own seed (the same for every run of a seed, so runs are
        # compared on the same sampling noise) and leaves the training RNG untouched
        self.generator.sync_weights(self.model)
        gen_state = self.generator.state_dict()
        self.generator.reseed(self.cfg.run.seed * 7919 + 104729)
        for k, name in enumerate(self.task_names):
            n_items = min(e.n_items, int(self.suite.pool_size(name, split)))
            ps = self.prompts(k, split, range(n_items))
            texts = [p.text for p in ps]
            row = {"n_items": n_items}
            if e.greedy:
                ro = self.generator.generate(texts, 1, max_new_tokens=r.max_new_tokens, greedy=True)
                _, c = self.score(ps, ro.texts)
                row["greedy"] = float(c.mean())
            ro = self.generator.generate(texts, e.k, max_new_tokens=r.max_new_tokens,
                                         temperature=e.temperature, top_p=1.0)
            _, c = self.score([ps[int(i)] for i in ro.prompt_index], ro.texts)
            c = c.reshape(n_items, e.k)
            row["mean_at_k"] = float(c.mean())
            row["pass_at_k"] = float(c.any(1).mean())
            res[name] = row
        self.generator.load_state_dict(gen_state)
        out = {"kind": "eval", "tag": tag, "split": split, "step": self.step, "k": e.k, "tasks": res,
               "worst_mean_at_k": min(v["mean_at_k"] for v in res.values()),
               "avg_mean_at_k": float(np.mean([v["mean_at_k"] for v in res.values()])),
               "eval_time_s": time.time() - t0}
        if e.greedy:
            out["worst_greedy"] = min(v["greedy"] for v in res.values())
            out["avg_greedy"] = float(np.mean([v["greedy"] for v in res.values()]))
        return out

    def _print_eval(self, ev: dict, title: str) -> None:
        if self.console is None:
            return
        from rich.table import Table

        t = Table(title=f"{title} ({ev['split']}, step {ev['step']}, {ev['eval_time_s']:.1f} s)")
        t.add_column("task")
        t.add_column("items", justify="right")
        if self.cfg.eval.greedy:
            t.add_column("greedy %", justify="right")
        t.add_column(f"mean@{ev['k']} %", justify="right")
        t.add_column(f"pass@{ev['k']} %", justify="right")
        for name, v in ev["tasks"].items():
            row = [name, str(v["n_items"])]
            if self.cfg.eval.greedy:
                row.append(f"{100 * v['greedy']:.1f}")
            row += [f"{100 * v['mean_at_k']:.1f}", f"{100 * v['pass_at_k']:.1f}"]
            t.add_row(*row)
        self.console.print(t)

    # ----------------------------------------------------------------- rollouts
    def generate_groups(self, task_ids, prompt_indices, n, bins=None) -> Groups:
        ps = self.prompts_mixed(task_ids, prompt_indices)
        r = self.cfg.rl
        ro = self.generator.generate([p.text for p in ps], [int(x) for x in n], max_new_tokens=r.max_new_tokens,
                                     temperature=r.temperature, top_p=r.top_p)
        pi = ro.prompt_index.numpy()
        rewards, correct = self.score([ps[int(i)] for i in pi], ro.texts)
        return Groups(np.asarray(task_ids, np.int64), np.asarray(prompt_indices, np.int64), np.asarray(n, np.int64),
                      ro, rewards, correct, pi, None if bins is None else np.asarray(bins, np.int64))

    def _round_stats(self, g: Groups, informative: np.ndarray, acc: dict) -> None:
        """Accumulate per-task correct / rollouts / groups / zero-adv groups over rounds."""
        t_resp = g.task_ids[g.group_of]
        acc["correct"] += np.bincount(t_resp, weights=g.correct.astype(np.float64), minlength=self.K)
        acc["rollouts"] += np.bincount(t_resp, minlength=self.K)
        acc["groups"] += np.bincount(g.task_ids, minlength=self.K)
        acc["zero_groups"] += np.bincount(g.task_ids, weights=(~informative).astype(np.float64), minlength=self.K)
        acc["reward"] += np.bincount(t_resp, weights=g.rewards, minlength=self.K)

    def collect_rollouts(self, z: np.ndarray) -> tuple[Groups, dict]:
        """Sampling rounds until the sampler stops; returns the selected groups and stats.

        Each round: the sampler's draw, the difficulty bins of the drawn prompts (from the
        history up to the previous step; GDRO algorithms only), the rollouts per prompt
        (the rollout allocation's, else ``rl.group_size``), generation and scoring, then
        J_k of the round's rollouts into the reward tracker and the zero-advantage filter's
        verdict back to the sampler.
        """
        cfg = self.cfg
        acc = {k: np.zeros(self.K) for k in ("correct", "rollouts", "groups", "zero_groups", "reward")}
        filt = bool(cfg.loss.filter_zero_adv)
        parts: list[Groups] = []
        self.sampler.start_step(np.asarray(z, np.float64))
        while True:
            draw = self.sampler.next_round()
            if draw is None:
                break
            t_ids, p_idx = np.asarray(draw.task_ids), np.asarray(draw.prompt_indices)
            bins = None if self.clf is None else np.asarray(self.clf.bins(self.prompt_uids(t_ids, p_idx)))
            n = (np.full(len(t_ids), cfg.rl.group_size) if self.alloc is None
                 else np.asarray(self.alloc.allocate(bins), np.int64))
            g = self.generate_groups(t_ids, p_idx, n, bins)
            informative = informative_groups(g.rewards, g.group_of, len(g.task_ids))
            keep = informative
            if cfg.loss.filter_rule == "strict":   # also drop groups without one full-reward response
                full = np.zeros(len(g.task_ids), bool)
                np.logical_or.at(full, g.group_of, g.rewards >= 1.0 - 1e-6)
                keep = informative & full
            self._round_stats(g, informative, acc)
            # J_k: accuracy of this round's rollouts for the tasks present in it
            J, present = per_task_mean(g.correct.astype(np.float64), g.task_ids[g.group_of], self.K)
            self.tracker.update(J, present)
            self.sampler.report(t_ids, p_idx, keep if filt else np.ones(len(t_ids), bool))
            parts.append(g)
        batch = self.sampler.finish()
        where = {}
        for pi, g in enumerate(parts):
            for j, (t, i) in enumerate(zip(g.task_ids, g.prompt_indices)):
                where[(int(t), int(i))] = (pi, j)
        kept = [where[(int(t), int(i))] for t, i in zip(batch.task_ids, batch.prompt_indices)]
        info = {"rounds": len(parts), "targets": np.asarray(batch.targets), "realized": np.asarray(batch.realized),
                "shortfall": int(batch.shortfall)}
        return self._select(parts, kept), {**info, **acc}

    def _select(self, parts, kept) -> Groups:
        """Gather the kept prompts' groups from the rounds into one Groups."""
        from .generation import Rollouts

        all_ro = _cat_rollouts([p.rollouts for p in parts])
        resp_off = np.cumsum([0] + [len(p.rollouts) for p in parts])
        rows, t, i, n, gof, bins = [], [], [], [], [], []
        for new_j, (pi, j) in enumerate(kept):
            g = parts[pi]
            r = np.nonzero(g.group_of == j)[0] + resp_off[pi]
            rows.append(r)
            t.append(g.task_ids[j])
            i.append(g.prompt_indices[j])
            n.append(g.n[j])
            gof.append(np.full(len(r), new_j))
            if g.bins is not None:
                bins.append(g.bins[j])
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        rr = torch.as_tensor(rows, dtype=torch.long)
        rewards = np.concatenate([p.rewards for p in parts])[rows]
        correct = np.concatenate([p.correct for p in parts])[rows]
        gof = np.concatenate(gof) if gof else np.zeros(0, np.int64)
        ro = Rollouts(torch.as_tensor(gof), all_ro.prompt_ids[rr], all_ro.prompt_mask[rr], all_ro.completion_ids[rr],
                      all_ro.completion_mask[rr], all_ro.sampling_logprobs[rr], [all_ro.texts[k] for k in rows])
        return Groups(np.asarray(t, np.int64), np.asarray(i, np.int64), np.asarray(n, np.int64), ro,
                      rewards, correct, gof, np.asarray(bins, np.int64) if self.clf is not None else None)

    def prompt_uids(self, task_ids, prompt_indices) -> np.ndarray:
        """Stable integer id of a training prompt (task index, pool index)."""
        return np.asarray(task_ids, np.int64) * 1_000_000_000 + np.asarray(prompt_indices, np.int64)

    # ----------------------------------------------------------------- one RL step
    def _loss(self, logp, old, mask, adv, seq_w, task_ids, ref=None, roll=None):
        """grpo_loss with the config's form; ``roll``: the rollouts' sampling log-probs, used by
        the IS correction (loss.is_correction) of the train / rollout mismatch."""
        import mtgrpo_core as mc

        lo = self.cfg.loss
        isc = None if lo.is_correction == "none" else lo.is_correction
        return mc.grpo_loss(logp, old, mask, adv, seq_weights=seq_w, clip_eps_low=lo.clip_eps_low,
                            clip_eps_high=lo.clip_eps_high, loss_agg=lo.loss_agg, ref_logprobs=ref,
                            kl_coef=lo.kl_coef if ref is not None else 0.0, task_ids=task_ids, num_tasks=self.K,
                            backend=lo.backend, policy_loss=lo.policy_loss, is_correction=isc, is_lo=lo.is_lo,
                            is_hi=lo.is_hi, rollout_logprobs=roll if isc is not None else None)

    def rl_step(self) -> dict:
        """One RL step: weights -> collect rollouts -> advantages -> policy update -> observe."""
        t0 = time.time()
        self.generator.sync_weights(self.model)   # vLLM: load the trained weights; HF: same object
        z = np.asarray(self.weighting.weights, np.float64)                        # 1. weights
        batch, info = self.collect_rollouts(z)                                    # 2. rollouts
        t_gen = time.time() - t0
        rec = self._step_record(z, batch, info)
        if len(batch.task_ids) == 0:
            rec["skipped"] = True
            self.step += 1
            rec["time_s"] = time.time() - t0
            return rec
        adv, seq_w = self.advantages(batch)                                       # 3. advantages
        upd = self.policy_update(batch, adv, seq_w)                               # 4. update (+ I_k)
        self.observe(batch, adv, upd["per_response_loss"])                        # 5. observe
        self.step += 1
        rec.update(upd["metrics"])
        rec.update(self.weighting.metrics())
        if self.adv_weighting is not None:
            rec.update(self.adv_weighting.metrics())
        if self.alloc is not None:
            rec.update(self.alloc.metrics())
        rec["weights_after"] = np.asarray(self.weighting.weights, np.float64)
        rec["completion_len"] = float(batch.rollouts.completion_mask.sum(1).float().mean())
        rec["gen_time_s"] = t_gen
        rec["time_s"] = time.time() - t0
        return rec

    def _step_record(self, z: np.ndarray, batch: Groups, info: dict) -> dict:
        rec = {"kind": "train", "step": self.step + 1, "algo": self.cfg.run.algo, "weights": z,
               "rounds": info["rounds"], "targets": info["targets"], "realized": info["realized"],
               "shortfall": info["shortfall"], "batch_prompts": len(batch.task_ids)}
        rol = np.maximum(info["rollouts"], 1)
        rec["train_acc"] = info["correct"] / rol
        rec["train_reward"] = info["reward"] / rol
        rec["zero_grad_rate"] = info["zero_groups"] / np.maximum(info["groups"], 1)
        rec["rollouts_per_task"] = info["rollouts"]
        rec["J"] = np.asarray(self.tracker.values, np.float64)
        if batch.bins is not None and len(batch.task_ids):
            G = self.clf.num_groups
            rec["bin_prompts"] = np.bincount(batch.bins, minlength=G)
            rec["bin_rollouts"] = np.bincount(batch.bins, weights=batch.n.astype(np.float64), minlength=G)
        if self.alloc is not None and len(batch.task_ids):
            rec["n_per_prompt_mean"] = float(batch.n.mean())
        return rec

    def advantages(self, batch: Groups) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Group-normalised advantages [N] and the advantage weighting's per-response
        multipliers [N] (None without one)."""
        import mtgrpo_core as mc

        lo = self.cfg.loss
        rewards = torch.as_tensor(batch.rewards, dtype=torch.float32)
        adv = mc.group_advantages(rewards, torch.as_tensor(batch.group_of, dtype=torch.long), scale=lo.adv_scale,
                                  clip=lo.adv_clip)
        seq_w = None
        if self.adv_weighting is not None:
            w = self.adv_weighting.response_weights(batch.bins[batch.group_of])
            seq_w = None if w is None else torch.as_tensor(np.asarray(w), dtype=torch.float32)
        return adv, seq_w

    @torch.no_grad()
    def _mismatch(self, ro, old_all: torch.Tensor) -> dict:
        """Train/inference mismatch of this step's tokens: the generator's sampling log-probs
        against the trainer's recomputed log-probs of the same policy (``old_all``, at
        temperature 1; recomputed at ``rl.temperature`` when that differs). Mean and max
        |Δ log p| and the share of tokens whose ratio exp(Δ) lies outside [0.5, 2]. With
        ``rl.top_p < 1`` the sampling side is renormalised over the nucleus and the figures
        include that (log Z of the kept mass)."""
        mask = ro.completion_mask.bool()
        if not bool(mask.any()):
            return {"mismatch_mean_abs": None, "mismatch_max_abs": None, "mismatch_ratio_out": None}
        T = float(self.cfg.rl.temperature)
        train_lp = old_all
        if T != 1.0:
            dev = self.device
            train_lp = completion_logprobs(self.model, ro.prompt_ids.to(dev), ro.prompt_mask.to(dev),
                                           ro.completion_ids.to(dev), ro.completion_mask.to(dev),
                                           temperature=T).float()
        d = (ro.sampling_logprobs.to(train_lp.device).float() - train_lp)[mask.to(train_lp.device)].abs()
        return {"mismatch_mean_abs": float(d.mean()), "mismatch_max_abs": float(d.max()),
                "mismatch_ratio_out": float((d > math.log(2.0)).float().mean())}

    def policy_update(self, batch: Groups, adv: torch.Tensor, seq_w: torch.Tensor | None) -> dict:
        """``rl.mini_batches`` optimiser updates over whole groups; returns the per-response
        loss before each update [N] and the step's loss metrics. A weighting that
        ``needs_improvement`` observes I_k after every mini-batch."""
        cfg, K, dev = self.cfg, self.K, self.device
        ro = batch.rollouts
        task_resp = torch.as_tensor(batch.task_ids[batch.group_of], dtype=torch.long)
        P = len(batch.task_ids)
        order = self.batch_rng.permutation(P)
        chunks = [c for c in np.array_split(order, min(cfg.rl.mini_batches, P)) if len(c)]
        mask_all = ro.completion_mask
        measure_I = bool(self.weighting.needs_improvement)
        self.model.train()
        # old log-probs: the policy before this step's first update; reference: the frozen warm start
        with torch.no_grad():
            old_all = completion_logprobs(self.model, ro.prompt_ids.to(dev), ro.prompt_mask.to(dev),
                                          ro.completion_ids.to(dev), mask_all.to(dev)).float()
            mismatch = self._mismatch(ro, old_all)
            ref_all = None
            if self.ref_model is not None:
                ref_all = completion_logprobs(self.ref_model, ro.prompt_ids.to(dev), ro.prompt_mask.to(dev),
                                              ro.completion_ids.to(dev), mask_all.to(dev)).float()
        losses, I_hist, stats_acc = [], [], []
        per_resp_loss = torch.zeros(len(ro))
        for c in chunks:
            sel = torch.as_tensor(np.nonzero(np.isin(batch.group_of, c))[0], dtype=torch.long)
            pid, pm = ro.prompt_ids[sel].to(dev), ro.prompt_mask[sel].to(dev)
            cid, cm = ro.completion_ids[sel].to(dev), mask_all[sel].to(dev)
            old = old_all[sel.to(dev)]
            ref = ref_all[sel.to(dev)] if ref_all is not None else None
            a = adv[sel].to(dev)
            sw = seq_w[sel].to(dev) if seq_w is not None else None
            tids = task_resp[sel].to(dev)
            roll = ro.sampling_logprobs[sel].to(dev).float() if cfg.loss.is_correction != "none" else None
            logp = completion_logprobs(self.model, pid, pm, cid, cm).float()
            loss, st = self._loss(logp, old, cm, a, sw, tids, ref, roll)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.rl.grad_clip)
                  if cfg.rl.grad_clip > 0 else None)
            self.opt.step()
            before = st.per_sequence_loss.detach().float().cpu()
            if sw is None:
                per_resp_loss[sel] = before
            else:
                # the adversary sees the UNWEIGHTED surrogate (no GDRO multiplier, no KL): the
                # weighted one feeds q back into itself and locked q at 0.991 on an arbitrary
                # bin in issue 14's stream where the hardest bin should lead with 0.30
                with torch.no_grad():
                    _, st_u = self._loss(logp.detach(), old, cm, a, None, tids, None, roll)
                per_resp_loss[sel] = st_u.per_sequence_loss.detach().float().cpu()
            losses.append(float(loss.detach()))
            stats_acc.append({"clip_frac_low": float(st.clip_frac_low), "clip_frac_high": float(st.clip_frac_high),
                              "ratio_mean": float(st.ratio_mean), "approx_kl": float(st.approx_kl),
                              "grad_norm": float(gn) if gn is not None else None,
                              "task_loss_sum": st.task_loss_sum.detach().float().cpu().numpy()
                              if getattr(st, "task_loss_sum", None) is not None else None})
            if ref is not None:
                stats_acc[-1]["ref_kl"] = float(st.ref_kl_mean)
            if roll is not None:  # the IS correction's mean weight and share truncated / masked
                stats_acc[-1]["is_ratio_mean"] = float(st.is_ratio_mean)
                stats_acc[-1]["is_clip_frac"] = float(st.is_clip_frac)
            if measure_I:
                with torch.no_grad():
                    logp2 = completion_logprobs(self.model, pid, pm, cid, cm).float()
                    _, st2 = self._loss(logp2, old, cm, a, sw, tids, ref, roll)
                after = st2.per_sequence_loss.detach().float().cpu()
                tk = tids.cpu().numpy()
                I = -(np.bincount(tk, weights=after.numpy().astype(np.float64), minlength=K)
                      - np.bincount(tk, weights=before.numpy().astype(np.float64), minlength=K))
                I_hist.append(I)
                self.weighting.observe(TaskStats.make(K, self.tracker.values, improvements=I))
        metrics = {"loss": float(np.mean(losses))}
        for k in stats_acc[0]:
            vals = [s[k] for s in stats_acc if s[k] is not None]
            if k == "task_loss_sum":   # per-task loss sums from the fused kernel, summed over mini-batches
                metrics[k] = np.sum(vals, 0) if vals else None
            else:
                metrics[k] = float(np.mean(vals)) if vals else None
        if I_hist:
            metrics["improvement"] = np.mean(I_hist, 0)
        metrics.update(mismatch)
        return {"per_response_loss": per_resp_loss.numpy(), "metrics": metrics}

    def observe(self, batch: Groups, adv: torch.Tensor, per_response_loss: np.ndarray) -> None:
        """Every controller folds the step in: the task weighting (unless it observed per
        mini-batch), the advantage weighting, the rollout allocation, then the classifier."""
        task_resp = batch.task_ids[batch.group_of]
        if not self.weighting.needs_improvement:
            mabs, present = per_task_mean(adv.abs().numpy().astype(np.float64), task_resp, self.K)
            self.weighting.observe(TaskStats.make(self.K, self.tracker.values, present=present,
                                                  mean_abs_advantage=mabs))
        if self.adv_weighting is not None:
            if getattr(self.adv_weighting, "needs_rewards", False):   # reward-based adversary signals
                self.adv_weighting.observe(batch.bins[batch.group_of], per_response_loss,
                                           rewards=np.asarray(batch.rewards, np.float64), prompt_of=batch.group_of)
            else:
                self.adv_weighting.observe(batch.bins[batch.group_of], per_response_loss)
        if self.alloc is not None:
            P = len(batch.task_ids)
            self.alloc.observe(batch.bins, batch.n, [batch.rewards[batch.group_of == j] for j in range(P)])
        if self.clf is not None:
            any_c = np.zeros(len(batch.task_ids), bool)
            np.logical_or.at(any_c, batch.group_of, batch.correct)
            self.clf.update(self.prompt_uids(batch.task_ids, batch.prompt_indices), any_c)

    # ----------------------------------------------------------------- the run
    def run(self) -> dict:
        cfg = self.cfg
        ck = self.out / ckpt.CKPT_NAME
        ckpt.remove_stale_tmp(self.out)  # temp files of a writer that was killed mid-write
        if self.resume and not ck.exists():
            # killed before its first checkpoint (during the warm-up): nothing to resume from
            self._print(f"[yellow]resume: no checkpoint in {self.out} yet; starting the run from the beginning")
            self.resume = False
        if self.resume:
            self.load_checkpoint(ck)
            self._print(f"[bold]resumed[/] {ck} at step {self.step} ({self.phase})")
        else:
            (self.out / "metrics.jsonl").write_text("")
            ckpt.write_text_atomic(self.out / "config.toml", to_toml(cfg))
        if self.phase == "warmup":
            if cfg.run.init_from:
                st = ckpt.load(cfg.run.init_from)
                self.model.load_state_dict(st["model"])
                self._log({"kind": "init", "from": cfg.run.init_from})
            elif cfg.warmup.steps > 0:
                self._log(self.warmup())
                if cfg.checkpoint.keep_warmup:   # reusable start point: run.init_from=OUT/warmup.pt
                    ckpt.save_atomic({"model": self.model.state_dict(), "config": cfg.to_dict(), "phase": "warmup"},
                                     self.out / "warmup.pt")
            ev = self.evaluate("test", tag="before")
            self._log(ev)
            self._print_eval(ev, "before RL")
            self._freeze_reference()
            self.phase = "rl"
            self.save_checkpoint()
        if self.phase == "rl":
            self._rl_loop()
            self.phase = "done"
            ev = self.evaluate("test", tag="after")
            self._log(ev)
            self._print_eval(ev, "after RL")
            self.save_checkpoint()
        summary = self.write_summary()
        try:
            self.suite.close()
        except Exception:  # pragma: no cover
            pass
        if self._owns_generator and hasattr(self.generator, "close"):   # vLLM: stop the engine processes
            self.generator.close()
        return summary

    def _rl_loop(self) -> None:
        cfg = self.cfg
        total = cfg.rl.steps
        prog = None
        if cfg.run.progress and self.console is not None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            prog = Progress(TextColumn("[bold]RL {task.fields[algo]}"), BarColumn(),
                            TextColumn("{task.percentage:>3.0f}%"),
                            TimeElapsedColumn(), TextColumn("{task.fields[msg]}"), console=self.console,
                            transient=False)
            prog.start()
            timed = bool(cfg.rl.max_time_s)   # a wall-clock budget: the bar shows seconds of it
            bar = prog.add_task("rl", total=cfg.rl.max_time_s if timed else total,
                                completed=self.rl_time if timed else self.step, algo=cfg.run.algo, msg="")
        try:
            while self.step < total:
                if cfg.rl.max_time_s and self.rl_time >= cfg.rl.max_time_s:
                    self._log({"kind": "stop", "reason": "rl.max_time_s", "step": self.step})
                    break
                t0 = time.time()
                rec = self.rl_step()
                self.rl_time += time.time() - t0
                rec["rl_time_s"] = self.rl_time
                self._log(rec)
                if prog is not None:
                    acc = " ".join(f"{a:.2f}" for a in rec["train_acc"])
                    w = " ".join(f"{a:.2f}" for a in rec["weights_after"]) if "weights_after" in rec else ""
                    prog.update(bar, completed=min(self.rl_time, cfg.rl.max_time_s) if timed else self.step,
                                msg=f"step {self.step} | batch acc {acc} | z {w}")
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < total:
                    ev = self.evaluate("test", tag="periodic")
                    self._log(ev)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save_checkpoint()
        finally:
            if prog is not None:
                prog.stop()

    def write_summary(self) -> dict:
        recs = read_metrics(self.out)
        evs = [r for r in recs if r.get("kind") == "eval"]
        before = next((r for r in evs if r.get("tag") == "before"), None)
        after = next((r for r in reversed(evs) if r.get("tag") == "after"), None)
        trains = [r for r in recs if r.get("kind") == "train"]
        summary = {"algo": self.cfg.run.algo, "seed": self.cfg.run.seed, "steps": self.step,
                   "torch_threads": self.threads, "load_at_start": self.load0,
                   "rl_time_s": self.rl_time, "task_names": self.task_names, "before": before, "after": after,
                   "verifier_stats": _jsonable(getattr(self.suite, "verifier_stats", {})),
                   "mean_step_time_s": float(np.mean([r["time_s"] for r in trains])) if trains else None}
        ckpt.write_text_atomic(self.out / "summary.json", json.dumps(_jsonable(summary), indent=2))
        return summary


def _load() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except OSError:  # pragma: no cover
        return None


def read_metrics(run_dir) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            out.append(json.loads(line))
    return out


def train(cfg: TrainConfig, *, resume: bool = False, console=None, generator=None) -> dict:
    """Run one training job; returns the summary dict (also written to ``summary.json``).
    ``generator``: an already running generator of the same model architecture (optional)."""
    return Trainer(cfg, resume=resume, console=console, generator=generator).run()

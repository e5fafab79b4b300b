"""TRL integration (tested against TRL 1.16): ``MTGRPOTrainer``, a ``GRPOTrainer`` whose
loss is :func:`mtgrpo_core.grpo_loss` and whose batches are task-weighted and
ratio-preserving (MT-GRPO, arXiv 2602.05547).

What
----
* Loss: TRL's ``_compute_loss`` for every ``loss_type`` ("grpo", "bnpo", "dr_grpo", "dapo",
  "cispo", "sapo", "luspo", "vespo"; the mapping is :func:`trl_loss_kwargs`) and every
  ``vllm_importance_sampling_mode`` (computed in the kernel from the sampling log-probs) with
  the same inputs, computed by the fused kernel (C++ on CPU, Triton on GPU); for the PPO forms:
  ``-min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A)`` with ``delta`` as the ratio cap,
  ``importance_sampling_level`` token / sequence, k3 KL times ``beta``; the normalisers are
  TRL's: grpo = mean over all rows of token means / GA steps, bnpo = local token mean / GA,
  dr_grpo = sum / (B * max_completion_length) / GA, dapo = sum / (num_items_in_batch /
  processes * GA / steps_per_generation) (GA = the current gradient-accumulation steps, in
  training only). Per-token multipliers TRL applies (top-entropy mask, off-policy sequence
  mask; both >= 0) are folded into token-level advantages, which
  gives the same values and gradients. Differences: the library clamps log-ratios to
  [-20, 20] and the k3 value to [-10, 10] (verl's guards; TRL has none), which only matters
  for ratios beyond e^20. TRL's default ``use_bias_correction_kl=True`` (k3 KL times the
  importance ratio) is added in torch next to the kernel's policy term; with it off the k3
  KL is fused in the kernel. ``delta`` matches exactly when ``delta >= 1 + epsilon_high``
  (TRL clips the uncapped ratio). Not supported (ValueError at construction): the entropy
  bonus (``entropy_coef`` / adaptive entropy) and the MoE
  auxiliary loss.
* Batches: each generation batch of ``P = generation_batch_size / num_generations`` prompts
  holds task ``k`` exactly ``n_k`` times (``target_counts`` of the task weights ``z``,
  inflated by ``1 / (1 - rho_k)`` when ``acceptance_aware``), the task being the dataset's
  ``task_column``. After each generation the trainer folds the rewards in (per-task accuracy
  EMA ``J``, zero-advantage share ``rho``) and updates ``z`` with the chosen controller
  (MT-GRPO IWU by default). Logged: ``task/<name>/accuracy``,
  ``accuracy_ema``, ``weight``, ``zero_adv_frac``, ``filtered_ratio``, ``loss``.
* Improvement signal (issue 23): with a weighting that uses I_k (MT-GRPO's IWU, the default;
  ``measure_improvement=None`` means "when the weighting needs it") the trainer keeps the
  per-row losses of every micro-batch of an optimiser step, recomputes them on the same rows
  with the updated parameters right after the step (a callback's ``on_step_end``; one extra
  no-grad forward per micro-batch), and sets I_k = -(after - before) summed over task k's
  rows of all processes, as ``train/trainer.py`` does per mini-batch; the controller then
  observes (J, I) once per optimiser step. Logged: ``task/<name>/improvement``,
  ``improvement/time_s`` and ``improvement/time_share`` (its share of the step's wall time).
* Generation rounds (issue 23, ``max_generation_rounds=R > 1``): each generation batch is
  built in up to R rounds by a :class:`~mtgrpo_core.sampling.RatioPreservingSampler`
  (batch size P = prompts per generation batch, ``oversample=1``, ``refill`` =
  fill-then-deficit, the released code's): round 1 draws P prompts with the task weights
  inflated by acceptance, the groups whose rewards are all equal are reported as rejected,
  and later rounds draw P prompts again (from the weights while fewer than P groups are
  accepted, then from the per-task deficits) until every quota is met or R rounds ran. The
  sampler's selection (each task's quota, then a top-up) is padded to P groups with the
  step's other groups (their advantage set to 0), so TRL's shapes stay fixed. Every round
  generates a whole batch (P x num_generations rows over all processes); the dataloader's
  batch is then only the clock of the step. With several processes the round outputs are
  gathered (``gather_object``) and each rank takes its share of the selection. Logged:
  ``generation/rounds``, ``generation/shortfall`` (P minus the accepted groups in the
  batch) and ``task/<name>/informative_frac`` (informative share of the groups drawn).
  ``scale_rewards="batch"`` normalises within each round. Text batches only.
* Prompt-GDRO (``advantage_weighting="prompt-gdro"``, issue 23): each generation batch's
  advantages (after the rounds, if any) are multiplied by the adversary's per-response
  weights (:class:`mtgrpo_core.integrations.verl.PromptGDROAdvantage`, the estimator verl
  uses): bins from each prompt's pass@k history over the earlier steps (prompt id =
  ``prompt_id_column``, else a hash of the prompt), signal "learnability" by default
  ("surrogate" is refused: it is 0 in expectation). Its state is checkpointed with the
  task weighting's.
* Dynamic sampling (``dynamic_sampling=True``): the rounds (default 4) without a task
  column are DAPO's dynamic sampling: one task, zero-advantage groups dropped and redrawn
  until the batch is full or the rounds run out; any supported ``loss_type``.
  TRL's dataloader may prefetch one generation batch, so a weight change reaches the
  batches one generation later. Fewer prompts per generation batch than tasks raise
  ValueError (the ratio cannot be expressed).
* Several processes (torchrun / accelerate): TRL deals each generation batch to the ranks in
  consecutive slices of ``per_device_train_batch_size * steps_per_generation`` rows. The
  sampler does not group a batch by task; it splits each task's count ``n_k`` over the
  ranks' slices so that rank ``r`` holds ``n_k * w_r / P`` of it rounded up or down (a
  matrix rounding with exact row and column sums, :func:`rank_task_counts`; ``w_r`` = the
  prompts whose first row is on rank ``r``), then shuffles each slice with the shared seed.
  So every rank sees every task in its share (within +-1 prompt) and the global counts are
  the plan. Within a rank, TRL's own shuffle then splits the generation batch over
  ``steps_per_generation`` steps. Per-task loss statistics are summed over the ranks
  (``accelerator.reduce``) before they are logged, so every rank logs the same values; the
  accuracy / weight metrics come from the gathered rewards and are identical anyway.
* Checkpoints: ``_save_checkpoint`` writes ``mtgrpo_task_weighting.json`` (the composer's
  state: controller weights and optimiser, accuracy EMA, rho, pool orders, RNG, and the
  generation batches already drawn by the dataloader's prefetch but not yet trained on)
  next to TRL's files; ``train(resume_from_checkpoint=...)`` restores it, replays the
  pending batches, and sets ``ignore_data_skip`` (the composer state already holds the
  data position, so skipping batches would draw new ones).
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import time
from typing import Any

import numpy as np
import torch

from ..groups import informative_groups
from ..ops import grpo_loss
from ..sampling import RatioPreservingSampler
from ..weighting import canonical_weighting
from ._batching import TaskBatchComposer
from ._trl_rounds import join_rows

try:
    from torch.utils.data import Sampler
    from transformers import TrainerCallback
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("mtgrpo_core.integrations.trl needs TRL: pip install 'mtgrpo_core[trl]' "
                      "(tested with trl 1.16)") from e

__all__ = ["MTGRPOTrainer", "TaskRepeatSampler", "SUPPORTED_LOSS_TYPES", "SUPPORTED_IS_MODES", "trl_loss_kwargs",
           "rank_task_counts", "STATE_FILE"]

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# TRL's vllm_importance_sampling_mode values, computed by grpo_loss's is_correction of the same name
SUPPORTED_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
TASK_IDS_KEY = "mtgrpo_task_ids"
STATE_FILE = "mtgrpo_task_weighting.json"
SINGLE_TASK = "all"            # the task name with dynamic_sampling=True and no task column
DEFAULT_DYNAMIC_ROUNDS = 4     # rounds a step with dynamic_sampling=True and no max_generation_rounds


def rank_task_counts(counts: Any, windows: Any) -> np.ndarray:
    """Split task counts over rank windows: an int matrix ``c[K, R]`` with row sums ``counts``,
    column sums ``windows`` and every entry ``floor`` or ``ceil`` of ``counts[k] * windows[r] / P``.

    Such a rounding always exists (the exact matrix is a fractional flow with integral row
    and column sums, and flows have integral optima); it is found by augmenting paths over
    the cells with a fractional part. O(K * R * (K + R)); K, R <= 100 here.

    Parameters
    ----------
    counts : int[K], non-negative, the prompts of each task in the batch (sum P > 0)
    windows : int[R], non-negative, the prompts of each rank's slice (sum P)

    Returns
    -------
    int64[K, R]
    """
    n = np.asarray(counts, dtype=np.int64)
    w = np.asarray(windows, dtype=np.int64)
    if n.ndim != 1 or w.ndim != 1 or (n < 0).any() or (w < 0).any():
        raise ValueError(f"counts, windows: expected non-negative 1-D integer arrays, got {n!r} and {w!r}")
    P = int(n.sum())
    if P <= 0 or int(w.sum()) != P:
        raise ValueError(f"windows: must sum to the batch size sum(counts) = {P} > 0, got {int(w.sum())}")
    prod = n[:, None] * w[None, :]
    out = prod // P
    frac = (prod % P) != 0  # cells that may take one more
    need_row = n - out.sum(1)
    need_col = w - out.sum(0)
    K, R = out.shape
    extra = np.zeros((K, R), dtype=bool)
    for k in range(K):
        while need_row[k] > 0:
            # BFS from task k: task -> rank over a free fractional cell, rank -> task over a taken one
            prev_rank = {}  # rank -> task it was reached from
            prev_task = {k: None}  # task -> rank it was reached from
            queue, end = [k], None
            while queue and end is None:
                t = queue.pop(0)
                for r in range(R):
                    if frac[t, r] and not extra[t, r] and r not in prev_rank:
                        prev_rank[r] = t
                        if need_col[r] > 0:
                            end = r
                            break
                        for t2 in range(K):
                            if extra[t2, r] and t2 not in prev_task:
                                prev_task[t2] = r
                                queue.append(t2)
            if end is None:  # cannot happen for consistent sums (see the docstring)
                raise RuntimeError(f"rank_task_counts: no rounding found for counts={n.tolist()}, windows={w.tolist()}")
            r = end
            need_col[r] -= 1
            need_row[k] -= 1
            while True:  # flip the path
                t = prev_rank[r]
                extra[t, r] = True
                back = prev_task[t]
                if back is None:
                    break
                extra[t, back] = False
                r = back
    return out + extra


def _rank_layout(idx: np.ndarray, counts: np.ndarray, windows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``idx`` (grouped by task, ``counts[k]`` of task k) ordered into consecutive rank slices of
    ``windows[r]`` entries, each holding every task in its share (:func:`rank_task_counts`),
    each slice shuffled with ``rng`` (the same draws on every rank)."""
    idx = np.asarray(idx, dtype=np.int64)
    per_rank = rank_task_counts(counts, windows)
    starts = np.concatenate([[0], np.cumsum(counts)])
    taken = np.zeros(len(counts), dtype=np.int64)
    out: list[np.ndarray] = []
    for r in range(per_rank.shape[1]):
        part = []
        for k in range(per_rank.shape[0]):
            c = int(per_rank[k, r])
            part.extend(idx[starts[k] + taken[k]: starts[k] + taken[k] + c].tolist())
            taken[k] += c
        out.append(rng.permutation(np.asarray(part, dtype=np.int64)))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class TaskRepeatSampler(Sampler):
    """TRL's ``RepeatSampler`` layout (each prompt ``mini_repeat_count`` times in a row, each
    chunk of ``batch_size`` prompts ``repeat_count`` times) with chunks composed by a
    :class:`~mtgrpo_core.integrations._batching.TaskBatchComposer` (task ratios) and laid
    out so that each of ``num_processes`` consecutive slices of ``rows_per_process`` rows
    holds every task in its share (:func:`rank_task_counts`, then a shuffle of each slice
    with the composer's seeded RNG, identical on every rank).

    ``pending`` (a deque shared with the trainer) receives every chunk drawn; the trainer
    drops the oldest once it has trained on it, so what is left at a checkpoint is what
    the dataloader prefetched. Chunks in ``replay`` are yielded before new ones are drawn
    (a resumed run).
    """

    def __init__(self, composer: TaskBatchComposer, num_rows: int, mini_repeat_count: int, repeat_count: int = 1,
                 num_processes: int = 1, rows_per_process: int | None = None, pending: collections.deque | None = None,
                 replay: list | None = None):
        self.composer = composer
        self.num_rows = int(num_rows)
        self.mini_repeat_count = int(mini_repeat_count)
        self.repeat_count = int(repeat_count)
        self.num_chunks = self.num_rows // composer.batch_size
        P, G = composer.batch_size, self.mini_repeat_count
        R = int(num_processes)
        rpp = P * G // R if rows_per_process is None else int(rows_per_process)
        if R < 1 or rpp * R != P * G:
            raise ValueError(f"num_processes, rows_per_process: {R} slices of {rpp} rows must hold the {P} prompts x "
                             f"{G} generations of a batch")
        # the rank of a prompt is the rank of its first row (a group may straddle two ranks)
        self.windows = np.bincount((np.arange(P) * G) // rpp, minlength=R)
        self.pending = collections.deque() if pending is None else pending
        self.replay = list(replay or [])

    def __len__(self) -> int:
        return self.num_chunks * self.composer.batch_size * self.mini_repeat_count * self.repeat_count

    def layout(self, idx: np.ndarray, counts: np.ndarray) -> list[int]:
        """Order a composed batch (``idx`` grouped by task, ``counts[k]`` of task k) by rank slices."""
        return _rank_layout(idx, counts, self.windows, self.composer.rng).tolist()

    def next_chunk(self) -> list[int]:
        if self.replay:
            chunk = [int(i) for i in self.replay.pop(0)]
        else:
            idx = self.composer.next_batch()
            chunk = self.layout(idx, self.composer.last_counts)
        self.pending.append(chunk)
        return chunk

    def __iter__(self):
        for _ in range(self.num_chunks):
            chunk = self.next_chunk()
            for _ in range(self.repeat_count):
                for index in chunk:
                    for _ in range(self.mini_repeat_count):
                        yield index


class MTGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with the mtgrpo_core loss and task-weighted, ratio-preserving batches.

    Parameters (besides ``GRPOTrainer``'s)
    --------------------------------------
    task_column : str
        Dataset column naming each row's task ("task"). Reward functions also receive it.
    task_weighting : str
        A task-weighting name of :func:`mtgrpo_core.weighting.make_weighting`: "iwu" (alias
        "mtgrpo", the default), "reward-only" (alias "regularized"), "uniform", "sec".
    task_weighting_kwargs : dict
        Its hyperparameters, e.g. ``{"lam": 0.25}``. For IWU ``policy_lr`` defaults to
        ``args.learning_rate`` (the improvement clip is ``improvement_clip * lr / 1e-6``).
    acceptance_aware : bool
        Inflate a task's share by ``1 / (1 - rho_k)`` (capped at 5).
    correct_threshold : float
        A completion counts as correct for ``J_k`` when its (weighted) reward >= this (1.0).
    loss_backend : "auto" | "cpu" | "triton" | "torch"
    max_generation_rounds : int or None
        Generation rounds per batch (module docstring); 1 (no rounds) unless
        ``dynamic_sampling``, then 4 by default.
    dynamic_sampling : bool
        Drop zero-advantage groups and redraw (the rounds). Without a ``task_column`` in the
        dataset this is DAPO's dynamic sampling over one task.
    measure_improvement : bool or None
        Measure I_k after each optimiser step (None: when the weighting uses it, i.e. IWU).
    advantage_weighting : None or "prompt-gdro"
        Prompt-GDRO's advantage multipliers; ``advantage_weighting_kwargs`` go to
        :class:`~mtgrpo_core.integrations.verl.PromptGDROAdvantage` (eta, edges, ...).
    prompt_id_column : str or None
        Integer prompt ids for the difficulty bins (default: a hash of the prompt).
    """

    def __init__(self, *args, task_column: str = "task", task_weighting: str = "mtgrpo",
                 task_weighting_kwargs: dict | None = None, acceptance_aware: bool = True,
                 correct_threshold: float = 1.0, loss_backend: str = "auto", max_generation_rounds: int | None = None,
                 dynamic_sampling: bool = False, measure_improvement: bool | None = None,
                 advantage_weighting: str | None = None, advantage_weighting_kwargs: dict | None = None,
                 prompt_id_column: str | None = None, **kwargs):
        rounds = _check_rounds(max_generation_rounds, dynamic_sampling)
        super().__init__(*args, **kwargs)
        if self.loss_type not in SUPPORTED_LOSS_TYPES:
            raise ValueError(f"loss_type: MTGRPOTrainer supports {SUPPORTED_LOSS_TYPES}, got {self.loss_type!r}")
        if getattr(self, "_entropy_bonus_enabled", False):
            raise ValueError("entropy_coef / use_adaptive_entropy: the entropy bonus is not supported by MTGRPOTrainer")
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError("router_aux_loss_coef: the MoE auxiliary loss is not supported by MTGRPOTrainer")
        self.task_column = task_column
        self.loss_backend = loss_backend
        ds = self.train_dataset
        # dynamic sampling without a task column: one task (DAPO's dynamic sampling)
        self._single_task = bool(dynamic_sampling) and ds is not None and task_column not in getattr(
            ds, "column_names", [])
        if ds is None or (task_column not in getattr(ds, "column_names", []) and not self._single_task):
            raise ValueError(f"task_column: the train dataset has no {task_column!r} column")
        task_of_row = [SINGLE_TASK] * len(ds) if self._single_task else list(ds[task_column])
        if self._single_task:
            task_weighting = "uniform"
        prompts_per_gen = self.args.generation_batch_size // self.num_generations
        num_tasks = len(set(task_of_row))
        if prompts_per_gen < num_tasks:
            raise ValueError(
                f"generation_batch_size: {self.args.generation_batch_size} rows / num_generations "
                f"{self.num_generations} = {prompts_per_gen} prompts per generation batch, fewer than the {num_tasks} "
                "tasks, so the task ratio cannot be kept; raise per_device_train_batch_size, steps_per_generation "
                "or the number of processes (generation_batch_size = per_device_train_batch_size x processes x "
                "steps_per_generation)")
        ckw = dict(task_weighting_kwargs or {})
        if canonical_weighting(task_weighting) == "iwu":   # the I_k clip scales with the policy lr / 1e-6
            ckw.setdefault("policy_lr", float(self.args.learning_rate))
        self.task_composer = TaskBatchComposer(
            task_of_row, prompts_per_gen, weighting=task_weighting, acceptance_aware=acceptance_aware,
            correct_threshold=correct_threshold, seed=int(self.args.seed), controller_kwargs=ckw)
        self.task_names = self.task_composer.task_names
        self._task_pos = {name: k for k, name in enumerate(self.task_names)}
        self._pending_chunks: collections.deque = collections.deque()
        self._replay_chunks: list = []
        self._init_rounds(rounds, acceptance_aware)
        self._init_improvement(measure_improvement)
        self._init_gdro(advantage_weighting, advantage_weighting_kwargs, prompt_id_column, correct_threshold)

    # -- batches -----------------------------------------------------------------------
    def _get_train_sampler(self, dataset=None):
        dataset = self.train_dataset if dataset is None else dataset
        replay, self._replay_chunks = self._replay_chunks, []
        return TaskRepeatSampler(self.task_composer, len(dataset), mini_repeat_count=self.num_generations,
                                 repeat_count=self.num_iterations * self.args.steps_per_generation,
                                 num_processes=self.accelerator.num_processes,
                                 rows_per_process=self._train_batch_size * self.args.steps_per_generation,
                                 pending=self._pending_chunks, replay=replay)

    def _local_task_ids(self, inputs) -> torch.Tensor:
        if self._single_task:
            return torch.zeros(len(inputs), dtype=torch.long, device=self.accelerator.device)
        return torch.tensor([self._task_pos.get(x.get(self.task_column), -1) for x in inputs], dtype=torch.long,
                            device=self.accelerator.device)

    def _generate_and_score_completions(self, inputs):
        training = self.model.training
        if training and self._pending_chunks:  # this generation batch is trained on: no longer pending
            self._pending_chunks.popleft()
        if training and self._round_sampler is not None:
            return self._generate_in_rounds(inputs)
        out = super()._generate_and_score_completions(inputs)
        out[TASK_IDS_KEY] = self._local_task_ids(inputs)
        if training and self._gdro is not None:
            self._apply_gdro(out, [self._prompt_key(x) for x in inputs], self._round_rewards[1])
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.model.training:
            tids = self.accelerator.gather(self._local_task_ids(inputs)).cpu().numpy()
            w = self.reward_weights.to(rewards_per_func.device).unsqueeze(0)
            r = (rewards_per_func * w).nansum(dim=1).float().cpu().numpy()
            self._round_rewards = (tids, r)  # the whole generation batch (all ranks), for the rounds
            groups = np.arange(r.shape[0]) // self.num_generations
            keep = tids >= 0
            # the weights move here only for one round a step without I_k; else after the rounds / the optimiser step
            update = self._round_sampler is None and not self._measure_improvement
            metrics = self.task_composer.observe(tids[keep], r[keep], groups[keep], update=update)
            self._log_task_metrics(metrics, weights=update)
        return rewards_per_func

    def _log_task_metrics(self, metrics: dict, weights: bool = True) -> None:
        for key, v in metrics.items():
            if (weights or not key.endswith("/weight")) and np.isfinite(v):
                self._metrics["train"][key].append(float(v))

    def _log_weights(self) -> None:
        self._log_task_metrics({f"task/{n}/weight": float(z) for n, z in zip(self.task_names, self.task_weights)})

    # -- acceptance-aware generation rounds (issue 23) ---------------------------------
    def _init_rounds(self, rounds: int, acceptance_aware: bool) -> None:
        """The ratio-preserving sampler of the rounds (``max_generation_rounds > 1``)."""
        self.max_generation_rounds = rounds
        self._round_sampler = None
        self._round_rewards = None
        if rounds <= 1:
            return
        G = self.num_generations
        rows = self._train_batch_size * self.args.steps_per_generation
        if rows % G:
            raise ValueError(f"max_generation_rounds: rounds keep whole groups on each process, so "
                             f"per_device_train_batch_size x steps_per_generation ({rows}) must be a multiple of "
                             f"num_generations ({G})")
        comp = self.task_composer
        self._round_members = [np.asarray(m, dtype=np.int64) for m in comp._walk.members]
        self._round_sampler = RatioPreservingSampler(
            [m.size for m in self._round_members], comp.batch_size, oversample=1.0, max_rounds=rounds,
            acceptance_cap=comp.acceptance_cap, rho_decay=comp.rho_decay, seed=int(self.args.seed),
            acceptance_aware=acceptance_aware, refill="fill-then-deficit")
        self._round_rng = np.random.default_rng(int(self.args.seed) + 23)
        self._round_windows = np.full(self.accelerator.num_processes, rows // G, dtype=np.int64)

    def _gather_round(self, out: dict) -> list[dict]:
        """Every process's output of one round (CPU tensors), in rank order."""
        local = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in out.items()}
        if self.accelerator.num_processes == 1:
            return [local]
        from accelerate.utils import gather_object

        return list(gather_object([local]))

    def _generate_in_rounds(self, inputs) -> dict:
        """Up to ``max_generation_rounds`` generations of the whole batch: each round's prompts
        come from the ratio-preserving sampler (round 1: the task weights inflated by
        acceptance; later rounds fill-then-deficit), its zero-advantage groups are reported
        as rejected, then the sampler's selection (each task's quota, then a top-up) is
        padded to the fixed batch with the step's other groups (zero advantage)."""
        G, K = self.num_generations, len(self.task_names)
        nproc, rank = self.accelerator.num_processes, self.accelerator.process_index
        Pl = len(inputs) // G
        P = Pl * nproc
        s = self._round_sampler
        s.start_step(self.task_composer.weights)
        parts: list[dict] = []   # per (round, rank): that process's output of the round
        metas = []               # per round: task ids, pool indices, informative flags (global prompt order)
        while True:
            draw = s.next_round()
            if draw is None:
                break
            t, p = np.asarray(draw.task_ids, np.int64), np.asarray(draw.prompt_indices, np.int64)
            if t.size != P:  # a pool ran short: the round cannot fill the batch's shape, so the rounds end
                break
            order = _rank_layout(np.arange(P), np.bincount(t, minlength=K), self._round_windows, self._round_rng)
            t, p = t[order], p[order]
            rows = np.array([self._round_members[k][i] for k, i in zip(t, p)], dtype=np.int64)
            local = [dict(self.train_dataset[int(i)]) for i in rows[rank * Pl:(rank + 1) * Pl] for _ in range(G)]
            out = super()._generate_and_score_completions(local)
            _, r = self._round_rewards
            inf = informative_groups(r, np.arange(P * G) // G, P)
            s.report(t, p, inf)
            parts.extend(self._gather_round(out))
            metas.append((t, p, inf, r, rows))
        if not metas:
            raise RuntimeError("max_generation_rounds: the sampler drew no full round (the dataset holds fewer "
                               "prompts than a generation batch?)")
        batch = s.finish()
        where = {(int(a), int(b)): (ri, j) for ri, (t, p, *_) in enumerate(metas) for j, (a, b) in enumerate(zip(t, p))}
        chosen = [where[(int(a), int(b))] for a, b in zip(batch.task_ids, batch.prompt_indices)]
        used = set(chosen)
        for ri in range(len(metas)):  # fill: the step's other groups, in round order (zero advantage)
            for j in range(P):
                if len(chosen) >= P:
                    break
                if (ri, j) not in used:
                    chosen.append((ri, j))
                    used.add((ri, j))
        ct = np.array([metas[ri][0][j] for ri, j in chosen], dtype=np.int64)
        srt = np.argsort(ct, kind="stable")
        chosen = [chosen[i] for i in srt]
        final = [chosen[i] for i in _rank_layout(np.arange(P), np.bincount(ct, minlength=K), self._round_windows,
                                                 self._round_rng)]
        mine = final[rank * Pl:(rank + 1) * Pl]
        picks = [(ri * nproc + j // Pl, (j % Pl) * G + g) for ri, j in mine for g in range(G)]
        out = join_rows(parts, picks, self._tokenizer.pad_token_id, skip=(TASK_IDS_KEY,))
        dev = self.accelerator.device
        out = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in out.items()}
        flat = torch.tensor([not metas[ri][2][j] for ri, j in mine for _ in range(G)], device=dev)
        out["advantages"] = out["advantages"].masked_fill(flat if out["advantages"].dim() == 1 else flat[:, None], 0.0)
        loss_mask = out["completion_mask"]
        if out.get("tool_mask") is not None:
            loss_mask = loss_mask * out["tool_mask"]
        out["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        out[TASK_IDS_KEY] = torch.tensor([int(metas[ri][0][j]) for ri, j in mine for _ in range(G)], dtype=torch.long,
                                         device=dev)
        if self._gdro is not None:
            keys = [self._prompt_key(self.train_dataset[int(metas[ri][4][j])]) for ri, j in mine for _ in range(G)]
            r_all = np.concatenate([metas[ri][3][j * G:(j + 1) * G] for ri, j in final])
            self._apply_gdro(out, keys, r_all)
        # metrics: rounds, shortfall, each task's informative share of the groups drawn this step
        drawn = sum(np.bincount(t, minlength=K) for t, *_ in metas)
        kept = sum(np.bincount(t[inf], minlength=K) for t, _, inf, *_ in metas)
        m = self._metrics["train"]
        m["generation/rounds"].append(float(len(metas)))
        m["generation/shortfall"].append(float(batch.shortfall))
        for k, name in enumerate(self.task_names):
            if drawn[k]:
                m[f"task/{name}/informative_frac"].append(float(kept[k] / drawn[k]))
        if not self._measure_improvement:  # one weight update a step, from the batch trained on
            adv = out["advantages"] if out["advantages"].dim() == 1 else out["advantages"][:, 0]
            both = self.accelerator.gather(torch.stack([out[TASK_IDS_KEY].double(), adv.double().abs()], 1)).cpu()
            tk = both[:, 0].long().numpy()
            cnt = np.bincount(tk, minlength=K)
            mabs = np.bincount(tk, weights=both[:, 1].numpy(), minlength=K) / np.maximum(cnt, 1)
            self.task_composer.update_weights(present=cnt > 0, mean_abs_advantage=mabs)
            self._log_weights()
        return out

    # -- Prompt-GDRO's advantage weights (issue 23) -------------------------------------
    def _init_gdro(self, name, kwargs, prompt_id_column, correct_threshold) -> None:
        self._gdro = None
        self.prompt_id_column = prompt_id_column
        if name is None:
            return
        if name != "prompt-gdro":
            raise ValueError(f"advantage_weighting: expected None or 'prompt-gdro', got {name!r}")
        if prompt_id_column is not None and prompt_id_column not in self.train_dataset.column_names:
            raise ValueError(f"prompt_id_column: the train dataset has no {prompt_id_column!r} column")
        from .verl import PromptGDROAdvantage

        kw = dict(kwargs or {})
        kw.setdefault("correct_threshold", correct_threshold)
        if kw.get("signal", "learnability") == "surrogate":
            raise ValueError("advantage_weighting_kwargs: signal 'surrogate' is not available in TRL (its expectation "
                             "is 0 in every bin, docs/ALGORITHMS.md 5.2); use 'learnability' or 'failure'")
        self._gdro = PromptGDROAdvantage(**kw)

    def _prompt_key(self, row) -> Any:
        """A prompt's stable id for the difficulty bins: ``prompt_id_column``, else a 63-bit hash of the prompt."""
        if self.prompt_id_column is not None:
            v = row[self.prompt_id_column]
            return v.item() if hasattr(v, "item") else v
        h = hashlib.blake2b(json.dumps(row["prompt"], sort_keys=True, default=str).encode(), digest_size=8)
        return int.from_bytes(h.digest(), "little") >> 1

    def _apply_gdro(self, out: dict, local_keys: list, rewards_all: np.ndarray) -> None:
        """Multiply the local advantages by Prompt-GDRO's multipliers of the whole batch (bins
        from each prompt's pass history up to the previous step), then fold the step in."""
        if self.prompt_id_column is not None and not all(isinstance(k, (int, np.integer)) for k in local_keys):
            raise ValueError(f"prompt_id_column: {self.prompt_id_column!r} must hold integer ids")
        dev = self.accelerator.device
        keys = self.accelerator.gather(torch.tensor([int(k) for k in local_keys], dtype=torch.long, device=dev))
        adv = out["advantages"] if out["advantages"].dim() == 1 else out["advantages"][:, 0]
        adv_all = self.accelerator.gather(adv.detach().float())
        n = int(keys.numel())
        w = self._gdro.step(torch.as_tensor(rewards_all, dtype=torch.float64), adv_all.cpu(),
                            np.arange(n) // self.num_generations, {"index": keys.cpu().tolist()})
        lo = self.accelerator.process_index * adv.shape[0]
        wl = torch.as_tensor(w[lo:lo + adv.shape[0]], dtype=out["advantages"].dtype, device=dev)
        out["advantages"] = out["advantages"] * (wl if out["advantages"].dim() == 1 else wl[:, None])
        for key, v in self._gdro.metrics.items():
            self._metrics["train"][key].append(float(v))

    # -- the improvement signal I_k (issue 23) -----------------------------------------
    def _init_improvement(self, measure: bool | None) -> None:
        needs = bool(getattr(self.task_composer.controller, "needs_improvement", False))
        if measure and not needs:
            raise ValueError("measure_improvement: the task weighting does not use I_k (only 'mtgrpo'/'iwu' does)")
        self._measure_improvement = needs if measure is None else bool(measure)
        self._I_window: list = []
        self._I_model = None
        self._I_last_end = None
        self._last_loss_stats = self._last_prepared = self._last_logps = None
        if self._measure_improvement:
            self.add_callback(_ImprovementCallback(self))

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._measure_improvement or not self.model.training:
            return super().training_step(model, inputs, num_items_in_batch)
        if self._I_last_end is None:
            self._I_last_end = time.perf_counter()
        self._last_loss_stats = self._last_prepared = self._last_logps = None
        out = super().training_step(model, inputs, num_items_in_batch)
        st, batch = self._last_loss_stats, self._last_prepared
        if st is not None and batch is not None and TASK_IDS_KEY in batch:  # the loss before the step, per row
            if batch.get("old_per_token_logps") is None:
                # on-policy (TRL keeps no old log-probs): the ratio of the second pass is new / before-step
                batch = dict(batch, old_per_token_logps=self._last_logps)
            self._I_window.append((batch, st.per_sequence_loss.detach().double().cpu(),
                                   batch[TASK_IDS_KEY].detach().cpu()))
            self._I_model = model
        return out

    def _prepare_inputs(self, generation_batch):
        out = super()._prepare_inputs(generation_batch)
        self._last_prepared = out  # the micro-batch (tensors) that training_step trains on
        return out

    def _finish_improvement(self) -> None:
        """After the optimiser step: the loss of the rows just trained on, again, with the new
        parameters; I_k = -(after - before) summed over task k's rows (all processes), then
        one controller update (the library trainer's measurement, train/trainer.py)."""
        window, self._I_window = self._I_window, []
        if not window:
            return
        t0 = time.perf_counter()
        K = len(self.task_names)
        before, after = np.zeros(K), np.zeros(K)
        saved = self._metrics  # the second pass's loss metrics are not logged
        self._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
        try:
            with torch.no_grad():
                for inputs, b, tids in window:
                    self._last_loss_stats = None
                    self._compute_loss(self._I_model, inputs)
                    a = self._last_loss_stats.per_sequence_loss.detach().double().cpu().numpy()
                    tk = tids.numpy()
                    ok = tk >= 0
                    before += np.bincount(tk[ok], weights=b.numpy()[ok], minlength=K)
                    after += np.bincount(tk[ok], weights=a[ok], minlength=K)
        finally:
            self._metrics = saved
        both = torch.tensor(np.stack([before, after]), dtype=torch.float64, device=self.accelerator.device)
        both = self.accelerator.reduce(both, reduction="sum").cpu().numpy()
        improvement = -(both[1] - both[0])
        self.task_composer.update_weights(improvements=improvement)
        now = time.perf_counter()
        m = self._metrics["train"]
        for k, name in enumerate(self.task_names):
            m[f"task/{name}/improvement"].append(float(improvement[k]))
        self._log_weights()
        m["improvement/time_s"].append(now - t0)
        m["improvement/time_share"].append((now - t0) / max(now - self._I_last_end, 1e-9))
        self._I_last_end = now

    # -- loss ------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        extra = {k: inputs.get(k) for k in ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                                            "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                                            "mm_token_type_ids", "image_position_ids")}
        per_token_logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, compute_entropy=True, compute_aux_loss=False, **extra)
        return self._mtgrpo_loss(per_token_logps, entropies, mask, inputs)

    def _mtgrpo_loss(self, per_token_logps: torch.Tensor, entropies: torch.Tensor, mask: torch.Tensor,
                     inputs: dict) -> torch.Tensor:
        """The loss from per-token log-probs (TRL's normalisers; see the module docstring)."""
        mode = "train" if self.model.training else "eval"
        adv = inputs["advantages"]
        old = inputs.get("old_per_token_logps")
        mult = None
        if self.top_entropy_quantile < 1.0:
            mult = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile).to(per_token_logps.dtype)
        if self.off_policy_mask_threshold is not None:
            old_or_cur = per_token_logps.detach() if old is None else old
            opm = self.get_off_policy_mask(advantages=adv if adv.dim() == 2 else adv.unsqueeze(1),
                                           per_token_logps=per_token_logps,
                                           sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_or_cur),
                                           mask=mask, off_policy_threshold=self.off_policy_mask_threshold)
            mult = opm if mult is None else mult * opm
        if mult is not None:
            if self.loss_type == "vespo":
                raise ValueError("top_entropy_quantile / off_policy_mask_threshold: not supported with "
                                 "loss_type='vespo' by MTGRPOTrainer (its gamma weight needs one advantage per "
                                 "sequence)")
            a2 = adv if adv.dim() == 2 else adv.unsqueeze(1)
            adv = (a2 * mult).expand_as(per_token_logps).contiguous()

        kw, divide = trl_loss_kwargs(self, inputs, mode)
        bias_corrected_kl = self.beta != 0.0 and bool(getattr(self.args, "use_bias_correction_kl", False))
        if self.beta != 0.0 and not bias_corrected_kl:  # plain k3 KL: fused in the kernel
            kw.update(ref_logprobs=inputs["ref_per_token_logps"], kl_coef=float(self.beta), kl_estimator="k3")
        tids = inputs.get(TASK_IDS_KEY)
        if tids is not None and bool((tids >= 0).all()):
            kw.update(task_ids=tids, num_tasks=len(self.task_names))
        loss, st = grpo_loss(per_token_logps, old, mask, adv, backend=self.loss_backend, **kw)
        self._last_loss_stats, self._last_logps = st, per_token_logps.detach()  # for I_k (training_step)
        kl_mean = st.ref_kl_mean
        if bias_corrected_kl:
            # TRL's default (use_bias_correction_kl=True): k3 times the (uncapped, differentiable) importance
            # ratio, which the kernel does not express; added in torch with the same normaliser.
            kl_tok, kl_mean = self._bias_corrected_kl(per_token_logps, old, inputs["ref_per_token_logps"], mask)
            loss = loss + self.beta * self._aggregate(kl_tok, mask)
        loss = loss / divide

        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(self.accelerator.gather(kl_mean.reshape(1)).nanmean().item())
        m = mask.float()
        ent = self.accelerator.reduce(torch.stack([(entropies.detach() * m).sum(), m.sum()]), reduction="sum")
        self._metrics[mode]["entropy"].append((ent[0] / ent[1].clamp(min=1.0)).item())
        low = self.accelerator.gather(st.clip_frac_low.reshape(1)).nanmean().item()
        high = self.accelerator.gather(st.clip_frac_high.reshape(1)).nanmean().item()
        self._metrics[mode]["clip_ratio/low_mean"].append(low)
        self._metrics[mode]["clip_ratio/high_mean"].append(high)
        self._metrics[mode]["clip_ratio/region_mean"].append(low + high)
        if st.task_loss_sum is not None and mode == "train":
            # summed over the ranks (every rank calls this once per micro-step), so all log the same value
            both = torch.stack([st.task_loss_sum.detach().double(), st.task_num_sequences.double()])
            both = self.accelerator.reduce(both.to(self.accelerator.device), reduction="sum").cpu()
            for k, name in enumerate(self.task_names):
                if float(both[1, k]) > 0:
                    self._metrics[mode][f"task/{name}/loss"].append(float(both[0, k] / both[1, k]))
        return loss

    def _bias_corrected_kl(self, logps, old, ref, mask):
        """Per-token ``k3 * ratio`` (TRL's ``use_bias_correction_kl``) and its detached masked mean."""
        old = logps.detach() if old is None else old
        log_ratio = logps - old
        if self.importance_sampling_level == "sequence":
            m = mask.to(logps.dtype)
            log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        u = ref - logps
        kl = (torch.exp(u) - u - 1) * torch.exp(log_ratio)
        m = mask.to(kl.dtype)
        return kl, ((kl * m).sum() / m.sum().clamp(min=1.0)).detach()

    def _aggregate(self, x, mask):
        """Sum / mean of a per-token term with the loss type's normaliser (before the GA division)."""
        m = mask.to(x.dtype)
        if self.loss_type in ("grpo", "sapo"):
            return ((x * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
        if self.loss_type == "luspo":
            return (x * m).sum(-1).mean()
        if self.loss_type == "bnpo":
            return (x * m).sum() / m.sum().clamp(min=1.0)
        if self.loss_type == "dr_grpo":
            return (x * m).sum() / (x.size(0) * self.max_completion_length)
        return (x * m).sum()  # dapo / cispo / vespo: divided by their normaliser with the policy term

    # -- checkpoints -------------------------------------------------------------------
    def task_weighting_state(self) -> dict:
        """JSON-able state of the task weighting: the composer (controller, EMA, rho, pool
        orders, RNG) and the generation batches drawn but not yet trained on."""
        state = {"version": 1, "task_names": [str(t) for t in self.task_names],
                 "composer": self.task_composer.state_dict(), "pending": [list(c) for c in self._pending_chunks]}
        if self._round_sampler is not None:
            state["rounds"] = {"sampler": self._round_sampler.state_dict(), "rng": self._round_rng.bit_generator.state}
        if self._gdro is not None:
            state["gdro"] = self._gdro.state_dict()
        return state

    def load_task_weighting_state(self, state: dict) -> None:
        """Restore :meth:`task_weighting_state` (the pending batches are replayed first)."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError(f"state: expected a task-weighting state of version 1, got {type(state).__name__}")
        if state["task_names"] != [str(t) for t in self.task_names]:
            raise ValueError(f"state: saved tasks {state['task_names']} differ from this dataset's {self.task_names}")
        if (self._round_sampler is not None) != ("rounds" in state):
            raise ValueError("state: saved with max_generation_rounds "
                             f"{'> 1' if 'rounds' in state else '<= 1'}, which this trainer does not match")
        if (self._gdro is not None) != ("gdro" in state):
            raise ValueError("state: saved with a different advantage_weighting than this trainer's")
        self.task_composer.load_state_dict(state["composer"])
        if self._round_sampler is not None:
            self._round_sampler.load_state_dict(_state_arrays(state["rounds"]["sampler"]))
            self._round_rng.bit_generator.state = state["rounds"]["rng"]
        if self._gdro is not None:
            self._gdro.load_state_dict(state["gdro"])
        self._pending_chunks.clear()
        self._replay_chunks = [list(c) for c in state["pending"]]

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), name)
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(self.task_weighting_state(), f, default=_json_default)

    def _load_optimizer_and_scheduler(self, checkpoint):
        dev = self.args.device
        if checkpoint is None or dev.type != "cpu" or dev.index is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        # transformers 5.10 loads the optimizer state with map_location=args.device when
        # world_size > 1, which is "cpu:<rank>" on multi-process CPU runs and torch.load rejects
        # it ("don't know how to restore data location ... cpu:0"); map it to "cpu" for this call.
        orig = torch.load

        def load_on_cpu(*a, **kw):
            if str(kw.get("map_location", "")).startswith("cpu:"):
                kw["map_location"] = "cpu"
            return orig(*a, **kw)

        torch.load = load_on_cpu
        try:
            return super()._load_optimizer_and_scheduler(checkpoint)
        finally:
            torch.load = orig

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; with ``resume_from_checkpoint`` also restores the task weighting
        (``mtgrpo_task_weighting.json``) and sets ``ignore_data_skip`` (see the module docstring)."""
        ckpt = resume_from_checkpoint
        if isinstance(ckpt, bool) and ckpt:
            from transformers.trainer_utils import get_last_checkpoint

            ckpt = get_last_checkpoint(self.args.output_dir)
            if ckpt is None:
                raise ValueError(f"resume_from_checkpoint: no checkpoint found in {self.args.output_dir}")
        if isinstance(ckpt, (str, os.PathLike)):
            path = os.path.join(ckpt, STATE_FILE)
            if not os.path.isfile(path):
                raise ValueError(f"resume_from_checkpoint: {ckpt} has no {STATE_FILE} (not saved by MTGRPOTrainer?); "
                                 "resuming would restart the task weights from uniform")
            with open(path) as f:
                self.load_task_weighting_state(json.load(f))
            # the composer state is the data position: skipping batches would draw (and so change) new ones
            self.args.ignore_data_skip = True
            resume_from_checkpoint = ckpt
        return super().train(resume_from_checkpoint, *args, **kwargs)

    @property
    def task_weights(self) -> np.ndarray:
        """Current task weights z[K] (order: ``self.task_names``)."""
        return self.task_composer.weights


class _ImprovementCallback(TrainerCallback):
    """Runs :meth:`MTGRPOTrainer._finish_improvement` right after each optimiser step."""

    def __init__(self, trainer: MTGRPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._finish_improvement()
        return control


def trl_loss_kwargs(tr, inputs: dict, mode: str) -> tuple[dict, Any]:
    """grpo_loss keyword arguments reproducing ``GRPOTrainer._compute_loss`` (TRL 1.16) for the
    trainer state ``tr`` (its loss_type, epsilons, delta, SAPO / VESPO parameters, importance
    sampling level and vLLM importance-sampling mode), and what the loss is divided by after.

    Policy form: grpo / bnpo / dr_grpo / dapo -> "vanilla" (``delta`` as the ratio cap), luspo
    -> "luspo", cispo -> "cispo" with TRL's one-sided cap ``clamp(r, max=epsilon_high)`` (clip
    range [1e-9, epsilon_high]: no lower clip, the log-ratio being clamped to [-20, 20]), sapo ->
    "sapo" (sapo_temperature_pos / _neg), vespo -> "vespo" (vespo_k / lambda, pos / neg).
    Normalisers: grpo / sapo = mean over all rows of token means, luspo = mean over rows of token
    sums, bnpo = token mean, dr_grpo = sum / (B * max_completion_length), each / GA; dapo / cispo /
    vespo = token sum / (num_items_in_batch / processes * GA / steps_per_generation) (GA: the
    current gradient-accumulation steps, in training only). vLLM importance sampling: the same
    mode computed by the kernel from ``sampling_per_token_logps`` (a NaN sampling log-prob, one vLLM
    could not score, gives ratio 1 as TRL's nan_to_num)."""
    lt = tr.loss_type
    if lt not in SUPPORTED_LOSS_TYPES:
        raise ValueError(f"loss_type: MTGRPOTrainer supports {SUPPORTED_LOSS_TYPES}, got {lt!r}")
    a = tr.args
    ga = tr.current_gradient_accumulation_steps if mode == "train" else 1.0
    kw: dict[str, Any] = dict(clip_eps_low=float(tr.epsilon_low), clip_eps_high=float(tr.epsilon_high),
                              importance_level=tr.importance_sampling_level)
    if lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        kw.update(policy_loss="luspo" if lt == "luspo" else "vanilla",
                  ratio_cap=None if a.delta is None else float(a.delta))
    elif lt == "cispo":
        if not float(tr.epsilon_high) > 1.0:
            raise ValueError(f"epsilon_high: TRL's cispo caps the ratio at epsilon_high, expected a value > 1, "
                             f"got {tr.epsilon_high!r}")
        kw.update(policy_loss="cispo", clip_eps_low=1.0 - 1e-9, clip_eps_high=float(tr.epsilon_high) - 1.0)
    elif lt == "sapo":
        kw.update(policy_loss="sapo", tau_pos=float(a.sapo_temperature_pos), tau_neg=float(a.sapo_temperature_neg))
    else:
        kw.update(policy_loss="vespo", vespo_k_pos=float(a.vespo_k_pos), vespo_lambda_pos=float(a.vespo_lambda_pos),
                  vespo_k_neg=float(a.vespo_k_neg), vespo_lambda_neg=float(a.vespo_lambda_neg))
    divide: Any = float(ga)
    if lt in ("grpo", "sapo"):
        kw.update(loss_agg="seq-mean-token-mean", seq_count="all")
    elif lt == "luspo":
        kw.update(loss_agg="seq-mean-token-sum", seq_count="all")
    elif lt == "bnpo":
        kw.update(loss_agg="token-mean")
    elif lt == "dr_grpo":
        kw.update(loss_agg="seq-mean-token-sum-norm", seq_count="all", norm_length=float(tr.max_completion_length))
    else:  # dapo / cispo / vespo: sum / (active tokens of the generation batch / processes), one window
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / tr.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * tr.current_gradient_accumulation_steps / a.steps_per_generation
        kw.update(loss_agg="token-sum")
        divide = normalizer
    if tr.use_vllm and tr.vllm_importance_sampling_correction:
        is_mode = tr.vllm_importance_sampling_mode
        if is_mode not in SUPPORTED_IS_MODES:
            raise ValueError(f"vllm_importance_sampling_mode: expected one of {SUPPORTED_IS_MODES}, got {is_mode!r}")
        samp = inputs["sampling_per_token_logps"]
        old = inputs["old_per_token_logps"]
        kw.update(is_correction=is_mode, rollout_logprobs=torch.where(torch.isnan(samp), old, samp),
                  is_lo=None if tr.vllm_importance_sampling_clip_min is None
                  else float(tr.vllm_importance_sampling_clip_min),
                  is_hi=None if tr.vllm_importance_sampling_clip_max is None
                  else float(tr.vllm_importance_sampling_clip_max))
    return kw, divide


def _check_rounds(max_generation_rounds, dynamic_sampling) -> int:
    """Rounds per generation batch: ``max_generation_rounds`` (None: 4 with dynamic sampling, else 1)."""
    if not isinstance(dynamic_sampling, bool):
        raise TypeError(f"dynamic_sampling: expected a bool, got {type(dynamic_sampling).__name__}")
    if max_generation_rounds is None:
        return DEFAULT_DYNAMIC_ROUNDS if dynamic_sampling else 1
    if isinstance(max_generation_rounds, bool) or not isinstance(max_generation_rounds, (int, np.integer)):
        raise TypeError(f"max_generation_rounds: expected an int, got {type(max_generation_rounds).__name__}")
    r = int(max_generation_rounds)
    if r < 1 or (dynamic_sampling and r < 2):
        raise ValueError(f"max_generation_rounds: expected >= {2 if dynamic_sampling else 1}"
                         f"{' with dynamic_sampling' if dynamic_sampling else ''}, got {r}")
    return r


def _state_arrays(d):
    """A JSON-loaded sampler state: lists back to numpy arrays (what the sampler's state holds)."""
    if isinstance(d, dict):
        return {k: _state_arrays(v) for k, v in d.items()}
    if isinstance(d, list) and d and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in d):
        return np.asarray(d)
    return d


def _json_default(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")

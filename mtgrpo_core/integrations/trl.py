"""TRL integration (tested against TRL 1.16): ``MTGRPOTrainer``, a ``GRPOTrainer`` whose
loss is :func:`mtgrpo_core.grpo_loss` and whose batches are task-weighted and
ratio-preserving (MT-GRPO, arXiv 2602.05547).

What
----
* Loss: TRL's ``_compute_loss`` for ``loss_type`` "grpo" / "bnpo" / "dr_grpo" / "dapo" with
  the same inputs, computed by the fused kernel (C++ on CPU, Triton on GPU):
  ``-min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A)`` with ``delta`` as the ratio cap,
  ``importance_sampling_level`` token / sequence, k3 KL times ``beta``; the normalisers are
  TRL's: grpo = mean over all rows of token means / GA steps, bnpo = local token mean / GA,
  dr_grpo = sum / (B * max_completion_length) / GA, dapo = sum / (num_items_in_batch /
  processes * GA / steps_per_generation) (GA = the current gradient-accumulation steps, in
  training only). Per-token multipliers TRL applies (top-entropy mask, off-policy sequence
  mask, vLLM importance ratios; all >= 0) are folded into token-level advantages, which
  gives the same values and gradients. Differences: the library clamps log-ratios to
  [-20, 20] and the k3 value to [-10, 10] (verl's guards; TRL has none), which only matters
  for ratios beyond e^20. TRL's default ``use_bias_correction_kl=True`` (k3 KL times the
  importance ratio) is added in torch next to the kernel's policy term; with it off the k3
  KL is fused in the kernel. ``delta`` matches exactly when ``delta >= 1 + epsilon_high``
  (TRL clips the uncapped ratio). Not supported (ValueError at construction): the other
  loss types, the entropy bonus (``entropy_coef`` / adaptive entropy) and the MoE
  auxiliary loss.
* Batches: each generation batch of ``P = generation_batch_size / num_generations`` prompts
  holds task ``k`` exactly ``n_k`` times (``target_counts`` of the task weights ``z``,
  inflated by ``1 / (1 - rho_k)`` when ``acceptance_aware``), the task being the dataset's
  ``task_column``. After each generation the trainer folds the rewards in (per-task accuracy
  EMA ``J``, zero-advantage share ``rho``) and updates ``z`` with the chosen controller
  (MT-GRPO IWU by default, with ``I = 0``: the improvement term needs a second forward
  pass after the optimiser step, not done here). Logged: ``task/<name>/accuracy``,
  ``accuracy_ema``, ``weight``, ``zero_adv_frac``, ``filtered_ratio``, ``loss``.
  TRL's dataloader may prefetch one generation batch, so a weight change reaches the
  batches one generation later.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..ops import grpo_loss
from ..weighting import canonical_weighting
from ._batching import TaskBatchComposer

try:
    from torch.utils.data import Sampler
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("mtgrpo_core.integrations.trl needs TRL: pip install 'mtgrpo_core[trl]' "
                      "(tested with trl 1.16)") from e

__all__ = ["MTGRPOTrainer", "TaskRepeatSampler", "SUPPORTED_LOSS_TYPES"]

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
TASK_IDS_KEY = "mtgrpo_task_ids"


class TaskRepeatSampler(Sampler):
    """TRL's ``RepeatSampler`` layout (each prompt ``mini_repeat_count`` times in a row, each
    chunk of ``batch_size`` prompts ``repeat_count`` times) with chunks composed by a
    :class:`~mtgrpo_core.integrations._batching.TaskBatchComposer` (task ratios)."""

    def __init__(self, composer: TaskBatchComposer, num_rows: int, mini_repeat_count: int, repeat_count: int = 1):
        self.composer = composer
        self.num_rows = int(num_rows)
        self.mini_repeat_count = int(mini_repeat_count)
        self.repeat_count = int(repeat_count)
        self.num_chunks = self.num_rows // composer.batch_size

    def __len__(self) -> int:
        return self.num_chunks * self.composer.batch_size * self.mini_repeat_count * self.repeat_count

    def __iter__(self):
        for _ in range(self.num_chunks):
            chunk = self.composer.next_batch().tolist()
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
    """

    def __init__(self, *args, task_column: str = "task", task_weighting: str = "mtgrpo",
                 task_weighting_kwargs: dict | None = None, acceptance_aware: bool = True,
                 correct_threshold: float = 1.0, loss_backend: str = "auto", **kwargs):
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
        if ds is None or task_column not in getattr(ds, "column_names", []):
            raise ValueError(f"task_column: the train dataset has no {task_column!r} column")
        prompts_per_gen = self.args.generation_batch_size // self.num_generations
        ckw = dict(task_weighting_kwargs or {})
        if canonical_weighting(task_weighting) == "iwu":   # the I_k clip scales with the policy lr / 1e-6
            ckw.setdefault("policy_lr", float(self.args.learning_rate))
        self.task_composer = TaskBatchComposer(
            list(ds[task_column]), prompts_per_gen, weighting=task_weighting, acceptance_aware=acceptance_aware,
            correct_threshold=correct_threshold, seed=int(self.args.seed), controller_kwargs=ckw)
        self.task_names = self.task_composer.task_names
        self._task_pos = {name: k for k, name in enumerate(self.task_names)}

    # -- batches -----------------------------------------------------------------------
    def _get_train_sampler(self, dataset=None):
        dataset = self.train_dataset if dataset is None else dataset
        return TaskRepeatSampler(self.task_composer, len(dataset), mini_repeat_count=self.num_generations,
                                 repeat_count=self.num_iterations * self.args.steps_per_generation)

    def _local_task_ids(self, inputs) -> torch.Tensor:
        return torch.tensor([self._task_pos.get(x.get(self.task_column), -1) for x in inputs], dtype=torch.long,
                            device=self.accelerator.device)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        out[TASK_IDS_KEY] = self._local_task_ids(inputs)
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.model.training:
            tids = self.accelerator.gather(self._local_task_ids(inputs)).cpu().numpy()
            w = self.reward_weights.to(rewards_per_func.device).unsqueeze(0)
            r = (rewards_per_func * w).nansum(dim=1).float().cpu().numpy()
            groups = np.arange(r.shape[0]) // self.num_generations
            keep = tids >= 0
            metrics = self.task_composer.observe(tids[keep], r[keep], groups[keep])
            for key, v in metrics.items():
                if np.isfinite(v):
                    self._metrics["train"][key].append(float(v))
        return rewards_per_func

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
        if self.use_vllm and self.vllm_importance_sampling_correction:
            isr = inputs["importance_sampling_ratio"]
            mult = isr if mult is None else mult * isr
        if mult is not None:
            a2 = adv if adv.dim() == 2 else adv.unsqueeze(1)
            adv = (a2 * mult).expand_as(per_token_logps).contiguous()

        ga = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        kw: dict[str, Any] = dict(clip_eps_low=float(self.epsilon_low), clip_eps_high=float(self.epsilon_high),
                                  ratio_cap=None if self.args.delta is None else float(self.args.delta),
                                  importance_level=self.importance_sampling_level)
        bias_corrected_kl = self.beta != 0.0 and bool(getattr(self.args, "use_bias_correction_kl", False))
        if self.beta != 0.0 and not bias_corrected_kl:  # plain k3 KL: fused in the kernel
            kw.update(ref_logprobs=inputs["ref_per_token_logps"], kl_coef=float(self.beta), kl_estimator="k3")
        tids = inputs.get(TASK_IDS_KEY)
        if tids is not None and bool((tids >= 0).all()):
            kw.update(task_ids=tids, num_tasks=len(self.task_names))
        divide = float(ga)
        if self.loss_type == "grpo":
            kw.update(loss_agg="seq-mean-token-mean", seq_count="all")
        elif self.loss_type == "bnpo":
            kw.update(loss_agg="token-mean")
        elif self.loss_type == "dr_grpo":
            kw.update(loss_agg="seq-mean-token-sum-norm", seq_count="all",
                      norm_length=float(self.max_completion_length))
        else:  # dapo: sum / (active tokens of the generation batch / processes), rescaled to one window
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            kw.update(loss_agg="token-mean", num_tokens=1)
            divide = normalizer
        loss, st = grpo_loss(per_token_logps, old, mask, adv, backend=self.loss_backend, **kw)
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
            nseq = st.task_num_sequences.clamp(min=1)
            for k, name in enumerate(self.task_names):
                if int(st.task_num_sequences[k]) > 0:
                    self._metrics[mode][f"task/{name}/loss"].append(float(st.task_loss_sum[k] / nseq[k]))
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
        if self.loss_type == "grpo":
            return ((x * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
        if self.loss_type == "bnpo":
            return (x * m).sum() / m.sum().clamp(min=1.0)
        if self.loss_type == "dr_grpo":
            return (x * m).sum() / (x.size(0) * self.max_completion_length)
        return (x * m).sum()  # dapo: divided by its normaliser with the policy term

    @property
    def task_weights(self) -> np.ndarray:
        """Current task weights z[K] (order: ``self.task_names``)."""
        return self.task_composer.weights

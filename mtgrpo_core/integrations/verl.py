"""verl integration (tested against verl 0.9.1, the PyPI release): registered loss,
advantage estimator and task / difficulty samplers, without forking verl.

What
----
* Policy loss ``"mtgrpo"`` in verl's policy-loss registry
  (``actor_rollout_ref.actor.policy_loss.loss_mode=mtgrpo``): verl's vanilla PPO-clip loss
  (``compute_policy_loss_vanilla`` + ``agg_loss``) computed by this library's fused
  :func:`mtgrpo_core.grpo_loss` (C++ on CPU, Triton on GPU): log-ratio clamp +-20,
  clip-higher (``clip_ratio_low`` / ``clip_ratio_high``), dual clip (``clip_ratio_c``),
  every ``loss_agg_mode`` (token-mean, token-sum, seq-mean-token-sum, seq-mean-token-mean,
  seq-mean-token-sum-norm) with ``global_batch_info`` (dp_size, batch_num_tokens,
  global_batch_size, loss_scale_factor), and rollout importance weights (non-negative
  per-token weights, folded into the advantages: ``w * max(-A r, -A clip(r)) =
  max(-(wA) r, -(wA) clip(r))`` for ``w >= 0``; a negative weight raises).
  Metrics ``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` as verl's.
  The KL and entropy terms stay verl's (added by its ``ppo_loss`` around the policy loss).
* Advantage estimator ``"mtgrpo_grpo"`` (``algorithm.adv_estimator=mtgrpo_grpo``): verl's
  GRPO outcome advantage (ragged groups by ``uid``, unbiased std, singleton groups mean 0 /
  std 1, ``norm_adv_by_std_in_grpo``) via :func:`mtgrpo_core.group_advantages` with
  ``singleton="raw"``; broadcast over tokens times the response mask. One difference: a
  group whose rewards are all equal gets exactly 0 (verl's float32 ``(r - mean) / (0 + eps)``
  can leave rounding noise amplified by 1/eps for rewards like 0.1).
* Advantage estimator ``"mtgrpo_gdro"``: Prompt-GDRO as advantage multipliers
  (:class:`PromptGDROAdvantage`, see below).
* Samplers for the dataloader: :class:`MTGRPOTaskSampler` (MT-GRPO task weights, the task
  is the row's ``data_source``, ratio-preserving batches) and :class:`PromptGDROSampler`
  (legacy: Prompt-GDRO by sampling difficulty bins; prefer the estimator). Their constructor is
  verl main's curriculum-sampler signature ``(data_source, data_config)`` and they have its ``update(batch)`` method.

How the samplers plug into verl 0.9.1 (and their limits)
--------------------------------------------------------
verl 0.9.1 builds the train sampler in ``verl.trainer.ppo.utils.create_rl_sampler``, which
has no class-path option (that option, ``data.sampler.class_path`` / ``class_name``, is in
verl main after 0.9.1). :func:`register` with ``sampler_hook=True`` (the default) wraps
``create_rl_sampler`` so that it honours those two keys, and every sampler it builds
attaches ``update`` as the dataset's ``on_batch_end``, which the 0.9.1 legacy trainer
(``trainer.use_v1=False``) calls after every step with the whole batch (data_source,
rewards, uid). So with the legacy trainer the weights update every step; the v1 trainer
has no such callback, so there the batches keep their ratios but the weights stay at their
initial values. verl 0.9.1's trainers run one generation round per step, so the
acceptance-aware *resampling rounds* of the RP sampler cannot be expressed: the sampler
instead inflates each task's share by ``1 / (1 - rho_k)`` (rho = EMA of its zero-advantage
share) so informative prompts are in ratio ``z`` in expectation. The MT-GRPO improvement
term ``I_k`` needs the per-task loss after the optimiser step, which verl does not return
to the driver: the weights use ``s_k = lambda J_k`` (``I = 0``).

Prompt-GDRO in verl is the advantage estimator ``"mtgrpo_gdro"``
(``algorithm.adv_estimator=mtgrpo_gdro``): verl's GRPO advantage times the adversary's
per-response multipliers (mean 1, capped), with the bins of the batch's prompt ids
(``extra_info.index``, found through the batch's rows: :func:`register` wraps verl's
``compute_advantage`` so the estimator sees ``non_tensor_batch``; verl passes a registered
estimator only the fresh per-step ``uid``, which cannot identify a prompt across steps).
verl's own shuffled dataloader stays in place, so every prompt is seen once per epoch.
Configure it with :func:`configure_prompt_gdro` (driver process). The older
:class:`PromptGDROSampler` draws bins with probability ``q`` instead; that starves
coverage (issue 14: 1,498 distinct prompts of 14,000 in 300 x 64 draws, uniform about
10,458) and is NOT equivalent to reweighting; it is kept for compatibility only. With
``data.dataloader_num_workers > 0`` the DataLoader prefetches ``prefetch_factor * num_workers``
batches, so weight changes reach the batches that late:
use ``data.dataloader_num_workers=0`` for immediate effect.

Registration must happen in every Ray process that runs verl code (the driver-side
trainer and the actor workers). The simplest way is verl's own hook, the environment
variable ``VERL_USE_EXTERNAL_MODULES=mtgrpo_core.integrations.verl_plugin`` forwarded to
Ray workers (see docs/guides/verl.md), whose import calls :func:`register`.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any

import numpy as np
import torch

from ..groups import group_labels
from ..ops import group_advantages, grpo_loss
from ..weighting import canonical_weighting
from ._batching import GDROBinComposer, TaskBatchComposer

try:  # the torch Sampler base; verl's dataloader is torchdata's StatefulDataLoader
    from torch.utils.data import Sampler
except ImportError:  # pragma: no cover
    Sampler = object

__all__ = ["register", "compute_policy_loss_mtgrpo", "compute_mtgrpo_grpo_advantage", "MTGRPOTaskSampler",
           "PromptGDROSampler", "PromptGDROAdvantage", "configure_prompt_gdro", "prompt_gdro_state",
           "compute_prompt_gdro_advantage", "GDRO_ADV_ESTIMATOR_NAME",
           "install_sampler_hook", "POLICY_LOSS_NAME", "ADV_ESTIMATOR_NAME", "FUSED_POLICY_LOSSES",
           "ORIGINAL_POLICY_LOSSES"]

POLICY_LOSS_NAME = "mtgrpo"
ADV_ESTIMATOR_NAME = "mtgrpo_grpo"
GDRO_ADV_ESTIMATOR_NAME = "mtgrpo_gdro"
TESTED_VERL = "0.9.1"


def _core_algos():
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("mtgrpo_core.integrations.verl needs verl: pip install 'mtgrpo_core[verl]' "
                          f"(tested with verl=={TESTED_VERL})") from e
    return core_algos


def _cfg_get(config: Any, key: str, default=None):
    if config is None:
        return default
    if hasattr(config, "get"):
        try:
            return config.get(key, default)
        except Exception:  # dataclass configs without get for unknown keys
            pass
    return getattr(config, key, default)


# ---------------------------------------------------------------------------------------
# Policy loss
# ---------------------------------------------------------------------------------------
def compute_policy_loss_mtgrpo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's vanilla PPO-clip policy loss through :func:`mtgrpo_core.grpo_loss`.

    Same signature, values and gradients as ``verl.trainer.ppo.core_algos.
    compute_policy_loss_vanilla`` (float32 tolerance).

    Parameters
    ----------
    old_log_prob, log_prob : Tensor[B, T]
        Behaviour / current log-probabilities (``log_prob`` requires grad).
    advantages : Tensor[B, T] (or [B])
    response_mask : Tensor[B, T], bool or 0/1
    loss_agg_mode : "token-mean" | "token-sum" | "seq-mean-token-sum" | "seq-mean-token-mean"
        | "seq-mean-token-sum-norm"
    config : verl ActorConfig (clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c,
        global_batch_info)
    rollout_is_weights : Tensor[B, T] or None, non-negative

    Returns
    -------
    (loss 0-d Tensor, metrics dict of floats)
    """
    if config is None:
        raise ValueError("config: the mtgrpo policy loss needs verl's ActorConfig (clip ratios), got None")
    if not isinstance(log_prob, torch.Tensor) or log_prob.dim() != 2:
        raise ValueError(f"log_prob: expected a [B, T] tensor, got {getattr(log_prob, 'shape', type(log_prob))}")
    n, t = log_prob.shape
    clip = _cfg_get(config, "clip_ratio", 0.2)
    low = _cfg_get(config, "clip_ratio_low", None)
    high = _cfg_get(config, "clip_ratio_high", None)
    low = clip if low is None else low
    high = clip if high is None else high
    c = _cfg_get(config, "clip_ratio_c", 3.0)
    if c is None or not float(c) > 1.0:
        raise ValueError(f"clip_ratio_c: the dual-clip bound must be > 1.0 (verl asserts it too), got {c!r}")
    info = dict(_cfg_get(config, "global_batch_info", None) or {})
    adv = _fold_is_weights(advantages, rollout_is_weights, response_mask, n, t)
    kw, scale = _agg_kwargs(loss_agg_mode, info, n, t)
    loss, st = grpo_loss(log_prob, old_log_prob, response_mask, adv, clip_eps_low=float(low),
                         clip_eps_high=float(high), dual_clip=float(c), **kw)
    if scale != 1.0:
        loss = loss * scale
    metrics = {
        "actor/pg_clipfrac": float(st.clip_frac_low + st.clip_frac_high),
        "actor/ppo_kl": float(st.approx_kl),
        "actor/pg_clipfrac_lower": float(st.dual_clip_frac),
    }
    return loss, metrics


def _fold_is_weights(advantages, rollout_is_weights, response_mask, n, t):
    """verl's rollout_is_weights multiply each token's loss; for losses linear in the advantage
    (and SAPO, whose gate only reads its sign) that is the advantage times w (w >= 0)."""
    adv = advantages
    if rollout_is_weights is not None:
        w = rollout_is_weights.detach()
        if tuple(w.shape) != (n, t):
            raise ValueError(f"rollout_is_weights: expected shape ({n}, {t}), got {tuple(w.shape)}")
        m = response_mask.bool()
        if bool((w[m] < 0).any()):
            raise ValueError("rollout_is_weights: negative weights cannot be folded into the advantages "
                             "(the mtgrpo loss needs w >= 0; verl's importance weights are ratios, so >= 0)")
        adv = (adv if adv.dim() == 2 else adv[:, None]) * w.to(adv.dtype)
    return adv


def _agg_kwargs(loss_agg_mode: str, info: dict, n: int, t: int) -> tuple[dict, float]:
    """grpo_loss aggregation keywords and a scale reproducing verl's ``agg_loss`` with
    ``global_batch_info`` (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)."""
    dp = int(info.get("dp_size") or 1)
    bnt = info.get("batch_num_tokens")
    gbs = info.get("global_batch_size")
    lsf = info.get("loss_scale_factor")
    if isinstance(bnt, torch.Tensor):
        bnt = float(bnt)
    if isinstance(gbs, torch.Tensor):
        gbs = float(gbs)
    kw: dict[str, Any] = {}
    scale = 1.0
    if loss_agg_mode == "token-mean":
        kw["loss_agg"] = "token-mean"
        if bnt is None:
            if dp > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        elif float(bnt) == int(bnt) and int(bnt) > 0:
            kw["num_tokens"] = int(bnt)
            scale = float(dp)
        else:
            kw["num_tokens"] = 1
            scale = dp / float(bnt)
    elif loss_agg_mode == "token-sum":
        kw.update(loss_agg="token-sum")
        scale = float(dp)
    elif loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        kw["loss_agg"] = loss_agg_mode
        if gbs is None:
            if dp > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            kw["seq_count"] = "nonempty"
        else:
            kw["seq_count"] = "all"  # sum over rows / N, rescaled to sum / global_batch_size * dp
            scale = n * dp / float(gbs)
        if loss_agg_mode == "seq-mean-token-sum-norm":
            kw["norm_length"] = float(lsf) if lsf is not None else float(t)
    else:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    return kw, scale


def _clip_ratios(config):
    clip = _cfg_get(config, "clip_ratio", 0.2)
    low = _cfg_get(config, "clip_ratio_low", None)
    high = _cfg_get(config, "clip_ratio_high", None)
    return float(clip if low is None else low), float(clip if high is None else high)


def _fused_policy_loss(name: str):
    """The fused version of verl's registered policy loss ``name`` ("cispo", "sapo", "gpg",
    "geo_mean"): verl's signature, values and gradients (float32 tolerance), through
    :func:`mtgrpo_core.grpo_loss` with ``policy_loss=name``."""

    def fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
           rollout_is_weights=None):
        if config is None:
            raise ValueError(f"config: the fused {name!r} policy loss needs verl's ActorConfig, got None")
        if not isinstance(log_prob, torch.Tensor) or log_prob.dim() != 2:
            raise ValueError(f"log_prob: expected a [B, T] tensor, got {getattr(log_prob, 'shape', type(log_prob))}")
        n, t = log_prob.shape
        low, high = _clip_ratios(config)
        info = dict(_cfg_get(config, "global_batch_info", None) or {})
        kw: dict[str, Any] = dict(policy_loss=name, clip_eps_low=low, clip_eps_high=high)
        if name == "geo_mean":  # verl: one advantage per row (the masked mean), torch.mean over rows
            m = response_mask.to(log_prob.dtype)
            a2 = advantages if advantages.dim() == 2 else advantages[:, None].expand(n, t)
            ms = m.sum(-1)
            adv = (a2 * m).sum(-1) / (ms + 1e-8)
            if rollout_is_weights is not None:  # verl: their geometric mean per row multiplies the row's loss
                w = rollout_is_weights.detach()
                kw["seq_weights"] = torch.exp((torch.log(w + 1e-10) * m).sum(-1) / (ms + 1e-8))
            scale = 1.0
        else:
            adv = _fold_is_weights(advantages, rollout_is_weights, response_mask, n, t)
            # verl's sapo aggregates with seq-mean-token-mean whatever loss_agg_mode says
            kw_agg, scale = _agg_kwargs("seq-mean-token-mean" if name == "sapo" else loss_agg_mode, info, n, t)
            kw.update(kw_agg)
            if name == "sapo":
                kw.update(tau_pos=float(_cfg_get(config, "tau_pos", 1.0)), tau_neg=float(_cfg_get(config, "tau_neg",
                                                                                                    1.05)))
        loss, st = grpo_loss(log_prob, old_log_prob, response_mask, adv, **kw)
        if scale != 1.0:
            loss = loss * scale
        metrics = {}
        if name != "gpg":
            metrics = {"actor/pg_clipfrac": float(st.clip_frac_low + st.clip_frac_high),
                       "actor/ppo_kl": float(st.approx_kl), "actor/pg_clipfrac_lower": 0.0}
            if name == "geo_mean":
                metrics["actor/pg_clipfrac"] = float(st.clip_frac_high)
                metrics["actor/pg_clipfrac_lower"] = float(st.clip_frac_low)
        return loss, metrics

    fn.__name__ = f"compute_policy_loss_{name}_fused"
    fn.__qualname__ = fn.__name__
    return fn


# The fused versions of verl's own policy losses, registered under verl's names by register()
# (verl's originals stay in ORIGINAL_POLICY_LOSSES). clip_cov / kl_cov (batch top-k
# statistics), dppo_*, dro and bypass_mode keep verl's implementations.
FUSED_POLICY_LOSSES = {"vanilla": compute_policy_loss_mtgrpo,
                       **{name: _fused_policy_loss(name) for name in ("cispo", "sapo", "gpg", "geo_mean")}}
ORIGINAL_POLICY_LOSSES: dict = {}


# ---------------------------------------------------------------------------------------
# Advantage estimator
# ---------------------------------------------------------------------------------------
def compute_mtgrpo_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any = None,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool | None = None,
    config: Any = None,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's GRPO outcome advantage over ragged ``uid`` groups, via :func:`group_advantages`.

    Parameters
    ----------
    token_level_rewards : Tensor[B, T]; the score of a response is its sum over T
    response_mask : Tensor[B, T]
    index : array of group keys (verl passes ``non_tensor_batch["uid"]`` strings)
    epsilon : float
    norm_adv_by_std_in_grpo : bool or None (None: read ``config.norm_adv_by_std_in_grpo``, default True)
    config : verl AlgoConfig

    Returns
    -------
    (advantages[B, T], returns[B, T]) - the same tensor twice, as verl's estimator.
    """
    if index is None:
        raise ValueError("index: the mtgrpo_grpo estimator needs the group key of each response (verl's uid)")
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = bool(_cfg_get(config, "norm_adv_by_std_in_grpo", True))
    scores = token_level_rewards.sum(dim=-1)
    if len(index) != scores.shape[0]:
        raise ValueError(f"index: expected {scores.shape[0]} group keys, got {len(index)}")
    with torch.no_grad():
        gid = torch.from_numpy(group_labels(list(index))).to(scores.device)
        adv = group_advantages(scores.detach(), gid, scale="group" if norm_adv_by_std_in_grpo else "none",
                               eps=float(epsilon), std="unbiased", singleton="raw")
        adv = adv.to(scores.dtype).unsqueeze(-1) * response_mask
    return adv, adv


# ---------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------
def _column(dataset: Any, key: str) -> list:
    """Values of ``key`` for every row: a dataframe column (verl's RLHFDataset keeps an HF
    ``datasets.Dataset`` in ``.dataframe``), else ``dataset[i][key]``."""
    frame = getattr(dataset, "dataframe", None)
    if frame is not None:
        try:
            return list(frame[key])
        except Exception:
            pass
    return [dataset[i][key] for i in range(len(dataset))]


def _prompt_id(extra_info: Any, fallback: int) -> Any:
    if isinstance(extra_info, dict) and "index" in extra_info and extra_info["index"] is not None:
        return extra_info["index"]
    return fallback


def _batch_size(data_config: Any, batch_size: int | None) -> int:
    if batch_size is not None:
        return int(batch_size)
    # compose whole training batches: verl fetches gen_batch_size rows at a time (1 in the v1
    # trainer's DAPO / async modes), and consecutive fetches add up to train_batch_size
    bs = _cfg_get(data_config, "train_batch_size", None)
    if bs is None:
        raise ValueError("batch_size: give batch_size or a data_config with train_batch_size")
    return int(bs)


def _sampler_kwargs(data_config: Any) -> dict:
    s = _cfg_get(data_config, "sampler", None)
    kw = _cfg_get(s, "kwargs", None) if s is not None else None
    if kw is None:
        return {}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(kw):
            return OmegaConf.to_container(kw, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(kw)


def _rows_from_batch(batch: Any) -> tuple[np.ndarray, dict, Any]:
    """(rewards[N], non_tensor dict, uids) from a verl DataProto (or a dict with the same keys)."""
    tensors = getattr(batch, "batch", None)
    nt = getattr(batch, "non_tensor_batch", None)
    if tensors is None and isinstance(batch, dict):
        tensors, nt = batch, batch
    if tensors is None or nt is None:
        raise TypeError(f"batch: expected a verl DataProto, got {type(batch).__name__}")
    keys = tensors.keys()
    for key in ("token_level_scores", "token_level_rewards", "rm_scores"):
        if key in keys:
            rewards = tensors[key]
            break
    else:
        raise ValueError("batch: needs token_level_scores (or token_level_rewards / rm_scores) to update the sampler")
    r = rewards.detach().float().sum(-1).cpu().numpy() if rewards.dim() == 2 else rewards.detach().float().cpu().numpy()
    return r, nt, nt.get("uid") if hasattr(nt, "get") else None


class _VerlSamplerBase(Sampler):
    """Index sampler for verl's dataloader: yields ``len(dataset) // B`` batches of ``B``
    indices per epoch, each composed by ``self.composer``; ``update(batch)`` feeds results back."""

    def __init__(self, data_source, data_config=None, *, batch_size: int | None = None):
        self.data_source = data_source
        self.data_config = data_config
        self.batch_size = _batch_size(data_config, batch_size)
        self.metrics: dict = {}
        # verl 0.9.1's legacy trainer calls train_dataset.on_batch_end(batch=...) after each step
        try:
            data_source.on_batch_end = self.update
        except (AttributeError, TypeError):  # read-only datasets: call update() yourself
            pass

    def __len__(self) -> int:
        return (len(self.data_source) // self.batch_size) * self.batch_size

    def __iter__(self):
        for _ in range(len(self.data_source) // self.batch_size):
            yield from self.composer.next_batch().tolist()

    def state_dict(self) -> dict:
        return {"composer": self.composer.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.composer.load_state_dict(d["composer"])


class MTGRPOTaskSampler(_VerlSamplerBase):
    """MT-GRPO task-weighted, ratio-preserving sampler for verl (task = ``data_source``).

    Parameters
    ----------
    data_source : the train dataset (verl's RLHFDataset or any indexable of dict rows)
    data_config : verl's ``data`` config; ``train_batch_size`` is the batch size and
        ``data.sampler.kwargs`` (optional) overrides the keywords below
    batch_size : int, optional, overrides the config
    task_key : str
        Row field holding the task ("data_source").
    weighting : a task-weighting name of :func:`mtgrpo_core.weighting.make_weighting`:
        "iwu" (alias "mtgrpo", the default), "reward-only" (alias "regularized"), "uniform", "sec"
    lam, lr, weight_decay : MT-GRPO IWU hyperparameters (0.2, 0.025, 1e-5); ``lr`` is also
        the reward-only and SEC step size
    policy_lr : float, optional
        The actor's learning rate (verl ``actor_rollout_ref.actor.optim.lr``; may be given in
        ``data.sampler.kwargs``): IWU clips I_k to ``0.1 * policy_lr / 1e-6``. None: clip 0.1.
    acceptance_aware, acceptance_cap, rho_decay, reward_ema, correct_threshold, seed :
        see :class:`mtgrpo_core.integrations._batching.TaskBatchComposer`
    """

    def __init__(self, data_source, data_config=None, *, batch_size: int | None = None,
                 task_key: str = "data_source", weighting: str = "mtgrpo", lam: float = 0.2, lr: float = 0.025,
                 weight_decay: float = 1e-5, acceptance_aware: bool = True, acceptance_cap: float = 5.0,
                 rho_decay: float = 0.9, reward_ema: float = 0.5, correct_threshold: float = 1.0,
                 task_names=None, seed: int = 0, policy_lr: float | None = None):
        super().__init__(data_source, data_config, batch_size=batch_size)
        opts = dict(task_key=task_key, weighting=weighting, lam=lam, lr=lr, weight_decay=weight_decay,
                    policy_lr=policy_lr, acceptance_aware=acceptance_aware, acceptance_cap=acceptance_cap,
                    rho_decay=rho_decay,
                    reward_ema=reward_ema, correct_threshold=correct_threshold, task_names=task_names, seed=seed)
        extra = _sampler_kwargs(data_config)
        unknown = set(extra) - set(opts)
        if unknown:
            raise ValueError(f"data.sampler.kwargs: unknown keys {sorted(unknown)}; expected some of {sorted(opts)}")
        opts.update(extra)
        self.task_key = opts["task_key"]
        kind = canonical_weighting(opts["weighting"])
        # the sampler's keywords each rule takes (a rule registered elsewhere gets its defaults)
        ckw = {"iwu": {"lr": opts["lr"], "lam": opts["lam"], "weight_decay": opts["weight_decay"],
                       "policy_lr": opts["policy_lr"]},
               "reward-only": {"lr": opts["lr"]}, "sec": {"lr": opts["lr"]}}.get(kind, {})
        self.composer = TaskBatchComposer(
            _column(data_source, self.task_key), self.batch_size, weighting=opts["weighting"],
            acceptance_aware=opts["acceptance_aware"], acceptance_cap=opts["acceptance_cap"],
            rho_decay=opts["rho_decay"], reward_ema=opts["reward_ema"],
            correct_threshold=opts["correct_threshold"], task_names=opts["task_names"], seed=int(opts["seed"]),
            controller_kwargs=ckw)

    @property
    def weights(self) -> np.ndarray:
        return self.composer.weights

    def update(self, batch: Any) -> dict:
        """Fold one training batch (verl DataProto: ``non_tensor_batch[task_key]``, ``uid``,
        ``token_level_scores``) into the task weights; returns the per-task metrics."""
        r, nt, uid = _rows_from_batch(batch)
        if self.task_key not in nt:
            raise ValueError(f"batch: non_tensor_batch has no {self.task_key!r} column (the task of each row)")
        pos = {name: k for k, name in enumerate(self.composer.task_names)}
        tasks = list(nt[self.task_key])
        keep = np.array([x in pos for x in tasks], bool)
        tid = np.array([pos.get(x, -1) for x in tasks], dtype=np.int64)
        groups = None if uid is None else np.asarray(group_labels(list(uid)))
        self.metrics = self.composer.observe(tid[keep], r[keep], None if groups is None else groups[keep])
        return self.metrics


class PromptGDROSampler(_VerlSamplerBase):
    """Legacy Prompt-GDRO difficulty-bin sampler for verl (prompt id = ``extra_info.index``).

    Draws each batch's bins with probability ``q`` (adversary loss ``1 - reward``). This is
    NOT the same expected gradient as reweighting (issue 14: q = [.46, .24, .17, .13] where
    reweighting puts [.84, .10, .05, .02] of the mass) and it starves coverage: the unseen
    group's q falls to about 0.01, so most prompts are never drawn. Use the advantage
    estimator ``"mtgrpo_gdro"`` (:class:`PromptGDROAdvantage`) with verl's own dataloader.

    Parameters
    ----------
    data_source, data_config, batch_size : as :class:`MTGRPOTaskSampler`
    id_key : str
        Row field whose ``["index"]`` is the prompt id ("extra_info"); rows without one use
        their dataset position.
    edges, window, hysteresis, unseen : :class:`mtgrpo_core.gdro.DifficultyClassifier`
    eta, gamma, ema : :class:`mtgrpo_core.gdro.PromptGDRO` (sampling has no weight cap)
    correct_threshold, seed
    """

    def __init__(self, data_source, data_config=None, *, batch_size: int | None = None, id_key: str = "extra_info",
                 edges=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), window: int = 50, hysteresis: float = 0.03,
                 unseen: str = "separate", eta: float = 0.65, gamma: float = 0.01, ema: float = 0.12,
                 correct_threshold: float = 1.0, seed: int = 0):
        super().__init__(data_source, data_config, batch_size=batch_size)
        opts = dict(id_key=id_key, edges=edges, window=window, hysteresis=hysteresis, unseen=unseen, eta=eta,
                    gamma=gamma, ema=ema, correct_threshold=correct_threshold, seed=seed)
        extra = _sampler_kwargs(data_config)
        unknown = set(extra) - set(opts)
        if unknown:
            raise ValueError(f"data.sampler.kwargs: unknown keys {sorted(unknown)}; expected some of {sorted(opts)}")
        opts.update(extra)
        self.id_key = opts["id_key"]
        ids = [_prompt_id(x, i) for i, x in enumerate(_column(data_source, self.id_key))]
        self.composer = GDROBinComposer(
            ids, self.batch_size,
            classifier_kwargs=dict(edges=tuple(opts["edges"]), window=opts["window"], hysteresis=opts["hysteresis"],
                                   unseen=opts["unseen"]),
            gdro_kwargs=dict(eta=opts["eta"], gamma=opts["gamma"], ema=opts["ema"]),
            correct_threshold=opts["correct_threshold"], seed=int(opts["seed"]))

    def update(self, batch: Any) -> dict:
        """Fold one training batch (prompt ids from ``non_tensor_batch[id_key]`` or ``index``,
        rewards from ``token_level_scores``) into the classifier and the adversary."""
        r, nt, _ = _rows_from_batch(batch)
        if self.id_key in nt:
            ids = [_prompt_id(x, None) for x in nt[self.id_key]]
        elif "index" in nt:
            ids = list(nt["index"])
        else:
            raise ValueError(f"batch: non_tensor_batch has neither {self.id_key!r} nor 'index' (the prompt id)")
        if any(i is None for i in ids):
            raise ValueError(f"batch: some rows have no prompt id in {self.id_key}['index']")
        ids = [i.item() if hasattr(i, "item") else i for i in ids]
        self.metrics = self.composer.observe(ids, r)
        return self.metrics




# ---------------------------------------------------------------------------------------
# Prompt-GDRO as an advantage estimator (issue 14)
# ---------------------------------------------------------------------------------------
_CURRENT_ROWS: dict = {"non_tensor_batch": None}
_ORIGINAL_COMPUTE_ADVANTAGE = None
_ADVANTAGE_MODULES = ("verl.trainer.ppo.ray_trainer", "verl.trainer.ppo.v1.utils",
                      "verl.experimental.separation.ray_trainer")


class PromptGDROAdvantage:
    """Prompt-GDRO for verl as advantage multipliers (driver side).

    Each call: bins of the batch's prompts from the classifier's history up to the previous
    step, GRPO advantages times the adversary's multipliers of those bins (mean 1 over the
    batch's responses, capped at ``cap``), then the step folds in (adversary signal, then
    the classifier's pass@k record).

    Parameters
    ----------
    id_key : str
        Row field whose ``["index"]`` is the prompt id ("extra_info"); else the row's "index".
    edges, window, hysteresis, unseen : :class:`mtgrpo_core.gdro.DifficultyClassifier`
    eta, gamma, ema, cap, share_floor, signal, reward_range : :class:`mtgrpo_core.gdro.PromptGDRO`
        ``signal`` defaults to "learnability" here: verl does not send the actor's surrogate
        back to the driver, and the surrogate at ratio 1 (``-A``, which "surrogate" uses here)
        averages to 0 in every prompt's group.
    correct_threshold : float
        A response counts as correct for the classifier when its reward >= this (1.0).
    """

    def __init__(self, *, id_key: str = "extra_info", edges=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                 window: int = 50, hysteresis: float = 0.03, unseen: str = "separate", eta: float = 0.65,
                 gamma: float = 0.01, ema: float = 0.12, cap: float = 15.0, share_floor: float = 1.0,
                 signal: str = "learnability", reward_range=(0.0, 1.0), correct_threshold: float = 1.0):
        from ..gdro import DifficultyClassifier, make_advantage_weighting

        if not isinstance(id_key, str):
            raise TypeError(f"id_key: expected a str, got {type(id_key).__name__}")
        self.id_key = id_key
        self.correct_threshold = float(correct_threshold)
        self.classifier = DifficultyClassifier(edges=tuple(edges), window=window, hysteresis=hysteresis,
                                               unseen=unseen)
        self.gdro = make_advantage_weighting("prompt-gdro", self.classifier.num_groups,
                                             eta=eta, gamma=gamma, ema=ema, cap=cap,
                               share_floor=share_floor, signal=signal, reward_range=reward_range)
        self.metrics: dict = {}

    def prompt_ids(self, non_tensor_batch: Any, n: int) -> list:
        """Prompt id of each of the ``n`` responses (``id_key``'s "index", else "index")."""
        if non_tensor_batch is None:
            raise ValueError("non_tensor_batch: the mtgrpo_gdro estimator needs the batch's rows; call "
                             "mtgrpo_core.integrations.verl.register() in the driver (it wraps compute_advantage)")
        if self.id_key in non_tensor_batch:
            ids = [_prompt_id(x, None) for x in non_tensor_batch[self.id_key]]
        elif "index" in non_tensor_batch:
            ids = list(non_tensor_batch["index"])
        else:
            raise ValueError(f"non_tensor_batch: neither {self.id_key!r} nor 'index' (the prompt id) is present")
        if len(ids) != n or any(i is None for i in ids):
            raise ValueError(f"non_tensor_batch: expected a prompt id for each of {n} responses in "
                             f"{self.id_key}['index'], got {len(ids)} (some missing: {any(i is None for i in ids)})")
        return [i.item() if hasattr(i, "item") else i for i in ids]

    def step(self, scores: torch.Tensor, adv: torch.Tensor, uids: Any, non_tensor_batch: Any) -> np.ndarray:
        """The adversary's per-response multipliers (float64[N]) for this batch, then the step
        folds in. ``scores`` [N] rewards, ``adv`` [N] GRPO advantages (unweighted), ``uids``
        [N] group keys of one step, ``non_tensor_batch`` the batch's rows."""
        n = int(scores.shape[0])
        ids = self.prompt_ids(non_tensor_batch, n)
        bins = self.classifier.bins(ids)                     # history up to the previous step
        w = np.asarray(self.gdro.response_weights(bins), np.float64)
        r = scores.detach().double().cpu().numpy()
        gid = group_labels(list(uids))
        a = adv.detach().double().cpu().numpy()
        # "surrogate": the clipped surrogate at ratio 1 (before the update) is -A, unweighted
        self.gdro.observe(bins, -a, rewards=r if self.gdro.needs_rewards else None, prompt_of=gid)
        correct = np.zeros(int(gid.max()) + 1 if n else 0, bool)
        np.logical_or.at(correct, gid, r >= self.correct_threshold)
        first = np.unique(gid, return_index=True)[1]
        self.classifier.update([ids[k] for k in first], correct[gid[first]])
        q = self.gdro.distribution
        self.metrics = {"gdro/q_max": float(q.max()), "gdro/q_argmax": int(q.argmax()),
                        "gdro/weight_max": float(w.max()) if n else 0.0}
        return w

    def state_dict(self) -> dict:
        return {"classifier": self.classifier.state_dict(), "gdro": self.gdro.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        if not isinstance(d, dict) or "classifier" not in d or "gdro" not in d:
            raise ValueError("state_dict: expected a dict with 'classifier' and 'gdro'")
        self.classifier.load_state_dict(d["classifier"])
        self.gdro.load_state_dict(d["gdro"])


_PROMPT_GDRO: dict = {"obj": None}


def configure_prompt_gdro(**kwargs: Any) -> PromptGDROAdvantage:
    """(Re)build the driver's :class:`PromptGDROAdvantage` used by ``"mtgrpo_gdro"``."""
    _PROMPT_GDRO["obj"] = PromptGDROAdvantage(**kwargs)
    return _PROMPT_GDRO["obj"]


def prompt_gdro_state() -> PromptGDROAdvantage:
    """The driver's :class:`PromptGDROAdvantage` (built with defaults on first use)."""
    if _PROMPT_GDRO["obj"] is None:
        configure_prompt_gdro()
    return _PROMPT_GDRO["obj"]


def compute_prompt_gdro_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any = None,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool | None = None,
    config: Any = None,
    non_tensor_batch: Any = None,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"mtgrpo_gdro"``: :func:`compute_mtgrpo_grpo_advantage` times Prompt-GDRO's
    per-response multipliers (:func:`prompt_gdro_state`). The rows come from
    ``non_tensor_batch`` or, in verl's trainer, from the wrapped ``compute_advantage``."""
    adv, _ = compute_mtgrpo_grpo_advantage(token_level_rewards, response_mask, index=index, epsilon=epsilon,
                                           norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, config=config)
    rows = non_tensor_batch if non_tensor_batch is not None else _CURRENT_ROWS["non_tensor_batch"]
    scores = token_level_rewards.sum(dim=-1)
    with torch.no_grad():
        per_resp = adv.sum(-1) / response_mask.sum(-1).clamp(min=1)       # the per-response advantage
        w = prompt_gdro_state().step(scores, per_resp, index, rows)
        out = adv * torch.as_tensor(w, dtype=adv.dtype, device=adv.device).unsqueeze(-1)
    return out, out


def _compute_advantage_with_rows(data, adv_estimator, *args, **kwargs):
    """verl's ``compute_advantage`` with ``data.non_tensor_batch`` visible to mtgrpo_gdro."""
    _CURRENT_ROWS["non_tensor_batch"] = getattr(data, "non_tensor_batch", None)
    try:
        return _ORIGINAL_COMPUTE_ADVANTAGE(data, adv_estimator, *args, **kwargs)
    finally:
        _CURRENT_ROWS["non_tensor_batch"] = None


def install_advantage_hook() -> None:
    """Wrap verl's ``compute_advantage`` (driver) so ``"mtgrpo_gdro"`` sees the batch's rows. Idempotent."""
    global _ORIGINAL_COMPUTE_ADVANTAGE
    rt = importlib.import_module("verl.trainer.ppo.ray_trainer")
    if _ORIGINAL_COMPUTE_ADVANTAGE is None:
        _ORIGINAL_COMPUTE_ADVANTAGE = rt.compute_advantage
    _rebind(_ADVANTAGE_MODULES, "compute_advantage", _ORIGINAL_COMPUTE_ADVANTAGE, _compute_advantage_with_rows)


def _rebind(modules, attr: str, original, replacement) -> None:
    """Point ``attr`` at ``replacement`` in every already-imported module of ``modules`` that
    still holds ``original`` (verl imports its helpers by name into several modules)."""
    for name in modules:
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, attr, None) is original:
            setattr(mod, attr, replacement)


# ---------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------
_ORIGINAL_CREATE_RL_SAMPLER = None
_SAMPLER_MODULES = ("verl.trainer.ppo.utils", "verl.trainer.main_ppo_v0", "verl.trainer.ppo.ray_trainer",
                    "verl.trainer.ppo.v1.trainer_base")


def _load_sampler_class(class_path: str, class_name: str):
    if class_path.startswith("pkg://"):
        return getattr(importlib.import_module(class_path[len("pkg://"):]), class_name)
    if class_path.endswith(".py") or "/" in class_path:
        from verl.utils.import_utils import load_extern_object

        return load_extern_object(class_path, class_name)
    return getattr(importlib.import_module(class_path), class_name)


def _create_rl_sampler_with_class_path(data_config, dataset):
    """``create_rl_sampler`` that honours ``data.sampler.class_path`` / ``class_name``."""
    s = _cfg_get(data_config, "sampler", None)
    path = _cfg_get(s, "class_path", None) if s is not None else None
    if path:
        cls = _load_sampler_class(str(path), str(_cfg_get(s, "class_name")))
        return cls(data_source=dataset, data_config=data_config)
    return _ORIGINAL_CREATE_RL_SAMPLER(data_config, dataset)


def install_sampler_hook() -> None:
    """Make verl 0.9.1's ``create_rl_sampler`` honour ``data.sampler.class_path`` /
    ``data.sampler.class_name`` (verl main's keys). Idempotent."""
    global _ORIGINAL_CREATE_RL_SAMPLER
    utils = importlib.import_module("verl.trainer.ppo.utils")
    if _ORIGINAL_CREATE_RL_SAMPLER is None:
        _ORIGINAL_CREATE_RL_SAMPLER = utils.create_rl_sampler
    _rebind(_SAMPLER_MODULES, "create_rl_sampler", _ORIGINAL_CREATE_RL_SAMPLER, _create_rl_sampler_with_class_path)


def register(*, sampler_hook: bool = True, fused_policy_losses: bool = True) -> dict:
    """Register the ``"mtgrpo"`` policy loss and the ``"mtgrpo_grpo"`` advantage estimator
    with verl (idempotent), and by default the sampler hook (:func:`install_sampler_hook`).
    With ``fused_policy_losses`` (default) the fused versions of verl's "vanilla", "cispo",
    "sapo", "gpg" and "geo_mean" replace verl's under the same names (FUSED_POLICY_LOSSES;
    verl's own functions are kept in ORIGINAL_POLICY_LOSSES).

    Returns
    -------
    dict: {"policy_loss": name, "adv_estimator": name, "verl": version}
    """
    ca = _core_algos()
    if ca.POLICY_LOSS_REGISTRY.get(POLICY_LOSS_NAME) is not compute_policy_loss_mtgrpo:
        ca.register_policy_loss(POLICY_LOSS_NAME)(compute_policy_loss_mtgrpo)
    if fused_policy_losses:
        for name, fn in FUSED_POLICY_LOSSES.items():
            if ca.POLICY_LOSS_REGISTRY.get(name) is not fn:
                ORIGINAL_POLICY_LOSSES.setdefault(name, ca.POLICY_LOSS_REGISTRY.get(name))
                ca.register_policy_loss(name)(fn)
    if ca.ADV_ESTIMATOR_REGISTRY.get(ADV_ESTIMATOR_NAME) is not compute_mtgrpo_grpo_advantage:
        if ADV_ESTIMATOR_NAME in ca.ADV_ESTIMATOR_REGISTRY:
            raise ValueError(f"verl's advantage registry already holds another {ADV_ESTIMATOR_NAME!r} estimator")
        ca.register_adv_est(ADV_ESTIMATOR_NAME)(compute_mtgrpo_grpo_advantage)
    if ca.ADV_ESTIMATOR_REGISTRY.get(GDRO_ADV_ESTIMATOR_NAME) is not compute_prompt_gdro_advantage:
        if GDRO_ADV_ESTIMATOR_NAME in ca.ADV_ESTIMATOR_REGISTRY:
            raise ValueError(f"verl's advantage registry already holds another {GDRO_ADV_ESTIMATOR_NAME!r} estimator")
        ca.register_adv_est(GDRO_ADV_ESTIMATOR_NAME)(compute_prompt_gdro_advantage)
    try:   # the driver-side trainer module; absent in a bare actor worker is fine
        install_advantage_hook()
    except ImportError:  # pragma: no cover
        pass
    if sampler_hook:
        install_sampler_hook()
    import verl

    return {"policy_loss": POLICY_LOSS_NAME, "adv_estimator": ADV_ESTIMATOR_NAME, "verl": verl.__version__}

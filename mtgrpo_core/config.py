"""Frozen hyperparameter dataclasses of the ops, validated once at construction."""
from __future__ import annotations

from dataclasses import dataclass, fields

from ._validate import check_number as _number
from ._validate import check_option as _choice

ADV_SCALES = ("group", "batch", "none")
ADV_STDS = ("unbiased", "population")
ADV_SINGLETONS = ("zero", "raw")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_LEVELS = ("token", "sequence")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")
# Policy-loss forms by verl's registry names (and TRL's luspo / vespo): docs/ALGORITHMS.md 1.4.
POLICY_LOSSES = ("vanilla", "cispo", "sapo", "gpg", "geo_mean", "luspo", "vespo", "clip_cov", "kl_cov")
# forms that select tokens by batch statistics (covariance top-k / random draw): the torch path only
TORCH_ONLY_POLICY_LOSSES = ("clip_cov", "kl_cov")
# Importance-sampling corrections of the train / rollout mismatch (TRL's vllm_importance_sampling_mode
# names; verl's token / sequence TIS and IcePop are token_truncate / sequence_truncate / *_mask).
IS_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
SEQ_COUNTS = ("nonempty", "all")


@dataclass(frozen=True)
class GRPOConfig:
    """Configuration of :func:`mtgrpo_core.grpo_loss` (docs/ALGORITHMS.md section 1).

    Defaults are PPO's symmetric clip (0.2 / 0.2, as verl and TRL), DAPO's token-mean
    aggregation, per-group std scaling with the unbiased std, and no KL term.
    ``seq_count`` chooses the sequence count of the seq-mean modes: "nonempty" excludes
    fully masked rows (verl), "all" counts every row (TRL's grpo and dr_grpo).
    """

    adv_scale: str = "group"
    adv_eps: float = 1e-6
    adv_std: str = "unbiased"
    adv_singleton: str = "zero"
    adv_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip: float | None = None
    ratio_cap: float | None = None
    importance_level: str = "token"
    loss_agg: str = "token-mean"
    num_tokens: int | None = None
    norm_length: float | None = None
    seq_count: str = "nonempty"
    policy_loss: str = "vanilla"
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 0.0002
    ppo_kl_coef: float = 1.0
    is_correction: str | None = None
    is_lo: float | None = None
    is_hi: float | None = None

    def __post_init__(self) -> None:
        _choice("adv_scale", self.adv_scale, ADV_SCALES)
        _number("adv_eps", self.adv_eps, lo=0.0)
        _choice("adv_std", self.adv_std, ADV_STDS)
        _choice("adv_singleton", self.adv_singleton, ADV_SINGLETONS)
        _number("adv_clip", self.adv_clip, lo=0.0, lo_open=True, optional=True)
        _number("kl_coef", self.kl_coef)
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _number("clip_eps_low", self.clip_eps_low, lo=0.0, hi=1.0)
        if self.clip_eps_low >= 1.0:
            raise ValueError(f"clip_eps_low: expected a value in [0, 1), got {self.clip_eps_low!r}")
        _number("clip_eps_high", self.clip_eps_high, lo=0.0)
        _number("dual_clip", self.dual_clip, lo=1.0, lo_open=True, optional=True)
        _number("ratio_cap", self.ratio_cap, lo=0.0, lo_open=True, optional=True)
        _choice("importance_level", self.importance_level, IMPORTANCE_LEVELS)
        _choice("loss_agg", self.loss_agg, LOSS_AGGS)
        _number("num_tokens", self.num_tokens, lo=0, lo_open=True, optional=True, integer=True)
        _number("norm_length", self.norm_length, lo=0.0, lo_open=True, optional=True)
        _choice("seq_count", self.seq_count, SEQ_COUNTS)
        _choice("policy_loss", self.policy_loss, POLICY_LOSSES)
        _number("tau_pos", self.tau_pos, lo=0.0, lo_open=True)
        _number("tau_neg", self.tau_neg, lo=0.0, lo_open=True)
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            _number(name, getattr(self, name), lo=0.0)
        _number("clip_cov_ratio", self.clip_cov_ratio, lo=0.0, lo_open=True)
        _number("kl_cov_ratio", self.kl_cov_ratio, lo=0.0, lo_open=True)
        _number("clip_cov_lb", self.clip_cov_lb)
        _number("clip_cov_ub", self.clip_cov_ub)
        _number("ppo_kl_coef", self.ppo_kl_coef)
        if self.is_correction is not None:
            _choice("is_correction", self.is_correction, IS_CORRECTIONS)
        _number("is_lo", self.is_lo, lo=0.0, optional=True)
        _number("is_hi", self.is_hi, lo=0.0, lo_open=True, optional=True)
        if self.is_lo is not None and self.is_hi is not None and self.is_lo > self.is_hi:
            raise ValueError(f"is_lo: expected a value <= is_hi ({self.is_hi!r}), got {self.is_lo!r}")
        if self.is_correction is None and (self.is_lo is not None or self.is_hi is not None):
            raise ValueError("is_correction: is_lo / is_hi given without a correction mode "
                             f"(one of {IS_CORRECTIONS})")
        if self.is_correction is not None and self.is_correction.endswith("truncate") and self.is_hi is None:
            raise ValueError(f"is_hi: the cap C is required with is_correction={self.is_correction!r}")
        if self.importance_level == "sequence" and self.policy_loss not in ("vanilla", "luspo", "cispo"):
            raise ValueError(f"importance_level: the sequence ratio (GSPO) applies to the ratio losses "
                             f"'vanilla', 'luspo' and 'cispo', got policy_loss={self.policy_loss!r}")
        if self.policy_loss == "vespo" and self.is_correction is not None and self.is_correction.startswith("seq"):
            raise ValueError(f"is_correction: VESPO folds token-level corrections into its weight (as TRL); "
                             f"got {self.is_correction!r}, expected 'token_truncate' or 'token_mask'")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

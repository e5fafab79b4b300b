"""`mtgrpo train generation.backend=vllm` on CPU: warm-up, every algorithm through the real
RL loop with vLLM generating (per-prompt n for Rollout-GDRO), evaluation, the mismatch
metrics, the report, and exact resume with the engine holding other weights meanwhile.

All runs share the session's engine (``Trainer(cfg, generator=engine)``); each run syncs its
policy into it before every generation, as a run with its own engine does."""
import math

import pytest
import torch

from mtgrpo_core.algorithms import ALGORITHMS
from mtgrpo_core.train import checkpoint as ckpt
from mtgrpo_core.train import config as C
from mtgrpo_core.train.trainer import Trainer, read_metrics, train

SMALL = [
    "run.threads=1", "run.progress=false", "generation.backend=vllm",
    "tasks.train_size=300", "tasks.test_size=20",
    "warmup.steps=40", "warmup.max_time_s=0", "warmup.batch_size=32",
    "rl.steps=2", "rl.max_time_s=0", "rl.batch_prompts=6", "rl.group_size=4", "rl.mini_batches=2",
    "rl.max_new_tokens=12", "rl.max_rounds=3",
    "eval.n_items=6", "eval.k=2", "checkpoint.every=1",
]
MISMATCH = ("mismatch_mean_abs", "mismatch_max_abs", "mismatch_ratio_out")


def cfg_of(out, *extra, algo="grpo"):
    return C.load_config(None, [*SMALL, *extra], algo=algo, out=str(out))


def _train(out):
    return [r for r in read_metrics(out) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def warm(tmp_path_factory, engine):
    """Supervised warm-up and the before-RL evaluation through vLLM."""
    out = tmp_path_factory.mktemp("warm")
    s = train(cfg_of(out, "rl.steps=0"), generator=engine)
    assert s["before"] is not None and s["steps"] == 0
    assert [r["kind"] for r in read_metrics(out)][:2] == ["warmup", "eval"]
    return out / "checkpoint.pt"


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_every_algorithm_with_vllm(tmp_path, engine, warm, algo):
    s = train(cfg_of(tmp_path, f"run.init_from={warm}", algo=algo), generator=engine)
    recs = _train(tmp_path)
    assert [r["step"] for r in recs] == [1, 2] and s["steps"] == 2 and s["after"] is not None
    for r in recs:
        assert not r.get("skipped") and math.isfinite(r["loss"])
        # the engine samples from the synced policy: sampling and recomputed log-probs agree
        assert r["mismatch_mean_abs"] < 1e-3 and r["mismatch_max_abs"] < 2e-2, r
        assert r["mismatch_ratio_out"] == 0.0
    if algo == "rollout-gdro":   # per-prompt n from the rollout allocation went through vLLM
        assert all(r["rounds"] == 1 and sum(r["rollouts_per_task"]) == sum(r["bin_rollouts"]) for r in recs)


def test_same_metrics_and_report_as_transformers(tmp_path, engine, warm):
    from mtgrpo_core.train.report import write_report

    train(cfg_of(tmp_path / "v", f"run.init_from={warm}"), generator=engine)
    train(cfg_of(tmp_path / "h", f"run.init_from={warm}", "generation.backend=transformers"))
    rv, rh = _train(tmp_path / "v"), _train(tmp_path / "h")
    assert [sorted(r) for r in rv] == [sorted(r) for r in rh]
    assert all(r["mismatch_max_abs"] < 1e-3 for r in rh)   # the transformers sampler is the policy itself
    md = write_report(tmp_path / "v").read_text()
    assert "Train/inference mismatch" in md and "ratio outside [0.5, 2]" in md


class _Interrupted(Exception):
    pass


class _StopAfter(Trainer):
    def rl_step(self):
        if self.step == 2:
            raise _Interrupted
        return super().rl_step()


def test_exact_resume_with_vllm(tmp_path, engine, warm, policy):
    extra = [f"run.init_from={warm}", "rl.steps=4"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    train(cfg_of(ref, *extra, algo="rollout-gdro"), generator=engine)
    with pytest.raises(_Interrupted):
        _StopAfter(cfg_of(cut, *extra, algo="rollout-gdro"), generator=engine).run()
    assert ckpt.load(cut / "checkpoint.pt")["step"] == 2
    engine.sync_weights(policy(7))   # a restarted engine starts from other weights
    Trainer(cfg_of(cut, *extra, algo="rollout-gdro"), resume=True, generator=engine).run()

    def strip(recs):
        return [{k: v for k, v in r.items() if "time" not in k} for r in recs]

    a, b = strip(read_metrics(ref)), strip(read_metrics(cut))
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra == rb, {k: (ra.get(k), rb.get(k)) for k in set(ra) | set(rb) if ra.get(k) != rb.get(k)}
    wa, wb = ckpt.load(ref / "checkpoint.pt")["model"], ckpt.load(cut / "checkpoint.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_generator_backend_must_match(tmp_path, engine):
    with pytest.raises(ValueError, match="generator: a 'vllm' generator was passed"):
        Trainer(cfg_of(tmp_path, "generation.backend=transformers"), generator=engine)

"""Issue 14: the GDRO fixes (unweighted adversary signal, reward ranges, share floor, bandit
arm draws), the difficulty-aware adversary signals, and the simulator's matched baselines."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from mtgrpo_core.gdro import PromptGDRO, RolloutAllocator
from mtgrpo_core.sim import SimConfig, simulate


# --------------------------------------------------------------------------------------
# (1) the adversary sees unweighted losses
# --------------------------------------------------------------------------------------
def _stream_step(rng, G=4, per_bin=16):
    """One step: per_bin responses in each of G bins; bin b's loss ~ 0.05 b + noise (harder
    bins have persistently higher loss)."""
    groups = np.repeat(np.arange(G), per_bin)
    loss = 0.05 * groups + 0.02 * rng.standard_normal(groups.size)
    return groups, loss


def test_unweighted_loss_leans_to_the_hardest_bin_weighted_feedback_does_not():
    rng = np.random.default_rng(0)
    # issue 14's floor 0.01: equal shares of 1/4 scale the signal by 4 (the default floor 1 does not)
    good, bad = PromptGDRO(4, eta=2.0, share_floor=0.01), PromptGDRO(4, eta=2.0, share_floor=0.01)
    for _ in range(200):
        g, loss = _stream_step(rng)
        good.observe(g, loss)
        # the old trainer's bug: the loss already multiplied by the adversary's own weights
        bad.observe(g, loss * bad.response_weights(g))
    q = good.distribution
    assert int(np.argmax(q)) == 3 and np.all(np.diff(q) > 0), q   # ordered by difficulty
    assert 0.3 < q.max() < 0.6                                      # leans (0.41), does not lock
    # the weighted feedback amplifies whichever bin leads until q locks on it (0.96)
    assert bad.distribution.max() > 0.9, bad.distribution


def test_trainer_feeds_the_adversary_the_unweighted_surrogate(tmp_path):
    """policy_update's per-response loss is the unweighted surrogate even with GDRO weights:
    with one mini-batch the ratio is 1 and the token-mean surrogate is exactly -A."""
    import torch

    from mtgrpo_core.train import config as C
    from mtgrpo_core.train.trainer import Trainer

    tiny = ["run.threads=1", "run.progress=false", "model.hidden_size=32", "model.intermediate_size=64",
            "model.num_hidden_layers=1", "model.num_attention_heads=2", "model.num_key_value_heads=2",
            "model.max_position_embeddings=64", "tasks.train_size=60", "tasks.test_size=8", "rl.batch_prompts=6",
            "rl.group_size=4", "rl.mini_batches=1", "rl.max_new_tokens=6", "gdro.signal='surrogate'"]
    tr = Trainer(C.load_config(None, tiny, algo="prompt-gdro", out=str(tmp_path)))
    batch, _ = tr.collect_rollouts(np.full(tr.K, 1.0 / tr.K))
    adv, _ = tr.advantages(batch)
    N = adv.shape[0]
    seq_w = torch.linspace(0.2, 3.0, N)                       # strongly non-uniform multipliers
    out = tr.policy_update(batch, adv, seq_w)
    loss = out["per_response_loss"]
    np.testing.assert_allclose(loss, -adv.numpy(), atol=1e-5)
    nz = adv.numpy() != 0
    if nz.any():   # and it is not the weighted loss
        assert not np.allclose(loss[nz], -(seq_w.numpy() * adv.numpy())[nz], atol=1e-3)


# --------------------------------------------------------------------------------------
# (4) reward ranges are declared, never clipped
# --------------------------------------------------------------------------------------
def test_rollout_allocator_declares_the_reward_range():
    g = np.array([0, 0, 1])
    n = np.array([2, 2, 2])
    pm1 = [np.array([1.0, -1.0]), np.array([-1.0, -1.0]), np.array([1.0, 1.0])]
    with pytest.raises(ValueError, match=r"reward_range"):
        RolloutAllocator(2).update(g, n, pm1)           # default (0, 1): -1 is out of range
    ra = RolloutAllocator(2, reward_range=(-1, 1))
    ra.update(g, n, pm1)
    # group 0: mean rewards 0 and -1 -> (0+1)/2 = 0.5 and 0 -> p = 0.25; group 1: 1 -> p = 1
    np.testing.assert_allclose(ra.p, [0.25, 1.0])
    # the same outcomes as 0/1 rewards give the same p
    rb = RolloutAllocator(2)
    rb.update(g, n, [(r + 1) / 2 for r in pm1])
    np.testing.assert_allclose(rb.p, ra.p)
    with pytest.raises(ValueError, match="reward_range"):
        RolloutAllocator(2, reward_range=(1, 0))
    with pytest.raises(ValueError, match="rewards_per_prompt"):
        ra.update(g, n, [np.array([1.5, 0.0]), np.zeros(2), np.zeros(2)])


def test_prompt_gdro_reward_range_and_signals_by_hand():
    g = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    prompt = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    r = np.array([1, 0, 1, 1, 0, 0, 0, 1.0])
    le = PromptGDRO(2, signal="learnability", share_normalize=False, ema=1.0)
    v = le.signal_values(g, rewards=r, prompt_of=prompt)
    # unbiased variance of {1, 0} = 0.5, divided by the max 1/4 -> clipped to 1; {1, 1} -> 0
    np.testing.assert_allclose(v, [1, 1, 0, 0, 0, 0, 1, 1])
    le.observe(g, rewards=r, prompt_of=prompt)
    np.testing.assert_allclose(le.scores, [0.5, 0.5])
    fa = PromptGDRO(2, signal="failure", share_normalize=False, ema=1.0, reward_range=(-1, 1))
    fa.observe(g, rewards=2 * r - 1)
    np.testing.assert_allclose(fa.scores, [0.25, 0.75])     # failure rates
    with pytest.raises(ValueError, match="rewards"):
        le.observe(g, None)
    with pytest.raises(ValueError, match="reward_range"):
        le.observe(g, rewards=2 * r - 1, prompt_of=prompt)   # -1 outside the default (0, 1)
    with pytest.raises(ValueError, match="signal"):
        PromptGDRO(2, signal="loss")
    assert le.needs_rewards and not PromptGDRO(2).needs_rewards
    # the state carries the signal; a surrogate state does not load into a learnability adversary
    with pytest.raises(ValueError, match="signal"):
        le.load_state_dict(PromptGDRO(2).state_dict())


# --------------------------------------------------------------------------------------
# (5) the share floor
# --------------------------------------------------------------------------------------
def test_share_floor_defaults_to_no_amplification_and_small_floors_stay_options():
    # issue 23: the default floor is 1 (a rare bin's signal is not amplified); issue 14's 0.01
    # and the released 1/G stay available
    assert PromptGDRO(10).share_floor == 1.0
    assert PromptGDRO(10, share_floor=None).share_floor == pytest.approx(0.1)
    g = np.array([0] * 99 + [1])                         # group 1 holds 1% of the responses
    default = PromptGDRO(2, ema=1.0)
    small, old = PromptGDRO(2, ema=1.0, share_floor=0.01), PromptGDRO(2, ema=1.0, share_floor=None)
    for pg in (default, small, old):
        pg.observe(g, np.ones(100))
    assert default.scores[1] == pytest.approx(1.0)      # the group's mean signal, not amplified
    assert small.scores[1] == pytest.approx(100.0)      # amplified 1 / 0.01
    assert old.scores[1] == pytest.approx(2.0)          # capped at 1 / (1/G) = 2
    with pytest.raises(ValueError, match="share_floor"):
        PromptGDRO(2, share_floor=0.0)


# --------------------------------------------------------------------------------------
# (3) bandit arm draws
# --------------------------------------------------------------------------------------
def test_bandit_draws_arms_at_the_exact_budget_and_explores():
    ra = RolloutAllocator(3, n_min=2, n_max=8, n_mean=4, method="bandit", seed=5)
    groups = np.repeat(np.arange(3), 20)
    seen = set()
    for _ in range(20):
        n = ra.allocate(groups)
        assert n.sum() == 240 and n.min() >= 2 and n.max() <= 8
        seen |= set(n[groups == 0].tolist())
    assert len(seen) >= 4        # draws visit several arms (the joint mode picks one per group)
    joint = RolloutAllocator(3, n_min=2, n_max=8, n_mean=4, method="bandit", draw=False)
    assert len(set(joint.allocate(groups)[groups == 0].tolist())) == 1
    # the draw stream resumes exactly from a state
    st = ra.state_dict()
    a = ra.allocate(groups)
    rb = RolloutAllocator(3, n_min=2, n_max=8, n_mean=4, method="bandit", seed=99)
    rb.load_state_dict(st)
    np.testing.assert_array_equal(rb.allocate(groups), a)


# --------------------------------------------------------------------------------------
# simulator: matched baseline, learnability moves q to the frontier
# --------------------------------------------------------------------------------------
CFG = SimConfig(steps=120, group_size=4, n_mean=4, batch_size=48)


def test_sim_grpo_baseline_is_matched():
    r = simulate("grpo", CFG)
    assert r.sampler == "unfiltered"
    assert np.all(r.extra["alloc_mean"] == 4.0)                 # same mean rollouts as Rollout-GDRO
    np.testing.assert_allclose(r.extra["wse"], r.extra["wse_uniform"])
    ro = simulate("rollout-sqrt", CFG)
    assert np.all(ro.extra["alloc_mean"] == 4.0) and ro.sampler == "unfiltered"
    assert r.extra["pass_k"].shape == (3,) and np.all(r.extra["pass_k"] >= r.success[-1] - 1e-12)


def test_learnability_signal_moves_q_to_the_frontier():
    """q's mass sits on bins whose pass rate is mid-range, not on the never-solved extreme."""
    lr = simulate("prompt-gdro", replace(CFG, gdro_signal="learnability"))
    sr = simulate("prompt-gdro", replace(CFG, gdro_signal="surrogate"))
    q = lr.extra["q_gdro"][-40:].mean(0)
    # bins: 0 = pass@n in [0, .1) (hardest) ... 9 = [.9, 1], 10 = unseen
    assert q[[0, 1, 9]].sum() < 0.05 and q[2:9].sum() > 0.85, q   # not the zero-gradient extremes
    qs = sr.extra["q_gdro"][-40:].mean(0)
    assert qs.max() < 0.2                       # the paper's surrogate stays near uniform (1/11)
    assert lr.worst > sr.worst                  # and the frontier adversary helps the worst task


# --------------------------------------------------------------------------------------
# (2) verl: Prompt-GDRO as advantage multipliers, verl's shuffled dataloader kept
# --------------------------------------------------------------------------------------
def test_verl_prompt_gdro_estimator_keeps_coverage_and_reweights():
    pytest.importorskip("verl")
    import torch
    from omegaconf import OmegaConf
    from torchdata.stateful_dataloader import StatefulDataLoader
    from verl import DataProto
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.utils import create_rl_sampler

    from mtgrpo_core.integrations import verl as mv

    mv.register()
    fn = core_algos.get_adv_estimator_fn("mtgrpo_gdro")
    assert fn is mv.compute_prompt_gdro_advantage
    try:   # verl's trainer module needs extras (cachetools, ray) that the test venv may lack
        from verl.trainer.ppo import ray_trainer
    except ImportError:
        ray_trainer = None
    if ray_trainer is not None:   # the driver's compute_advantage hands the rows to the estimator
        assert ray_trainer.compute_advantage is mv._compute_advantage_with_rows

    class Rows(torch.utils.data.Dataset):   # verl RLHF-style rows with extra_info.index
        def __init__(self, n):
            self.rows = [{"data_source": "t", "prompt": [{"role": "user", "content": f"q{i}"}],
                          "extra_info": {"index": 10_000 + i, "split": "train"}} for i in range(n)]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    Pn, B, steps, n = 1200, 32, 50, 4
    ds = Rows(Pn)
    data_cfg = OmegaConf.create({"train_batch_size": B, "shuffle": True, "seed": 1})
    sampler = create_rl_sampler(data_cfg, ds)     # verl's own sampler: GDRO does not replace it
    assert not isinstance(sampler, mv.PromptGDROSampler)
    loader = StatefulDataLoader(ds, batch_size=B, sampler=sampler, num_workers=0, drop_last=True,
                                collate_fn=lambda rows: rows)
    gd = mv.configure_prompt_gdro(edges=(0.5,), window=4, eta=4.0, share_floor=0.01, signal="learnability")
    skill = np.random.default_rng(0).random(Pn)   # per-prompt success probability
    rng = np.random.default_rng(1)
    distinct, it = set(), iter(loader)
    for step in range(steps):
        try:
            rows = next(it)
        except StopIteration:
            it = iter(loader)
            rows = next(it)
        ext = [r["extra_info"] for r in rows for _ in range(n)]
        uid = [f"s{step}p{k}" for k in range(len(rows)) for _ in range(n)]
        pid = np.array([r["extra_info"]["index"] - 10_000 for r in rows])
        distinct |= set(pid.tolist())
        sc = (rng.random((len(rows), n)) < skill[pid][:, None]).astype(np.float32).ravel()
        tlr = torch.zeros(sc.size, 3)
        tlr[:, -1] = torch.from_numpy(sc)
        mask = torch.ones(sc.size, 3)
        data = DataProto.from_dict(tensors={"token_level_rewards": tlr, "response_mask": mask},
                                   non_tensors={"extra_info": np.array(ext, dtype=object),
                                                "uid": np.array(uid, dtype=object)})
        bins = gd.classifier.bins([e["index"] for e in ext])
        w_expect = gd.gdro.response_weights(bins)
        if ray_trainer is not None:
            got = ray_trainer.compute_advantage(data, adv_estimator="mtgrpo_gdro").batch["advantages"]
        else:   # the call verl's compute_advantage makes, with the rows the hook would pass
            got, _ = fn(token_level_rewards=tlr, response_mask=mask, index=data.non_tensor_batch["uid"], config=None,
                        non_tensor_batch=data.non_tensor_batch)
        base, _ = mv.compute_mtgrpo_grpo_advantage(tlr, mask, index=np.array(uid, dtype=object))
        torch.testing.assert_close(got, base * torch.as_tensor(w_expect).float()[:, None],
                                   rtol=1e-5, atol=1e-6)
    draws = steps * B
    uniform = Pn * (1 - (1 - 1 / Pn) ** draws)     # distinct prompts of uniform draws with replacement
    assert len(distinct) >= 0.9 * uniform, (len(distinct), uniform)
    q = gd.gdro.distribution                       # bins: 0 hard, 1 easy, 2 unseen
    assert q.shape == (3,) and gd.gdro.steps == steps and q.max() > 0.4
    # without the rows (estimator called outside verl's wrapped compute_advantage) it says so
    with pytest.raises(ValueError, match="non_tensor_batch"):
        mv.compute_prompt_gdro_advantage(tlr, mask, index=np.array(uid, dtype=object))
    st = gd.state_dict()
    mv.configure_prompt_gdro(edges=(0.5,), window=4, eta=4.0, signal="learnability").load_state_dict(st)
    np.testing.assert_array_equal(mv.prompt_gdro_state().gdro.distribution, q)


# --------------------------------------------------------------------------------------
# mtgrpo compare: rollout-gdro and pass@k
# --------------------------------------------------------------------------------------
def test_compare_includes_rollout_gdro_and_a_pass_at_k_table(tmp_path):
    import json

    from mtgrpo_core.train import config as C
    from mtgrpo_core.algorithms import COMPARE_ALGOS
    from mtgrpo_core.train.compare import run_compare

    assert "rollout-gdro" in COMPARE_ALGOS and "prompt-gdro" in COMPARE_ALGOS
    tiny = ["run.threads=1", "run.progress=false", "model.hidden_size=32", "model.intermediate_size=64",
            "model.num_hidden_layers=1", "model.num_attention_heads=2", "model.num_key_value_heads=2",
            "model.max_position_embeddings=64", "tasks.train_size=60", "tasks.test_size=8", "warmup.steps=10",
            "warmup.max_time_s=0", "rl.steps=1", "rl.max_time_s=0", "rl.batch_prompts=4", "rl.group_size=2",
            "rl.max_new_tokens=4", "eval.n_items=4", "eval.k=2"]
    cfg = C.load_config(None, tiny, algo="grpo", out=str(tmp_path / "unused"))
    md = run_compare(cfg, tmp_path / "cmp", algos=("grpo", "rollout-gdro"), seeds=(0,), threshold=0.0)
    lines = md.splitlines()
    k = lines.index(next(l for l in lines if l.startswith("pass@k")))
    assert any(l.startswith("| rollout-gdro |") for l in lines[:k])          # mean@k table
    prow = next(l for l in lines[k:] if l.startswith("| rollout-gdro |"))  # pass@k table
    res = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    pk = res["algos"]["rollout-gdro"]
    assert len(pk["pass_worst"]) == 1 and 0 <= pk["pass_worst"][0] <= 1
    # pass@k >= mean@k task by task
    assert all(pk["pass_per_task"][0][t] >= pk["per_task"][0][t] for t in pk["per_task"][0])
    assert f"{100 * pk['pass_worst'][0]:.1f}" in prow

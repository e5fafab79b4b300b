"""verl integration (verl 0.9.1): the registered "mtgrpo" policy loss equals verl's
compute_policy_loss_vanilla + agg_loss for every aggregation mode (values, gradients,
metrics), the "mtgrpo_grpo" estimator equals compute_grpo_outcome_advantage on ragged
groups, and the samplers build task-ratio / GDRO-bin batches over a verl-style dataset of
reasoning-gym prompts through verl's own create_rl_sampler and dataloader."""
from __future__ import annotations

import collections
import uuid

import numpy as np
import pytest
import torch

pytest.importorskip("verl")
rg = pytest.importorskip("reasoning_gym")

from omegaconf import OmegaConf  # noqa: E402
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

from mtgrpo_core.integrations import verl as mv  # noqa: E402
from mtgrpo_core.sampling import target_counts  # noqa: E402

MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
TASKS = ("basic_arithmetic", "chain_sum", "arc_1d")


@pytest.fixture(scope="module", autouse=True)
def registered():
    return mv.register()


def test_register_is_idempotent_and_visible_in_verl_registries():
    info = mv.register()
    assert info == {"policy_loss": "mtgrpo", "adv_estimator": "mtgrpo_grpo", "verl": "0.9.1"}
    assert core_algos.get_policy_loss_fn("mtgrpo") is mv.compute_policy_loss_mtgrpo
    assert core_algos.get_adv_estimator_fn("mtgrpo_grpo") is mv.compute_mtgrpo_grpo_advantage
    from verl.trainer.ppo import utils as verl_utils

    assert verl_utils.create_rl_sampler is mv._create_rl_sampler_with_class_path


def _actor_config(**kw):
    base = dict(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                clip_ratio_c=3.0)
    base.update(kw)
    return ActorConfig(**base)


def _loss_inputs(seed, n=9, t=13):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(n, t, generator=g) * 0.4 - 1.5)
    old = lp + torch.randn(n, t, generator=g) * 0.5  # wide ratios: both clips and the dual clip are active
    adv = torch.randn(n, 1, generator=g).expand(n, t).contiguous()
    mask = torch.rand(n, t, generator=g) > 0.3
    mask[2] = False  # a fully masked response
    mask[5, :] = True
    mask[4, :3] = True
    adv[4] = -adv[4].abs() - 0.1
    old[4] = lp[4] - 1.6  # ratio ~5 > clip_ratio_c with A < 0: the dual clip binds
    adv = adv * mask
    return lp, old, adv, mask


GLOBAL_INFOS = [
    {},
    {"dp_size": 2, "batch_num_tokens": 150, "global_batch_size": 20, "loss_scale_factor": 32},
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("info", range(len(GLOBAL_INFOS)))
@pytest.mark.parametrize("with_is_weights", [False, True])
def test_policy_loss_matches_verl_vanilla(mode, info, with_is_weights):
    lp, old, adv, mask = _loss_inputs(seed=MODES.index(mode) + 10 * info)
    cfg = _actor_config()
    cfg.global_batch_info.update(GLOBAL_INFOS[info])
    w = None
    if with_is_weights:
        w = torch.rand(lp.shape, generator=torch.Generator().manual_seed(3)) * 2.0
        w[0, :3] = 0.0
    fn = core_algos.get_policy_loss_fn("mtgrpo")
    x1 = lp.clone().requires_grad_()
    l1, m1 = core_algos.compute_policy_loss_vanilla(old, x1, adv, mask, mode, cfg, rollout_is_weights=w)
    (g1,) = torch.autograd.grad(l1, x1)
    x2 = lp.clone().requires_grad_()
    l2, m2 = fn(old_log_prob=old, log_prob=x2, advantages=adv, response_mask=mask, loss_agg_mode=mode, config=cfg,
                rollout_is_weights=w)
    (g2,) = torch.autograd.grad(l2, x2)
    torch.testing.assert_close(l2.detach(), l1.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g2, g1, rtol=2e-5, atol=1e-7)
    assert set(m2) == set(m1)
    assert m1["actor/pg_clipfrac_lower"] > 0 and m1["actor/pg_clipfrac"] > 0
    for k in m1:
        if with_is_weights and k != "actor/ppo_kl":
            continue  # zero weights make verl count clipped tokens whose loss is 0; we do not
        assert m2[k] == pytest.approx(m1[k], abs=1e-6), k


def test_policy_loss_matches_verl_in_float64_and_rejects_bad_input():
    lp, old, adv, mask = (x.double() if x.is_floating_point() else x for x in _loss_inputs(seed=99))
    cfg = _actor_config(clip_ratio_c=2.5)
    for mode in MODES:
        x1 = lp.clone().requires_grad_()
        l1, _ = core_algos.compute_policy_loss_vanilla(old, x1, adv, mask, mode, cfg)
        x2 = lp.clone().requires_grad_()
        l2, _ = mv.compute_policy_loss_mtgrpo(old, x2, adv, mask, mode, cfg)
        (g1,), (g2,) = torch.autograd.grad(l1, x1), torch.autograd.grad(l2, x2)
        torch.testing.assert_close(l2, l1, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g2, g1, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        mv.compute_policy_loss_mtgrpo(old, lp, adv, mask, "nope", cfg)
    with pytest.raises(ValueError, match="rollout_is_weights"):
        mv.compute_policy_loss_mtgrpo(old, lp, adv, mask, "token-mean", cfg, rollout_is_weights=-torch.ones_like(lp))
    with pytest.raises(ValueError, match="config"):
        mv.compute_policy_loss_mtgrpo(old, lp, adv, mask, "token-mean", None)
    bad = _actor_config()
    bad.global_batch_info.update({"dp_size": 2})
    with pytest.raises(ValueError, match="batch_num_tokens"):
        mv.compute_policy_loss_mtgrpo(old, lp, adv, mask, "token-mean", bad)


@pytest.mark.parametrize("norm", [True, False])
def test_advantage_estimator_matches_verl_on_ragged_groups(norm):
    rng = np.random.default_rng(int(norm))
    sizes = [1, 2, 3, 5, 4, 1, 6, 2]  # ragged, with singletons
    uids = np.array([u for s in sizes for u in [str(uuid.uuid4())] * s], dtype=object)
    perm = rng.permutation(len(uids))  # verl's balance_batch reorders rows
    uids = uids[perm]
    n, t = len(uids), 11
    mask = torch.from_numpy(rng.random((n, t)) > 0.25).float()
    mask[:, 0] = 1.0
    scores = torch.from_numpy(rng.choice([0.0, 0.5, 1.0], size=n)).float()
    scores[:3] = 1.0  # some all-equal groups likely
    last = (mask * torch.arange(t)).argmax(-1)
    tlr = torch.zeros(n, t)
    tlr[torch.arange(n), last] = scores  # outcome reward on the last response token, as verl
    a1, r1 = core_algos.compute_grpo_outcome_advantage(tlr, mask, uids, norm_adv_by_std_in_grpo=norm)
    cfg = OmegaConf.create({"norm_adv_by_std_in_grpo": norm})
    fn = core_algos.get_adv_estimator_fn("mtgrpo_grpo")
    a2, r2 = fn(token_level_rewards=tlr, response_mask=mask, index=uids, config=cfg)
    torch.testing.assert_close(a2, a1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r2, r1, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Samplers over a verl-style dataset of reasoning-gym prompts
# ---------------------------------------------------------------------------------------
class VerlStyleDataset(torch.utils.data.Dataset):
    """Rows shaped like verl's RLHF parquet rows: prompt messages, data_source, reward_model,
    extra_info.index (the stable prompt id)."""

    def __init__(self, per_task):
        self.rows = []
        for name, count in zip(TASKS, per_task):
            ds = rg.create_dataset(name, size=count, seed=7)
            for i in range(count):
                e = ds[i]
                self.rows.append({
                    "data_source": name,
                    "prompt": [{"role": "user", "content": e["question"]}],
                    "ability": "reasoning",
                    "reward_model": {"style": "rule", "ground_truth": str(e["answer"])},
                    "extra_info": {"index": len(self.rows), "split": "train"},
                })

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = dict(self.rows[i])
        r["index"] = r["extra_info"]["index"]
        return r


def _collate(rows):
    return {k: [r[k] for r in rows] for k in rows[0]}


def _data_config(cls_name, B, **kwargs):
    return OmegaConf.create({"train_batch_size": B, "gen_batch_size": None, "shuffle": True, "seed": 1,
                             "sampler": {"class_path": "pkg://mtgrpo_core.integrations.verl", "class_name": cls_name,
                                         "kwargs": kwargs}})


def _feedback(rows, rewards_of, n=4):
    """A verl DataProto like the one the trainer passes to on_batch_end: n rollouts per prompt."""
    src, ext, uid, scores = [], [], [], []
    for r in rows:
        u = str(uuid.uuid4())
        for j in range(n):
            src.append(r["data_source"])
            ext.append(r["extra_info"])
            uid.append(u)
            scores.append(rewards_of(r, j))
    tls = torch.zeros(len(scores), 5)
    tls[:, -1] = torch.tensor(scores)
    return DataProto.from_dict(tensors={"token_level_scores": tls},
                               non_tensors={"data_source": np.array(src, dtype=object),
                                            "extra_info": np.array(ext, dtype=object),
                                            "uid": np.array(uid, dtype=object)})


def test_mtgrpo_sampler_through_verl_create_rl_sampler_and_dataloader():
    from verl.trainer.ppo.utils import create_rl_sampler

    ds = VerlStyleDataset(per_task=(40, 30, 20))
    B = 12
    sampler = create_rl_sampler(_data_config("MTGRPOTaskSampler", B, lam=1.0, lr=0.3), ds)
    assert isinstance(sampler, mv.MTGRPOTaskSampler)
    assert ds.on_batch_end == sampler.update  # the 0.9.1 legacy trainer's per-step callback
    loader = StatefulDataLoader(ds, batch_size=B, sampler=sampler, num_workers=0, drop_last=True, collate_fn=_collate)
    names = sampler.composer.task_names
    acc = {"basic_arithmetic": 1.0, "chain_sum": 0.5, "arc_1d": 0.0}
    w_hist = []
    expected_shares = sampler.composer.draw_shares()   # the shares the next batch is drawn with
    for step, batch in enumerate(loader):
        shares = expected_shares
        counts = collections.Counter(batch["data_source"])
        expect = target_counts(shares, B)
        assert [counts.get(n, 0) for n in names] == expect.tolist()
        assert len(set(batch["index"])) == B  # no prompt twice in a batch
        rows = [ds.rows[i] for i in batch["index"]]
        ds.on_batch_end(batch=_feedback(rows, lambda r, j: 1.0 if j < 4 * acc[r["data_source"]] else 0.0))
        w_hist.append(sampler.weights.copy())
        expected_shares = sampler.composer.draw_shares()
        if step == 5:
            break
    w = w_hist[-1]
    # arc_1d (accuracy 0) gains weight, basic_arithmetic (accuracy 1) loses it
    assert w[names.index("arc_1d")] > 1 / 3 > w[names.index("basic_arithmetic")]
    assert sampler.metrics["task/arc_1d/accuracy"] == 0.0
    # all-equal groups (accuracy 0 or 1) raise rho, the inflation of those tasks
    assert sampler.composer.rho[names.index("arc_1d")] > 0 and sampler.composer.rho[names.index("chain_sum")] == 0
    # exact resume
    state = sampler.state_dict()
    nxt = sampler.composer.next_batch()
    sampler.load_state_dict(state)
    np.testing.assert_array_equal(sampler.composer.next_batch(), nxt)


def test_prompt_gdro_sampler_bins_follow_q():
    from verl.trainer.ppo.utils import create_rl_sampler

    ds = VerlStyleDataset(per_task=(30, 30, 30))
    B = 16
    sampler = create_rl_sampler(_data_config("PromptGDROSampler", B, edges=[0.5], window=4), ds)
    assert isinstance(sampler, mv.PromptGDROSampler)
    loader = StatefulDataLoader(ds, batch_size=B, sampler=sampler, num_workers=0, drop_last=True, collate_fn=_collate)
    for step, batch in enumerate(loader):
        bins_before = sampler.composer.classifier.bins(list(batch["index"]))
        planned = sampler.composer.last_counts
        assert np.bincount(bins_before, minlength=planned.size).tolist() == planned.tolist()
        rows = [ds.rows[i] for i in batch["index"]]
        # arithmetic is always solved, the others never: they become the hard bin
        ds.on_batch_end(batch=_feedback(rows, lambda r, j: 1.0 if r["data_source"] == "basic_arithmetic" else 0.0))
        if step == 4:
            break
    q = sampler.composer.gdro.distribution
    assert q.shape == (3,) and np.isclose(q.sum(), 1.0)
    assert q[0] > q[1]  # the hard bin (loss 1 - reward = 1) outweighs the easy one
    b = sampler.composer.bins()
    src = np.array([r["data_source"] for r in ds.rows])
    seen = b != sampler.composer.classifier.unseen_group
    assert np.all(b[seen & (src == "basic_arithmetic")] == 1) and np.all(b[seen & (src != "basic_arithmetic")] == 0)


def test_plugin_module_registers_through_verls_external_modules_variable():
    """verl imports VERL_USE_EXTERNAL_MODULES on `import verl` in every (Ray) process."""
    import os
    import subprocess
    import sys

    code = ("import verl\n"
            "from verl.trainer.ppo import core_algos as ca, utils as u\n"
            "print(ca.get_policy_loss_fn('mtgrpo').__name__, ca.get_adv_estimator_fn('mtgrpo_grpo').__name__,"
            " u.create_rl_sampler.__name__)\n")
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="mtgrpo_core.integrations.verl_plugin")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["compute_policy_loss_mtgrpo", "compute_mtgrpo_grpo_advantage",
                                  "_create_rl_sampler_with_class_path"]


def test_default_sampler_untouched_without_class_path():
    from verl.trainer.ppo.utils import create_rl_sampler

    ds = VerlStyleDataset(per_task=(4, 4, 4))
    s = create_rl_sampler(OmegaConf.create({"shuffle": False}), ds)
    assert type(s).__name__ == "SequentialSampler"
    with pytest.raises(ValueError, match="unknown keys"):
        create_rl_sampler(_data_config("MTGRPOTaskSampler", 4, bogus=1), ds)


def test_batch_composer_quota_and_pool_walk_invariants():
    """Quotas sum to B within pool capacities; no prompt twice in a batch across epoch ends."""
    from mtgrpo_core.integrations._batching import TaskBatchComposer, _quota

    rng = np.random.default_rng(0)
    for _ in range(500):
        k = int(rng.integers(1, 6))
        cap = rng.integers(0, 8, k)
        if cap.sum() == 0:
            continue
        b = int(rng.integers(1, cap.sum() + 1))
        q = rng.dirichlet(np.ones(k)) * (rng.random(k) > 0.3)
        q = q / q.sum() if q.sum() > 0 else np.full(k, 1.0 / k)
        n = _quota(q, b, cap)
        assert n.sum() == b and np.all((n >= 0) & (n <= cap))
    comp = TaskBatchComposer(["small"] * 3 + ["big"] * 10, 6, weighting="uniform")
    seen = collections.Counter()
    for _ in range(20):
        batch = comp.next_batch()
        assert len(set(batch.tolist())) == 6
        assert (comp.task_ids[batch] == comp.task_names.index("small")).sum() == 3
        seen.update(batch.tolist())
    assert all(seen[i] == 20 for i in range(3))  # the small pool is used in full every batch
    with pytest.raises(ValueError, match="batch_size"):
        TaskBatchComposer(["a", "b"], 3)

"""The algorithm interface: controller protocols and registries, algorithms as data, one set of
names everywhere, and the structural promises (no branch on an algorithm's name in the trainer,
no cli <-> demo import cycle)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mtgrpo_core
from mtgrpo_core import gdro, weighting
from mtgrpo_core.algorithms import Algorithm, algorithm_names, get_algorithm, register_algorithm
from mtgrpo_core.pools import MixedSampler, PoolWalker
from mtgrpo_core.weighting import TaskStats, TaskWeighting, make_weighting, register_weighting

PKG = Path(mtgrpo_core.__file__).resolve().parent


def test_weighting_registry_names_aliases_and_errors():
    assert weighting.weighting_names() == ("uniform", "iwu", "reward-only", "sec")
    assert type(make_weighting("mtgrpo", 3)) is weighting.ImprovementAwareWeights
    assert type(make_weighting("regularized", 3)) is weighting.RegularizedWeights
    with pytest.raises(ValueError, match="weighting: expected one of"):
        make_weighting("bogus", 3)
    with pytest.raises(TypeError, match="lam"):
        make_weighting("sec", 3, lam=0.2)
    with pytest.raises(ValueError, match="already registered"):
        register_weighting("iwu")(weighting.UniformWeights)


@pytest.mark.parametrize("name", weighting.weighting_names())
def test_every_weighting_follows_the_protocol(name):
    w = make_weighting(name, 3)
    assert isinstance(w, TaskWeighting)
    stats = TaskStats.make(3, [0.2, 0.5, 0.9], present=[True, True, False], improvements=[0.01, -0.02, 0.0],
                           mean_abs_advantage=[0.3, 0.1, 0.0])
    z = np.asarray(w.observe(stats))
    assert z.shape == (3,) and abs(z.sum() - 1) < 1e-12 and np.all(z >= 0)
    np.testing.assert_array_equal(z, w.weights)
    assert isinstance(w.metrics(), dict)
    w2 = make_weighting(name, 3)
    w2.load_state_dict(w.state_dict())
    np.testing.assert_array_equal(w2.weights, w.weights)


def test_protocol_observe_matches_update():
    a, b = make_weighting("iwu", 3, lam=0.3), weighting.ImprovementAwareWeights(3, lam=0.3)
    for J, I in (([0.1, 0.5, 0.9], [0.05, 0.0, -0.02]), ([0.2, 0.4, 0.8], [0.0, 0.01, 0.0])):
        np.testing.assert_array_equal(a.observe(TaskStats.make(3, J, improvements=I)), b.update(J, I))
    s1, s2 = make_weighting("sec", 3), weighting.SECCurriculum(3)
    m, p = [0.4, 0.2, 0.0], [True, True, False]
    np.testing.assert_array_equal(s1.observe(TaskStats.make(3, [0, 0, 0], present=p, mean_abs_advantage=m)),
                                  s2.update(m, present=p))
    assert s1.metrics()["sec_reward"].tolist() == m
    with pytest.raises(ValueError, match="mean_abs_advantage"):
        s1.observe(TaskStats.make(3, [0, 0, 0]))
    with pytest.raises(ValueError, match="present"):
        TaskStats.make(3, [0, 0, 0], present=[1, 2, 0])


def test_gdro_registries_build_the_api_classes():
    pg = gdro.make_advantage_weighting("prompt-gdro", 4, eta=1.0)
    assert isinstance(pg, gdro.PromptGDRO) and isinstance(pg, gdro.AdvantageWeighting)
    q = pg.observe(np.array([0, 0, 1, 3]), np.array([1.0, 0.5, 0.2, 0.0]))
    np.testing.assert_array_equal(q, pg.metrics()["gdro_q"])
    for rule in ("sqrt", "bandit"):
        ra = gdro.make_rollout_allocation(rule, 4, n_min=2, n_max=6, n_mean=3)
        assert isinstance(ra, gdro.RolloutAllocator) and ra.method == rule and isinstance(ra, gdro.RolloutAllocation)
        n = ra.allocate(np.array([0, 1, 1, 3]))
        assert n.sum() == 12
        ra.observe(np.array([0, 1, 1, 3]), n, np.zeros(int(n.sum())))
    with pytest.raises(ValueError, match="rollout allocation: expected one of"):
        gdro.make_rollout_allocation("uniform", 4)


def test_algorithms_are_bundles_of_registered_names():
    names = algorithm_names()
    for want in ("grpo", "dapo", "mtgrpo", "sec-grpo", "sec-dapo", "prompt-gdro", "rollout-gdro",
                 "mtgrpo-reward-only", "iwu-no-rps", "rps-uniform"):
        assert want in names
    assert get_algorithm("sec") is get_algorithm("sec-dapo")     # the CLI's historical name
    m = get_algorithm("mtgrpo")
    assert (m.sampler, m.filter_zero_adv, m.weighting) == ("ratio-preserving", True, "iwu")
    assert get_algorithm("iwu-no-rps").sampler == "mixed" and get_algorithm("rps-uniform").weighting == "uniform"
    assert get_algorithm("mtgrpo-reward-only").weighting == "reward-only"
    assert get_algorithm("grpo").loss_preset() == {"clip_eps_low": 0.2, "clip_eps_high": 0.2,
                                                   "loss_agg": "seq-mean-token-mean", "filter_zero_adv": False}
    assert get_algorithm("prompt-gdro").uses_difficulty_bins and not get_algorithm("dapo").uses_difficulty_bins
    with pytest.raises(ValueError, match="weighting: expected one of"):
        Algorithm("x", "bad", weighting="nope")
    with pytest.raises(ValueError, match="sampler"):
        Algorithm("x", "bad", sampler="nope")
    with pytest.raises(ValueError, match="algorithm: expected one of"):
        get_algorithm("gpro")


def test_one_set_of_names_in_cli_config_sim_and_integrations():
    from mtgrpo_core.sim import ALGOS as SIM
    from mtgrpo_core.train.config import ALGOS as CFG

    assert set(CFG) == set(algorithm_names(aliases=True))
    # "grpo": the GDRO runs' matched baseline (issue 14: same unfiltered draw, same mean rollouts)
    assert set(SIM) == set(weighting.weighting_names()) | {"prompt-gdro", "rollout-sqrt", "rollout-bandit", "grpo"}
    src = (PKG / "cli.py").read_text()
    assert "algorithm_names(aliases=True)" in src
    # the integrations build controllers through the registry only
    for f in ("integrations/_batching.py", "integrations/verl.py", "integrations/trl.py", "sim/core.py"):
        text = (PKG / f).read_text()
        for cls in ("ImprovementAwareWeights(", "RegularizedWeights(", "SECCurriculum(", "PromptGDRO(",
                    "RolloutAllocator("):
            assert cls not in text, (f, cls)


def test_trainer_has_no_branch_on_an_algorithm_name():
    names = set(algorithm_names(aliases=True)) | set(weighting.weighting_names(aliases=True))
    tree = ast.parse((PKG / "train" / "trainer.py").read_text())
    consts = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not (consts & names), consts & names
    attrs = {ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Compare)}
    assert not any("run.algo" in a for a in attrs), attrs


def test_no_import_cycle_between_cli_and_demo():
    code = "import sys, mtgrpo_core.cli; print('mtgrpo_core.demo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert "from .demo" not in (PKG / "cli.py").read_text()


def test_pool_walker_and_mixed_sampler():
    w = PoolWalker([3, np.array([10, 11])], np.random.default_rng(0))
    first = [w.next(0) for _ in range(3)]
    assert sorted(first) == [0, 1, 2]                       # an epoch visits every member once
    assert sorted(w.take(1, 2).tolist()) == [10, 11]
    got = w.take(0, 3)
    assert sorted(got.tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="n: pool 1 holds 2"):
        w.take(1, 3)
    s = MixedSampler([5, 5], seed=1)
    st = s.state_dict()
    a = s.draw(6, [0.5, 0.5])
    s.load_state_dict(st)
    b = s.draw(6, [0.5, 0.5])
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len(set(zip(*[v.tolist() for v in a]))) == len(a[0])   # no prompt twice
    with pytest.raises(ValueError, match="probs"):
        s.draw(2, [0.0, 0.0])


def test_group_statistics_follow_group_advantages():
    from mtgrpo_core.groups import group_labels, informative_groups, per_task_mean

    r = np.array([1.0, 0.0, 1.0, 1.0, 0.1, 0.1, 0.5])
    g = np.array([0, 0, 1, 1, 2, 2, 3])
    np.testing.assert_array_equal(informative_groups(r, g), [True, False, False, False])   # singleton: no baseline
    np.testing.assert_array_equal(informative_groups(r[:0], g[:0], 2), [False, False])
    assert group_labels(["b", "a", "b", "c"]).tolist() == [0, 1, 0, 2]
    m, p = per_task_mean([1.0, 3.0, 5.0], [0, 0, 2], 3)
    assert m.tolist() == [2.0, 0.0, 5.0] and p.tolist() == [True, False, True]


def test_a_new_weighting_rule_is_one_registration(tmp_path):
    """The CONTRIBUTING.md example: a rule registered under a new name runs in the simulator
    (and would in the trainer through an Algorithm bundle) without touching either."""
    from mtgrpo_core.sim import SimConfig, simulate

    @register_weighting("test-inverse-accuracy")
    class InverseAccuracy:
        needs_improvement = False

        def __init__(self, num_tasks, floor=0.05):
            self.num_tasks, self.floor = num_tasks, floor
            self.z = np.full(num_tasks, 1.0 / num_tasks)

        @property
        def weights(self):
            return self.z.copy()

        def observe(self, stats):
            w = np.maximum(1.0 - stats.rewards, self.floor)
            self.z = w / w.sum()
            return self.weights

        def metrics(self):
            return {}

        def state_dict(self):
            return {"z": self.z.tolist()}

        def load_state_dict(self, d):
            self.z = np.asarray(d["z"], float)

    try:
        res = simulate("test-inverse-accuracy", SimConfig(steps=20))
        assert res.weights.shape == (20, 3) and np.allclose(res.weights.sum(1), 1)
        assert res.weights[-1, 2] > res.weights[-1, 0]       # the hard task gets the most weight
        algo = register_algorithm(Algorithm("test-inverse-dapo", "example", filter_zero_adv=True,
                                            weighting="test-inverse-accuracy"))
        assert get_algorithm("test-inverse-dapo") is algo
    finally:
        weighting.WEIGHTINGS.pop("test-inverse-accuracy", None)
        from mtgrpo_core.algorithms import ALGORITHMS

        ALGORITHMS.pop("test-inverse-dapo", None)

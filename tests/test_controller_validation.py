"""Controller hyperparameters and states are validated (issue 16, item 8): 1e300 step sizes
used to give NaN weights whose state could no longer be loaded."""
import json

import numpy as np
import pytest

from mtgrpo_core.gdro import DifficultyClassifier, PromptGDRO, RolloutAllocator
from mtgrpo_core.weighting import ImprovementAwareWeights, RegularizedWeights, SECCurriculum, TaskRewardTracker


@pytest.mark.parametrize("cls,kw,name", [
    (RegularizedWeights, dict(lr=1e300), "lr"),
    (RegularizedWeights, dict(eta=1e300), "eta"),
    (ImprovementAwareWeights, dict(lr=1e300), "lr"),
    (ImprovementAwareWeights, dict(weight_decay=1e300), "weight_decay"),
    (ImprovementAwareWeights, dict(lam=1e300), "lam"),
    (ImprovementAwareWeights, dict(lr=float("nan")), "lr"),
    (ImprovementAwareWeights, dict(lr=0.0), "lr"),
    (ImprovementAwareWeights, dict(improvement_clip=float("inf")), "improvement_clip"),
    (PromptGDRO, dict(eta=1e300), "eta"),
    (PromptGDRO, dict(cap=1e300), "cap"),
    (RolloutAllocator, dict(eta=1e300), "eta"),
    (RolloutAllocator, dict(n_max=10**12), "n_max"),
    (DifficultyClassifier, dict(window=10**10), "window"),
])
def test_out_of_range_hyperparameters_are_refused_by_name(cls, kw, name):
    args = () if cls is DifficultyClassifier else (3,)
    with pytest.raises(ValueError, match=rf"^{name}: "):
        cls(*args, **kw)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_weights_stay_finite_at_the_largest_allowed_hyperparameters(optimizer):
    rng = np.random.default_rng(0)
    for cls, kw in ((RegularizedWeights, dict(lr=1e3, eta=1e3, optimizer=optimizer)),
                    (ImprovementAwareWeights, dict(lr=1e3, weight_decay=1e3, lam=1e6, improvement_clip=1e6,
                                                   optimizer=optimizer))):
        c = cls(3, **kw)
        for _ in range(200):
            z = c.update(rng.choice([1e300, -1e300, 0.0, 1.0], 3), rng.choice([1e300, -1e300, 0.0], 3))
            assert np.all(np.isfinite(z)) and abs(z.sum() - 1.0) < 1e-12 and np.all(z >= 0)
        st = json.loads(json.dumps(c.state_dict()))
        c2 = cls(3, **kw)
        c2.load_state_dict(st)
        assert np.array_equal(c2.weights, c.weights)


def test_corrupt_states_are_refused_and_change_nothing():
    c = ImprovementAwareWeights(3)
    c.update([0.1, 0.5, 0.9], [0.0, 0.01, -0.01])
    good = c.state_dict()
    before = c.weights.copy()
    for key, val, pat in (("xi", [float("nan")] * 3, "xi"), ("xi", [1e300] * 3, "xi"), ("steps", -1, "steps"),
                          ("steps", 1.5, "steps"), ("adam", {"m": [0] * 3, "v": [-1] * 3, "t": 1}, "v"),
                          ("adam", {"m": [0] * 3, "v": [0] * 3, "t": -1}, "t"), ("adam", None, "adam")):
        with pytest.raises(ValueError, match=pat):
            c.load_state_dict({**good, key: val})
        assert np.array_equal(c.weights, before)
    bad = {k: v for k, v in good.items() if k != "xi"}
    with pytest.raises(ValueError, match="missing key 'xi'"):
        c.load_state_dict(bad)
    s = SECCurriculum(3)
    with pytest.raises(ValueError, match="steps"):
        s.load_state_dict({**s.state_dict(), "steps": -2})
    t = TaskRewardTracker(3)
    with pytest.raises(ValueError, match="values"):
        t.load_state_dict({**t.state_dict(), "values": [float("inf")] * 3})
    g = PromptGDRO(4)
    with pytest.raises(ValueError, match="seen"):
        g.load_state_dict({**g.state_dict(), "seen": [2, 0, 0, 0]})
    a = RolloutAllocator(2)
    with pytest.raises(ValueError, match="p"):
        a.load_state_dict({**a.state_dict(), "p": [5.0, 0.0]})
    d = DifficultyClassifier()
    d.update(["a", "b"], [True, False])
    st = d.state_dict()
    before = d.pass_rates(["a", "b"])
    with pytest.raises(ValueError, match="hysteresis"):
        d.load_state_dict({**st, "hysteresis": float("nan")})
    with pytest.raises(ValueError, match="inconsistent"):
        d.load_state_dict({**st, "windows": ["1", "2"]})
    assert np.array_equal(d.pass_rates(["a", "b"]), before)

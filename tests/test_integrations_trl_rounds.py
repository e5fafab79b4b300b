"""Issue 23: MT-GRPO whole inside TRL. Acceptance-aware generation rounds
(``max_generation_rounds``), the improvement signal I_k measured after each optimiser step,
and DAPO's dynamic sampling (``dynamic_sampling=True`` without a task column) for every
supported loss type. Tiny in-process Llama, char tokenizer, a reward that is a function of
the prompt and the rollout's position (so which groups are informative is known)."""
from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig  # noqa: E402

import mtgrpo_core.integrations.trl as mtrl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_workers"))
# the character tokenizer and tiny Llama of the 2-process TRL worker, one definition for both
from trl_worker import model as _model  # noqa: E402
from trl_worker import tokenizer as _tokenizer  # noqa: E402
from mtgrpo_core.integrations._trl_rounds import join_rows  # noqa: E402
from mtgrpo_core.integrations.trl import SUPPORTED_LOSS_TYPES, MTGRPOTrainer  # noqa: E402
from mtgrpo_core.weighting import TaskRewardTracker, TaskStats, make_weighting  # noqa: E402

G = 2
# percent of each task's prompts whose group is informative (rewards 0 and 1), the others all 0
INFORMATIVE = {"alpha": 25, "beta": 55, "gamma": 90}


def _informative(prompt: str, task: str) -> bool:
    return zlib.crc32(prompt.encode()) % 100 < INFORMATIVE.get(task, 50)


EVENTS: list = []


def reward(prompts, completions, task=None, **kwargs):
    """Position i % G of an informative prompt's group scores i % G (0, 1); other groups 0."""
    task = task if task is not None else ["all"] * len(prompts)
    r = [float(i % G) if _informative(p, t) else 0.0 for i, (p, t) in enumerate(zip(prompts, task))]
    EVENTS.append(("reward", list(task), list(r)))
    return r


def _data(with_task=True, per_task=20):
    if with_task:
        return Dataset.from_list([{"prompt": f"{t} {i}:", "task": t} for t in INFORMATIVE for i in range(per_task)])
    return Dataset.from_list([{"prompt": f"q {i}:"} for i in range(per_task * 2)])


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=6, num_generations=G, max_completion_length=3,
                max_steps=4, learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                seed=0, loss_type="dapo", dataloader_num_workers=0, bf16=False, disable_tqdm=True)
    base.update(kw)
    return GRPOConfig(**base)


def test_rounds_fill_a_fixed_batch_with_informative_groups(tok, tmp_path):
    """Gradient accumulation 2, steps_per_generation 4 (two optimiser steps a generation): every
    generation batch keeps TRL's shape, its informative groups number P - shortfall, no prompt
    twice, rounds are logged."""
    args = _args(tmp_path, steps_per_generation=4, gradient_accumulation_steps=2)
    tr = MTGRPOTrainer(model=_model(len(tok)), reward_funcs=reward, args=args, train_dataset=_data(),
                       processing_class=tok, max_generation_rounds=3, task_weighting="uniform", correct_threshold=0.5)
    batches = []
    orig = tr._generate_in_rounds

    def recording(inputs):  # instrumentation: keep each generation batch the trainer returns
        out = orig(inputs)
        batches.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in out.items()})
        return out

    tr._generate_in_rounds = recording
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    L = 6 * 4  # per_device_train_batch_size x steps_per_generation
    P = L // G
    assert len(batches) == 2  # 4 optimiser steps of GA 2 = 8 micro-batches = 2 generations of 4 micro-batches
    gen_logs = [h for h in logs if "generation/rounds" in h]
    assert len(gen_logs) == 2
    for b, h in zip(batches, gen_logs):
        assert b["completion_ids"].shape[0] == L and b["advantages"].shape == (L,)
        prompts = tok.batch_decode(b["prompt_ids"], skip_special_tokens=True)
        tasks = [tr.task_names[int(k)] for k in b[mtrl.TASK_IDS_KEY]]
        groups = [(prompts[g * G], tasks[g * G]) for g in range(P)]
        assert len(set(groups)) == P  # no prompt twice in the batch
        informative = np.array([_informative(p, t) for p, t in groups])
        adv = b["advantages"].view(P, G)
        # zero-advantage fillers carry exactly 0; informative groups a non-zero advantage
        assert torch.all(adv[torch.as_tensor(~informative)] == 0)
        assert torch.all(adv[torch.as_tensor(informative)].abs().sum(1) > 0)
        assert 1 <= h["generation/rounds"] <= 3
        assert informative.sum() == P - h["generation/shortfall"]
        for name in INFORMATIVE:
            if f"task/{name}/informative_frac" in h:
                assert 0.0 <= h[f"task/{name}/informative_frac"] <= 1.0
    # across the run the later rounds did add informative groups: round 1 alone accepts ~55%
    assert any(h["generation/rounds"] > 1 for h in gen_logs)


def test_improvement_weights_equal_the_library_controller_fed_the_same_data(tok, tmp_path, monkeypatch):
    """TRL's path (rounds on, steps_per_generation 2) and the library's own objects fed the same
    per-round rewards and the same per-row losses before / after each optimiser step (as
    train/trainer.py measures I_k) end with the same MT-GRPO weights."""
    calls = []
    real = mtrl.grpo_loss

    def recording_loss(*a, **kw):  # instrumentation: the real kernel, its per-row losses recorded
        loss, st = real(*a, **kw)
        if kw.get("task_ids") is not None:
            calls.append(("loss", torch.is_grad_enabled(), st.per_sequence_loss.detach().double().numpy().copy(),
                          kw["task_ids"].cpu().numpy().copy()))
            EVENTS.append(calls[-1])
        return loss, st

    monkeypatch.setattr(mtrl, "grpo_loss", recording_loss)
    EVENTS.clear()
    ckw = {"lam": 1.0, "lr": 0.5}
    args = _args(tmp_path, steps_per_generation=2)
    tr = MTGRPOTrainer(model=_model(len(tok)), reward_funcs=reward, args=args, train_dataset=_data(),
                       processing_class=tok, max_generation_rounds=2, task_weighting_kwargs=ckw, correct_threshold=0.5)
    assert tr._measure_improvement
    tr.train()
    K = len(tr.task_names)
    pos = {n: k for k, n in enumerate(tr.task_names)}
    tracker = TaskRewardTracker(K, decay=0.5)
    ctrl = make_weighting("mtgrpo", K, policy_lr=1e-2, **ckw)
    before, updates = None, 0
    for ev in EVENTS:
        if ev[0] == "reward":  # one generation round: J_k of its rollouts
            t = np.array([pos[x] for x in ev[1]])
            c = (np.array(ev[2]) >= 0.5).astype(float)
            present = np.bincount(t, minlength=K) > 0
            acc = np.bincount(t, weights=c, minlength=K) / np.maximum(np.bincount(t, minlength=K), 1)
            tracker.update(acc, present)
        elif ev[1]:   # the training forward: the loss before the step
            before = ev
        else:         # the re-forward after the step: I_k = -(after - before) per task
            _, _, after, tk = ev
            _, _, b, tb = before
            np.testing.assert_array_equal(tk, tb)
            imp = -(np.bincount(tk, weights=after, minlength=K) - np.bincount(tb, weights=b, minlength=K))
            ctrl.observe(TaskStats.make(K, tracker.values, improvements=imp))
            updates += 1
    assert updates == 4  # one per optimiser step
    np.testing.assert_allclose(tr.task_weights, ctrl.weights, rtol=1e-12, atol=1e-15)
    assert np.ptp(tr.task_weights) > 1e-3  # the weights moved, so the comparison means something
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert all(f"task/{n}/improvement" in h for h in logs for n in tr.task_names)
    # the second pass sees the updated policy (ratio != 1), so I_k is not identically 0
    assert any(abs(h[f"task/{n}/improvement"]) > 1e-6 for h in logs for n in tr.task_names)
    assert all(0.0 < h["improvement/time_share"] < 1.0 for h in logs)


@pytest.mark.parametrize("loss_type", SUPPORTED_LOSS_TYPES)
def test_dynamic_sampling_without_task_column_for_every_loss_type(tok, tmp_path, loss_type):
    """DAPO's dynamic sampling: one task, zero-advantage groups redrawn, batch shape fixed."""
    kw = {"epsilon_high": 4.0} if loss_type == "cispo" else {}   # TRL's cispo caps the ratio at epsilon_high
    tr = MTGRPOTrainer(model=_model(len(tok)), reward_funcs=reward, args=_args(tmp_path, loss_type=loss_type,
                                                                                  max_steps=1, **kw),
                       train_dataset=_data(with_task=False), processing_class=tok, dynamic_sampling=True)
    assert tr.task_names == [mtrl.SINGLE_TASK] and tr.max_generation_rounds == mtrl.DEFAULT_DYNAMIC_ROUNDS
    assert not tr._measure_improvement
    tr.train()
    h = [h for h in tr.state.log_history if "loss" in h][0]
    assert np.isfinite(h["loss"]) and 1 <= h["generation/rounds"] <= mtrl.DEFAULT_DYNAMIC_ROUNDS
    assert h["generation/shortfall"] >= 0 and 0 <= h["task/all/informative_frac"] <= 1
    np.testing.assert_array_equal(tr.task_weights, [1.0])


def test_round_arguments_are_validated(tok, tmp_path):
    data = _data()

    def make(**kw):
        return MTGRPOTrainer(model=_model(len(tok)), reward_funcs=reward, args=_args(tmp_path), train_dataset=data,
                             processing_class=tok, **kw)

    with pytest.raises(ValueError, match="max_generation_rounds"):
        make(max_generation_rounds=0)
    with pytest.raises(ValueError, match="max_generation_rounds"):
        make(max_generation_rounds=1, dynamic_sampling=True)
    with pytest.raises(TypeError, match="max_generation_rounds"):
        make(max_generation_rounds=2.5)
    with pytest.raises(TypeError, match="dynamic_sampling"):
        make(dynamic_sampling="yes")
    with pytest.raises(ValueError, match="measure_improvement"):
        make(task_weighting="uniform", measure_improvement=True)
    with pytest.raises(ValueError, match="task_column"):  # without dynamic sampling the column is required
        MTGRPOTrainer(model=_model(len(tok)), reward_funcs=reward, args=_args(tmp_path),
                      train_dataset=_data(with_task=False), processing_class=tok)


def test_rounds_state_round_trips_through_json(tok, tmp_path):
    tr = MTGRPOTrainer(model=_model(len(tok)), reward_funcs=reward, args=_args(tmp_path), train_dataset=_data(),
                       processing_class=tok, max_generation_rounds=3)
    s = tr._round_sampler
    s.start_step(tr.task_weights)
    first = s.next_round()
    s.report(first.task_ids, first.prompt_indices, np.ones(len(first), bool))
    s.finish()
    state = json.loads(json.dumps(tr.task_weighting_state(), default=mtrl._json_default))
    nxt = (s.start_step(tr.task_weights), s.next_round())[1]
    tr.load_task_weighting_state(state)
    again = (tr._round_sampler.start_step(tr.task_weights), tr._round_sampler.next_round())[1]
    np.testing.assert_array_equal(again.prompt_indices, nxt.prompt_indices)
    plain = MTGRPOTrainer(model=_model(len(tok)), reward_funcs=reward, args=_args(tmp_path), train_dataset=_data(),
                          processing_class=tok)
    with pytest.raises(ValueError, match="max_generation_rounds"):
        plain.load_task_weighting_state(state)


def test_join_rows_pads_prompts_left_and_completions_right():
    a = {"prompt_ids": torch.tensor([[5, 6], [7, 8]]), "prompt_mask": torch.ones(2, 2, dtype=torch.long),
         "completion_ids": torch.tensor([[1, 2, 3], [4, 5, 6]]), "completion_mask": torch.ones(2, 3, dtype=torch.long),
         "advantages": torch.tensor([0.5, -0.5]), "num_items_in_batch": torch.tensor(6)}
    b = {"prompt_ids": torch.tensor([[9, 9, 9]]), "prompt_mask": torch.ones(1, 3, dtype=torch.long),
         "completion_ids": torch.tensor([[3]]), "completion_mask": torch.ones(1, 1, dtype=torch.long),
         "advantages": torch.tensor([2.0]), "num_items_in_batch": torch.tensor(1)}
    out = join_rows([a, b], [(1, 0), (0, 1)], pad_token_id=0)
    assert "num_items_in_batch" not in out
    torch.testing.assert_close(out["prompt_ids"], torch.tensor([[9, 9, 9], [0, 7, 8]]))
    torch.testing.assert_close(out["prompt_mask"], torch.tensor([[1, 1, 1], [0, 1, 1]]))
    torch.testing.assert_close(out["completion_ids"], torch.tensor([[3, 0, 0], [4, 5, 6]]))
    torch.testing.assert_close(out["completion_mask"], torch.tensor([[1, 0, 0], [1, 1, 1]]))
    torch.testing.assert_close(out["advantages"], torch.tensor([2.0, -0.5]))
    with pytest.raises(ValueError, match="text batches only"):
        join_rows([dict(a, pixel_values=torch.zeros(2, 3))], [(0, 0)], pad_token_id=0)
    with pytest.raises(ValueError, match="picks"):
        join_rows([a], [(1, 0)], pad_token_id=0)
    with pytest.raises(ValueError, match="picks"):
        join_rows([a], [(0, 5)], pad_token_id=0)


@pytest.mark.parametrize("rounds", [None, 2])
def test_prompt_gdro_multiplies_trl_advantages_by_the_adversary_weights(tok, tmp_path, rounds):
    """advantage_weighting='prompt-gdro': the trained advantages are TRL's times the weights of a
    PromptGDROAdvantage fed the same prompt ids and rewards (bins from each prompt's pass history
    over the earlier steps); the state round-trips through JSON."""
    from mtgrpo_core.integrations.verl import PromptGDROAdvantage

    data = _data(per_task=2)  # 6 prompts, 3 a generation batch: every prompt comes back every 2 steps
    kw = {"max_generation_rounds": rounds} if rounds else {}
    tr = MTGRPOTrainer(model=_model(len(tok)), reward_funcs=reward, args=_args(tmp_path, max_steps=5),
                       train_dataset=data, processing_class=tok, task_weighting="uniform", correct_threshold=0.5,
                       advantage_weighting="prompt-gdro", advantage_weighting_kwargs={"eta": 4.0}, **kw)
    seen = []
    orig = tr._apply_gdro

    def recording(out, keys, r):  # instrumentation: the advantages before / after the multipliers
        before = out["advantages"].clone()
        orig(out, keys, r)
        seen.append((list(keys), np.asarray(r).copy(), before, out["advantages"].clone()))

    tr._apply_gdro = recording
    tr.train()
    ref = PromptGDROAdvantage(eta=4.0, correct_threshold=0.5)
    moved = False
    for keys, r, before, after in seen:
        w = ref.step(torch.as_tensor(r), before, np.arange(len(keys)) // G, {"index": keys})
        torch.testing.assert_close(after, before * torch.as_tensor(w, dtype=before.dtype))
        moved |= bool(np.ptp(w) > 1e-6)
    assert len(seen) == 5
    # without rounds the batch mixes bins and the multipliers differ once prompts came back
    # (with rounds this reward leaves only informative prompts, all in the top bin)
    assert moved or rounds
    state = json.loads(json.dumps(tr.task_weighting_state(), default=mtrl._json_default))
    tr.load_task_weighting_state(state)
    np.testing.assert_allclose(tr._gdro.gdro.distribution, ref.gdro.distribution)
    with pytest.raises(ValueError, match="advantage_weighting"):
        MTGRPOTrainer(model=_model(len(tok)), reward_funcs=reward, args=_args(tmp_path), train_dataset=data,
                      processing_class=tok, advantage_weighting="rollout-gdro")
    with pytest.raises(ValueError, match="surrogate"):
        MTGRPOTrainer(model=_model(len(tok)), reward_funcs=reward, args=_args(tmp_path), train_dataset=data,
                      processing_class=tok, advantage_weighting="prompt-gdro",
                      advantage_weighting_kwargs={"signal": "surrogate"})

"""TRL integration: MTGRPOTrainer's loss equals GRPOTrainer._compute_loss on identical inputs
for every supported loss_type (values and gradients), and two real CPU training steps with a
tiny in-process Llama model, a char-level tokenizer and reasoning-gym prompts build
task-ratio batches and log per-task accuracy and weights."""
from __future__ import annotations

import collections
import zlib

import numpy as np
import pytest
import torch

pytest.importorskip("trl")
rg = pytest.importorskip("reasoning_gym")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, decoders, models  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from mtgrpo_core.integrations.trl import MTGRPOTrainer, TaskRepeatSampler  # noqa: E402
from mtgrpo_core.sampling import target_counts  # noqa: E402

SEED_OF: dict = {}
TASKS = ("basic_arithmetic", "chain_sum", "arc_1d")


def _tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per char
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _model(vocab_size: int):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(cfg)


def _dataset(per_task: int = 12):
    rows = []
    for name in TASKS:
        ds = rg.create_dataset(name, size=per_task, seed=3)
        for i in range(per_task):
            e = ds[i]
            rows.append({"prompt": e["question"][:120], "task": name, "answer": str(e["answer"])})
    return Dataset.from_list(rows)


SEEN_TASKS: list[list[str]] = []


def reward_digits(prompts, completions, task, answer, **kwargs):
    """1 for the exact answer, else the share of digits (a shaped reward so groups differ)."""
    SEEN_TASKS.append(list(task))
    return [1.0 if c.strip() == a else sum(ch.isdigit() for ch in c) / max(len(c), 1)
            for c, a in zip(completions, answer)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = _tokenizer()
    data = _dataset()
    return tok, data, tmp_path_factory.mktemp("trl")


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=12, num_generations=2, max_completion_length=6,
                max_steps=2, learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                seed=0, loss_type="dapo", dataloader_num_workers=0, bf16=False)
    base.update(kw)
    return GRPOConfig(**base)


def test_two_training_steps_task_ratio_batches(setup):
    tok, data, out = setup
    model = _model(len(tok))
    tr = MTGRPOTrainer(model=model, reward_funcs=reward_digits, args=_args(out), train_dataset=data,
                       processing_class=tok, task_weighting_kwargs={"lam": 1.0, "lr": 0.5},
                       correct_threshold=0.3)
    assert isinstance(tr._get_train_sampler(), TaskRepeatSampler)
    composed = []
    orig = tr.task_composer.next_batch

    def recording_next_batch():  # instrumentation: remember each chunk's planned task counts
        shares = tr.task_composer.draw_shares()
        idx = orig()
        composed.append((shares, tr.task_composer.last_counts.copy(), idx))
        return idx

    tr.task_composer.next_batch = recording_next_batch
    before = [p.detach().clone() for p in model.parameters()]
    SEEN_TASKS.clear()
    tr.train()
    changed = sum(float((p.detach() - q).abs().sum()) for p, q in zip(model.parameters(), before))
    assert changed > 0, "two optimizer steps must move the weights"
    assert len(SEEN_TASKS) >= 2
    P = 12 // 2
    for (shares, counts, idx), seen in zip(composed, SEEN_TASKS):
        # the planned quota is target_counts(q, P) and the generation batch really holds it
        np.testing.assert_array_equal(counts, target_counts(shares, P))
        got = collections.Counter(seen)
        expect = {name: int(c) * 2 for name, c in zip(tr.task_names, counts) if c}
        assert dict(got) == expect
        assert len(set(idx.tolist())) == P  # no prompt twice in a batch
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2
    for name in TASKS:
        assert f"task/{name}/accuracy" in logs[0] and f"task/{name}/weight" in logs[0]
    w = tr.task_weights
    assert np.isclose(w.sum(), 1.0) and np.all(w > 0)
    np.testing.assert_allclose([logs[-1][f"task/{n}/weight"] for n in tr.task_names], w, rtol=1e-6)
    acc = np.array([logs[0][f"task/{n}/accuracy"] for n in tr.task_names])
    if np.ptp(acc) > 0:  # tasks of different accuracy: the IWU step moves weight to the worst one
        assert np.argmax(w) == np.argmin(tr.task_composer.tracker.values)


def _inputs(tok, B=6, Tp=5, Tc=7, seed=0, beta=False):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, len(tok), (B, Tp), generator=g)
    prompt_mask = torch.ones(B, Tp, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    completion_ids = torch.randint(3, len(tok), (B, Tc), generator=g)
    completion_mask = torch.ones(B, Tc, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[3, 2:] = 0
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask,
              "advantages": torch.randn(B, generator=g),
              "num_items_in_batch": completion_mask.sum() * 2}  # as if the generation batch were twice as large
    return inputs, g


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("variant", ["plain", "clip_higher_kl_delta", "kl_no_bias_correction", "sequence",
                                     "entropy_mask"])
def test_loss_parity_with_trl_compute_loss(setup, loss_type, variant):
    tok, data, out = setup
    model = _model(len(tok))
    kw = {}
    if variant == "clip_higher_kl_delta":
        kw.update(epsilon_high=0.28, delta=1.5)
    elif variant == "kl_no_bias_correction":
        kw.update(use_bias_correction_kl=False)
    elif variant == "sequence":
        kw.update(importance_sampling_level="sequence")
    elif variant == "entropy_mask":
        kw.update(top_entropy_quantile=0.5)
    args = _args(out, loss_type=loss_type, gradient_accumulation_steps=2, steps_per_generation=4, **kw)
    tr = MTGRPOTrainer(model=model, reward_funcs=reward_digits, args=args, train_dataset=data, processing_class=tok)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 2
    if variant in ("clip_higher_kl_delta", "kl_no_bias_correction"):
        tr.beta = 0.04  # set after construction: with beta != 0 TRL would load a reference model by name
    seed = SEED_OF.get((loss_type, variant), zlib.crc32(f"{loss_type}-{variant}".encode()) % 1000)
    inputs, g = _inputs(tok, seed=seed)
    with torch.no_grad():  # behaviour policy = current policy perturbed, so the clip is active
        lp, _, _ = tr._get_per_token_logps_and_entropies(
            model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].size(1))
    inputs["old_per_token_logps"] = lp + 0.4 * torch.randn(lp.shape, generator=g)
    if tr.beta != 0.0:
        inputs["ref_per_token_logps"] = lp + 0.3 * torch.randn(lp.shape, generator=g)

    def run(fn):
        model.zero_grad()
        loss = fn(model, inputs)
        loss.backward()
        return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]

    ref_loss, ref_grads = run(lambda m, x: GRPOTrainer._compute_loss(tr, m, x))
    our_loss, our_grads = run(tr._compute_loss)
    torch.testing.assert_close(our_loss, ref_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert abs(float(ref_loss)) > 0


def test_rejects_unsupported_options(setup):
    tok, data, out = setup
    # every TRL loss type is supported since issue 22; the entropy bonus is not
    with pytest.raises(ValueError, match="entropy_coef"):
        MTGRPOTrainer(model=_model(len(tok)), reward_funcs=reward_digits, args=_args(out, entropy_coef=0.01),
                      train_dataset=data, processing_class=tok)
    with pytest.raises(ValueError, match="task_column"):
        MTGRPOTrainer(model=_model(len(tok)), reward_funcs=reward_digits, args=_args(out), train_dataset=data,
                      processing_class=tok, task_column="nope")


def test_fewer_prompts_than_tasks_is_an_error(setup):
    tok, data, out = setup
    # 2 rows / 2 generations = 1 prompt per generation batch for 3 tasks
    with pytest.raises(ValueError, match="fewer than the 3 tasks"):
        MTGRPOTrainer(model=_model(len(tok)), reward_funcs=reward_digits,
                      args=_args(out, per_device_train_batch_size=2), train_dataset=data, processing_class=tok)


def test_rank_task_counts_rounds_each_share_up_or_down():
    from mtgrpo_core.integrations.trl import rank_task_counts

    rng = np.random.default_rng(0)
    for _ in range(500):
        K, R = int(rng.integers(1, 7)), int(rng.integers(1, 6))
        w = rng.integers(0, 7, size=R)
        if w.sum() == 0:
            continue
        n = np.bincount(rng.integers(0, K, size=int(w.sum())), minlength=K)
        c = rank_task_counts(n, w)
        np.testing.assert_array_equal(c.sum(1), n)
        np.testing.assert_array_equal(c.sum(0), w)
        assert np.all(np.abs(c - n[:, None] * w[None, :] / w.sum()) < 1)
    with pytest.raises(ValueError, match="windows"):
        rank_task_counts([2, 1], [1, 1])


def test_sampler_layout_spreads_tasks_over_rank_slices(setup):
    from mtgrpo_core.integrations._batching import TaskBatchComposer

    tok, data, out = setup
    comp = TaskBatchComposer(list(data["task"]), 12, weighting="uniform", seed=0)
    s = TaskRepeatSampler(comp, len(data), mini_repeat_count=2, num_processes=3, rows_per_process=8)
    chunk = s.next_chunk()
    tasks = np.array([comp.task_ids[i] for i in chunk])
    for r in range(3):  # 4 prompts per rank, 4 of each task in the batch: 4/3 of each per rank, +-1
        counts = np.bincount(tasks[4 * r:4 * r + 4], minlength=3)
        assert np.all(np.abs(counts - 4 / 3) < 1), counts
    assert list(s.pending) == [chunk]


def test_task_weighting_state_round_trip_and_errors(setup, tmp_path):
    import json

    tok, data, out = setup
    tr = MTGRPOTrainer(model=_model(len(tok)), reward_funcs=reward_digits, args=_args(out), train_dataset=data,
                       processing_class=tok)
    sampler = tr._get_train_sampler()
    first = sampler.next_chunk()  # drawn (prefetched), not trained on: pending
    state = json.loads(json.dumps(tr.task_weighting_state()))
    assert state["pending"] == [first]
    assert {"controller", "tracker", "rho", "walk", "rng"} <= set(state["composer"])  # weights, EMA, RNG
    nxt = sampler.next_chunk()
    tr.load_task_weighting_state(state)
    replayed = tr._get_train_sampler()
    assert replayed.next_chunk() == first and replayed.next_chunk() == nxt  # replay, then the same draw
    bad = dict(state, task_names=["x", "y", "z"])
    with pytest.raises(ValueError, match="saved tasks"):
        tr.load_task_weighting_state(bad)
    with pytest.raises(ValueError, match="mtgrpo_task_weighting.json"):
        tr.train(resume_from_checkpoint=str(tmp_path))

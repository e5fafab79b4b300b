"""The policy-loss family against the installed peers' own code on identical inputs (issue 22).

* TRL 1.16: ``GRPOTrainer._compute_loss`` itself, for every ``loss_type`` and every
  ``vllm_importance_sampling_mode``, on a minimal trainer state (the attributes the method
  reads; the policy's log-probs come from a stub ``_get_per_token_logps_and_entropies`` so
  that the gradient is taken w.r.t. the same leaf tensor), against ``grpo_loss`` with the
  integration's mapping :func:`mtgrpo_core.integrations.trl.trl_loss_kwargs`.
* verl 0.9.1: its registered policy losses (vanilla, cispo, sapo, gpg, geo_mean) against the
  fused versions the plugin registers under the same names, with and without rollout IS
  weights from verl's own ``compute_rollout_correction_weights`` (token / sequence TIS,
  IcePop), and those weights against grpo_loss's ``is_correction``.

Values and gradients to float32 tolerance, on the C++ backend (the default on CPU) and on
Triton under TRITON_INTERPRET=1 for a subset.
"""
from __future__ import annotations

import collections
import math
import types
import zlib

import pytest
import torch

import mtgrpo_core as mc

trl = pytest.importorskip("trl")
from trl import GRPOTrainer  # noqa: E402

from mtgrpo_core.integrations.trl import SUPPORTED_IS_MODES, SUPPORTED_LOSS_TYPES, trl_loss_kwargs  # noqa: E402

TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


class _Acc:
    """The accelerator calls _compute_loss makes for metrics: one process."""

    num_processes = 1

    def gather(self, x):
        return x.reshape(-1)

    def reduce(self, x, reduction="sum"):
        return x

    def gather_for_metrics(self, x):
        return x


def _trl_state(loss_type, is_mode, lp, **kw):
    """The minimal trainer state GRPOTrainer._compute_loss reads (TRL 1.16 defaults)."""
    args = types.SimpleNamespace(delta=kw.get("delta"), use_bias_correction_kl=False, sapo_temperature_pos=1.0,
                                 sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                                 vespo_lambda_neg=2.0, steps_per_generation=4)
    st = types.SimpleNamespace(
        loss_type=loss_type, args=args, epsilon_low=0.2, epsilon_high=kw.get("epsilon_high", 0.28), beta=0.0,
        importance_sampling_level=kw.get("level", "token"), top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        use_vllm=is_mode is not None, vllm_importance_sampling_correction=is_mode is not None,
        vllm_importance_sampling_mode=is_mode or "sequence_mask",
        vllm_importance_sampling_clip_min=kw.get("clip_min", 0.5), vllm_importance_sampling_clip_max=3.0 if is_mode
        and is_mode.endswith("truncate") else kw.get("clip_max", 2.0),
        max_completion_length=lp.shape[1] + 3, current_gradient_accumulation_steps=2, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, model=types.SimpleNamespace(training=True), accelerator=_Acc(),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        get_gamma_weights=GRPOTrainer.get_gamma_weights, get_off_policy_mask=GRPOTrainer.get_off_policy_mask)
    return st


def _trl_is_ratio(old, samp, mask, st):
    """The importance-sampling ratio as TRL's _generate_and_score_completions computes it
    (trl/trainer/grpo_trainer.py, "Compute the importance sampling ratio when using vLLM")."""
    diff = torch.nan_to_num((old - samp) * mask, nan=0.0)
    if st.vllm_importance_sampling_mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    r = torch.exp(diff)
    lo, hi = st.vllm_importance_sampling_clip_min, st.vllm_importance_sampling_clip_max
    if st.vllm_importance_sampling_mode.endswith("truncate"):
        return torch.clamp(r, min=lo, max=hi)
    bad = (r < (-math.inf if lo is None else lo)) | (r > (math.inf if hi is None else hi))
    return r.masked_fill(bad, 0.0)


def _case(seed, b=6, t=9):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(b, t, generator=g) * 0.4 - 1.5
    old = lp + 0.3 * torch.randn(b, t, generator=g)
    samp = old + 0.25 * torch.randn(b, t, generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    adv = torch.randn(b, generator=g)
    adv[4] = 0.0
    return lp, old, samp, mask, adv


def _trl_inputs(lp, old, samp, mask, adv, st):
    b, t = lp.shape
    inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum() * 2}
    if st.use_vllm:
        inputs["sampling_per_token_logps"] = samp
        inputs["importance_sampling_ratio"] = _trl_is_ratio(old, samp, mask, st)
    return inputs


def _trl_loss(st, inputs, lp):
    x = lp.clone().requires_grad_()
    st._get_per_token_logps_and_entropies = lambda *a, **k: (x, torch.zeros_like(x), None)
    loss = GRPOTrainer._compute_loss(st, None, inputs)
    loss.backward()
    return loss.detach(), x.grad


def _our_loss(st, inputs, lp, backend="auto"):
    x = lp.clone().requires_grad_()
    kw, divide = trl_loss_kwargs(st, inputs, "train")
    loss, stats = mc.grpo_loss(x, inputs["old_per_token_logps"], inputs["completion_mask"], inputs["advantages"],
                               backend=backend, **kw)
    loss = loss / divide
    loss.backward()
    return loss.detach(), x.grad, stats


def test_every_trl_loss_type_is_supported():
    assert set(SUPPORTED_LOSS_TYPES) == set(TRL_LOSS_TYPES)
    assert set(SUPPORTED_IS_MODES) == {"token_truncate", "token_mask", "sequence_truncate", "sequence_mask"}


# TRL's GRPOTrainer.__init__ rejects VESPO with the sequence-level IS modes: those pairs are not cases
TRL_CASES = [(lt, m) for lt in TRL_LOSS_TYPES for m in (None, *SUPPORTED_IS_MODES)
             if not (lt == "vespo" and m is not None and m.startswith("sequence"))]


@pytest.mark.parametrize("loss_type,is_mode", TRL_CASES)
def test_trl_compute_loss_parity(loss_type, is_mode):
    kw = {"epsilon_high": 4.0} if loss_type == "cispo" else {}
    seed = TRL_LOSS_TYPES.index(loss_type) * 10 + (SUPPORTED_IS_MODES.index(is_mode) + 1 if is_mode else 0)
    lp, old, samp, mask, adv = _case(seed)
    if loss_type == "cispo":
        g = torch.Generator().manual_seed(seed)
        old = lp - 1.5 * torch.rand(lp.shape, generator=g)  # ratios above the cap
        samp = old + 0.1 * torch.randn(lp.shape, generator=g)
    st = _trl_state(loss_type, is_mode, lp, **kw)
    inputs = _trl_inputs(lp, old, samp, mask, adv, st)
    l0, g0 = _trl_loss(st, inputs, lp)
    l1, g1, stats = _our_loss(st, inputs, lp)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-7)
    assert float(g0.abs().sum()) > 0
    if is_mode is not None and loss_type != "vespo":  # TRL's logged mean IS ratio
        r = inputs["importance_sampling_ratio"]
        want = r.flatten().mean() if is_mode.startswith("sequence") else r[mask.bool()].mean()
        torch.testing.assert_close(stats.is_ratio_mean, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type,level,is_mode", [("grpo", "sequence", "token_mask"),
                                                     ("cispo", "sequence", "sequence_truncate"),
                                                     ("luspo", "sequence", None), ("dapo", "token", None)])
def test_trl_parity_sequence_level_and_delta(loss_type, level, is_mode):
    lp, old, samp, mask, adv = _case(77)
    st = _trl_state(loss_type, is_mode, lp, level=level, delta=1.5 if loss_type == "dapo" else None,
                    epsilon_high=4.0 if loss_type == "cispo" else 0.28)
    inputs = _trl_inputs(lp, old, samp, mask, adv, st)
    l0, g0 = _trl_loss(st, inputs, lp)
    l1, g1, _ = _our_loss(st, inputs, lp)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss_type,is_mode", [("cispo", "token_truncate"), ("sapo", "sequence_mask"),
                                               ("vespo", "token_mask"), ("luspo", "token_truncate")])
def test_trl_parity_triton_interpreter(loss_type, is_mode):
    lp, old, samp, mask, adv = _case(5)
    st = _trl_state(loss_type, is_mode, lp, epsilon_high=4.0 if loss_type == "cispo" else 0.28)
    inputs = _trl_inputs(lp, old, samp, mask, adv, st)
    l0, g0 = _trl_loss(st, inputs, lp)
    l1, g1, _ = _our_loss(st, inputs, lp, backend="triton")
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- verl
verl = pytest.importorskip("verl")
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

import mtgrpo_core.integrations.verl as mv  # noqa: E402

VERL_ORIGINALS = {"vanilla": core_algos.compute_policy_loss_vanilla, "cispo": core_algos.compute_policy_loss_cispo,
                  "sapo": core_algos.compute_policy_loss_sapo, "gpg": core_algos.compute_policy_loss_gpg,
                  "geo_mean": core_algos.compute_policy_loss_geo_mean}


def _verl_case(seed, n=7, t=11):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(n, t, generator=g) * 0.4 - 1.5
    old = lp + 0.3 * torch.randn(n, t, generator=g)
    roll = old + 0.2 * torch.randn(n, t, generator=g)
    mask = torch.rand(n, t, generator=g) > 0.25
    mask[2] = False
    mask[0] = True
    adv = torch.randn(n, 1, generator=g).expand(n, t).contiguous() * mask
    return lp, old, roll, mask.float(), adv


def test_verl_plugin_registers_fused_losses_under_verl_names():
    mv.register(sampler_hook=False)
    for name, fn in mv.FUSED_POLICY_LOSSES.items():
        assert core_algos.get_policy_loss_fn(name) is fn
        assert mv.ORIGINAL_POLICY_LOSSES[name] is VERL_ORIGINALS[name]


@pytest.mark.parametrize("is_level", [None, "token", "sequence", "token_icepop"])
@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("name", ["vanilla", "cispo", "sapo", "gpg", "geo_mean"])
def test_verl_policy_loss_parity(name, mode, is_level):
    cfg = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2, clip_ratio_low=0.2,
                      clip_ratio_high=0.28, clip_ratio_c=3.0)
    lp, old, roll, mask, adv = _verl_case(zlib.crc32(f"{name}-{mode}-{is_level}".encode()) % 1000)
    w = None
    if is_level is not None:
        thr = "0.8_1.2" if is_level == "token_icepop" else 1.5
        w, _ = compute_rollout_correction_weights(old - roll, mask, rollout_is=is_level.split("_")[0],
                                                  rollout_is_threshold=thr)
    x0 = lp.clone().requires_grad_()
    l0, m0 = VERL_ORIGINALS[name](old, x0, adv, mask, mode, cfg, rollout_is_weights=w)
    l0.backward()
    x1 = lp.clone().requires_grad_()
    l1, m1 = mv.FUSED_POLICY_LOSSES[name](old, x1, adv, mask, mode, cfg, rollout_is_weights=w)
    l1.backward()
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1.grad, x0.grad, rtol=1e-4, atol=1e-7)
    if name in ("cispo", "geo_mean"):
        assert m1["actor/pg_clipfrac"] == pytest.approx(m0["actor/pg_clipfrac"], abs=1e-6)


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
def test_verl_cov_losses_parity_on_the_torch_path(name):
    """verl's clip_cov / kl_cov (batch covariance selection; clip_cov draws with torch.randperm,
    so both sides start from the same global seed) against grpo_loss's torch-path forms."""
    from verl.workers.config.actor import PolicyLossConfig

    pl = PolicyLossConfig(loss_mode=name, clip_cov_ratio=0.1, clip_cov_lb=-0.5, clip_cov_ub=5.0, kl_cov_ratio=0.1,
                          ppo_kl_coef=0.7)
    cfg = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2, clip_ratio_low=0.2,
                      clip_ratio_high=0.28, clip_ratio_c=3.0, policy_loss=pl)
    lp, old, roll, mask, adv = _verl_case(21, n=9, t=17)
    torch.manual_seed(5)
    x0 = lp.clone().requires_grad_()
    l0, _ = VERL_ORIGINALS_COV[name](old, x0, adv, mask, "token-mean", cfg)
    l0.backward()
    torch.manual_seed(5)
    x1 = lp.clone().requires_grad_()
    l1, _ = mc.grpo_loss(x1, old, mask, adv, policy_loss=name, clip_eps_low=0.2, clip_eps_high=0.28,
                         clip_cov_ratio=0.1, clip_cov_lb=-0.5, clip_cov_ub=5.0, kl_cov_ratio=0.1, ppo_kl_coef=0.7)
    l1.backward()
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1.grad, x0.grad, rtol=1e-4, atol=1e-7)


VERL_ORIGINALS_COV = {"clip_cov": core_algos.compute_policy_loss_clip_cov,
                      "kl_cov": core_algos.compute_policy_loss_kl_cov}


@pytest.mark.parametrize("level,thr,ours", [("token", 1.5, ("token_truncate", None, 1.5)),
                                           ("sequence", 2.0, ("sequence_truncate", None, 2.0)),
                                           ("token", "0.8_1.25", ("token_mask", 0.8, 1.25)),
                                           ("sequence", "0.5_2.0", ("sequence_mask", 0.5, 2.0))])
def test_verl_rollout_correction_weights_parity(level, thr, ours):
    """grpo_loss's is_correction weights = verl's compute_rollout_correction_weights: the gpg
    loss times w summed per token (token-sum) gives sum_t w_t A_t logp_t on both sides."""
    lp, old, roll, mask, adv = _verl_case(11)
    w, _ = compute_rollout_correction_weights(old - roll, mask, rollout_is=level, rollout_is_threshold=thr)
    want = -(w * adv * lp * mask).sum()
    mode, lo, hi = ours
    got, st = mc.grpo_loss(lp, old, mask, adv, policy_loss="gpg", loss_agg="token-sum", rollout_logprobs=roll,
                           is_correction=mode, is_lo=lo, is_hi=hi)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if level == "token":
        torch.testing.assert_close(st.is_ratio_mean, (w * mask).sum() / mask.sum(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- MTGRPOTrainer end to end
def _tiny_trainer(tmp_path, loss_type, **kw):
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig as TRLConfig

    from mtgrpo_core.integrations.trl import MTGRPOTrainer

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: 3 + i for i, c in enumerate("abcdefgh")}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                  pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1))
    data = Dataset.from_list([{"prompt": "abc"[: 1 + i % 3], "task": f"t{i % 2}"} for i in range(8)])
    args = TRLConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                     max_completion_length=9, max_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                     loss_type=loss_type, gradient_accumulation_steps=2, steps_per_generation=4, bf16=False, **kw)
    tr = MTGRPOTrainer(model=model, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=args,
                       train_dataset=data, processing_class=tok)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 2
    return tr, model


@pytest.mark.parametrize("loss_type,is_mode", [("cispo", None), ("sapo", "token_truncate"), ("luspo", "sequence_mask"),
                                               ("vespo", "token_mask"), ("dapo", "sequence_truncate")])
def test_mtgrpo_trainer_matches_trl_for_new_loss_types(tmp_path, loss_type, is_mode):
    """MTGRPOTrainer._compute_loss (the fused kernel) = GRPOTrainer._compute_loss on the same
    model and inputs, values and parameter gradients, with TRL's vLLM IS correction switched on
    after construction (the sampling log-probs given as vLLM would)."""
    tr, model = _tiny_trainer(tmp_path, loss_type, **({"epsilon_high": 4.0} if loss_type == "cispo" else {}))
    if is_mode is not None:
        tr.use_vllm = tr.vllm_importance_sampling_correction = True
        tr.vllm_importance_sampling_mode = is_mode
    g = torch.Generator().manual_seed(3)
    b, t = 6, 9
    inputs = {"prompt_ids": torch.randint(3, 11, (b, 3), generator=g),
              "prompt_mask": torch.ones(b, 3, dtype=torch.long),
              "completion_ids": torch.randint(3, 11, (b, t), generator=g),
              "completion_mask": torch.ones(b, t, dtype=torch.long), "advantages": torch.randn(b, generator=g),
              "num_items_in_batch": torch.tensor(2 * b * t)}
    inputs["completion_mask"][1, 5:] = 0
    with torch.no_grad():
        lp, _, _ = tr._get_per_token_logps_and_entropies(
            model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), t)
    inputs["old_per_token_logps"] = lp + 0.3 * torch.randn(lp.shape, generator=g)
    if is_mode is not None:
        inputs["sampling_per_token_logps"] = inputs["old_per_token_logps"] + 0.2 * torch.randn(lp.shape, generator=g)
        inputs["importance_sampling_ratio"] = _trl_is_ratio(inputs["old_per_token_logps"],
                                                            inputs["sampling_per_token_logps"],
                                                            inputs["completion_mask"], tr)

    def run(fn):
        model.zero_grad()
        loss = fn(model, inputs)
        loss.backward()
        return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]

    l0, g0 = run(lambda m, x: GRPOTrainer._compute_loss(tr, m, x))
    l1, g1 = run(tr._compute_loss)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for a, b_ in zip(g1, g0):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-6)
    assert abs(float(l0)) > 0

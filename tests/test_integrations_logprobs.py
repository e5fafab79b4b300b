"""completion_logprobs in one process: values and gradients equal log_softmax of the model's
full logits, the mask selects rows, the head check refuses models that transform their
logits, bad input raises naming the argument; process_group needs torch.distributed."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import mtgrpo_core as mc  # noqa: E402
from mtgrpo_core.integrations import completion_logprobs, unwrap_model  # noqa: E402

V, T, TC = 37, 8, 3


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))


def _batch(b=3):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (b, T), generator=g)
    att = torch.ones(b, T, dtype=torch.long)
    att[0, :2] = 0
    cm = torch.ones(b, TC, dtype=torch.long)
    cm[1, 2:] = 0
    return ids, att, cm


@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_values_and_gradients_match_full_logits(tau):
    m = _llama()
    ids, att, cm = _batch()
    lp, ent = completion_logprobs(m, ids, att, cm, tau, return_entropy=True)
    (lp.sum() + 0.1 * ent.sum()).backward()
    g_fused = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    logits = m(input_ids=ids, attention_mask=att).logits[:, T - TC - 1:T - 1] / tau
    logp = torch.log_softmax(logits, -1)
    want = logp.gather(-1, ids[:, T - TC:, None])[..., 0] * cm
    want_ent = -(logp.exp() * logp).sum(-1) * cm
    torch.testing.assert_close(lp, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-5)
    assert float(lp.detach()[1, 2]) == 0.0  # outside the mask
    (want.sum() + 0.1 * want_ent.sum()).backward()
    for a, b in zip(g_fused, [p.grad for p in m.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_refuses_models_that_transform_their_logits():
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, head_dim=8, max_position_embeddings=32, final_logit_softcapping=0.5)
    m = Gemma2ForCausalLM(cfg)
    ids, att, cm = _batch()
    with pytest.raises(ValueError, match="soft-cap"):
        completion_logprobs(m, ids, att, cm)


def test_validation():
    m = _llama()
    ids, att, cm = _batch()
    with pytest.raises(ValueError, match="completion_mask"):
        completion_logprobs(m, ids, att, torch.ones(3, T))
    with pytest.raises(ValueError, match="attention_mask"):
        completion_logprobs(m, ids, att[:, 1:], cm)
    with pytest.raises(ValueError, match="temperature"):
        completion_logprobs(m, ids, att, cm, 0.0)
    with pytest.raises(TypeError, match="input_ids"):
        completion_logprobs(m, ids.float(), att, cm)
    with pytest.raises(TypeError, match="model"):
        completion_logprobs(object(), ids, att, cm)
    with pytest.raises(ValueError, match="output_hidden_states"):
        completion_logprobs(m, ids, att, cm, output_hidden_states=False)
    with pytest.raises(ValueError, match="causal LM"):
        completion_logprobs(m.model, ids, att, cm)
    assert unwrap_model(torch.nn.DataParallel(m)) is m


def test_process_group_needs_torch_distributed():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    g = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="process_group"):
        mc.group_advantages(r, g, process_group=object())
    lp = torch.zeros(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match="process_group"):
        mc.grpo_loss(lp, None, torch.ones(4, 3), rewards=r, group_ids=g, process_group=object())

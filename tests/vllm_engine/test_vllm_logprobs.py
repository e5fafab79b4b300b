"""vLLM on CPU against the policy: sampling log-probs of the distribution actually sampled
from (temperature, top-p), before and after a weight sync through the worker extension."""
import copy

import pytest
import torch

# two prompts longer than a KV block (16 tokens): a prefix cache left from the old weights
# after a sync would be reused for them
PROMPTS = ["S:abcde=", "A:12+7=", "C:3,5,9>17=", "S:hello=", "S:abcdefghijklmnopqrstuvwxyz=",
           "C:12,34,56,78,90>1234,5678="]


def reference_logprobs(model, ro, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs [N, T] of the sampled tokens under softmax(logits / temperature) restricted to
    the top-p nucleus (vLLM's rule: drop the tokens whose ascending cumulative probability is
    <= 1 - top_p, keep at least one). top_p = 1 goes through the library's linear_logprobs."""
    from mtgrpo_core.train.model import completion_logprobs, position_ids_from_mask

    if top_p >= 1.0:
        return completion_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask,
                                   temperature=temperature).float()
    P, T = ro.prompt_ids.shape[1], ro.completion_ids.shape[1]
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    mask = torch.cat([ro.prompt_mask.long(), ro.completion_mask.long()], 1)
    pos = position_ids_from_mask(torch.cat([ro.prompt_mask.long(), torch.ones_like(ro.completion_mask,
                                                                                  dtype=torch.long)], 1))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, P - 1:P + T - 1].float()
    logits = logits / temperature
    srt, idx = logits.sort(-1)
    drop = srt.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[..., -1] = False
    logits = logits.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    return torch.log_softmax(logits, -1).gather(-1, ro.completion_ids[..., None]).squeeze(-1)


def max_gap(model, ro, temperature, top_p) -> float:
    with torch.no_grad():
        ref = reference_logprobs(model, ro, temperature, top_p)
    m = ro.completion_mask.bool()
    assert int(m.sum()) > 50
    return float((ro.sampling_logprobs[m] - ref[m]).abs().max())


def _changed(model, seed=1):
    """A copy of ``model`` whose every weight moved (as after many optimiser steps)."""
    m2 = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m2.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m2


@pytest.mark.parametrize("temperature, top_p", [(0.7, 1.0), (1.0, 1.0), (1.0, 0.9)])
def test_sampling_logprobs_match_policy_before_and_after_sync(engine, policy, temperature, top_p):
    a = policy(0)
    s = engine.sync_weights(a)
    assert s["tensors"] == len(a.state_dict()) and s["bytes"] > 2_000_000
    ro = engine.generate(PROMPTS, 8, max_new_tokens=24, temperature=temperature, top_p=top_p)
    assert ro.prompt_index.tolist() == [i for i in range(len(PROMPTS)) for _ in range(8)]
    assert max_gap(a, ro, temperature, top_p) < 2e-3
    b = _changed(a)
    # before the sync the engine still samples from a: b's log-probs do not match (this is
    # what the test would see if the sync were skipped or had no effect)
    assert max_gap(b, ro, temperature, top_p) > 0.05
    engine.sync_weights(b)
    ro2 = engine.generate(PROMPTS, 8, max_new_tokens=24, temperature=temperature, top_p=top_p)
    assert max_gap(b, ro2, temperature, top_p) < 2e-3
    assert max_gap(a, ro2, temperature, top_p) > 0.05


def test_greedy_matches_transformers(engine, policy):
    from mtgrpo_core.train.generation import HFGenerator

    a = _changed(policy(0), seed=3)
    engine.sync_weights(a)
    v = engine.generate(PROMPTS, 1, max_new_tokens=16, greedy=True)
    h = HFGenerator(a).generate(PROMPTS, 1, max_new_tokens=16, greedy=True)
    assert v.texts == h.texts
    assert torch.equal(v.completion_ids, h.completion_ids)


def test_seeded_sampling_is_reproducible(engine, policy):
    engine.sync_weights(policy(0))
    engine.reseed(5)
    r1 = engine.generate(PROMPTS, [2, 1, 3, 1, 1, 2], max_new_tokens=12)
    engine.reseed(5)
    r2 = engine.generate(PROMPTS, [2, 1, 3, 1, 1, 2], max_new_tokens=12)
    assert r1.texts == r2.texts and r1.prompt_index.tolist() == [0, 0, 1, 2, 2, 2, 3, 4, 5, 5]
    r3 = engine.generate(PROMPTS, [2, 1, 3, 1, 1, 2], max_new_tokens=12)   # the next call draws anew
    assert r3.texts != r2.texts


def test_sync_validates_its_input(engine, policy):
    from mtgrpo_core.integrations.vllm_sync import pack_weights, sync_weights, unpack_weights

    with pytest.raises(TypeError, match="llm"):
        sync_weights(object(), policy(0))
    with pytest.raises(TypeError, match="model_or_weights"):
        engine.sync_weights(3)
    with pytest.raises(ValueError, match="weights: no tensors"):
        pack_weights({})
    p = pack_weights({"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)})
    (name, t), = unpack_weights(p["names"], p["dtypes"], p["shapes"], p["blob"])
    assert name == "w" and t.dtype == torch.bfloat16 and t.tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="blob: 2 bytes left over"):
        list(unpack_weights(p["names"], p["dtypes"], p["shapes"], p["blob"] + b"xx"))


def test_sleep_mode_is_refused_on_cpu(tmp_path, policy):
    from vllm.platforms import current_platform

    from mtgrpo_core.train.generation import VLLMGenerator

    if current_platform.is_sleep_mode_available():
        pytest.skip(f"this platform ({current_platform.device_type}) has sleep mode; the refusal is CPU's")
    with pytest.raises(ValueError, match="sleep: vLLM's sleep mode is not available"):
        VLLMGenerator(policy(0), str(tmp_path / "m"), sleep=True)

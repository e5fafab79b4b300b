"""Generation backends: the transformers KV-cache sampler and the vLLM adapter's conversions
(vLLM itself is not installed in CI; its request/result conversion is plain Python)."""
import importlib.util
from types import SimpleNamespace

import pytest
import torch

from mtgrpo_core.train.config import ModelConfig
from mtgrpo_core.train.generation import HFGenerator, vllm_requests, vllm_results
from mtgrpo_core.train.model import BOS, EOS, PAD, VOCAB_SIZE, CharTokenizer, build_model, completion_logprobs

TINY = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, max_position_embeddings=64)


def test_char_tokenizer_roundtrip():
    tok = CharTokenizer()
    s = "C:3,5,7>22= (a-b)*c ~"
    ids = tok.encode(s, bos=True, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS and max(ids) < VOCAB_SIZE == 98
    assert tok.decode(ids) == s
    assert tok.decode(tok.encode("é")) == "?"
    ids, mask = tok.encode_prompts(["ab", "abcd"])
    assert ids.shape == (2, 5) and ids[0, 0] == PAD and mask[0].tolist() == [0, 0, 1, 1, 1]


def test_hf_generator_per_prompt_n_masks_logprobs_and_seed():
    model = build_model(TINY, seed=0)
    gen = HFGenerator(model, seed=3)
    texts = ["S:abc=", "C:1,2,3>6=", "A:1+2="]
    ro = gen.generate(texts, [2, 5, 1], max_new_tokens=6, temperature=1.3, top_p=0.9)
    assert ro.prompt_index.tolist() == [0, 0, 1, 1, 1, 1, 1, 2]
    N, T = ro.completion_ids.shape
    assert N == 8 and T <= 6 and len(ro.texts) == 8
    for i in range(N):  # mask covers exactly the tokens through the first EOS
        ids = ro.completion_ids[i].tolist()
        L = int(ro.completion_mask[i].sum())
        assert L >= 1 and (EOS not in ids[:L - 1]) and all(t == PAD for t in ids[L:])
    # sampling log-probs are those of the tempered distribution: at T=1, top_p=1 they must equal
    # the training forward pass's log-probs
    ro1 = gen.generate(texts, [3, 3, 3], max_new_tokens=6)
    lp = completion_logprobs(model, ro1.prompt_ids, ro1.prompt_mask, ro1.completion_ids, ro1.completion_mask)
    m = ro1.completion_mask
    torch.testing.assert_close(lp[m], ro1.sampling_logprobs[m], atol=1e-5, rtol=1e-5)
    # same generator state -> same samples; restore via state_dict
    st = gen.state_dict()
    a = gen.generate(texts, 4, max_new_tokens=5)
    gen.load_state_dict(st)
    b = gen.generate(texts, 4, max_new_tokens=5)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    # greedy is deterministic and identical across copies of a prompt
    g = gen.generate(texts, 2, max_new_tokens=5, greedy=True)
    assert torch.equal(g.completion_ids[0], g.completion_ids[1])
    with pytest.raises(ValueError, match="n: every per-prompt count must be >= 1"):
        gen.generate(texts, [1, 0, 1])


def test_vllm_request_conversion():
    tok = CharTokenizer()
    reqs = vllm_requests(tok, ["S:ab=", "A:1+2="], [3, 5], max_new_tokens=7, temperature=0.8, top_p=0.95,
                         greedy=False, seed=10)
    assert [r["params"]["n"] for r in reqs] == [3, 5]
    assert reqs[0]["prompt"]["prompt_token_ids"] == tok.encode("S:ab=", bos=True)
    p = reqs[1]["params"]
    assert p["max_tokens"] == 7 and p["temperature"] == 0.8 and p["top_p"] == 0.95
    assert p["stop_token_ids"] == [EOS] and p["logprobs"] == 0 and p["seed"] == 11
    g = vllm_requests(tok, ["x"], 2, max_new_tokens=3, temperature=0.8, top_p=0.5, greedy=True)
    assert g[0]["params"]["temperature"] == 0.0 and g[0]["params"]["top_p"] == 1.0


def _completion(tok, text, lps, eos=True):
    ids = tok.encode(text, eos=eos)
    return SimpleNamespace(token_ids=ids,
                           logprobs=[{t: SimpleNamespace(logprob=lp), 99: SimpleNamespace(logprob=-9.0)}
                                     for t, lp in zip(ids, lps)])


def test_vllm_result_conversion():
    tok = CharTokenizer()
    outs = [SimpleNamespace(outputs=[_completion(tok, "ba", [-0.1, -0.2, -0.3]),
                                     _completion(tok, "abc", [-1.0, -1.1, -1.2, -1.3], eos=False)]),
            SimpleNamespace(outputs=[_completion(tok, "3", [-0.5, -0.6])])]
    ro = vllm_results(tok, ["S:ab=", "A:1+2="], [2, 1], outs)
    assert ro.prompt_index.tolist() == [0, 0, 1]
    assert ro.texts == ["ba", "abc", "3"]
    assert ro.completion_mask.sum(1).tolist() == [3, 3, 2]
    assert ro.completion_ids.shape == (3, 3) and ro.completion_ids[2, 2] == PAD
    torch.testing.assert_close(ro.sampling_logprobs[0], torch.tensor([-0.1, -0.2, -0.3]))
    torch.testing.assert_close(ro.sampling_logprobs[2], torch.tensor([-0.5, -0.6, 0.0]))
    ids, mask = tok.encode_prompts(["S:ab=", "S:ab=", "A:1+2="])
    assert torch.equal(ro.prompt_ids, ids) and torch.equal(ro.prompt_mask, mask)
    with pytest.raises(ValueError, match=r"outputs\[1\]: expected 2 completions, got 1"):
        vllm_results(tok, ["S:ab=", "A:1+2="], [2, 2], outs)
    with pytest.raises(ValueError, match="expected 2 request outputs"):
        vllm_results(tok, ["S:ab=", "A:1+2="], [2, 1], outs[:1])


@pytest.mark.requires_cuda
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="needs the [vllm] extra (pip install 'mtgrpo_core[vllm]'), not installed by make test")
def test_vllm_generator_on_gpu(tmp_path):
    from mtgrpo_core.train.generation import VLLMGenerator

    model = build_model(TINY, seed=0, device="cuda")
    gen = VLLMGenerator(model, str(tmp_path / "m"), gpu_memory_utilization=0.2)
    ro = gen.generate(["S:abc=", "A:1+2="], [3, 2], max_new_tokens=5)
    assert ro.prompt_index.tolist() == [0, 0, 0, 1, 1]
    gen.sync_weights(model)
    g1 = gen.generate(["S:abc="], 1, max_new_tokens=5, greedy=True)
    hf = HFGenerator(model).generate(["S:abc="], 1, max_new_tokens=5, greedy=True)
    assert g1.texts == hf.texts

"""The embedded policy: a character tokenizer made in-process and a small Llama built from a
config (no download).

Vocabulary: PAD = 0, BOS = 1, EOS = 2, then the 95 printable ASCII characters (32..126):
V = 98. ``LlamaConfig(vocab_size=98, hidden_size=128, intermediate_size=512,
num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
max_position_embeddings=128, tie_word_embeddings=True)`` has about 537k parameters and, per
the measured CPU-DEFAULT-RUN facts, learns the compact CPU suite fastest on 2 cores.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

PAD, BOS, EOS = 0, 1, 2
_FIRST = 32
VOCAB_SIZE = 3 + 95


class CharTokenizer:
    """Printable-ASCII character tokenizer with PAD/BOS/EOS. Characters outside 32..126 are
    mapped to '?' so any completion string can be encoded."""

    pad_id, bos_id, eos_id = PAD, BOS, EOS
    vocab_size = VOCAB_SIZE

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [BOS] if bos else []
        for ch in text:
            o = ord(ch)
            ids.append(o - _FIRST + 3 if _FIRST <= o <= 126 else ord("?") - _FIRST + 3)
        if eos:
            ids.append(EOS)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decode up to the first EOS; PAD/BOS are dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i >= 3:
                out.append(chr(i - 3 + _FIRST))
        return "".join(out)

    def encode_prompts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt batch: ids[B, P] (BOS + text), attention_mask[B, P]."""
        seqs = [self.encode(t, bos=True) for t in texts]
        P = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), P), PAD, dtype=torch.long)
        mask = torch.zeros((len(seqs), P), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, P - len(s):] = 1
        return ids, mask


def build_model(mcfg, *, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A fresh ``LlamaForCausalLM`` from a :class:`~mtgrpo_core.train.config.ModelConfig`,
    initialised deterministically from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=mcfg.hidden_size,
        intermediate_size=mcfg.intermediate_size, num_hidden_layers=mcfg.num_hidden_layers,
        num_attention_heads=mcfg.num_attention_heads, num_key_value_heads=mcfg.num_key_value_heads,
        max_position_embeddings=mcfg.max_position_embeddings,
        tie_word_embeddings=mcfg.tie_word_embeddings,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )
    try:
        conf._attn_implementation = "sdpa"
    except Exception:  # pragma: no cover
        pass
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(conf)
    torch.random.set_rng_state(state)
    return model.to(device=device, dtype=dtype)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: 0 at the first real token."""
    pos = mask.long().cumsum(-1) - 1
    return pos.clamp_(min=0)


def completion_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                        completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                        *, temperature: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """Log-probs [N, T] of ``completion_ids`` under ``model`` given left-padded prompts.

    Uses :func:`mtgrpo_core.linear_logprobs` on the last hidden states and the lm_head weight
    (never materialising [N, T, V] logits). Differentiable when grad is enabled.
    """
    N, P = prompt_ids.shape
    T = completion_ids.shape[1]
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask.long(), completion_mask.long()], 1)
    # positions after the prompt continue counting even under the completion's padding
    pos = position_ids_from_mask(torch.cat([prompt_mask.long(), torch.ones_like(completion_mask, dtype=torch.long)], 1))
    out = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    hidden = out.last_hidden_state[:, P - 1:P + T - 1]          # states that predict completion tokens
    weight = model.lm_head.weight
    bias = getattr(model.lm_head, "bias", None)
    from ..ops.linear_logprobs import linear_logprobs

    return linear_logprobs(hidden, weight, completion_ids, bias=bias, temperature=temperature, backend=backend)

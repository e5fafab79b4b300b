"""Reference (oracle) for ``linear_logprobs``: token log-probs and entropy from hidden states.

What: for hidden states ``h[M, H]``, the LM-head ``W[V, H]`` (optional bias ``b[V]``) and the
sampled token ids ``y[M]``::

    z        = (h @ W.T + b) / temperature          # logits [M, V]
    logp[i]  = z[i, y_i] - logsumexp_j z[i, j]      # log pi(y_i | context_i)
    ent[i]   = -sum_j p_ij log p_ij,  p = softmax(z[i])

This is the readable, naive way every GRPO stack computes it (TRL's
``selective_log_softmax``, verl's ``logprobs_from_logits``): it materialises the full
``[M, V]`` logits, so it costs ``M * V`` elements of memory several times over (logits,
log-softmax output and their gradients in backward). It is the correctness oracle and the
``backend="torch"`` path of :func:`mtgrpo_core.ops.linear_logprobs`.

Precision: the matmul runs in the inputs' dtype (as a model's LM head would produce its
logits), the log-softmax, gather and entropy in float32 (float64 for float64 inputs).
Outputs are float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch


def linear_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, *,
                        bias: torch.Tensor | None = None, temperature: float = 1.0,
                        return_entropy: bool = False):
    """Naive token log-probs (and entropy) through the full logits.

    Parameters
    ----------
    hidden : Tensor[M, H] or [N, T, H], float
    weight : Tensor[V, H], same dtype as ``hidden``
    token_ids : LongTensor[M] or [N, T], values in [0, V)
    bias : Tensor[V] or None
    temperature : float > 0
    return_entropy : bool

    Returns
    -------
    logprobs : Tensor[M] or [N, T] (float32; float64 for float64 inputs)
    entropy : same shape, only when ``return_entropy``
    """
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(acc)
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent

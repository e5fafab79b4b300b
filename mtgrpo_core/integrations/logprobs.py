"""The fused LM head + log-probs kernel inside any training stack: :func:`completion_logprobs`.

Why a helper
------------
:func:`mtgrpo_core.linear_logprobs` takes the final hidden states and the LM head weight.
Getting the hidden states by calling the inner model (``ddp.module.model(...)``) bypasses
the wrapper's ``forward``: DDP then never prepares its gradient reducer for the iteration,
the gradients are not averaged over the ranks, and the replicas drift apart silently
(measured 3e-2 apart after a few steps). This helper always calls the *wrapper's* forward
(DDP, or the bare model), with ``output_hidden_states=True``, and takes the last entry of
``hidden_states`` (transformers puts the final-norm output there).

What it computes instead of the logits
--------------------------------------
The wrapper forward gets ``logits_to_keep=1`` (``num_logits_to_keep=1`` on older
transformers models), so the model builds the logits of the last position only
(``[B, 1, V]``, 1/T of the full ``[B, T, V]`` tensor that dominates GRPO memory). Those
logits are used for one check (``check_head=True``): ``hidden[:, -1] @ W.T (+ b)`` divided
by nothing must equal them, otherwise the model transforms its logits (Gemma-2's final
soft-cap, a ``logit_scale``) in a way :func:`linear_logprobs` does not, and a ValueError
says so instead of returning wrong log-probs. Then ``linear_logprobs`` runs on the hidden
states of the completion positions only (the rows ``completion_mask`` selects; padded
positions cost nothing) with the LM head weight of the unwrapped model, which is the same
parameter DDP hooks, so its gradient is all-reduced like any other.

Limits: models whose forward accepts neither ``logits_to_keep`` nor ``num_logits_to_keep``
are refused (they would build the full logits). FSDP-sharded heads are refused (the
weight outside the forward is a shard or a DTensor); use DDP, or gather the head first.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from ..ops import linear_logprobs

__all__ = ["completion_logprobs", "unwrap_model"]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / DataParallel / ``torch.compile`` wrappers (``.module`` / ``._orig_mod``)."""
    m = model
    for _ in range(8):  # wrappers nest a few levels at most (compile(DDP(model)))
        inner = getattr(m, "module", None)
        if isinstance(inner, torch.nn.Module) and isinstance(
                m, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            m = inner
            continue
        inner = getattr(m, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            m = inner
            continue
        break
    return m


def _keep_kwarg(inner: torch.nn.Module) -> str:
    params = inspect.signature(inner.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return name
    raise ValueError(f"model: {type(inner).__name__}.forward accepts neither logits_to_keep nor num_logits_to_keep, "
                     "so it would build the full [B, T, V] logits; compute hidden states yourself through the "
                     "wrapper's forward and call mtgrpo_core.linear_logprobs")


def completion_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        completion_mask: torch.Tensor, temperature: float = 1.0, *, return_entropy: bool = False,
                        check_head: bool = True, backend: str = "auto", **forward_kwargs: Any):
    """Log-probs of the completion tokens of a causal LM through the fused kernel.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers causal LM, bare or wrapped in ``DistributedDataParallel`` (the wrapper's
        forward is called, so its gradient hooks run; see the module docstring).
    input_ids : int Tensor[B, T]
        Prompt + completion tokens; the completion is the last ``Tc`` columns.
    attention_mask : Tensor[B, T]
    completion_mask : Tensor[B, Tc], 1 <= Tc < T, bool or 0/1
        The completion tokens whose log-probs are wanted (the last ``Tc`` columns of
        ``input_ids``; TRL's layout). Positions outside it get log-prob 0 and no gradient.
    temperature : float > 0
        The sampling temperature (logits are divided by it, as TRL / vLLM do).
    return_entropy : bool
        Also return each position's entropy (0 outside the mask).
    check_head : bool
        Check the hidden-state path against the model's own last-position logits.
    backend : "auto" | "cpu" | "triton" | "torch"
        :func:`mtgrpo_core.linear_logprobs`'s backend.
    **forward_kwargs
        Passed to the model's forward (e.g. ``position_ids``).

    Returns
    -------
    logprobs : Tensor[B, Tc], float32 (float64 for a float64 model)
    entropy : Tensor[B, Tc], only with ``return_entropy``
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("completion_mask", completion_mask)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids: expected an integer tensor, got {input_ids.dtype}")
    B, T = input_ids.shape
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask: expected shape ({B}, {T}), got {tuple(attention_mask.shape)}")
    Tc = completion_mask.shape[1]
    if completion_mask.shape[0] != B or not 1 <= Tc < T:
        raise ValueError(f"completion_mask: expected shape ({B}, Tc) with 1 <= Tc < {T} (the last Tc columns of "
                         f"input_ids), got {tuple(completion_mask.shape)}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature: expected a float > 0, got {temperature!r}")
    for key in ("output_hidden_states", "logits_to_keep", "num_logits_to_keep", "labels"):
        if key in forward_kwargs:
            raise ValueError(f"forward_kwargs: {key!r} is set by completion_logprobs itself")
    inner = unwrap_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"model: {type(inner).__name__} has no output embedding (get_output_embeddings() with a "
                         "weight); completion_logprobs needs a causal LM")
    weight, bias = head.weight, getattr(head, "bias", None)
    if type(weight) is not torch.nn.Parameter and type(weight) is not torch.Tensor or weight.dim() != 2 or \
            weight.numel() == 0:
        raise ValueError(f"model: the LM head weight is a {type(weight).__name__} of shape {tuple(weight.shape)}; "
                         "sharded heads (FSDP) are not supported, use DDP or gather the head")

    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                **{_keep_kwarg(inner): 1}, **forward_kwargs)  # the wrapper's forward: DDP's hooks run
    hidden_states = out.hidden_states if hasattr(out, "hidden_states") else out["hidden_states"]
    if hidden_states is None:
        raise ValueError(f"model: {type(inner).__name__} returned no hidden_states for output_hidden_states=True")
    h = hidden_states[-1]
    if h.shape[:2] != (B, T):
        raise ValueError(f"model: the last hidden states have shape {tuple(h.shape)}, expected ({B}, {T}, H)")
    if check_head:
        with torch.no_grad():
            mine = torch.nn.functional.linear(h[:, -1].to(weight.dtype), weight, bias).float()
            theirs = out.logits[:, -1].float()
            tol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 3e-2
            err = (mine - theirs).abs().max()
            scale = theirs.abs().max().clamp(min=1.0)
            if not bool(err <= tol * scale):
                raise ValueError(
                    f"model: {type(inner).__name__}'s logits are not hidden_states[-1] @ lm_head.weight.T (+ bias) "
                    f"(max difference {float(err):.3g} at the last position): it transforms its logits (soft-cap, "
                    "logit scale), which linear_logprobs does not; pass check_head=False only if you add that yourself")
    del out  # the last-position logits: not needed any more
    mask = completion_mask.bool()
    targets = input_ids[:, T - Tc:]
    hc = h[:, T - Tc - 1:T - 1]  # position t's hidden state predicts token t + 1
    rows = mask.nonzero(as_tuple=True)
    res = linear_logprobs(hc[rows].contiguous(), weight.to(hc.dtype) if weight.dtype != hc.dtype else weight,
                          targets[rows], bias=bias, temperature=float(temperature), return_entropy=return_entropy,
                          backend=backend)
    lp, ent = (res if return_entropy else (res, None))
    full = lp.new_zeros((B, Tc)).index_put(rows, lp)
    if not return_entropy:
        return full
    return full, ent.new_zeros((B, Tc)).index_put(rows, ent)

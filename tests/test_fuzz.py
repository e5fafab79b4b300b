"""Fuzz harness over every public entry point (issue 16): the ops on each CPU backend, the
sampler, the controllers and the training config.

For every generated case it records one outcome per implementation: a result, a *clean*
error (ValueError / TypeError naming the problem), an *unclear* error (any other exception,
e.g. a bare RuntimeError from deep inside torch), or a *crash* (the process died: a native
fault). Results are checked for NaN/inf on valid input and, for the ops, compared with the
reference backend (``backend="torch"``, the readable implementation) value by value and
gradient by gradient. The test asserts zero crashes, unclear errors, NaN, accepted invalid
inputs and disagreements, and prints the counts.

Cases that can reach native code run in a worker subprocess, many cases per process (a
crash costs a restart, and the case that was running is the one counted). Hypothesis draws
the cases; the budget is ``MTGRPO_FUZZ_EXAMPLES`` (default 25 per target, about a minute in
total on 2 busy cores; e.g. ``MTGRPO_FUZZ_EXAMPLES=500`` for a long run). Directed cases, one
per known defect and per edge case of issue 16, always run in addition.

``KNOWN_OP_DEFECTS`` lists the op defects of issue 16 (items 1-6) that other branches fix:
their cases are counted separately and must still fail (strict), so that after merging the
fixes the lead deletes the entries and the harness guards them from then on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

N_EXAMPLES = int(os.environ.get("MTGRPO_FUZZ_EXAMPLES", "25"))
OP_BACKENDS = ("cpu", "torch")   # triton is fuzzed on GPUs only; "torch" is the reference
REFERENCE = "torch"

#: (op, backend, feature) of the op defects of issue 16 fixed on other branches; a case with
#: such a feature on that backend is counted as "known" instead of failing the test. Strict:
#: each entry's directed case must still fail here. Delete an entry once its fix is merged.
KNOWN_OP_DEFECTS: dict = {}

FAILURES = ("crash", "hang", "unclear", "nan", "accepted_invalid", "disagree")


# ============================================================================ worker side
def _tensors(spec):
    """Inputs of an op case, built deterministically from the spec (runs in the worker)."""
    import torch

    g = torch.Generator().manual_seed(spec["seed"])
    dt = getattr(torch, spec["dtype"])
    dev = "meta" if spec.get("meta") else "cpu"

    def rnd(*shape, lo=-1.0, hi=1.0, dtype=dt):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)

    def mask_of(n, t):
        m = torch.rand(n, t, generator=g) < spec["mask_p"]
        kind = spec["mask"]
        if kind == "bool":
            return m
        if kind == "uint8-big":   # 0/1 masks stored with values > 1 mean "1"
            return m.to(torch.uint8) * torch.randint(1, 4, (n, t), generator=g, dtype=torch.uint8)
        return m.to(getattr(torch, kind))

    def poison(x, m):
        """Put the special values the case asks for at masked / unmasked positions."""
        sp = spec["special"]
        if sp == "none" or x.numel() == 0:
            return x
        x = x.clone()
        val = float("nan") if "nan" in sp else float("inf")
        where = (m == 0) if sp.endswith("masked") and not sp.endswith("unmasked") else (m != 0)
        idx = torch.nonzero(where)
        if len(idx):
            i = idx[len(idx) // 2]
            x[tuple(i.tolist())] = val
        return x

    return torch, g, dt, dev, rnd, mask_of, poison


def _run_op(spec, backend):
    """One op call + backward; returns a list of float64 numpy arrays (outputs, gradients)."""
    import mtgrpo_core as mc

    torch, g, dt, dev, rnd, mask_of, poison = _tensors(spec)
    op, N, T = spec["op"], spec["N"], spec["T"]
    outs = []

    def grads(loss, leaves):
        if spec.get("meta") or not loss.requires_grad:
            return []
        gs = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [x for x in gs if x is not None]

    if op in ("grpo_loss", "fused_linear_grpo_loss"):
        mask = mask_of(N, T)
        kw = dict(kl_coef=spec["kl"], clip_eps_low=spec["eps"], clip_eps_high=spec["eps"] * 1.4,
                  dual_clip=spec["dual_clip"], ratio_cap=spec["ratio_cap"],
                  importance_level=spec["level"], loss_agg=spec["agg"], backend=backend)
        adv = None
        if spec["adv"] == "seq":
            adv = rnd(N)
        elif spec["adv"] == "token":
            adv = rnd(N, T)
        else:
            kw["rewards"] = rnd(N, lo=0, hi=1, dtype=getattr(torch, spec["rewards_dtype"]))
            kw["group_ids"] = torch.div(torch.arange(N), max(1, spec["group"]), rounding_mode="floor")
        if spec["tasks"]:
            kw["task_ids"] = torch.randint(0, 3, (N,), generator=g)
            kw["num_tasks"] = 3
        if spec["seq_weights"]:
            kw["seq_weights"] = rnd(N, lo=0, hi=2)
        if op == "grpo_loss":
            lp = poison(rnd(N, T, lo=-4, hi=0), mask)
            old = None if spec["on_policy"] else (lp + rnd(N, T, lo=-0.3, hi=0.3)).clamp(max=0)
            if spec["kl"]:
                kw["ref_logprobs"] = (lp + rnd(N, T, lo=-0.2, hi=0.2)).clamp(max=0)
            lp = lp.to(dev).requires_grad_(True)
            mask = mask.to(dev)
            old = None if old is None else old.to(dev)
            adv = None if adv is None else adv.to(dev)
            kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            loss, _ = mc.grpo_loss(lp, old, mask, adv, **kw)
            outs += [loss] + grads(loss, [lp])
        else:
            H, V = spec["H"], spec["V"]
            hidden = rnd(N, T, H).to(dev).requires_grad_(True)
            weight = (rnd(V, H) * 0.5).to(dev).requires_grad_(True)
            ids = torch.randint(0, V, (N, T), generator=g).to(dev)
            if spec["kl"]:
                kw["ref_logprobs"] = rnd(N, T, lo=-4, hi=0).to(dev)
            kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            old = None if spec["on_policy"] else rnd(N, T, lo=-4, hi=0).to(dev)
            loss, _ = mc.fused_linear_grpo_loss(hidden, weight, ids, old, mask.to(dev),
                                                None if adv is None else adv.to(dev),
                                                temperature=spec["temperature"], **kw)
            outs += [loss] + grads(loss, [hidden, weight])
    elif op == "group_advantages":
        r = poison(rnd(N, lo=0, hi=1), torch.ones(N, dtype=torch.bool)) if spec["special"] == "nan-unmasked" \
            else rnd(N, lo=0, hi=1)
        gid = torch.div(torch.arange(N), max(1, spec["group"]), rounding_mode="floor")
        if spec["shuffle"] and N:
            gid = gid[torch.randperm(N, generator=g)]
        outs.append(mc.group_advantages(r.to(dev), gid.to(dev), scale=spec["scale"], std=spec["std"],
                                        singleton=spec["singleton"], clip=spec["clip"], backend=backend))
    elif op in ("task_masked_sum", "task_weighted_loss"):
        mask = mask_of(N, T)
        vals = poison(rnd(N, T, lo=-3, hi=3), mask)
        tid = torch.randint(0, spec["K"], (N,), generator=g)
        if op == "task_masked_sum":
            s, c = mc.task_masked_sum(vals.to(dev), mask.to(dev), tid.to(dev), spec["K"], backend=backend)
            outs += [s, c]
        else:
            vals = vals.to(dev).requires_grad_(True)
            w = rnd(spec["K"], lo=0, hi=1, dtype=torch.float64)
            loss = mc.task_weighted_loss(vals, mask.to(dev), tid.to(dev), w.to(dev), normalize=spec["normalize"],
                                         backend=backend)
            outs += [loss] + grads(loss, [vals])
    elif op == "linear_logprobs":
        M, H, V = spec["N"], spec["H"], spec["V"]
        hidden = rnd(M, H).to(dev).requires_grad_(True)
        weight = (rnd(V, H) * spec["wscale"]).to(dev).requires_grad_(True)
        bias = rnd(V).to(dev).requires_grad_(True) if spec["bias"] else None
        ids = torch.randint(0, max(V, 1), (M,), generator=g).to(dev)
        if not spec.get("meta"):
            # heap poisoning: freed blocks of the gradients' sizes hold 1e30, so a gradient
            # read from uninitialised memory (issue 16 item 3) shows up instead of being 0 by luck
            junk = [torch.full_like(t, 1e30) for t in (weight, hidden) + ((bias,) if bias is not None else ())
                    for _ in range(4)]
            del junk
        res = mc.linear_logprobs(hidden, weight, ids, bias=bias, temperature=spec["temperature"],
                                 return_entropy=spec["entropy"], backend=backend)
        res = list(res) if isinstance(res, tuple) else [res]
        total = sum(r.sum() for r in res)
        outs += res + grads(total, [hidden, weight] + ([bias] if bias is not None else []))
    else:
        raise AssertionError(op)
    if spec.get("meta"):
        return []
    return [np.asarray(o.detach().to(torch.float64).cpu().numpy()) for o in outs]


def _run_sampler(spec):
    from mtgrpo_core.sampling import RatioPreservingSampler, target_counts

    if spec["kind"] == "target_counts":
        n = target_counts(spec["weights"], spec["B"], method=spec["method"], seed=spec["seed"])
        if int(n.sum()) != spec["B"] or (n < 0).any():
            raise AssertionError(f"target_counts broke its contract: {n.tolist()}")
        return [n.astype(np.float64)]
    s = RatioPreservingSampler(spec["pools"], spec["B"], oversample=spec["oversample"], rounding=spec["method"],
                               max_rounds=spec["max_rounds"], seed=spec["seed"], backend=spec["backend"])
    if spec["corrupt"]:
        st = s.state_dict()
        key, val = spec["corrupt"]
        st[key] = np.asarray(val) if isinstance(st.get(key), np.ndarray) else val
        s.load_state_dict(st)
    w = np.asarray(spec["weights"], dtype=np.float64)
    s.start_step(w / w.sum() if w.sum() > 0 else w)
    rng = np.random.default_rng(spec["seed"] % 2**32)
    while (d := s.next_round()) is not None:
        s.report(d.task_ids, d.prompt_indices, rng.random(len(d)) < 0.5)
    b = s.finish()
    return [np.asarray(b.realized, np.float64), s.filtered_ratios]


def _run_controller(spec):
    import mtgrpo_core.gdro as G
    import mtgrpo_core.weighting as W

    cls = getattr(W, spec["cls"], None) or getattr(G, spec["cls"])
    c = cls(*spec["args"], **spec["kwargs"])
    outs = []
    rng = np.random.default_rng(spec["seed"])
    for _ in range(spec["steps"]):
        if spec["cls"] in ("ImprovementAwareWeights", "RegularizedWeights", "UniformWeights", "SECCurriculum"):
            K = c.num_tasks
            z = c.update(rng.choice(spec["values"], K), rng.choice(spec["values"], K))
            if abs(float(np.sum(z)) - 1.0) > 1e-9 or (np.asarray(z) < 0).any():
                raise AssertionError(f"weights left the simplex: {z}")
            outs.append(np.asarray(z))
        elif spec["cls"] == "TaskRewardTracker":
            outs.append(c.update(rng.choice(spec["values"], c.num_tasks)))
        elif spec["cls"] == "PromptGDRO":
            g = rng.integers(0, c.num_groups, 8)
            outs.append(c.update(g, rng.choice(spec["values"], 8)))
            outs.append(c.distribution)
        elif spec["cls"] == "RolloutAllocator":
            g = rng.integers(0, c.num_groups, 4)
            n = c.allocate(g) if hasattr(c, "allocate") else None
            outs.append(np.asarray(c.arm_probs()))
            if n is not None:
                n = np.asarray(n)
                c.update(g, n, [rng.random(int(k)) for k in n])
        elif spec["cls"] == "DifficultyClassifier":
            ids = [f"p{int(i)}" for i in rng.integers(0, 5, 6)]
            c.update(ids, rng.random(6) < 0.5)
            outs.append(c.pass_rates(ids[:1]))
    st = c.state_dict()
    c2 = cls(*spec["args"], **spec["kwargs"])
    try:
        c2.load_state_dict(json.loads(json.dumps(st)))     # the state must stay loadable (JSON-able)
    except Exception as e:  # noqa: BLE001 - a state the object wrote itself: never a clean refusal
        raise AssertionError(f"its own state_dict does not load: {type(e).__name__}: {e}") from None
    return [np.asarray(o, np.float64) for o in outs if np.asarray(o).size and not np.isnan(o).all()]


def _run_config(spec):
    from mtgrpo_core.train import config as C

    C.load_config(None, spec["overrides"], algo=spec["algo"])
    return []


def _classify_exc(e):
    return "clean" if isinstance(e, (ValueError, TypeError)) and not isinstance(e, NotImplementedError) else "unclear"


def _worker() -> None:  # pragma: no cover - runs in the subprocess
    """Reads one JSON case a line, writes one JSON result a line (flushed before the next)."""
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    for line in sys.stdin:
        spec = json.loads(line)
        res = {}
        if spec["target"] == "op":
            runs = [(b, lambda b=b, spec=spec: _run_op(spec, b)) for b in OP_BACKENDS]
        else:
            runner = {"sampler": _run_sampler, "controller": _run_controller, "config": _run_config}[spec["target"]]
            runs = [("-", lambda runner=runner, spec=spec: runner(spec))]
        for b, fn in runs:
            print(json.dumps({"start": b}), flush=True)
            try:
                outs = fn()
                finite = all(np.all(np.isfinite(o)) for o in outs)
                res[b] = {"status": "ok", "finite": bool(finite), "outs": [o.tolist() for o in outs]}
            except Exception as e:  # noqa: BLE001
                res[b] = {"status": _classify_exc(e), "msg": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps({"result": res}), flush=True)


# ============================================================================ parent side
CASE_TIMEOUT_S = 60.0   # one call taking longer is a hang (the issue's B-draw multinomial ran for hours)


def _execute(cases):
    """Run cases in worker processes; returns one {backend: outcome} per case. A worker that
    dies (crash) or stays silent for CASE_TIMEOUT_S (hang) is replaced and the case it was
    running is recorded as such."""
    import queue
    import threading

    results, i = [], 0
    while i < len(cases):
        p = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        lines: queue.Queue = queue.Queue()

        def pump(out=p.stdout, q=lines):
            for ln in out:
                q.put(ln)
            q.put(None)

        threading.Thread(target=pump, daemon=True).start()
        p.stdin.write("".join(json.dumps(c) + "\n" for c in cases[i:]))
        p.stdin.close()
        started, why = None, "crash"
        while True:
            try:
                line = lines.get(timeout=CASE_TIMEOUT_S)
            except queue.Empty:
                p.kill()
                why = "hang"
                break
            if line is None:
                break
            msg = json.loads(line)
            if "start" in msg:
                started = msg["start"]
            else:
                results.append(msg["result"])
                i += 1
                started = None
        rc = p.wait()
        if i < len(cases):   # the worker died or hung inside case i
            results.append({started or "-": {"status": why, "msg": f"worker {why} (exit {rc})"}})
            i += 1
    return results


def _close(a, b, dtype, scale=1.0):
    """allclose on every output; ``scale`` multiplies atol by the size of the terms that
    cancel (1/temperature for the LM-head ops: a float32 gradient that should be exactly 0,
    e.g. V = 1, is then ~1e-7 * |h| / T)."""
    if len(a) != len(b):
        return False
    rtol, atol = {"float64": (1e-7, 1e-9), "float32": (2e-4, 2e-5)}.get(dtype, (1e-7, 1e-9))
    atol *= scale
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape or not np.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
            return False
    return True


def _precision(spec):
    """The least precise float input decides the tolerance: float32 rewards next to float64
    log-probs carry float32 precision (cpu and the reference may differ by ~1e-7 there)."""
    if spec["dtype"] == "float32" or (spec.get("adv") == "rewards" and spec.get("rewards_dtype") == "float32"):
        return "float32"
    return spec["dtype"]


def _scale(spec):
    # capped at 1e4 so that the known tiny-temperature defects (errors ~1e21) still show
    t = spec.get("temperature")
    return 1.0 if t is None or spec["op"] not in ("linear_logprobs", "fused_linear_grpo_loss") else \
        min(max(1.0, 1.0 / t), 1e4)


def _known(spec, backend):
    if "known-config" in spec.get("features", []):
        return ("config", "-", spec["overrides"][0])
    for f in spec.get("features", []):
        for op, b, feat in KNOWN_OP_DEFECTS:
            if feat == f and op in ("*", spec.get("op")) and b in ("*", backend):
                return (op, b, feat)
    return None


def _tally(cases, results):
    counts = Counter()
    failures, known_hits = [], Counter()
    for spec, res in zip(cases, results):
        counts["cases"] += 1
        found = []  # (category, backend, detail)
        for b, r in res.items():
            st_ = r["status"]
            if st_ == "clean":
                counts["clean_errors"] += 1
                if spec.get("valid", True) and spec["target"] == "op" and res.get(REFERENCE, {}).get("status") == "ok":
                    found.append(("disagree", b, "refused a valid input the reference accepts: " + r["msg"]))
            elif st_ in ("unclear", "crash", "hang"):
                found.append((st_, b, r["msg"]))
            elif st_ == "ok":
                counts["ok"] += 1
                if not spec.get("valid", True):
                    found.append(("accepted_invalid", b, "returned a result for invalid input"))
                elif not r["finite"] and not spec.get("nan_expected"):
                    found.append(("nan", b, "non-finite output for valid input"))
        if spec["target"] == "op" and spec.get("N") == 0 and not spec.get("meta"):
            # no rows: every output (sums, losses, weight/bias gradients) is an empty sum, exactly 0;
            # a tolerance would let uninitialised memory that happens to hold denormals pass
            for b, r in res.items():
                if r.get("status") == "ok" and any(np.any(np.asarray(o) != 0) for o in r["outs"]):
                    found.append(("disagree", b, "non-zero output for an input with no rows"))
        if spec["target"] == "op" and spec.get("valid", True) and not spec.get("meta"):
            ref, cpu = res.get(REFERENCE, {}), res.get("cpu", {})
            both_ok = ref.get("status") == "ok" and cpu.get("status") == "ok"
            if both_ok and (ref["finite"] or spec.get("nan_expected")) and \
                    not _close(cpu["outs"], ref["outs"], _precision(spec), _scale(spec)):
                found.append(("disagree", "cpu", "values/gradients differ from the reference"))
        for cat, b, detail in found:
            k = _known(spec, b)
            if k is not None:
                known_hits[k] += 1
                counts["known_defects"] += 1
            else:
                counts[cat] += 1
                failures.append((cat, b, detail, spec))
    return counts, failures, known_hits


def _report(name, counts, failures):
    line = ", ".join(f"{k}={counts.get(k, 0)}" for k in ("cases", "clean_errors", "nan", "crash", "hang", "unclear",
                                                          "accepted_invalid", "disagree", "known_defects"))
    print(f"\n[fuzz {name}] {line}")
    for cat, b, detail, spec in failures[:10]:
        print(f"  {cat} [{b}] {detail}\n     case: {json.dumps(spec)[:400]}")
    return line


# ---------------------------------------------------------------------------- strategies
_DTYPES = st.sampled_from(["float32", "float64"])


@st.composite
def grpo_case(draw, op="grpo_loss"):
    N, T = draw(st.integers(0, 6)), draw(st.integers(0, 7))
    spec = dict(target="op", op=op, seed=draw(st.integers(0, 2**31 - 1)), dtype=draw(_DTYPES), N=N, T=T,
                mask=draw(st.sampled_from(["bool", "uint8", "uint8-big", "float32", "int64"])),
                mask_p=draw(st.sampled_from([0.0, 0.5, 0.9, 1.0])),
                adv=draw(st.sampled_from(["seq", "token", "rewards"])), group=draw(st.integers(1, 4)),
                rewards_dtype=draw(st.sampled_from(["float32", "float64"])),
                level=draw(st.sampled_from(["token", "sequence"])),
                agg=draw(st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                          "seq-mean-token-sum-norm"])),
                kl=draw(st.sampled_from([0.0, 0.1])), eps=draw(st.sampled_from([0.0, 0.2, 0.5, 10.0])),
                dual_clip=draw(st.sampled_from([None, 3.0])), ratio_cap=draw(st.sampled_from([None, 10.0])),
                tasks=draw(st.booleans()), seq_weights=draw(st.booleans()), on_policy=draw(st.booleans()),
                special=draw(st.sampled_from(["none", "none", "nan-masked", "inf-masked", "nan-unmasked"])),
                H=draw(st.integers(1, 5)), V=draw(st.integers(1, 9)),
                temperature=draw(st.sampled_from([1.0, 0.7, 1e-30, 1e6])),
                meta=draw(st.integers(0, 19)) == 0)
    if op == "fused_linear_grpo_loss":
        spec["special"] = "none"
    return _features(spec)


@st.composite
def task_case(draw, op):
    spec = dict(target="op", op=op, seed=draw(st.integers(0, 2**31 - 1)), dtype=draw(_DTYPES),
                N=draw(st.integers(0, 6)), T=draw(st.integers(0, 7)), K=draw(st.integers(1, 5)),
                mask=draw(st.sampled_from(["bool", "uint8", "uint8-big", "float32"])),
                mask_p=draw(st.sampled_from([0.0, 0.5, 1.0])), normalize=draw(st.sampled_from(
                    ["task-token-mean", "token-mean"])),
                special=draw(st.sampled_from(["none", "none", "nan-masked", "inf-masked", "nan-unmasked"])),
                meta=draw(st.integers(0, 19)) == 0)
    return _features(spec)


@st.composite
def adv_case(draw):
    spec = dict(target="op", op="group_advantages", seed=draw(st.integers(0, 2**31 - 1)), dtype=draw(_DTYPES),
                N=draw(st.integers(0, 9)), T=0, group=draw(st.integers(1, 5)), shuffle=draw(st.booleans()),
                scale=draw(st.sampled_from(["group", "batch", "none"])), std=draw(st.sampled_from(
                    ["unbiased", "biased"])), singleton=draw(st.sampled_from(["zero", "raw"])),
                clip=draw(st.sampled_from([None, 0.5, 5.0])),
                special=draw(st.sampled_from(["none", "none", "nan-unmasked"])), meta=draw(st.integers(0, 19)) == 0)
    return _features(spec)


@st.composite
def linear_case(draw):
    spec = dict(target="op", op="linear_logprobs", seed=draw(st.integers(0, 2**31 - 1)), dtype=draw(_DTYPES),
                N=draw(st.integers(0, 6)), T=0, H=draw(st.integers(1, 6)), V=draw(st.integers(1, 12)),
                bias=draw(st.booleans()), entropy=draw(st.booleans()),
                temperature=draw(st.sampled_from([1.0, 0.5, 3.0, 1e-30, 1e-3, 1e6])),
                wscale=draw(st.sampled_from([0.5, 50.0])), special="none", meta=draw(st.integers(0, 19)) == 0)
    return _features(spec)


def _features(spec):
    """Tags a case with the issue-16 defect features it exercises, and whether it is valid."""
    f = []
    if spec.get("meta"):
        f.append("meta")
    sp = spec.get("special", "none")
    masked_exist = spec.get("mask_p", 1.0) < 1.0 and spec["N"] * max(spec.get("T", 1), 1) > 0
    unmasked_exist = spec.get("mask_p", 0.0) > 0.0 and spec["N"] * max(spec.get("T", 1), 1) > 0
    if spec["op"] == "group_advantages":
        unmasked_exist = spec["N"] > 0
    if sp in ("nan-masked", "inf-masked") and masked_exist:
        f.append("nan-masked")
    if sp == "nan-unmasked" and unmasked_exist:
        f.append("nan-unmasked")
    spec["valid"] = "nan-unmasked" not in f
    if spec["op"] in ("task_masked_sum", "task_weighted_loss") and "nan-unmasked" in f:
        # a sum over a selected NaN is NaN: valid input, NaN expected (and compared)
        spec["valid"], spec["nan_expected"] = True, True
    if spec["op"] in ("grpo_loss", "fused_linear_grpo_loss"):
        if spec["level"] == "sequence" and spec["adv"] == "token":
            f.append("gspo-token-adv")
        if spec["adv"] == "rewards" and spec["tasks"] and spec["rewards_dtype"] != spec["dtype"]:
            f.append("f64-rewards-task-ids")
    if spec["op"] == "fused_linear_grpo_loss" and spec["temperature"] < 1e-20:
        f.append("tiny-temperature")
    if spec["op"] == "linear_logprobs":
        if spec["N"] == 0:
            f.append("empty-M")
        if spec["temperature"] < 1e-20:
            f.append("tiny-temperature")
    spec["features"] = f
    return spec


def _collect(strategy, n):
    out = []

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw_cases(case):
        out.append(case)

    draw_cases()
    return out


# Directed cases: each issue-16 edge case once (the defects' reproducers among them)
def _directed_op_cases():
    base = dict(target="op", seed=7, dtype="float64", N=4, T=5, mask="bool", mask_p=0.6, adv="seq", group=2,
                rewards_dtype="float32", level="token", agg="token-mean", kl=0.0, eps=0.2, dual_clip=None,
                ratio_cap=None, tasks=False, seq_weights=False, on_policy=False, special="none", H=4, V=7,
                temperature=1.0, meta=False)
    cases = [
        dict(base, op="grpo_loss", level="sequence", adv="token"),                           # item 1
        dict(base, op="fused_linear_grpo_loss", level="sequence", adv="token"),
        dict(base, op="grpo_loss", mask="uint8-big"),                                        # item 2 (cpu/torch)
        dict(base, op="grpo_loss", special="nan-masked"),                                    # item 5
        dict(base, op="grpo_loss", special="nan-unmasked"),
        dict(base, op="grpo_loss", adv="rewards", tasks=True, rewards_dtype="float64", dtype="float32"),
        dict(base, op="fused_linear_grpo_loss", adv="rewards", tasks=True, rewards_dtype="float64", dtype="float32"),
        dict(base, op="grpo_loss", meta=True),                                               # item 6
        dict(base, op="fused_linear_grpo_loss", temperature=1e-30, dtype="float32", seed=12580617, N=4, T=4,
             mask="float32", mask_p=1.0, group=3, level="sequence", agg="seq-mean-token-sum", kl=0.1,
             dual_clip=3.0, ratio_cap=10.0, seq_weights=True, H=4, V=3),                      # item 4
        dict(base, op="task_masked_sum", K=3, normalize="task-token-mean", special="nan-masked"),
        dict(base, op="task_weighted_loss", K=3, normalize="task-token-mean", special="nan-masked"),
        dict(base, op="task_weighted_loss", K=3, normalize="token-mean", mask="uint8-big"),
        dict(base, op="group_advantages", N=7, group=3, shuffle=True, scale="group", std="unbiased",
             singleton="zero", clip=None),
        # item 3 (three tries: uninitialised memory can hold zeros by chance)
        *[dict(base, op="linear_logprobs", N=0, bias=True, entropy=False, wscale=0.5, seed=s) for s in (1, 2, 3)],
        dict(base, op="linear_logprobs", N=5, bias=True, entropy=True, wscale=0.5, temperature=1e-30,
             dtype="float32"),                                                                # item 4
        dict(base, op="linear_logprobs", N=5, bias=False, entropy=True, wscale=50.0, temperature=1e6),
    ]
    return [_features(c) for c in cases]


def _run_target(name, cases):
    results = _execute(cases)
    counts, failures, known = _tally(cases, results)
    line = _report(name, counts, failures)
    return counts, failures, known, line


def _assert_clean(counts, failures):
    bad = {k: counts.get(k, 0) for k in FAILURES if counts.get(k, 0)}
    assert not bad, f"fuzz failures {bad}; first: " + "; ".join(
        f"{c} [{b}] {d} case={json.dumps(s)[:300]}" for c, b, d, s in failures[:5])


# ---------------------------------------------------------------------------- tests
def test_fuzz_ops():
    directed = _directed_op_cases()
    cases = list(directed)
    per = max(4, N_EXAMPLES)
    cases += _collect(grpo_case(), per) + _collect(grpo_case("fused_linear_grpo_loss"), per // 2)
    cases += _collect(task_case("task_masked_sum"), per // 2) + _collect(task_case("task_weighted_loss"), per // 2)
    cases += _collect(adv_case(), per // 2) + _collect(linear_case(), per)
    results = _execute(cases)
    counts, failures, _ = _tally(cases, results)
    _report("ops", counts, failures)
    assert counts["cases"] == len(cases) == len(results)
    _assert_clean(counts, failures)
    # strict: every known defect still reproduces (delete the entry once its fix is merged); the
    # directed cases ran first, in the same workers
    _, _, dknown = _tally(directed, results[:len(directed)])
    stale = [k for k in KNOWN_OP_DEFECTS if k not in dknown]
    assert not stale, f"KNOWN_OP_DEFECTS entries that no longer fail (remove them): {stale}"


@st.composite
def sampler_case(draw):
    K = draw(st.integers(1, 4))
    method = draw(st.sampled_from(["largest-remainder", "multinomial"]))
    w = draw(st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0, 3.0]), min_size=K, max_size=K))
    if draw(st.booleans()):
        return dict(target="sampler", kind="target_counts", weights=[x / sum(w) if sum(w) else x for x in w],
                    B=draw(st.sampled_from([0, 1, 7, 1000, 2**22, 2**22 + 1, 2**31, 2**40, 2**53, 2**62, -3])),
                    method=method, seed=draw(st.integers(0, 2**64 - 1)))
    corrupt = draw(st.sampled_from([None, None, ("batch_size", 2**31), ("batch_size", 2**62), ("batch_size", -1),
                                    ("rho", [2.0] * K), ("rng_inc", 2), ("perm_pos", [10**12] * K),
                                    ("steps_done", -5), ("oversample", float("nan")), ("rounding", "bogus"),
                                    ("max_rounds", 0), ("perm_keys", [-1] * (4 * K))]))
    return dict(target="sampler", kind="sampler", pools=draw(st.lists(st.integers(0, 40), min_size=K, max_size=K)),
                B=draw(st.sampled_from([1, 4, 17, 2**31])), oversample=draw(st.sampled_from([0.5, 3.0, 1e-9])),
                max_rounds=draw(st.integers(1, 4)), method=method, seed=draw(st.integers(0, 2**64 - 1)),
                weights=w, corrupt=corrupt, backend=draw(st.sampled_from(["cpp", "python"])))


def test_fuzz_sampler():
    cases = _collect(sampler_case(), max(20, 2 * N_EXAMPLES))
    for c in cases:
        c.setdefault("valid", True)
    counts, failures, _, _ = _run_target("sampler", cases)
    _assert_clean(counts, failures)


_EXTREME = [0.0, 1e-300, 1e-5, 0.5, 1.0, 1e3, 1e6, 1e300, -1.0, float("nan"), float("inf")]


@st.composite
def controller_case(draw):
    # half the draws are ordinary values, so most controllers get built and stepped
    x = st.sampled_from(_EXTREME + [0.01, 0.05, 0.1, 0.2, 0.5, 0.9, 0.99, 0.3, 0.02, 0.7])
    cls = draw(st.sampled_from(["ImprovementAwareWeights", "RegularizedWeights", "UniformWeights", "SECCurriculum",
                                "TaskRewardTracker", "PromptGDRO", "RolloutAllocator", "DifficultyClassifier"]))
    K = draw(st.sampled_from([1, 3, 3, 2, 9, 0, -1]))
    kw = {
        "ImprovementAwareWeights": lambda: dict(lam=draw(x), lr=draw(x), weight_decay=draw(x),
                                                optimizer=draw(st.sampled_from(["adam", "sgd", "bogus"])),
                                                improvement_clip=draw(x)),
        "RegularizedWeights": lambda: dict(lr=draw(x), eta=draw(x), optimizer=draw(st.sampled_from(["adam", "sgd"]))),
        "UniformWeights": lambda: {},
        "SECCurriculum": lambda: dict(lr=draw(x), temperature=draw(x)),
        "TaskRewardTracker": lambda: dict(decay=draw(x), initial=draw(x)),
        "PromptGDRO": lambda: dict(eta=draw(x), gamma=draw(x), ema=draw(x), cap=draw(x)),
        "RolloutAllocator": lambda: dict(n_min=draw(st.sampled_from([1, 2, 0])), n_max=draw(st.sampled_from(
            [4, 12, 10**12])), mu_lr=draw(x), eta=draw(x), gamma=draw(x)),
        "DifficultyClassifier": lambda: dict(window=draw(st.sampled_from([1, 50, 10**10, 0])),
                                             hysteresis=draw(x)),
    }[cls]()
    args = [] if cls == "DifficultyClassifier" else [K]
    vals = draw(st.lists(st.sampled_from([0.0, 1.0, 0.5, 1e300, -1e300, 1e-300]), min_size=1, max_size=4))
    return dict(target="controller", cls=cls, args=args, kwargs=kw, values=vals, steps=draw(st.integers(1, 6)),
                seed=draw(st.integers(0, 2**31 - 1)), valid=True)


def test_fuzz_controllers():
    cases = _collect(controller_case(), max(40, 4 * N_EXAMPLES))
    # the issue's reproducers: 1e300 hyperparameters gave NaN weights and unloadable states
    for cls, kw in (("RegularizedWeights", dict(lr=1e300, eta=1e300)),
                    ("ImprovementAwareWeights", dict(lr=1e300, weight_decay=1e300)),
                    ("ImprovementAwareWeights", dict(lr=1e3, weight_decay=1e3, lam=1e6)),
                    ("RegularizedWeights", dict(lr=1e3, eta=1e3, optimizer="sgd"))):
        cases.append(dict(target="controller", cls=cls, args=[3], kwargs=kw, values=[1e300, -1e300, 0.0],
                          steps=20, seed=1, valid=True))
    counts, failures, _, _ = _run_target("controllers", cases)
    _assert_clean(counts, failures)


#: Config overrides of issue 16 item 9 that must be refused at load time.
ISSUE_CONFIG_CASES = ["model.num_attention_heads=0", "rl.lr=inf", "rl.grad_clip=nan", "rl.pool_items=0",
                      "generation.batch_size=0", "eval.temperature=0", "loss.backend=bogus",
                      "gdro.window=10000000000", "model.num_key_value_heads=0"]
#: Of those, the ones this branch does not refuse cleanly (accepted, or an exception other
#: than ValueError/TypeError): issue 16 item 9, fixed on branch `algo`. Strict: exactly these
#: must still misbehave here; the lead empties the list after merging that branch.
KNOWN_CONFIG_DEFECTS: list = []


def _config_fields():
    from dataclasses import fields

    from mtgrpo_core.train import config as C

    out = []
    for sec, cls in C._section_classes().items():
        for f in fields(cls):
            out.append((sec, f.name, f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))))
    return out


@st.composite
def config_case(draw, fields_):
    sec, name, typ = draw(st.sampled_from(fields_))
    val = draw(st.sampled_from(["0", "-1", "1", "0.5", "inf", "nan", "-inf", "1e300", "10000000000", "bogus", "",
                                "true", "[1, 2]"]))
    return dict(target="config", overrides=[f"{sec}.{name}={val}"], algo=draw(st.sampled_from(
        ["grpo", "mtgrpo", "dapo", "rollout-gdro"])), valid=True)


def test_fuzz_config():
    cases = _collect(config_case(_config_fields()), max(40, 4 * N_EXAMPLES))
    for c in cases:
        if c["overrides"][0] in KNOWN_CONFIG_DEFECTS:
            c["features"], c["op"] = ["known-config"], "config"
    # accepted-but-invalid values from the issue must be refused cleanly: run after the drawn
    # cases, in the same workers
    probe = [dict(target="config", overrides=[o], algo="grpo", valid=False) for o in ISSUE_CONFIG_CASES]
    results = _execute(cases + probe)
    assert len(results) == len(cases) + len(probe)
    counts, failures, _ = _tally(cases, results[:len(cases)])
    _report("config", counts, failures)
    _assert_clean(counts, failures)      # only ValueError / TypeError, never another exception
    res = results[len(cases):]
    misbehaving = [p["overrides"][0] for p, r in zip(probe, res) if r["-"]["status"] != "clean"]
    print(f"[fuzz config] issue-16 probes not refused cleanly: {misbehaving}")
    assert sorted(misbehaving) == sorted(KNOWN_CONFIG_DEFECTS), (
        f"config values not refused with ValueError: {misbehaving}; expected exactly "
        f"KNOWN_CONFIG_DEFECTS={KNOWN_CONFIG_DEFECTS}")


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _worker()

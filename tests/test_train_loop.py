"""End-to-end training loop on tiny settings: every algorithm through the real loop (real
suite, verifiers, model, generation, fused loss, sampler and controllers), exact resume
after SIGKILL, evaluation, report and CLI."""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mtgrpo_core.train import checkpoint as _ckpt
from mtgrpo_core.train import config as C
from mtgrpo_core.train.trainer import Trainer, read_metrics, train

TINY = [
    "run.threads=1", "run.progress=false",
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
    "model.num_attention_heads=2", "model.num_key_value_heads=2", "model.max_position_embeddings=64",
    "tasks.train_size=300", "tasks.test_size=20",
    "warmup.steps=60", "warmup.max_time_s=0", "warmup.batch_size=32",
    "rl.steps=2", "rl.max_time_s=0", "rl.batch_prompts=6", "rl.group_size=4", "rl.mini_batches=2",
    "rl.max_new_tokens=8", "rl.max_rounds=3",
    "eval.n_items=8", "eval.k=2", "checkpoint.every=1",
]


def tiny_cfg(out, *extra, algo="grpo"):
    return C.load_config(None, [*TINY, *extra], algo=algo, out=str(out))


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A tiny policy after a short supervised warm-up (shared by the RL tests)."""
    out = tmp_path_factory.mktemp("warm")
    summary = train(tiny_cfg(out, "rl.steps=0"))
    recs = read_metrics(out)
    wu = [r for r in recs if r["kind"] == "warmup"][0]
    assert wu["steps"] == 60 and math.isfinite(wu["final_loss"])
    assert summary["before"] is not None and summary["steps"] == 0
    return out / "checkpoint.pt"


def _train_recs(out):
    return [r for r in read_metrics(out) if r["kind"] == "train"]


@pytest.mark.parametrize("algo", ["grpo", "dapo", "mtgrpo", "sec", "prompt-gdro", "rollout-gdro",
                                  "sec-grpo", "mtgrpo-reward-only", "iwu-no-rps", "rps-uniform"])
def test_each_algorithm_runs_the_real_loop(tmp_path, warm, algo):
    from mtgrpo_core.algorithms import get_algorithm

    bundle = get_algorithm(algo)
    cfg = tiny_cfg(tmp_path, f"run.init_from={warm}", algo=algo)
    summary = train(cfg)
    recs = _train_recs(tmp_path)
    assert [r["step"] for r in recs] == [1, 2] and summary["steps"] == 2
    for r in recs:
        assert not r.get("skipped"), r
        assert 1 <= r["batch_prompts"] <= 6 and math.isfinite(r["loss"])
        assert abs(sum(r["weights_after"]) - 1) < 1e-9
        assert all(0 <= x <= 1 for x in r["zero_grad_rate"] + r["train_acc"])
        assert sum(r["realized"]) == r["batch_prompts"]
        assert len(r["task_loss_sum"]) == 3 and all(map(math.isfinite, r["task_loss_sum"]))
        # tasks absent from the batch contribute nothing to the kernel's per-task sums
        assert all(x == 0 for x, n in zip(r["task_loss_sum"], r["realized"]) if n == 0)
    if not bundle.filter_zero_adv:   # no filter: one round of exactly B prompts (grpo, sec-grpo, GDRO)
        assert all(r["rounds"] == 1 and r["batch_prompts"] == 6 for r in recs)
    if algo == "mtgrpo":   # IWU moved the weights once per mini-batch, from I_k measured per mini-batch
        assert all(len(r["improvement"]) == 3 for r in recs)
        assert np.abs(np.asarray(recs[-1]["weights_after"]) - 1 / 3).max() > 1e-4
        assert all(sum(r["targets"]) == 6 for r in recs)
    if bundle.weighting == "sec":
        assert all(len(r["sec_reward"]) == 3 for r in recs)
    if bundle.weighting == "iwu":   # the weights moved (IWU per mini-batch, from I_k)
        assert np.abs(np.asarray(recs[-1]["weights_after"]) - 1 / 3).max() > 1e-4
    if bundle.weighting == "reward-only":   # Subroutine 2 moves z only where J differs between tasks
        J = np.asarray(recs[0]["J"])
        moved = np.abs(np.asarray(recs[0]["weights_after"]) - 1 / 3).max() > 1e-12
        assert moved == bool(np.ptp(J) > 0), (J, recs[0]["weights_after"])
    if bundle.weighting == "uniform":
        assert all(np.allclose(r["weights_after"], 1 / 3) for r in recs)
    if bundle.sampler == "ratio-preserving":
        assert all(sum(r["targets"]) == 6 for r in recs)
    if algo == "prompt-gdro":
        assert all(abs(sum(r["gdro_q"]) - 1) < 1e-9 for r in recs)
    if algo == "rollout-gdro":
        assert all(r["n_per_prompt_mean"] == 4.0 for r in recs)   # exact compute budget (gdro.n_mean)
        assert all(sum(r["bin_rollouts"]) == 24 for r in recs)
    ev = [r for r in read_metrics(tmp_path) if r["kind"] == "eval"]
    assert [e["tag"] for e in ev] == ["before", "after"]
    for e in ev:
        for t in e["tasks"].values():
            assert t["n_items"] == 8 and 0 <= t["mean_at_k"] <= t["pass_at_k"] <= 1
    assert (tmp_path / "summary.json").exists() and (tmp_path / "config.toml").exists()


def test_rl_updates_change_the_policy_and_rp_sampler_preserves_ratios(tmp_path, warm):
    cfg = tiny_cfg(tmp_path, f"run.init_from={warm}", "rl.steps=3", algo="mtgrpo")
    tr = Trainer(cfg)
    tr.run()
    w0 = _ckpt.load(warm)["model"]
    w1 = tr.model.state_dict()
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    for r in _train_recs(tmp_path):   # realised counts hit the targets whenever there is no shortfall
        if r["shortfall"] == 0:
            assert r["realized"] == r["targets"]


def _strip_times(recs):
    return [{k: v for k, v in r.items() if "time" not in k} for r in recs]


@pytest.mark.parametrize("algo", ["mtgrpo", "rollout-gdro"])
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path, warm, algo):
    steps = 10
    extra = [f"run.init_from={warm}", f"rl.steps={steps}"]
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    train(tiny_cfg(ref_dir, *extra, algo=algo))
    cmd = [sys.executable, "-m", "mtgrpo_core.cli", "train", "--algo", algo, "--out", str(kill_dir),
           "--no-report", *TINY, *extra]
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    metrics = kill_dir / "metrics.jsonl"
    deadline = time.time() + 120
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum('"kind": "train"' in l for l in metrics.read_text().splitlines()) >= 4:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    proc.wait()
    assert killed, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    st = _ckpt.load(kill_dir / "checkpoint.pt")
    assert st["phase"] == "rl" and 1 <= st["step"] < steps      # killed mid-training
    res = subprocess.run([sys.executable, "-m", "mtgrpo_core.cli", "train", "--resume", "--out", str(kill_dir),
                          "--no-report"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = read_metrics(ref_dir), read_metrics(kill_dir)
    assert _strip_times(a) == _strip_times(b)
    wa = _ckpt.load(ref_dir / "checkpoint.pt")
    wb = _ckpt.load(kill_dir / "checkpoint.pt")
    assert wa["step"] == wb["step"] == steps
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k


def test_checkpoint_write_is_atomic(tmp_path):
    from mtgrpo_core.train import checkpoint as ck

    p = tmp_path / "c.pt"
    ck.save_atomic({"a": torch.arange(3)}, p)
    ck.save_atomic({"a": torch.arange(4)}, p)
    assert torch.equal(ck.load(p)["a"], torch.arange(4))
    assert [f.name for f in tmp_path.iterdir()] == ["c.pt"]   # no temporary left behind


def test_cli_eval_report_and_resume_errors(tmp_path, warm, capsys):
    from mtgrpo_core.cli import main

    out = tmp_path / "run"
    assert main(["train", "--algo", "dapo", "--out", str(out), *TINY, f"run.init_from={warm}"]) == 0
    rep = out / "report"
    for name in ("accuracy.png", "task_weights.png", "zero_grad_rate.png", "batch_shares.png", "rollouts.png",
                 "report.md"):
        assert (rep / name).stat().st_size > 0, name
    md = (rep / "report.md").read_text()
    assert "spell_backward" in md and "worst" in md
    assert main(["eval", "--run", str(out), "--split", "test", "--n-items", "5"]) == 0
    ev = json.loads((out / "eval-test.json").read_text())
    assert all(v["n_items"] == 5 for v in ev["tasks"].values())
    assert main(["report", "--run", str(out), "--baseline", str(out)]) == 0
    assert "Δ% vs baseline" in capsys.readouterr().out
    assert main(["train", "--resume", "--out", str(tmp_path / "nothing")]) == 2


def test_compare_writes_the_paper_style_table(tmp_path):
    from mtgrpo_core.train.compare import run_compare

    cfg = tiny_cfg(tmp_path / "unused", "rl.steps=2", "eval.every=1", "warmup.steps=20")
    md = run_compare(cfg, tmp_path / "cmp", algos=("dapo", "mtgrpo"), seeds=(0,), threshold=0.0)
    lines = md.splitlines()
    assert any(l.startswith("| dapo |") and "0 (ref)" in l for l in lines)
    row = next(l for l in lines if l.startswith("| mtgrpo |"))
    assert row.count("|") == lines[2].count("|") and "worst-task" in lines[2] and "Δ% vs DAPO" in lines[2]
    res = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert res["algos"]["mtgrpo"]["steps_to_threshold"] == [0]   # threshold 0 is met before RL
    # the paired worst-task difference is mtgrpo's worst task minus DAPO's, same seed
    mt, da = res["algos"]["mtgrpo"], res["algos"]["dapo"]
    assert mt["seeds"] == da["seeds"] == [0]
    want = min(mt["per_task"][0].values()) - min(da["per_task"][0].values())
    assert mt["worst_diff_vs_dapo"] == pytest.approx([want])
    assert f"| {100 * mt['worst_diff_vs_dapo'][0]:+.1f} |" in row and "worst Δ vs DAPO (paired, pts)" in lines[2]
    # both algorithms started RL from the same warm-up checkpoint
    a = read_metrics(tmp_path / "cmp" / "dapo-s0")
    b = read_metrics(tmp_path / "cmp" / "mtgrpo-s0")
    assert a[0] == b[0] == {"kind": "init", "from": str(tmp_path / "cmp" / "warmup-s0" / "checkpoint.pt")}
    assert a[1]["tasks"] == b[1]["tasks"]   # identical "before" evaluation (same model, same eval seed)
    # `mtgrpo compare --table` rebuilds the same table from the runs (seeds run side by side)
    from mtgrpo_core.cli import _seed_list, main

    (tmp_path / "cmp" / "compare.md").unlink()
    assert main(["compare", "--table", "--seeds", "0,", "--algos", "dapo,mtgrpo", "--out", str(tmp_path / "cmp"),
                 "--threshold", "0"]) == 0
    assert (tmp_path / "cmp" / "compare.md").read_text().strip() == md.strip()
    # a folder without the runs (a typo in --out) or an empty --algos: a clear error, exit 2
    assert main(["compare", "--table", "--seeds", "0,", "--out", str(tmp_path / "no-runs")]) == 2
    assert main(["compare", "--table", "--algos", " , ", "--out", str(tmp_path / "cmp")]) == 2
    assert _seed_list("3") == [0, 1, 2] and _seed_list("0,2") == [0, 2] and _seed_list("1,") == [1]
    for bad in ("0", "x", "-1,"):
        with pytest.raises(argparse.ArgumentTypeError):
            _seed_list(bad)


def test_policy_update_direction_through_library_loss():
    """One SGD step on the fused loss raises the log-likelihood of positive-advantage
    completions and lowers it for negative ones (sign and wiring of logprobs -> loss)."""
    import mtgrpo_core as mc
    from mtgrpo_core.train.generation import HFGenerator
    from mtgrpo_core.train.model import build_model, completion_logprobs

    m = build_model(C.load_config(None, TINY).model, seed=0)
    ro = HFGenerator(m, seed=0).generate(["S:abc=", "A:1+2="], 4, max_new_tokens=6)
    adv = mc.group_advantages(torch.tensor([1., 0, 1, 0, 0, 1, 0, 1]), ro.prompt_index)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    lp0 = completion_logprobs(m, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    loss, _ = mc.grpo_loss(lp0, lp0.detach(), ro.completion_mask, adv, loss_agg="token-mean")
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        lp1 = completion_logprobs(m, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    d = ((lp1 - lp0.detach()) * ro.completion_mask).sum(1)
    assert torch.equal(d > 0, adv > 0), (d, adv)

"""The kernels across 2 processes (torchrun, gloo, CPU): completion_logprobs through a DDP
wrapper gives the gradients of one process on the whole batch (and the log-probs of the
model's own logits); group_advantages and the fused grpo_loss with process_group normalise
groups split across ranks like one process on the whole batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

WORKER = Path(__file__).parent / "dist_workers" / "kernels_worker.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_kernels")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_completion_logprobs_values(ranks):
    for r in ranks:
        assert r["value_err"] < 1e-5  # = log_softmax(model logits / tau) of the completion tokens
        assert r["ddp_value_err"] < 1e-6


def test_completion_logprobs_under_ddp_equals_one_process(ranks):
    for r in ranks:
        # the local half's own gradient is far from the whole batch's, the DDP one equals it
        assert r["local_only_grad_diff"] > 1e-2 * r["ddp_grad_scale"]
        assert r["ddp_grad_diff"] <= 1e-5 * max(1.0, r["ddp_grad_scale"])


def test_group_advantages_across_ranks(ranks):
    for r in ranks:
        assert r["adv_local_diff"] > 0.1  # split groups normalised locally are wrong ...
        assert r["adv_err"] < 1e-6        # ... gathered, they are the whole batch's


def test_fused_loss_across_ranks(ranks):
    for r in ranks:
        assert abs(r["loss_ref"]) > 1e-4
        assert r["loss_err"] < 1e-6 and r["loss_grad_err"] < 1e-7 and r["loss_adv_err"] < 1e-6
        # one flat group (all rewards 1.0) of the 3, each rank holds rows of all 3
        assert r["zero_adv_group_frac"] == pytest.approx(1 / 3) and r["task_zero_adv_frac"] == pytest.approx(1 / 3)
        assert "process_group" in r["refuses_precomputed"]

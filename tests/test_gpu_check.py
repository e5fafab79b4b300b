"""``mtgrpo gpu-check``: what can be checked without a GPU.

The no-GPU path (a clear message, exit status 2, nothing written) runs the real command in a
child process with ``CUDA_VISIBLE_DEVICES=""``, so it holds on a GPU machine too. The table
writer is a pure function of the rows it is given: these tests feed it rows in the bench
harness's JSON format and check the arithmetic (GB/s, TFLOP/s, % of the H200 peak, time
over the roofline's lower bound) and the notes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mtgrpo_core import gpu_check as gc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from _harness import H200, roofline  # noqa: E402


def test_no_gpu_exits_2_with_a_clear_message(tmp_path):
    out = tmp_path / "GPU-CHECK.md"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "mtgrpo_core.cli", "gpu-check", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == gc.NO_GPU_EXIT == 2, proc.stdout + proc.stderr
    assert "no NVIDIA GPU found" in proc.stderr
    assert "Nothing was measured" in proc.stderr
    assert not out.exists()


def test_main_without_gpu_returns_2_and_writes_nothing(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():  # this process sees a GPU: the child-process test covers it
        assert gc.no_gpu_reason() is None
        return
    out = tmp_path / "t.md"
    assert gc.main(out=out) == 2
    assert not out.exists()
    assert "no NVIDIA GPU found" in capsys.readouterr().err


def _row(op, case, provider, device, ms, gbps=None, extra=None):
    return {"op": op, "case": case, "provider": provider, "device": device, "median_ms": ms, "gbps": gbps,
            "extra": extra or {}}


def test_table_writer_arithmetic_and_notes():
    rf = roofline(min_bytes=48e6, kernel_bytes=50e6)  # 50 MB at 4.8 TB/s: 0.0104 ms lower bound
    rows = [
        _row("task_accumulate", "fwd/8192x1024/K3", "mtgrpo-cuda", "cuda", 0.02, 2400.0, {"mode": "fwd", **rf}),
        _row("task_accumulate", "fwd/8192x1024/K3", "torch_ref", "cuda", 0.2, 240.0, {"mode": "fwd", **rf}),
        _row("task_accumulate", "fwd/8192x1024/K3", "mtgrpo-cpu", "cpu", 5.0, 9.6, {"mode": "fwd", **rf}),
        # a FLOP row in the linear_logprobs bench's format (gflop, no roofline)
        _row("linear_logprobs", "M=16384,H=4096,V=151936,bfloat16,fwd+bwd", "mtgrpo-triton", "cuda", 200.0,
             None, {"gflop": 81585.2}),
        # the grpo bench's format: only gbps
        _row("grpo_loss", "512x2048", "mtgrpo-triton", "cuda", 0.05, 270.0, {}),
    ]
    text = gc.format_table(rows, device_name="NVIDIA H200", peaks=dict(H200), tests={"passed": 40, "failed": 1},
                           notes=["bench_x.py: stopped after its 45 s limit"])
    lines = text.splitlines()
    assert lines[0] == "# GPU check: NVIDIA H200"
    assert "4.80 TB/s HBM" in text and "989 TFLOP/s bf16" in text
    assert "requires_cuda tests: 40 passed, 1 failed." in text
    table = [ln for ln in lines if ln.startswith("| ") and "---" not in ln][1:]
    assert len(table) == 4  # the CPU row is left out
    cells = {(c[2].strip(), c[3].strip()): [x.strip() for x in c] for c in (ln.split("|") for ln in table)}
    cuda = cells[("fwd/8192x1024/K3", "mtgrpo-cuda")]
    # 48e6 B / 0.02 ms = 2400 GB/s = 50.0 % of 4.8 TB/s; 0.02 / 0.0104 = 1.92 x the bound
    assert cuda[5] == "2400.0 GB/s" and cuda[6] == "50.0" and cuda[7] == "1.92"
    ref = cells[("fwd/8192x1024/K3", "torch_ref")]
    assert ref[5] == "240.0 GB/s" and ref[6] == "5.0"
    lin = cells[("M=16384,H=4096,V=151936,bfloat16,fwd+bwd", "mtgrpo-triton")]
    # 81585.2 GFLOP / 0.2 s = 407.9 TFLOP/s = 41.2 % of 989
    assert lin[5] == "407.9 TFLOP/s" and lin[6] == "41.2" and lin[7] == ""
    grpo = cells[("512x2048", "mtgrpo-triton")]
    assert grpo[5] == "270.0 GB/s" and grpo[6] == "5.6"
    assert "- bench_x.py: stopped after its 45 s limit" in lines
    assert "- grpo_loss: no `liger` row on the GPU (not measured)" in lines
    assert "- task_accumulate: no `index_add` row on the GPU (not measured)" in lines
    assert not any("no `torch_ref` row" in ln and "task_accumulate" in ln for ln in lines)


def test_table_writer_unknown_device_and_no_rows():
    text = gc.format_table([], device_name="Some GPU", peaks=None)
    assert "Peaks: unknown for this device" in text and "| (no GPU rows) |" in text
    assert gc.device_peaks("NVIDIA H200")["hbm_bytes_per_s"] == H200["hbm_bytes_per_s"]
    assert gc.device_peaks("NVIDIA A100-SXM4-80GB")["name"].startswith("A100")
    assert gc.device_peaks("Some GPU") is None


def test_parsers_read_harness_json_and_pytest_summary():
    row = _row("grpo_loss", "64x1024", "torch_ref", "cuda", 1.5, 12.0, {"fwd_bwd": True})
    out = "# bench_grpo_loss.py\nnoise {not json}\n" + json.dumps({**row, "git": "abc"}) + "\n# summary\n"
    (parsed,) = gc.parse_bench_rows(out)
    assert parsed["provider"] == "torch_ref" and parsed["median_ms"] == 1.5
    summary = ("....F.\n=== short test summary info ===\nFAILED x\n"
               "3 failed, 40 passed, 2 skipped, 900 deselected in 81.2s\n")
    assert gc.parse_pytest_summary(summary) == {"failed": 3, "passed": 40, "skipped": 2, "deselected": 900}
    assert gc.parse_pytest_summary("garbage") == {}

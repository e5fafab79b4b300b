"""Training config: TOML + key=value overrides, validation with clear messages."""
import pytest

from mtgrpo_core.train import config as C


def test_default_config_loads_and_resolves_presets():
    cfg = C.load_config()
    assert cfg.run.algo == "mtgrpo" and cfg.tasks.suite == "cpu-3task"
    assert cfg.loss.clip_eps_high == 0.28 and cfg.loss.loss_agg == "token-mean" and cfg.loss.filter_zero_adv
    g = C.load_config(algo="grpo")
    assert (g.loss.clip_eps_low, g.loss.clip_eps_high, g.loss.loss_agg, g.loss.filter_zero_adv) == \
        (0.2, 0.2, "seq-mean-token-mean", False)
    pg = C.load_config(algo="prompt-gdro")
    assert pg.loss.adv_clip == 5.0 and not pg.loss.filter_zero_adv
    # an explicit loss setting wins over the preset
    d = C.load_config(algo="dapo", overrides=["loss.clip_eps_high=0.3", "loss.filter_zero_adv=false"])
    assert d.loss.clip_eps_high == 0.3 and d.loss.filter_zero_adv is False


def test_overrides_types_and_roundtrip(tmp_path):
    cfg = C.load_config(overrides=["rl.steps=7", "rl.lr=1e-4", "run.progress=false", "gdro.edges=[0.3, 0.6]",
                                   "run.out=some/where"])
    assert cfg.rl.steps == 7 and cfg.rl.lr == 1e-4 and cfg.run.progress is False
    assert cfg.gdro.edges == (0.3, 0.6) and cfg.run.out == "some/where"
    p = tmp_path / "c.toml"
    p.write_text(C.to_toml(cfg))
    assert C.load_config(p) == cfg


@pytest.mark.parametrize("overrides, match", [
    (["rl.stepz=3"], r"unknown config key 'rl.stepz' \(did you mean 'rl.steps'\?\)"),
    (["steps=3"], r"must be section.key \(did you mean 'warmup.steps'\?\)"),
    (["rll.steps=3"], r"unknown config section 'rll' \(did you mean 'rl'\?\)"),
    (["rl.steps=abc"], r"rl.steps: expected an int, got str 'abc'"),
    (["rl.lr=true"], r"rl.lr: expected a number, got bool"),
    (["run.progress=maybe"], r"run.progress: expected a bool"),
    (["gdro.n_min=13"], r"gdro.n_min \(13\) must be <= gdro.n_max \(12\)"),
    (["gdro.n_mean=1"], r"gdro.n_mean \(1\) must lie in \[gdro.n_min, gdro.n_max\]"),
    (["rl.mini_batches=30", "rl.batch_prompts=8"], r"rl.mini_batches \(30\) cannot exceed rl.batch_prompts \(8\)"),
    (["rl.group_size=1"], r"rl.group_size must be >= 2"),
    (["run.algo=mtgrp"], r"unknown algorithm 'mtgrp' \(did you mean 'mtgrpo'\?\)"),
    (["loss.loss_agg=token_mean"], r"loss.loss_agg must be one of .* \(did you mean 'token-mean'\?\)"),
    (["generation.backend=vllm", "generation.vllm_sleep=true", "run.device=cpu"],
     r"generation.vllm_sleep: vLLM's sleep mode is not available on CPU"),
    (["rl.top_p=0"], r"rl.top_p must be in \(0, 1\]"),
    (["gdro.edges=[0.5, 0.2]"], r"gdro.edges must be increasing"),
    (["rl.steps"], r"not of the form section.key=value"),
    # values that used to be accepted and fail later (issue 16 item 9)
    (["model.num_attention_heads=0"], r"model.num_attention_heads must be >= 1, got 0"),
    (["rl.lr=inf"], r"rl.lr: expected a finite number, got inf"),
    (["rl.grad_clip=nan"], r"rl.grad_clip: expected a finite number, got nan"),
    (["rl.pool_items=0"], r"rl.pool_items must be >= 1"),
    (["generation.batch_size=0"], r"generation.batch_size must be >= 1, got 0"),
    (["eval.temperature=0"], r"eval.temperature must be > 0"),
    (["loss.backend=bogus"], r"loss.backend must be one of .*, got 'bogus'"),
    (["gdro.window=10000000000"], r"gdro.window must be <= 10000, got 10000000000"),
    (["sec.lr=2"], r"sec.lr: expected a finite number in \(0.0, 1.0\], got 2.0"),
    (["mtgrpo.weight_lr=-1"], r"mtgrpo.weight_lr: expected a finite number in \(0.0, 1000.0\]"),
    (["tasks.suite=nope"], r"tasks.suite: unknown suite 'nope'"),
    (["eval.batch_size=8"], r"unknown config key 'eval.batch_size'"),
])
def test_bad_configs_rejected_with_clear_messages(overrides, match):
    with pytest.raises(C.ConfigError, match=match):
        C.load_config(overrides=overrides)


def test_bad_toml_files(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[rl]\nbatch_prompt = 8\n")
    with pytest.raises(C.ConfigError, match=r"did you mean 'rl.batch_prompts'"):
        C.load_config(p)
    p.write_text("algo = 'dapo'\n")
    with pytest.raises(C.ConfigError, match=r"must live in a \[section\]"):
        C.load_config(p)
    p.write_text("[rl\n")
    with pytest.raises(C.ConfigError, match="not valid TOML"):
        C.load_config(p)
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load_config(tmp_path / "missing.toml")


def test_cli_reports_config_errors(capsys):
    from mtgrpo_core.cli import main

    assert main(["train", "--out", "/nonexistent/never", "mtgrpo.lamda=0.2"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'mtgrpo.lamda' (did you mean 'mtgrpo.lam'?)" in err


def test_report_on_a_missing_run_is_a_clean_error(tmp_path, capsys):
    from mtgrpo_core.cli import main

    assert main(["report", "--run", str(tmp_path / "missing")]) == 2
    assert "no run at" in capsys.readouterr().err


def test_top_level_exports_match_ops_and_train_speaks_at_once():
    """mtgrpo_core resolves the ops lazily from a fixed list: it must equal ops.__all__; and the
    `mtgrpo train` command prints its first line before importing torch (issue: progress in 1 s)."""
    import subprocess
    import sys
    import time

    import mtgrpo_core
    import mtgrpo_core.ops as ops

    assert sorted(mtgrpo_core._OPS_NAMES) == sorted(ops.__all__)
    for name in mtgrpo_core.__all__:
        assert getattr(mtgrpo_core, name) is not None
    # a fresh interpreter: importing the package and the CLI must not import torch
    code = "import sys, mtgrpo_core, mtgrpo_core.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "mtgrpo_core.cli", "train", "no_such_section.key=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()
    elapsed = time.monotonic() - t0
    proc.communicate(timeout=300)
    assert first.startswith("mtgrpo train: starting"), first
    # the first line comes before any heavy import; 5 s leaves room for a loaded 2-core machine
    assert elapsed < 5.0, elapsed
    assert proc.returncode == 2  # and the bad key is still rejected

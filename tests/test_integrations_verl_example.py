"""CPU smoke test of examples/verl (no GPU, no rollout engine, no Ray): the data-preparation
script writes verl parquet files (data_source = task); verl 0.9.1's own RLHFDataset reads
them; both example command lines compose into verl's legacy trainer config with Hydra (every
key exists); verl's create_rl_sampler builds MTGRPOTaskSampler / PromptGDROSampler from that
config; a few sampler steps with the dataset's on_batch_end (rewards from examples/verl/
reward.py) move the weights; verl's legacy trainer modules import with the [verl] extra."""
from __future__ import annotations

import collections
import importlib
import os
import re
import shlex
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("reasoning_gym")

from omegaconf import OmegaConf  # noqa: E402
from tokenizers import Tokenizer, decoders, models  # noqa: E402
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402

from mtgrpo_core.integrations import verl as mv  # noqa: E402
from mtgrpo_core.sampling import target_counts  # noqa: E402

EX = Path(__file__).resolve().parents[1] / "examples" / "verl"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"verl_example_{name}", EX / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("verl_data")
    counts = _load("prepare_data").main(["--suite", "cpu-3task", "--train-size", "24", "--test-size", "4",
                                         "--out", str(out)])
    return out, counts


def _tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tok


def _overrides(script: str, data_dir: str) -> list[str]:
    """The Hydra overrides of an example script's main_ppo command, variables filled in."""
    text = (EX / script).read_text()
    cmd = text[text.index("python -m verl.trainer.main_ppo"):].split('"$@"')[0].replace("\\\n", " ")
    env = {"DATA": data_dir, "MODEL": "tiny-model", "NGPUS": "1", "ROLLOUT": "vllm", "HERE": str(EX),
           "PLUGIN": "mtgrpo_core.integrations.verl_plugin"}
    cmd = re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], cmd)
    return shlex.split(cmd)[3:]


def _config(script, data_dir):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import verl.trainer.main_ppo as main_ppo

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(main_ppo.__file__).parent / "config"), version_base=None):
        return compose(config_name="ppo_trainer", overrides=_overrides(script, data_dir))


def test_prepared_dataset_is_verl_format(data):
    out, counts = data
    assert set(counts["train"]) == {"spell_backward", "countdown", "countdown-4"}
    assert all(v == 24 for v in counts["train"].values()) and all(v == 4 for v in counts["test"].values())
    from verl.utils.dataset.rl_dataset import RLHFDataset

    ds = RLHFDataset(str(out / "train.parquet"), _tokenizer(), OmegaConf.create({"max_prompt_length": 64}))
    assert len(ds) == 72
    item = ds[0]
    assert item["data_source"] == "spell_backward" and "extra_info" in item
    assert sorted(set(ds.dataframe["data_source"])) == sorted(counts["train"])
    # extra_info.index is unique (PromptGDROSampler's prompt id)
    assert len({e["index"] for e in ds.dataframe["extra_info"]}) == 72


def test_reward_function_scores_the_rebuilt_item(data):
    out, _ = data
    import pandas as pd

    reward = _load("reward")
    rows = pd.read_parquet(out / "train.parquet")
    for _, r in rows.iloc[::20].iterrows():
        gt = r["reward_model"]["ground_truth"]
        assert reward.compute_score(r["data_source"], gt, gt, dict(r["extra_info"])) == 1.0
        assert reward.compute_score(r["data_source"], "@@", gt, dict(r["extra_info"])) == 0.0


@pytest.mark.parametrize("script,cls", [("run_mtgrpo.sh", "MTGRPOTaskSampler"), ("run_gdro.sh", "RandomSampler")])
def test_example_commands_compose_and_build_the_sampler(data, script, cls):
    out, _ = data
    mv.register()
    cfg = _config(script, str(out))
    assert cfg.trainer.use_v1 is False
    assert cfg.algorithm.adv_estimator == ("mtgrpo_grpo" if cls == "MTGRPOTaskSampler" else "mtgrpo_gdro")
    assert core_algos.get_adv_estimator_fn(cfg.algorithm.adv_estimator) is not None
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "mtgrpo"
    assert core_algos.get_policy_loss_fn("mtgrpo") is mv.compute_policy_loss_mtgrpo
    assert cfg.data.train_files == str(out / "train.parquet")
    from verl.trainer.ppo.utils import create_rl_sampler
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

    data_cfg = OmegaConf.merge(cfg.data, {"train_batch_size": 12, "max_prompt_length": 64})
    ds = RLHFDataset(data_cfg.train_files, _tokenizer(), data_cfg)
    sampler = create_rl_sampler(data_cfg, ds)
    assert type(sampler).__name__ == cls
    if cls == "RandomSampler":  # Prompt-GDRO: verl's own dataloader, the weights live in the estimator
        return
    assert ds.on_batch_end == sampler.update
    loader = StatefulDataLoader(ds, batch_size=12, sampler=sampler, num_workers=0, drop_last=True,
                                collate_fn=collate_fn)
    reward = _load("reward")
    rng = np.random.default_rng(0)
    acc = {"spell_backward": 0.9, "countdown": 0.5, "countdown-4": 0.1}
    for step, batch in enumerate(loader):
        if cls == "MTGRPOTaskSampler":
            names = sampler.composer.task_names
            c = collections.Counter(batch["data_source"])
            assert sum(c.values()) == 12 and all(c[n] > 0 for n in names if sampler.composer.last_counts[
                names.index(n)] > 0)
        src, ext, uid, scores = [], [], [], []
        for s, e, gt in zip(batch["data_source"], batch["extra_info"],
                            [r["ground_truth"] for r in batch["reward_model"]]):
            u = str(uuid.uuid4())
            for _ in range(4):  # 4 rollouts per prompt: the answer with the task's accuracy, else junk
                comp = gt if rng.random() < acc[s] else "@@"
                src.append(s), ext.append(e), uid.append(u)
                scores.append(reward.compute_score(s, comp, gt, e))
        tls = torch.zeros(len(scores), 3)
        tls[:, -1] = torch.tensor(scores)
        ds.on_batch_end(batch=DataProto.from_dict(
            tensors={"token_level_scores": tls},
            non_tensors={"data_source": np.array(src, dtype=object), "extra_info": np.array(ext, dtype=object),
                         "uid": np.array(uid, dtype=object)}))
        if step == 3:
            break
    w = sampler.weights
    names = sampler.composer.task_names
    assert w[names.index("countdown-4")] > 1 / 3 > w[names.index("spell_backward")]
    np.testing.assert_array_equal(sampler.composer.last_counts.sum(), 12)
    assert target_counts(sampler.composer.draw_shares(), 12).sum() == 12


def test_legacy_trainer_modules_import():
    # what verl.trainer.main_ppo runs with trainer.use_v1=False (the [verl] extra adds cachetools,
    # uvicorn and fastapi, which verl 0.9.1 imports there without declaring them)
    for name in ("verl.trainer.main_ppo", "verl.trainer.main_ppo_v0", "verl.trainer.ppo.ray_trainer",
                 "verl.workers.engine_workers"):
        importlib.import_module(name)
    assert "cachetools" in sys.modules and "fastapi" in sys.modules and os.path.isfile(EX / "prepare_data.py")

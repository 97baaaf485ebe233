"""Wiring: parquet written by data_prep/prepare_erc.py loads through verl 0.9.1's own RLHFDataset and collate_fn.

Tokenizer: the tiny ByteLevel BPE with a ChatML template from selfemo_verl.cpu.assets.tiny_model_dir().
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import datasets
import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer
from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

from selfemo_verl.cpu.assets import tiny_model_dir
from selfemo_verl.data.erc_data import SPLITS

REPO = Path(__file__).resolve().parents[1]
EXPECTED_ROWS = {"train": 7551, "val": 954, "test": 984}  # EmoryNLP, the smallest of the three


@pytest.fixture(scope="module")
def emorynlp_parquet(data_dir, tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("prepare_erc", REPO / "data_prep" / "prepare_erc.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path_factory.mktemp("emorynlp_parquet")
    argv = ["--dataset", "emorynlp", "--raw-dir", str(data_dir / "emorynlp"), "--out-dir", str(out)]
    assert cli.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tiny_model_dir())


@pytest.fixture(scope="module")
def loaded(emorynlp_parquet, tokenizer, tmp_path_factory) -> dict[str, RLHFDataset]:
    """split -> RLHFDataset, each built once; HF datasets cache and verl's copy cache live in tmp."""
    tmp = tmp_path_factory.mktemp("rlhf_caches")
    config = OmegaConf.create({
        "prompt_key": "prompt", "max_prompt_length": 1 << 16, "filter_overlong_prompts": True,
        "filter_overlong_prompts_workers": 1, "cache_dir": str(tmp / "verl_cache"), "return_raw_chat": True,
    })
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp / "hf_datasets"))
        files = {split: str(emorynlp_parquet / f"{split}.parquet") for split in SPLITS}
        return {split: RLHFDataset(data_files=f, tokenizer=tokenizer, config=config) for split, f in files.items()}


@pytest.mark.parametrize("split", SPLITS)
def test_rlhf_dataset_keeps_every_row(split, loaded):
    # reason: no prompt exceeds the (huge) max length, so verl's overlong filter must keep all rows
    assert len(loaded[split]) == EXPECTED_ROWS[split]


def test_collated_batch_carries_prompt_extra_info_agent_name_and_reward_model(loaded):
    val = loaded["val"]
    items = [val[i] for i in range(4)]
    batch = collate_fn(items)
    assert batch["dummy_tensor"].shape == (4, 1)
    assert len(batch["raw_prompt"]) == 4
    for i in range(4):
        prompt, extra = batch["raw_prompt"][i], batch["extra_info"][i]
        assert [m["role"] for m in prompt] == ["system", "user"]
        assert prompt[1]["content"].startswith("Dialogue:\n")
        assert f"What emotion(s) does {extra['speaker']} express in the last turn?" in prompt[1]["content"]
        assert extra["index"] == i and batch["index"][i] == i  # reason: verl copies extra_info.index to index
        assert extra["split"] == "val" and extra["label_space"] == "emorynlp" and extra["origin"] == "real"
        assert extra["window"][-1]["speaker"] == extra["speaker"]
        assert isinstance(extra["next_gold"], list) and extra["round"] == 0
        assert batch["agent_name"][i] == "selfemo_recognize"
        assert batch["reward_model"][i]["style"] == "rule"
        assert list(batch["reward_model"][i]["ground_truth"]) == [items[i]["reward_model"]["ground_truth"][0]]
        assert batch["data_source"][i] == "selfemo/emorynlp"


def test_train_rows_select_the_self_play_agent_loop_and_tokenize(loaded, tokenizer):
    row = loaded["train"][0]
    assert row["agent_name"] == "selfemo_self_play"
    text = tokenizer.apply_chat_template(row["raw_prompt"], add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # reason: the tiny BPE round-trips the prompt
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert row["extra_info"]["window"][-1]["text"] in text

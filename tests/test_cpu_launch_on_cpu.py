"""selfemo_verl.cpu.launch: the CPU env and overrides (fp32 on every CPU) and the recipes that take them."""

import subprocess
import sys

import pytest

from selfemo_verl.cpu import launch


# ---------------- launch helper ----------------


def test_launch_overrides_compose_with_verls_ppo_trainer_config():
    from hydra import compose, initialize_config_module

    with initialize_config_module("verl.trainer.config", version_base=None):
        cfg = compose("ppo_trainer", overrides=launch.cpu_overrides())
    assert cfg.trainer.device == "cpu" and cfg.actor_rollout_ref.rollout.name == "hf"
    assert cfg.ray_kwargs.ray_init.num_gpus == cfg.trainer.n_gpus_per_node == 1
    assert cfg.transfer_queue.backend.SimpleStorage.num_data_storage_units == 1


def test_vllm_overrides_compose_with_verls_config_and_turn_off_what_vllm_offers_only_on_gpus():
    from hydra import compose, initialize_config_module

    with initialize_config_module("verl.trainer.config", version_base=None):
        cfg = compose("ppo_trainer", overrides=launch.cpu_overrides(rollout="vllm"))
    rollout = cfg.actor_rollout_ref.rollout
    assert rollout.name == "vllm" and rollout.tensor_model_parallel_size == 1 and rollout.dtype == "float32"
    # reason: vLLM's sleep mode (and so freeing its cache between steps) and CUDA graphs exist only on GPUs
    assert rollout.enforce_eager and not rollout.free_cache_engine and not rollout.enable_sleep_mode
    assert launch.cpu_env("vllm").items() >= launch.VLLM_CPU_ENV.items()
    assert not launch.VLLM_CPU_ENV.keys() & launch.cpu_env("hf").keys()
    with pytest.raises(ValueError, match="unknown rollout 'sglang'"):
        launch.cpu_overrides(rollout="sglang")


def test_launch_cli_prints_env_and_overrides_and_rejects_bad_usage(capsys):
    def run(*args):
        code = launch.main(["launch", *args])
        return code, capsys.readouterr().out.splitlines()

    assert "export VERL_PLATFORM=cpu" in run("env")[1]
    assert "export VLLM_CPU_KVCACHE_SPACE=1" in run("env", "vllm")[1]
    assert run("overrides")[1] == launch.cpu_overrides()
    assert run("overrides", "vllm")[1] == launch.cpu_overrides(rollout="vllm")
    assert run("precision")[1][0].split()[0] == "precision=fp32"
    assert run("bogus")[0] == run("env", "sglang")[0] == run("env", "hf", "extra")[0] == 2
    # the module runs as the recipes call it
    cli = subprocess.run([sys.executable, "-m", "selfemo_verl.cpu.launch", "env"], capture_output=True, text=True)
    assert cli.returncode == 0 and "export VERL_PLATFORM=cpu" in cli.stdout.splitlines()


# ---------------- precision: fp32 for actor, reference and rollout on every CPU ----------------


def test_native_bf16_is_a_bool_read_from_the_cpu_flags(tmp_path):
    assert isinstance(launch.native_bf16(), bool)
    for flags, native in (("fpu avx2 avx512f", False), ("fpu avx2 avx512f avx512_bf16", True), ("amx_bf16", True)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        assert launch.native_bf16(str(info)) is native
    assert launch.native_bf16(str(tmp_path / "absent")) is False  # not Linux: fp32 is the only safe answer


@pytest.mark.parametrize("native", [False, True])
def test_cpu_overrides_compute_in_fp32_whether_or_not_bf16_is_native(native, monkeypatch):
    # reason: bench_cpu_precision.py: without native bf16 a bf16 matmul is ~37x slower; with it, a bf16 actor still
    # disagrees with the rollout by ~0.05 in probability (fp32: ~5e-6), even when the server is bf16 too
    from hydra import compose, initialize_config_module

    monkeypatch.setattr(launch, "native_bf16", lambda *a: native)
    overrides = launch.cpu_overrides()
    assert set(launch.precision_overrides()) <= set(overrides)
    with initialize_config_module("verl.trainer.config", version_base=None):
        cfg = compose("ppo_trainer", overrides=overrides)
    for role in ("actor", "ref"):
        engine = cfg.actor_rollout_ref[role].fsdp_config
        assert dict(engine.mixed_precision) == {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
        assert engine.model_dtype == "fp32"
    assert cfg.actor_rollout_ref.rollout.dtype == "float32"


def test_every_cpu_recipe_takes_the_launch_overrides(repo_root):
    # the demo and the rounds recipe run the smoke recipe; the smoke and stock ones read `launch overrides`
    recipes = repo_root / "recipes"
    for name in ("run_cpu_smoke.sh", "run_cpu_stock_grpo.sh"):
        assert "-m selfemo_verl.cpu.launch overrides" in (recipes / name).read_text()
    for name in ("run_cpu_demo.sh", "run_cpu_rounds.sh"):
        assert "bash recipes/run_cpu_smoke.sh" in (recipes / name).read_text()


def test_cpu_threads_are_every_usable_core_unless_the_user_set_omp_num_threads():
    import os

    from selfemo_verl.cpu.launch import cpu_threads

    cores = len(os.sched_getaffinity(0))
    assert cpu_threads({}) == cores  # reason: Ray would give each actor 1 thread; we give all cores
    assert cpu_threads({"OMP_NUM_THREADS": "1"}) == 1  # reason: the user's choice wins (e.g. to compare)
    assert cpu_threads({"OMP_NUM_THREADS": "0"}) == cpu_threads({"OMP_NUM_THREADS": "x"}) == cores  # reason: invalid

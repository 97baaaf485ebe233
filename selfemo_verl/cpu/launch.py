"""The environment and Hydra overrides that run verl 0.9.1's trainer on a CPU (DESIGN.md §10).

One source for scripts and tests:

    eval "$(python -m selfemo_verl.cpu.launch env)"             # export the variables
    mapfile -t CPU < <(python -m selfemo_verl.cpu.launch overrides)
    python -m verl.trainer.main_ppo "${CPU[@]}" ...             # or python -m selfemo_verl.main

Why each item is needed (notes/verl-0.9.1-on-cpu.md §5, blockers 1-10): see the comments below.
The overrides set only the device plumbing; batch sizes, lengths and the model are the caller's.
"""

from __future__ import annotations

import shlex
import sys

from selfemo_verl.cpu import verl_private

# Ray's logical CPUs: TransferQueue starts a controller plus storage actors at num_cpus=1 each, and a
# 2-core machine with num_cpus=2 hangs in tq.init. Logical CPUs are only a scheduling count.
RAY_LOGICAL_CPUS = 16


def cpu_env() -> dict[str, str]:
    """Environment variables for a CPU run (set before Ray starts, so every Ray worker inherits them)."""
    return {
        "VERL_PLATFORM": "cpu",  # selects selfemo_verl.cpu.cpu_platform.PlatformCPU (device cpu, backend gloo)
        **verl_private.ENGINE_DEVICE_ENV,  # FSDP engine lookup (registered for cuda/npu only)
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        "RAY_AUTH_MODE": "disabled",  # ray 2.60's token-auth warning on a local cluster
        "RAY_DEDUP_LOGS": "0",
    }


def cpu_overrides(n_procs: int = 1) -> list[str]:
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
        # --- rollout: the transformers-generate server (selfemo_verl.cpu.hf_rollout) ---
        "actor_rollout_ref.rollout.name=hf",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
    ]


def main(argv: list[str]) -> int:
    """`env` prints export lines; `overrides` prints one override per line."""
    if argv[1:] == ["env"]:
        print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in cpu_env().items()))
    elif argv[1:] == ["overrides"]:
        print("\n".join(cpu_overrides()))
    else:
        print("usage: python -m selfemo_verl.cpu.launch {env|overrides}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

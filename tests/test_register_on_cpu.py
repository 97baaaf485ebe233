"""The verl.plugins entry point registers every SELF-EMO extension on a plain `import verl`.

verl swallows plugin import errors at DEBUG level, so a broken plugin would otherwise fail silently.
Runs in a fresh interpreter so that nothing imported by other tests can help.
"""

import json
import subprocess
import sys

PROBE = """
import json, verl
from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY
# Relies on verl 0.9.1 private _agent_loop_registry (no public accessor exists).
from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
from verl.plugin.platform import PlatformRegistry
from verl.workers.rollout.replica import RolloutReplicaRegistry
print(json.dumps({
    "adv": sorted(ADV_ESTIMATOR_REGISTRY),
    "agent": sorted(_agent_loop_registry),
    "platform": sorted(PlatformRegistry.registered_names()),
    "replica": RolloutReplicaRegistry.get("hf").__name__,
}))
"""


def test_plain_import_verl_registers_all_selfemo_names():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert "self_grpo" in found["adv"]
    assert {"selfemo_self_play", "selfemo_recognize"} <= set(found["agent"])
    assert "cpu" in found["platform"]
    assert found["replica"]  # the "hf" loader resolved to a RolloutReplica class

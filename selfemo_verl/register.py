"""The `verl.plugins` entry point: `import verl` imports this module in every process (Ray workers too).

Importing each adapter module runs its verl registration decorator. verl swallows plugin import errors at
DEBUG level, so tests/test_register_on_cpu.py asserts every name below exists after a plain `import verl`.
"""

# Each import registers the names in its comment.
import selfemo_verl.cpu.plugin  # noqa: F401  platform "cpu" (VERL_PLATFORM=cpu), rollout "hf" (rollout.name=hf)
import selfemo_verl.agent_loop  # noqa: F401  agent loops "selfemo_self_play", "selfemo_recognize"
import selfemo_verl.estimator  # noqa: F401  advantage estimator "self_grpo"

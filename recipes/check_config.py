"""Dry-run check of SELF-EMO round configs on CPU: compose, validate, resolve the plugin names; train nothing.

    python recipes/check_config.py ROUND_DIR/overrides.txt [...]

Each file holds one Hydra override per line (exactly the arguments `python -m selfemo_verl.main` gets in that
round). For each file: compose `selfemo_verl/config/selfemo_trainer.yaml` with the overrides (what
`python -m selfemo_verl.main --cfg job ...` prints), run the checks `selfemo_verl.main` runs before training
(`check_trainer_mode`, verl's `validate_config`: batch-size divisibility over n_gpus, micro-batch keys, ...),
resolve the estimator and the reward function with verl's own loaders, check the default agent loop is
registered, and write the resolved config beside the file as `config.yaml`. One line per file on stdout;
the first failure prints `check_config: error: <file>: <reason>` on stderr and exits 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import verl  # noqa: F401  (loads the selfemo plugin: estimator, agent loops)
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
from verl.trainer.ppo.reward import get_custom_reward_fn
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import validate_config

# Relies on verl 0.9.1 private _agent_loop_registry (no public accessor exists).
from verl.experimental.agent_loop.agent_loop import _agent_loop_registry

from selfemo_verl.trainer import check_trainer_mode


def check(overrides_file: Path) -> str:
    """Compose + validate one round; return a one-line description of the composed config."""
    overrides = [line for line in overrides_file.read_text().splitlines() if line.strip()]
    with initialize_config_module(config_module="selfemo_verl.config", version_base=None):
        config = compose(config_name="selfemo_trainer", overrides=overrides)
    check_trainer_mode(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    get_adv_estimator_fn(config.algorithm.adv_estimator)
    if get_custom_reward_fn(config) is None:
        raise ValueError("reward.custom_reward_function.path is not set")
    agent = config.actor_rollout_ref.rollout.agent.default_agent_loop
    if agent not in _agent_loop_registry:
        raise ValueError(f"agent loop {agent!r} is not registered; registered: {sorted(_agent_loop_registry)}")
    (overrides_file.parent / "config.yaml").write_text(OmegaConf.to_yaml(config, resolve=True))
    arf = config.actor_rollout_ref
    return (f"{overrides_file.parent.name}: ok | adv_estimator={config.algorithm.adv_estimator} "
            f"strategy={arf.actor.strategy} rollout={arf.rollout.name} model={arf.model.path} "
            f"reward={config.reward.custom_reward_function.path}:{config.reward.custom_reward_function.name} "
            f"agent_loop={agent} train_files={config.data.train_files}")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    for name in argv:
        try:
            print(check(Path(name)))
        except Exception as err:  # any composition/validation failure is reported as one line, exit 2
            print(f"check_config: error: {name}: {type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Entry point: `python -m selfemo_verl.main [hydra overrides]` trains SELF-EMO with verl 0.9.1 (docs/method.md §5).

Adapter. Same flow as `verl.trainer.main_ppo.main` (device auto-set, `validate_config`, `run_ppo`), with the
package's config (`selfemo_verl/config/selfemo_trainer.yaml`, which extends verl's `ppo_trainer`) and the
package's Ray task runner (`selfemo_verl.trainer.SelfEmoTaskRunner`: verl's `TaskRunnerV1` running
`SelfEmoTrainer`). Nothing here is GPU-specific: the device comes from `trainer.device` / verl's platform.
"""

from __future__ import annotations

import sys

import hydra

from verl.trainer.main_ppo import run_ppo
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import validate_config
from verl.utils.device import auto_set_device

from selfemo_verl.agent_loop import check_role_temperatures
from selfemo_verl.trainer import SelfEmoTaskRunner, check_dump_config, check_trainer_mode


def check_config(config) -> None:
    """The SELF-EMO start-up checks, before any Ray worker starts; a bad config raises a one-line ValueError."""
    check_trainer_mode(config)
    check_dump_config(config)
    check_role_temperatures(config)


@hydra.main(config_path="config", config_name="selfemo_trainer", version_base=None)
def main(config) -> None:
    """Check the SELF-EMO requirements (exit 2 with one line on a bad config), validate with verl, run PPO."""
    try:
        check_config(config)
    except ValueError as exc:
        print(f"selfemo_verl.main: bad config: {exc}", file=sys.stderr)
        sys.exit(2)
    auto_set_device(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    run_ppo(config, task_runner_class=SelfEmoTaskRunner)


if __name__ == "__main__":
    main()

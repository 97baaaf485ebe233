"""CPU development backend for verl 0.9.1 (docs/method.md §10): tiny offline assets, a `cpu` platform and an
`hf` rollout replica. Used by tests, CI and the CPU demo only; the GPU recipes never load it.

Nothing here is active unless the user opts in with `VERL_PLATFORM=cpu` (platform) and
`actor_rollout_ref.rollout.name=hf` (rollout). Importing this package imports neither verl nor torch.
"""

import os

PLATFORM_NAME = "cpu"


def cpu_platform_selected() -> bool:
    """True when VERL_PLATFORM (verl's own platform override) names the CPU platform: the one switch of the backend."""
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME

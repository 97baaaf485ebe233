"""What a run on a Ray cluster started beforehand needs (issue 13): forwarded env vars, a shared-filesystem check.

Core module (no verl; ray is imported only inside `check_shared`, the one function that talks to a cluster).
The recipes call the CLI:

    mapfile -t RAY_ENV < <(python -m selfemo_verl.ray_env overrides)          # Hydra overrides, one a line
    RAY_ADDRESS=head:6379 python -m selfemo_verl.ray_env check-shared --nodes 2 OUT_DIR DATA_DIR

Why forward: on a cluster started with `ray start` (the driver finds it through RAY_ADDRESS), a Ray worker
inherits the environment of its node's raylet, not the driver's. verl 0.9.1 forwards only its own list
(`verl.trainer.constants_ppo.get_ppo_ray_runtime_env`: TOKENIZERS_PARALLELISM, NCCL_DEBUG, VLLM_LOGGING_LEVEL, …
and only when the driver does *not* set them; VERL_FULL_DETERMINISM and a few determinism switches), so e.g.
VERL_FILE_LOGGER_PATH exported by the recipe never reaches the TaskRunner, whose "file" logger then writes
metrics.jsonl into its own working directory. verl's `run_ppo` merges `ray_kwargs.ray_init.runtime_env` over its
defaults and passes it to `ray.init`; Ray merges the job's `env_vars` into every task's and actor's own (verl's
workers add RANK, WORLD_SIZE, …). So each forwarded variable becomes
`++ray_kwargs.ray_init.runtime_env.env_vars.NAME='value'` (`++`: added, or replaced when a YAML sets it).
On a local cluster (no RAY_ADDRESS) the workers inherit the driver's environment anyway; the overrides repeat it.

Forwarded when set in the driver's environment (one list, here):
- every name starting with FORWARD_PREFIXES: `SELFEMO_` (this package's knobs) and `VERL_` (verl's: the file
  logger's VERL_FILE_LOGGER_PATH / _ROOT, VERL_LOGGING_LEVEL, VERL_PLATFORM, VERL_ENGINE_DEVICE, …);
- FORWARD_NAMES: logging back ends, Hugging Face hub/cache, CUDA/NCCL/vLLM tuning, tokenizers.
Never forwarded: names with a `_`-separated part in SECRET_MARKERS (HF_TOKEN, WANDB_API_KEY, …): verl prints
ray.init's kwargs and Ray stores the job's runtime env in its GCS. Set those, and per-node network settings
(NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME), in the environment of `ray start` on every node
(recipes/multinode/ray_node.sh runs it in the job's environment). Anything else: add
`++ray_kwargs.ray_init.runtime_env.env_vars.NAME=...` to the recipe's args.

Why check the filesystem: checkpoints, `latest_checkpointed_iteration.txt`, episode dumps and metrics.jsonl are
written by Ray workers on any node, and the driver's next steps (flywheel, round chaining, model selection) read
them; the parquet files and round r's model are read on any node. `check-shared DIR...` waits for `--nodes` alive
nodes, writes a token file into each DIR, runs one task pinned to each node (NodeAffinitySchedulingStrategy, 0
CPUs) that reads the driver's tokens and writes its own, then reads every node's token back: a DIR that is not
the same directory on every node fails, naming the node and the directory. It removes its files afterwards.
A refusal prints `ray_env: error: <reason>` on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import time
import uuid
from pathlib import Path

FORWARD_PREFIXES = ("SELFEMO_", "VERL_")
FORWARD_NAMES = (
    # logging back ends (verl.utils.tracking reads them in the TaskRunner)
    "WANDB_MODE", "WANDB_DIR", "WANDB_ENTITY", "WANDB_BASE_URL", "TENSORBOARD_DIR", "MLFLOW_TRACKING_URI",
    # Hugging Face hub and caches (model and tokenizer loading in every worker)
    "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    # accelerator and communication tuning (the Megatron engine wants CUDA_DEVICE_MAX_CONNECTIONS=1)
    "CUDA_DEVICE_MAX_CONNECTIONS", "PYTORCH_CUDA_ALLOC_CONF", "NCCL_DEBUG", "VLLM_LOGGING_LEVEL",
    "VLLM_ATTENTION_BACKEND",
)
SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD")
ENV_VARS_KEY = "++ray_kwargs.ray_init.runtime_env.env_vars"
CHECK_SUBDIR = ".selfemo_shared_check"


class RayEnvError(ValueError):
    """A value that cannot be forwarded, or a cluster that fails the check: the CLI prints it, exit 2."""


def is_secret(name: str) -> bool:
    """True for names that look like credentials (never forwarded): a `_`-separated part is one of SECRET_MARKERS.

    >>> is_secret("HF_TOKEN"), is_secret("WANDB_API_KEY"), is_secret("TOKENIZERS_PARALLELISM")
    (True, True, False)
    """
    return any(part in SECRET_MARKERS for part in name.upper().split("_"))


def forwarded_env(environ) -> dict[str, str]:
    """The variables of `environ` that the workers must see: FORWARD_NAMES and FORWARD_PREFIXES, no secrets; sorted.

    >>> forwarded_env({"VERL_FILE_LOGGER_PATH": "/o/m", "SELFEMO_HF_TOKEN": "x", "HOME": "/h", "NCCL_DEBUG": "WARN"})
    {'NCCL_DEBUG': 'WARN', 'VERL_FILE_LOGGER_PATH': '/o/m'}
    """
    names = [n for n in environ if (n in FORWARD_NAMES or n.startswith(FORWARD_PREFIXES)) and not is_secret(n)]
    return {name: environ[name] for name in sorted(names)}


def hydra_quote(value: str) -> str:
    r"""`value` as a single-quoted Hydra override value (always a string, never parsed as int/bool/list).

    Hydra's rule: inside quotes, backslashes are escaped only before a quote and at the end. `${` and
    newlines are refused: OmegaConf would treat `${...}` as an interpolation (verl resolves the whole config in
    the TaskRunner), and a newline breaks the one-override-a-line output.

    >>> print(hydra_quote("/out/metrics.jsonl"), hydra_quote("1"), hydra_quote("it's"), hydra_quote("a\\"))
    '/out/metrics.jsonl' '1' 'it\'s' 'a\\'
    """
    if "${" in value or "\n" in value:
        raise RayEnvError(f"value {value!r}: cannot be passed through Hydra (contains '${{' or a newline)")
    quoted = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    quoted = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, quoted)
    return f"'{quoted}'"


def runtime_env_overrides(environ) -> list[str]:
    """Hydra overrides that put `forwarded_env(environ)` into the Ray job's runtime env (verl's ray_init).

    >>> runtime_env_overrides({"VERL_FILE_LOGGER_PATH": "/o/m.jsonl", "PATH": "/bin"})
    ["++ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH='/o/m.jsonl'"]
    """
    out = []
    for name, value in forwarded_env(environ).items():
        try:
            out.append(f"{ENV_VARS_KEY}.{name}={hydra_quote(value)}")
        except RayEnvError as exc:
            raise RayEnvError(f"{name}: {exc}") from None
    return out


# ---------------- shared filesystem: token files written on one side, read on the other ----------------


def write_token(directory: str, owner: str) -> Path:
    """Write `DIR/.selfemo_shared_check/<owner>` holding the owner's name and a fresh random token."""
    path = Path(directory) / CHECK_SUBDIR / owner
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{owner} {uuid.uuid4().hex}\n")
    return path


def read_tokens(paths: dict[str, str]) -> list[str]:
    """The problems reading `paths` ({path: expected content}): one line per missing or different file.

    >>> read_tokens({"/nonexistent/x": "a"})
    ['/nonexistent/x: no such file or directory']
    """
    problems = []
    for path, expected in paths.items():
        try:
            content = Path(path).read_text()
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror.lower() if exc.strerror else exc}")
            continue
        if content != expected:
            problems.append(f"{path}: holds {content.strip()!r}, expected {expected.strip()!r}")
    return problems


def node_probe(node_id: str, expected: dict[str, str], dirs: list[str]) -> dict:
    """Run on one node (a Ray task): read the driver's tokens, write this node's token into each of `dirs`."""
    written = {}
    problems = read_tokens(expected)
    for directory in dirs:
        try:
            path = write_token(directory, f"node-{node_id[:12]}")
        except OSError as exc:
            problems.append(f"{directory}: cannot write here ({exc})")
            continue
        written[str(path)] = path.read_text()
    return {"host": socket.gethostname(), "problems": problems, "written": written}


def wait_for_nodes(ray, min_nodes: int, timeout_s: float) -> list[dict]:
    """Alive nodes of the connected cluster, once there are at least `min_nodes` (else RayEnvError after timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        if len(nodes) >= min_nodes:
            return nodes
        if time.monotonic() > deadline:
            raise RayEnvError(f"only {len(nodes)} of {min_nodes} Ray nodes alive after {timeout_s:.0f} s")
        time.sleep(1.0)


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast when nothing listens at a `host:port` RAY_ADDRESS (ray.init would retry for minutes).

    Other forms (`auto`, `ray://...`) are left to ray.init.
    >>> check_reachable("auto")
    """
    match = re.fullmatch(r"([^:/]+):(\d+)", address)
    if match is None:
        return
    try:
        socket.create_connection((match[1], int(match[2])), timeout=timeout_s).close()
    except OSError as exc:
        raise RayEnvError(f"RAY_ADDRESS={address}: no Ray head answers there ({exc})") from None


def check_shared(dirs: list[str], min_nodes: int = 1, timeout_s: float = 300.0) -> list[str]:
    """Check that every alive node of the cluster at RAY_ADDRESS sees `dirs` as the driver does; one line per node.

    Raises RayEnvError naming the node and the directory on the first failure.
    """
    import ray  # the one place this module talks to Ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not os.environ.get("RAY_ADDRESS"):
        raise RayEnvError("RAY_ADDRESS is not set: check-shared checks a cluster started beforehand")
    check_reachable(os.environ["RAY_ADDRESS"])
    dirs = [str(Path(d).resolve()) for d in dirs]
    try:
        mine = {str(p): p.read_text() for p in (write_token(d, f"driver-{socket.gethostname()}") for d in dirs)}
        ray.init(log_to_driver=False, logging_level="WARNING")
        try:
            results = _probe_nodes(ray, NodeAffinitySchedulingStrategy, mine, dirs, min_nodes, timeout_s)
        finally:
            ray.shutdown()
        return [_node_line(node, result, dirs) for node, result in results.items()]
    finally:
        for d in dirs:
            _remove_tokens(Path(d) / CHECK_SUBDIR)


def _probe_nodes(ray, affinity, mine: dict, dirs: list[str], min_nodes: int, timeout_s: float) -> dict:
    """{"<ip> <node id>": node_probe's result} for every alive node, each probe pinned to its node."""
    nodes = wait_for_nodes(ray, min_nodes, timeout_s)
    probe = ray.remote(num_cpus=0, max_retries=0)(node_probe)
    refs = {f"{n['NodeManagerAddress']} {n['NodeID'][:12]}":
            probe.options(scheduling_strategy=affinity(n["NodeID"], soft=False)).remote(n["NodeID"], mine, dirs)
            for n in nodes}
    try:
        return dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
    except ray.exceptions.RayError as exc:  # a node that cannot run the probe (no selfemo_verl there, gone, slow)
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise RayEnvError(f"a node probe failed ({type(exc).__name__}): {first}") from None


def _node_line(node: str, result: dict, dirs: list[str]) -> str:
    problems = result["problems"] + read_tokens(result["written"])
    if problems:
        raise RayEnvError(f"node {node} ({result['host']}) does not share the driver's filesystem: {problems[0]} "
                          "(OUT_DIR and DATA_DIR must be on a filesystem every node mounts at the same path)")
    return f"node {node} ({result['host']}): sees {', '.join(dirs)}"


def _remove_tokens(check_dir: Path) -> None:
    """Remove the token files of a check (written by this driver and by the nodes) and their folder."""
    if not check_dir.is_dir():
        return
    for path in check_dir.iterdir():
        path.unlink()
    check_dir.rmdir()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m selfemo_verl.ray_env", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("overrides", help="print the runtime-env overrides for this environment, one a line")
    check = sub.add_parser("check-shared", help="check that every node of RAY_ADDRESS's cluster sees DIR...")
    check.add_argument("dirs", nargs="+")
    check.add_argument("--nodes", type=int, default=1, help="wait until this many nodes are alive")
    check.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for nodes and probes")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "overrides":
            print("\n".join(runtime_env_overrides(os.environ)))
        else:
            print("\n".join(check_shared(args.dirs, args.nodes, args.timeout)))
    except (RayEnvError, OSError) as exc:  # OSError: a DIR the driver cannot write, a cluster it cannot reach
        print(f"ray_env: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

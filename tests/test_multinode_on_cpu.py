"""Multi-node on one machine (issue 13): a real two-node Ray cluster, the CPU smoke through RAY_ADDRESS, the
shared-filesystem check, and recipes/multinode/slurm.sbatch with fakes of SLURM's srun and scontrol.

- The cluster: `recipes/multinode/ray_node.sh head|worker` (`ray start --block`, so the test owns the process of
  each node and stops it by pid), two raylets with their own temp dirs, 1 logical GPU each, started with an
  environment that holds no VERL_* / SELFEMO_* variable: a worker sees only what the runtime env forwards.
- The run: recipes/multinode/run_cpu_smoke_on_ray.sh (the CPU smoke, trainer.nnodes=2: one FSDP rank per node,
  gloo across them, one hf rollout server per rank). Metrics, weight syncs and episode dumps must land under
  OUT_DIR, and each node must have hosted a trainer rank (`ray::WorkerDict` in its process tree, sampled every
  second during the run: Ray titles each worker process `ray::<actor class>`).
- The shared-filesystem check must name a third node that runs in a private mount namespace where OUT_DIR is an
  empty tmpfs (needs `unshare -m`, i.e. root; skipped otherwise).
- After stopping the nodes by pid: no process of any node tree alive, no port they listened on still listening.
Marked slow (about 2 min on 2 cores); the two tests of what verl hands to ray.init are fast.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from selfemo_verl import ray_env
from selfemo_verl.cpu.launch import cpu_env, cpu_overrides
from selfemo_verl.cpu.watch import alive, run_watched
from selfemo_verl.data.episode_dump import read_dumps

REPO = Path(__file__).resolve().parents[1]
STEPS = 2
EPISODES_PER_STEP = 8  # run_cpu_smoke.sh: 4 prompts x rollout.n 2
NODE_CPUS = 8  # logical: verl's placement bundle per GPU asks {"CPU": 3, "GPU": 1}; TaskRunner, TransferQueue 1 each
CLUSTER_OVERRIDES = ["ray_kwargs.ray_init.num_cpus=null", "ray_kwargs.ray_init.num_gpus=null", "trainer.nnodes=2"]


# ---------------- forwarding: what verl 0.9.1 hands to ray.init ----------------


def test_forwarded_values_reach_verls_ray_init_as_strings(monkeypatch):
    """verl's run_ppo merges ray_kwargs.ray_init.runtime_env over its defaults; ours win, every value a str."""
    from hydra import compose, initialize_config_module

    import ray
    from verl.trainer.main_ppo import run_ppo

    env = {"VERL_FILE_LOGGER_PATH": "/out/a b/metrics.jsonl", "SELFEMO_HF_THREADS": "1", "WANDB_MODE": "true",
           "TOKENIZERS_PARALLELISM": "false", "SELFEMO_ODD": "it's a\\", "HF_TOKEN": "secret", "HOME": "/root"}
    overrides = [*cpu_overrides(), *CLUSTER_OVERRIDES, *ray_env.runtime_env_overrides(env)]
    with initialize_config_module(config_module="selfemo_verl.config", version_base=None):
        config = compose(config_name="selfemo_trainer", overrides=overrides)
    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop run_ppo before it creates the TaskRunner

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(KeyboardInterrupt):
        run_ppo(config, task_runner_class=None)
    env_vars = seen["runtime_env"]["env_vars"]
    # reason: ray.init refuses num_cpus / num_gpus when it joins a running cluster
    assert seen["num_cpus"] is None and seen["num_gpus"] is None
    for name in ("VERL_FILE_LOGGER_PATH", "SELFEMO_HF_THREADS", "WANDB_MODE", "TOKENIZERS_PARALLELISM", "SELFEMO_ODD"):
        assert env_vars[name] == env[name], name  # the exact string ("1", "true" stay strings; quotes, backslash)
    assert "HF_TOKEN" not in env_vars and "HOME" not in env_vars  # secrets and unlisted names stay home
    assert env_vars["NCCL_DEBUG"] == "WARN"  # verl's own defaults are kept beside ours


def test_overrides_cli_refuses_a_value_hydra_cannot_carry(monkeypatch, capsys):
    monkeypatch.setenv("SELFEMO_BAD", "${oc.env:HOME}")
    assert ray_env.main(["overrides"]) == 2
    assert "SELFEMO_BAD" in capsys.readouterr().err


def test_check_shared_stops_at_once_when_no_head_listens_at_ray_address(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_free_port()}")  # reason: nothing listens on a just-freed port
    start = time.monotonic()
    assert ray_env.main(["check-shared", str(tmp_path)]) == 2
    assert "no Ray head answers there" in capsys.readouterr().err
    assert time.monotonic() - start < 30 and not (tmp_path / ray_env.CHECK_SUBDIR).exists()


# ---------------- a two-node cluster on this machine ----------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_env() -> dict:
    """This environment without what a run would forward: a node must not hand it to its workers by inheritance."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ray_env.FORWARD_PREFIXES) and k != "RAY_ADDRESS"}
    return {**env, "RAY_AUTH_MODE": "disabled", "NODE_IP": "127.0.0.1"}


def _wait_port(port: int, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"no Ray head on port {port} after {timeout_s} s")


def _title(proc: psutil.Process) -> str:
    """'WorkerDict' for a process titled 'ray::WorkerDict.update_actor', '' for any other process."""
    cmd = proc.cmdline()
    first = cmd[0].split()[0] if cmd and cmd[0] else ""
    return first[len("ray::"):].split(".")[0] if first.startswith("ray::") else ""


@dataclass
class Cluster:
    """Ray nodes started by this test (`ray start --block` processes) and what a sampler saw of their trees."""

    root: Path  # Ray temp dirs (short: Unix socket paths must stay under 108 bytes)
    port: int
    nodes: dict = field(default_factory=dict)  # name -> Popen of `ray start --block`
    seen: dict = field(default_factory=dict)  # pid -> psutil.Process, every process of every node tree
    titles: dict = field(default_factory=dict)  # node name -> {actor class titles seen}
    ports: set = field(default_factory=set)  # TCP ports a node process listened on
    peak_pss_gib: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_node(self, name: str, role: str, *flags: str, prefix: tuple = (), gpus: int = 1, cpus: int = NODE_CPUS):
        env = {**_node_env(), "RAY_TEMP_DIR": str(self.root / name), "RAY_PORT": str(self.port),
               "NGPUS": str(gpus), "NUM_CPUS": str(cpus)}
        if role == "worker":
            env["RAY_ADDRESS"] = self.address
        cmd = [*prefix, "bash", str(REPO / "recipes/multinode/ray_node.sh"), role,
               "--dashboard-agent-listen-port", str(_free_port()), *flags]
        log = open(self.root / f"{name}.log", "w")
        self.nodes[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def sample(self) -> None:
        pss = 0
        for name, node in list(self.nodes.items()):  # the test may add a node meanwhile
            try:
                procs = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for proc in procs:
                try:
                    self.seen.setdefault(proc.pid, proc)
                    self.titles.setdefault(name, set()).add(_title(proc))
                    self.ports.update(c.laddr.port for c in proc.net_connections("tcp") if c.status == "LISTEN")
                    pss += proc.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
        self.peak_pss_gib = max(self.peak_pss_gib, pss / 1024**3)

    def watch(self) -> threading.Thread:
        def loop():
            while not self._stop.is_set():
                self.sample()
                time.sleep(1.0)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread

    def stop(self, settle_s: float = 60.0) -> tuple[list[str], list[int]]:
        """SIGTERM each node's `ray start --block` (it stops its gcs, raylet, workers); leftovers and open ports."""
        self._stop.set()
        for node in self.nodes.values():
            if node.poll() is None:
                node.terminate()
        for node in self.nodes.values():
            try:
                node.wait(timeout=settle_s)
            except subprocess.TimeoutExpired:
                node.kill()  # only the process we started; its orphans are reported below
        deadline = time.monotonic() + settle_s
        while alive(self.seen) and time.monotonic() < deadline:
            time.sleep(1.0)
        listening = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == "LISTEN"}
        return alive(self.seen), sorted(self.ports & listening)


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="mn", dir="/tmp"))
    c = Cluster(root=root, port=_free_port())
    try:
        c.start_node("head", "head", "--include-dashboard", "false", "--ray-client-server-port", str(_free_port()))
        _wait_port(c.port)
        c.start_node("worker", "worker")
        c.watch()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root)


@dataclass(frozen=True)
class SmokeRun:
    report: object
    wall_s: float
    out_dir: Path
    log: str


@pytest.fixture(scope="module")
def smoke(cluster, tmp_path_factory, data_dir):
    out_dir = tmp_path_factory.mktemp("multinode")
    env = {**_node_env(), "RAY_ADDRESS": cluster.address, "NNODES": "2", "OUT_DIR": str(out_dir),
           "STEPS": str(STEPS), "RAW_DIR": str(data_dir / "meld")}
    cmd = ["bash", str(REPO / "recipes/multinode/run_cpu_smoke_on_ray.sh"),
           "selfemo.dump.enable=True", f"selfemo.dump.dir={out_dir / 'dumps'}"]
    start = time.monotonic()
    report = run_watched(cmd, env=env, log_path=str(out_dir / "run.log"), timeout_s=900)
    wall = time.monotonic() - start
    print(f"two-node smoke: wall {wall:.0f} s, driver tree peak PSS {report.peak_pss_gib:.2f} GiB, "
          f"cluster peak PSS {cluster.peak_pss_gib:.2f} GiB")
    return SmokeRun(report, wall, out_dir, (out_dir / "run.log").read_text(errors="replace"))


@pytest.mark.slow  # a Ray cluster on this machine (`make test-fast` skips it)
def test_two_node_smoke_writes_metrics_syncs_and_dumps_under_out_dir(smoke):
    assert smoke.report.returncode == 0, smoke.log[-4000:]
    assert smoke.report.leftovers == [], smoke.report.leftovers  # the driver's own processes
    # reason: the nodes were started without VERL_FILE_LOGGER_PATH; only the forwarded value puts it here
    steps = [json.loads(line) for line in (smoke.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    # two replicas (one per rank), each synced before training and after each step
    syncs = [json.loads(line) for line in (smoke.out_dir / "weight_sync.jsonl").read_text().splitlines()]
    assert len(syncs) == 2 * (STEPS + 1)
    assert all(s["missing"] == s["unexpected"] == 0 and s["loaded"] > 0 for s in syncs)
    records, corrupt = read_dumps(smoke.out_dir / "dumps")
    assert corrupt == 0
    assert [sum(r.step == step for r in records) for step in range(1, STEPS + 1)] == [EPISODES_PER_STEP] * STEPS


@pytest.mark.slow  # a Ray cluster on this machine (`make test-fast` skips it)
def test_two_node_smoke_checked_that_both_nodes_see_out_dir(smoke):
    lines = [line for line in smoke.log.splitlines() if line.startswith("node ") and "sees" in line]
    assert len(lines) == 2, lines


@pytest.mark.slow  # a Ray cluster on this machine (`make test-fast` skips it)
def test_two_node_smoke_ran_one_trainer_rank_on_each_node(smoke, cluster):
    assert smoke.report.returncode == 0
    print({node: sorted(t for t in titles if t) for node, titles in cluster.titles.items()})
    # reason: trainer.nnodes=2 with one logical GPU per node: verl places one placement group (and rank) per node
    for node in ("head", "worker"):
        assert "WorkerDict" in cluster.titles.get(node, set()), (node, sorted(cluster.titles.get(node, ())))
    everywhere = set().union(*cluster.titles.values())
    assert {"HFRolloutServerImpl", "TransferQueueController"} <= everywhere, sorted(everywhere)


@pytest.mark.slow  # a Ray cluster on this machine (`make test-fast` skips it)
def test_workers_see_forwarded_variables_not_the_drivers_environment(cluster, tmp_path):
    """The premise: a pre-started node's worker inherits the raylet's environment; only runtime_env reaches it."""
    code = (
        "import os, ray\n"
        "ray.init(log_to_driver=False, logging_level='WARNING', runtime_env=%r)\n"
        "print(ray.get(ray.remote(lambda: os.environ.get('VERL_FILE_LOGGER_PATH')).remote()))\n"
    )
    env = {**_node_env(), "RAY_ADDRESS": cluster.address, "VERL_FILE_LOGGER_PATH": str(tmp_path / "m.jsonl")}
    forwarded = {"env_vars": ray_env.forwarded_env(env)}
    outs = [subprocess.run([sys.executable, "-c", code % rt], env=env, capture_output=True, text=True, timeout=120)
            for rt in (None, forwarded)]
    assert [o.returncode for o in outs] == [0, 0], [o.stderr[-2000:] for o in outs]
    assert [o.stdout.strip().splitlines()[-1] for o in outs] == ["None", str(tmp_path / "m.jsonl")]


@pytest.mark.slow  # a Ray cluster on this machine (`make test-fast` skips it)
def test_check_shared_names_a_node_that_does_not_see_out_dir(smoke, cluster, tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to give a node its own mount namespace")
    hidden = tmp_path / "out"
    hidden.mkdir()
    script = f'mount -t tmpfs tmpfs "{hidden}" && exec "$@"'  # this node sees an empty OUT_DIR
    cluster.start_node("island", "worker", prefix=("unshare", "-m", "--propagation", "private", "bash", "-c", script,
                                                   "island"), gpus=0, cpus=1)
    env = {**_node_env(), "RAY_ADDRESS": cluster.address}
    cmd = [sys.executable, "-m", "selfemo_verl.ray_env", "check-shared", "--nodes", "3", "--timeout", "120",
           str(hidden)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2, (result.stdout, result.stderr[-3000:])
    assert "does not share the driver's filesystem" in result.stderr, result.stderr[-3000:]
    assert str(hidden / ray_env.CHECK_SUBDIR) in result.stderr
    assert not (hidden / ray_env.CHECK_SUBDIR).exists()  # the driver removed its token files


@pytest.mark.slow  # a Ray cluster on this machine (`make test-fast` skips it)
def test_stopping_the_nodes_by_pid_leaves_no_process_and_no_port(smoke, cluster):
    leftovers, ports = cluster.stop()
    assert len(cluster.seen) > 10  # the sampler saw the clusters' gcs, raylets and workers
    assert leftovers == [], leftovers
    assert ports == [], f"still listening: {ports}"


# ---------------- recipes/multinode/slurm.sbatch with fake srun / scontrol ----------------

FAKE_SCONTROL = """#!/usr/bin/env bash
# Fake of SLURM's `scontrol show hostnames LIST` (comma-separated names only).
[ "$1 $2" = "show hostnames" ] && tr ',' '\\n' <<< "$3"
"""

FAKE_SRUN = """#!/usr/bin/env bash
# Fake of SLURM's srun: runs the command on this machine once per selected "host" of SLURM_JOB_NODELIST (-w, or
# all but --exclude, at most --nodes), forwards SIGTERM to them like srun does. A Ray node started through
# ray_node.sh gets the host's own temp dir and free agent / client ports (they would be separate machines).
hosts=(); exclude=; n=
while [[ $1 == -* ]]; do
  case $1 in
    -w) hosts=("$2"); shift 2 ;;
    --exclude=*) exclude=${1#--exclude=}; shift ;;
    --nodes=*) n=${1#--nodes=}; shift ;;
    *) shift ;;
  esac
done
all=(${SLURM_JOB_NODELIST//,/ })
if [ ${#hosts[@]} -eq 0 ]; then for h in "${all[@]}"; do [ "$h" != "$exclude" ] && hosts+=("$h"); done; fi
hosts=("${hosts[@]:0:${n:-${#hosts[@]}}}")
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
pids=()
for h in "${hosts[@]}"; do
  extra=()
  if [[ " $* " == *ray_node.sh* ]]; then
    extra=(--dashboard-agent-listen-port "$(free_port)")
    if [[ " $* " == *" head "* ]]; then extra+=(--ray-client-server-port "$(free_port)" --include-dashboard false); fi
  fi
  RAY_TEMP_DIR=$FAKE_SLURM_ROOT/$h "$@" "${extra[@]}" &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' TERM INT
wait
wait
"""

FAKE_RECIPE = """#!/usr/bin/env bash
# Stands in for recipes/run_qwen3_8b.sh: records what slurm.sbatch hands a recipe, then runs its cluster check.
set -euo pipefail
echo "RAY_ADDRESS=$RAY_ADDRESS NNODES=$NNODES NGPUS=$NGPUS args=$*" > "$OUT_DIR/recipe.txt"
python -m selfemo_verl.ray_env check-shared --nodes "$NNODES" --timeout 120 "$OUT_DIR" > "$OUT_DIR/check.txt"
"""


@pytest.mark.slow  # a Ray cluster on this machine (`make test-fast` skips it)
def test_slurm_sbatch_starts_a_head_and_workers_then_the_recipe_on_the_cluster(tmp_path):
    bin_dir, out_dir = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir(), out_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("recipe.sh", FAKE_RECIPE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    root = Path(tempfile.mkdtemp(prefix="sl", dir="/tmp"))
    env = {**_node_env(), "PATH": f"{bin_dir}:{REPO / '.venv/bin'}:{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "fake-a,fake-b", "SLURM_SUBMIT_DIR": str(REPO), "FAKE_SLURM_ROOT": str(root),
           "RECIPE": str(bin_dir / "recipe.sh"), "OUT_DIR": str(out_dir), "RAY_PORT": str(_free_port()),
           "NGPUS": "1", "NUM_CPUS": "2"}
    env.pop("NODE_IP")  # the head's address comes from `srun -w <head> hostname --ip-address`, as on SLURM
    report = run_watched(["bash", str(REPO / "recipes/multinode/slurm.sbatch"), "trainer.total_epochs=1"], env=env,
                         log_path=str(tmp_path / "sbatch.log"), timeout_s=400, settle_s=60)
    shutil.rmtree(root)
    log = (tmp_path / "sbatch.log").read_text(errors="replace")
    assert report.returncode == 0, log[-4000:]
    address, *rest = (out_dir / "recipe.txt").read_text().split()
    assert address.startswith("RAY_ADDRESS=") and address.endswith(f":{env['RAY_PORT']}"), address
    assert rest == ["NNODES=2", "NGPUS=1", "args=trainer.total_epochs=1"]
    assert len((out_dir / "check.txt").read_text().splitlines()) == 2  # both nodes see OUT_DIR
    assert report.leftovers == [], report.leftovers  # the trap stopped both nodes (srun -> ray start --block)

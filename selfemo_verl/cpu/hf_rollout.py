"""verl rollout `hf`: a transformers-generate server for CPU runs (selected by actor_rollout_ref.rollout.name=hf).

Three pieces, mirroring verl 0.9.1's vLLM backend:
- `HFRolloutServer` (Ray actor): token-in/token-out `generate(...) -> TokenOutput` for the agent loops,
  plus weight loading; every sync's counts, the received tensors' norm and their distance from the
  previous weights (`norm`, `delta_norm`), and what the server generated since the previous sync
  (`generation`: requests, tokens, decode steps, peak batch) are kept (`weight_sync_stats`) and, when the env var
  `SELFEMO_HF_SYNC_LOG` names a file, appended to it as one JSON line (tests and smoke runs read it).
- `HFServerAdapter` (BaseRollout, lives in the trainer worker): forwards the trainer's full tensors to
  the server on `update_weights`.
- `HFReplica` (RolloutReplica): launches one server per replica.
Generation itself is `selfemo_verl.cpu.hf_generate` and `selfemo_verl.cpu.hf_batching` (no verl there): concurrent
`generate` calls decode together in one continuously batched KV cache of at most `rollout.max_num_seqs` rows, and
prompts reuse the KV cache of their longest prefix seen since the last weight sync. The
model is loaded in `rollout.dtype` (verl's key; the CPU launch overrides set float32) and computes with
`SELFEMO_HF_THREADS` torch threads (default: all cores but one, see `server_threads`).

Fault injection (tests of the infra-error path, docs/method.md §3.5; off by default), read from the environment when
the server starts (Ray workers inherit the driver's):
- `SELFEMO_HF_FAIL_FIRST_CALLS=0.25`: the server fails that share of the calls whose request id it sees for
  the first time, on a fixed seeded pattern (exactly floor(N * share) or one more of the first N new ids);
- `SELFEMO_HF_FAIL_MODE=raise` (default: `generate` raises `InjectedServerError`) or `abort` (it returns no
  tokens with stop_reason "aborted");
- `SELFEMO_HF_FAIL_SEED=0`: phase of the pattern.
verl 0.9.1's client sends a fresh uuid per call unless `actor_rollout_ref.rollout.full_determinism=true`, so by
default every call counts as new (recognize, respond, judge alike); with full determinism only an episode's
first call and its judge calls are new. verl's v1 client retries an aborted call after 1 s, so `abort` tests
that retry rather than an episode failure. Details: `selfemo_verl.cpu.faults`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

import ray
import torch
from torch.distributed.tensor import DTensor
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.torch_dtypes import PrecisionType
from verl.workers.config import HFModelConfig
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, TokenOutput

from selfemo_verl.cpu import verl_private
from selfemo_verl.cpu.faults import faults_from_env
from selfemo_verl.cpu.hf_batching import BatchScheduler
from selfemo_verl.cpu.hf_generate import HFGenerator, WeightSync, load_model, parse_sampling

logger = logging.getLogger(__name__)
SYNC_LOG_ENV = "SELFEMO_HF_SYNC_LOG"
THREADS_ENV = "SELFEMO_HF_THREADS"
BUCKET_BYTES = 256 << 20  # weights travel to the server in buckets of about this size


def server_name(replica_rank: int, suffix: str = "") -> str:
    return f"selfemo_hf_rollout_server_{replica_rank}{suffix}"


def _model_config(model_config) -> HFModelConfig:
    return model_config if isinstance(model_config, HFModelConfig) else omega_conf_to_dataclass(model_config)


def server_threads(environ=os.environ) -> int:
    """Torch threads of the server: SELFEMO_HF_THREADS, else all but one of the cores this process may run on.

    In the synchronous trainer the actor waits while the server generates, but the agent-loop and reward workers
    run beside it; one core is left to them. Measured on 2 shared cores (SmolLM2 demo step, 16 episodes): the
    generation phase took 18-24 s with 1 server thread and 20-24 s with 2, and 2 OpenMP threads competing with
    another busy process can run several times slower (benchmarks/bench_hf_batching.py, threads_2).
    """
    raw = environ.get(THREADS_ENV, "").strip()
    return int(raw) if raw else max(1, len(os.sched_getaffinity(0)) - 1)


def _load_generator(rollout_config, model_config: HFModelConfig, seed: int) -> HFGenerator:
    from transformers import AutoTokenizer

    path = model_config.local_path or model_config.path
    tokenizer = AutoTokenizer.from_pretrained(model_config.local_tokenizer_path or path)
    model = load_model(path, PrecisionType.to_dtype(rollout_config.dtype))
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return HFGenerator(model, tokenizer, {e for e in eos_ids if e is not None}, seed=seed)


class HFRolloutServerImpl:
    """The server's body (plain class, wrapped as a Ray actor below; tests may use it directly)."""

    def __init__(self, config, model_config, replica_rank: int = 0):
        torch.set_num_threads(server_threads())
        self.config = omega_conf_to_dataclass(config)
        self.engine = _load_generator(self.config, _model_config(model_config), self.config.seed + replica_rank)
        self.global_steps = None
        self.sync_stats: list[dict] = []
        self._sync: WeightSync | None = None
        self._lock = asyncio.Lock()  # a tick of the scheduler or a weight bucket, never both
        self.scheduler = BatchScheduler(self.engine, max_batch=self.config.max_num_seqs, lock=self._lock)
        self.faults = faults_from_env()
        if self.faults is not None:
            logger.warning("[hf rollout] fault injection on: %s", self.faults)

    def get_server_address(self) -> tuple[str, int]:
        return "127.0.0.1", 0  # token-in/token-out through the actor handle; no HTTP endpoint

    def _room(self, n_prompt: int) -> tuple[int, int]:
        """(default max_tokens, most tokens the context allows), as verl's vLLM server computes them."""
        max_len = self.config.max_model_len or self.config.prompt_length + self.config.response_length
        default = min(self.config.response_length, self.config.prompt_length + self.config.response_length - n_prompt)
        return default, max_len - n_prompt

    async def generate(self, prompt_ids, sampling_params, request_id, image_data=None, video_data=None, **kwargs):
        """verl's token-in/token-out call (same signature as the vLLM server): -> TokenOutput."""
        prompt_ids = list(prompt_ids)
        default, room = self._room(len(prompt_ids))
        if room < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in the context")
        sampling = parse_sampling(dict(sampling_params), default, room)
        if self.faults is not None and self.faults.should_fail(request_id):
            return self._injected_fault(request_id)
        out = await self.scheduler.generate(prompt_ids, sampling)
        return TokenOutput(token_ids=out.token_ids, log_probs=out.log_probs, stop_reason=out.stop_reason,
                           extra_fields={"global_steps": self.global_steps})

    def _injected_fault(self, request_id) -> TokenOutput:
        """Raise (mode `raise`) or answer "aborted" with no tokens (mode `abort`)."""
        logger.warning("[hf rollout] injected fault %d (%s) on request %s", self.faults.failed, self.faults.mode,
                       request_id)
        if self.faults.mode == "raise":
            raise self.faults.error(request_id)
        return TokenOutput(token_ids=[], log_probs=[], stop_reason="aborted",
                           extra_fields={"global_steps": self.global_steps})

    async def begin_weight_sync(self) -> None:
        self._sync = WeightSync(self.engine.model)

    async def load_weight_bucket(self, named_tensors: list) -> None:
        async with self._lock:
            self.scheduler.clear_prefix_cache()  # KV caches of the old weights must not seed new prompts
            self._sync.load(named_tensors)

    async def finish_weight_sync(self, global_steps=None) -> dict:
        """Close the sync: record, log and return its counts."""
        stats = self._sync.report()
        self._sync, self.global_steps = None, global_steps
        stats.update(sync=len(self.sync_stats) + 1, global_steps=global_steps, time=time.time(),
                     generation=self.scheduler.take_stats())  # what the server generated since the last sync
        self.sync_stats.append(stats)
        _append_sync_log(stats)
        return stats

    async def update_weights(self, named_tensors: list, global_steps=None) -> dict:
        """The whole sync in one call (begin, one bucket, finish)."""
        await self.begin_weight_sync()
        await self.load_weight_bucket(named_tensors)
        return await self.finish_weight_sync(global_steps)

    def weight_sync_stats(self) -> list[dict]:
        return list(self.sync_stats)

    async def abort_all_requests(self, reject_request: bool = False, **kwargs):
        self.engine.aborted = True
        return {}

    async def resume_generation(self):
        self.engine.aborted = False

    async def wake_up(self, tags=None):
        """Weights stay resident on CPU: nothing to wake."""

    async def sleep(self):
        """Nothing to offload on CPU."""

    async def clear_kv_cache(self):
        """Forget the prefix store (running requests keep their own caches)."""
        async with self._lock:
            self.scheduler.clear_prefix_cache()

    async def release_kv_cache(self):
        """The KV caches stay in host memory."""

    resume_kv_cache = release_kv_cache

    async def start_profile(self, **kwargs):
        """No profiler."""

    async def stop_profile(self):
        """No profiler."""


def _append_sync_log(stats: dict) -> None:
    logger.warning("[hf rollout] weight sync %s: loaded %s/%s tensors, missing=%s unexpected=%s mismatched=%s "
                   "norm=%.6g delta_norm=%.6g; generated since the last sync: %s", stats["sync"], stats["loaded"],
                   stats["received"], stats["missing"], stats["unexpected"], stats["mismatched"], stats["norm"],
                   stats["delta_norm"], stats["generation"])
    path = os.environ.get(SYNC_LOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(stats) + "\n")


HFRolloutServer = ray.remote(HFRolloutServerImpl)


def _full_cpu_tensor(tensor: torch.Tensor) -> torch.Tensor:
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu")  # Ray copies it into the object store when the bucket is sent


def buckets(weights, max_bytes: int = BUCKET_BYTES):
    """Group (name, tensor) pairs into lists of about `max_bytes` (a tensor larger than that goes alone).

    >>> [len(b) for b in buckets([(str(i), torch.zeros(4)) for i in range(5)], max_bytes=32)]
    [2, 2, 1]
    """
    bucket, size = [], 0
    for name, tensor in weights:
        if bucket and size + tensor.nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += tensor.nbytes
    if bucket:
        yield bucket


class HFServerAdapter(BaseRollout):
    """Trainer-side handle of the hf server (rollout rank 0 of each replica owns the server)."""

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1, **kwargs):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))
        world = (self.config.tensor_model_parallel_size * self.config.data_parallel_size
                 * self.config.pipeline_model_parallel_size)
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.is_server_owner = rank % world == 0
        self._server = None

    def _server_actor(self):
        if self._server is None:  # hybrid replicas carry no name suffix (see HFReplica.launch_servers)
            self._server = ray.get_actor(server_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]):
        """Weights and cache stay resident on CPU."""

    async def release(self):
        """Nothing to free on CPU."""

    async def update_weights(self, weights, wire_format: str = "named_tensors", global_steps=None, **kwargs):
        if wire_format != "named_tensors":
            raise NotImplementedError(f"hf rollout supports wire_format='named_tensors' only, got {wire_format!r}")
        full = ((name, _full_cpu_tensor(t)) for name, t in weights)  # every rank joins each full_tensor()
        if not self.is_server_owner:
            for _ in full:
                pass
            return
        server = self._server_actor()
        await server.begin_weight_sync.remote()
        for bucket in buckets(full):
            await server.load_weight_bucket.remote(bucket)
        await server.finish_weight_sync.remote(global_steps)


class HFReplica(RolloutReplica):
    """One hf server per replica; it takes no Ray GPU (the trainer holds the logical GPU)."""

    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def launch_servers(self):
        server = HFRolloutServer.options(
            name=server_name(self.replica_rank, self.name_suffix), num_cpus=0, max_concurrency=self.max_concurrency,
        ).remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        host, port = await server.get_server_address.remote()
        verl_private.publish_server(self, server, f"{host}:{port}")


def load_replica_class() -> type[RolloutReplica]:
    """Loader for verl's RolloutReplicaRegistry (called only when rollout.name=hf is used)."""
    return HFReplica

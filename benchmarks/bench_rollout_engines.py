"""Tokens/s of three rollout engines on the same self-play generation phase, prompts and model.

    .venv-vllm/bin/python benchmarks/bench_rollout_engines.py [--threads 2] [--prompts 4] [--n 4] [--model DIR]

Runs in the vLLM lane's environment (make venv-vllm). The phase is bench_hf_batching.py's: a SmolLM2 demo step's
episodes (4 MELD prompts x 4, window 4; recognize 24 / respond 48 / judge 24 new tokens, temperature 1), every
episode concurrent, each recognize -> role switch + respond -> blind judge, fp32 everywhere. Engines, one after
the other in one process:
- `hf_server`: our rollout server's scheduler (selfemo_verl.cpu.hf_batching.BatchScheduler: continuous batching
  with a prefix store), in this process with `--threads` torch threads;
- `hf_generate`: plain batched `model.generate` (left-padded, one wave per role): this machine's ceiling for the
  model with stock transformers;
- `vllm_replica`: verl 0.9.1's own vLLM replica on vLLM's CPU build (LLMServerManager -> vLLMReplica ->
  vLLMHttpServer -> vLLM engine and worker processes, OMP_NUM_THREADS=`--threads`), called through verl's
  LLMServerClient exactly as the agent loop calls it. Started after the in-process engines (its engine process
  would compete with them); its start time is reported apart; one warm-up episode precedes the timed phase.
Prints one JSON object: per engine the phase's wall time, generated tokens and tokens/s, beside the CPU capability.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from uuid import uuid4

from selfemo_verl.cpu import launch

REPO = Path(__file__).resolve().parents[1]
YAML = REPO / "selfemo_verl" / "config" / "selfemo_trainer.yaml"


def vllm_config(model_dir: str, max_seqs: int):
    """The project's config with the vLLM lane's CPU overrides; the server loads the model's weights itself."""
    import hydra

    overrides = [
        *launch.cpu_overrides(rollout="vllm"), f"actor_rollout_ref.model.path={model_dir}",
        "actor_rollout_ref.rollout.load_format=auto", "actor_rollout_ref.rollout.nnodes=1",
        "actor_rollout_ref.rollout.n_gpus_per_node=1", f"actor_rollout_ref.rollout.max_num_seqs={max_seqs}",
        "actor_rollout_ref.rollout.prompt_length=1024", "actor_rollout_ref.rollout.response_length=128",
        "actor_rollout_ref.rollout.max_model_len=2048",
    ]
    with hydra.initialize_config_dir(config_dir=str(YAML.parent), version_base=None):
        return hydra.compose(config_name=YAML.stem, overrides=overrides)


async def vllm_phases(model_dir: str, tokenizer, episodes: list, args) -> tuple:
    """(start seconds, timed Phase) of verl's vLLM replica serving the episodes through verl's client."""
    from bench_hf_batching import Phase, episode
    from verl.workers.rollout.llm_server import LLMServerManager

    start = time.perf_counter()
    manager = await LLMServerManager.create(vllm_config(model_dir, args.max_batch))
    started = time.perf_counter() - start
    client = manager.get_client()

    async def generate(ids, s):
        params = {"temperature": s.temperature, "top_p": 1.0, "top_k": -1, "max_tokens": s.max_tokens,
                  "logprobs": True}
        return await client.generate(uuid4().hex, prompt_ids=ids, sampling_params=params)

    await episode(generate, tokenizer, *episodes[0], 0, args.temperature, Phase())  # warm-up
    phase, t0 = Phase(), time.perf_counter()
    await asyncio.gather(*[episode(generate, tokenizer, w, sp, i, args.temperature, phase)
                           for i, (w, sp) in enumerate(episodes)])
    return started, phase, time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF model dir (default: the SmolLM2 demo asset)")
    parser.add_argument("--raw-dir", default=str(REPO.parent / "shared" / "data" / "meld"))
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4, help="episodes per prompt")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-batch", type=int, default=16, help="rows decoded together (both servers)")
    args = parser.parse_args(argv)
    os.environ.update({**launch.cpu_env("vllm"), "OMP_NUM_THREADS": str(args.threads)})  # before verl and Ray

    import ray
    import torch
    from bench_hf_batching import hf_generate_phase, meld_windows, report, server_phase, timed
    from transformers import AutoTokenizer

    from selfemo_verl.cpu import hf_generate
    from selfemo_verl.cpu.assets import smollm2_dir

    torch.set_num_threads(args.threads)
    path = args.model or str(smollm2_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = hf_generate.load_model(path, torch.float32)
    engine = hf_generate.HFGenerator(model, tokenizer, {tokenizer.eos_token_id}, seed=0)
    episodes = [ep for ep in meld_windows(args.raw_dir, args.prompts, args.window) for _ in range(args.n)]
    result = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": launch.native_bf16(),
              "threads": args.threads, "torch": torch.__version__, "model": path, "dtype": "float32",
              "episodes": len(episodes), "temperature": args.temperature}
    phase, wall = timed(lambda: asyncio.run(server_phase("batched", engine, episodes, args.temperature,
                                                         args.max_batch)))
    result["hf_server"] = report(phase, wall)
    model.set_attn_implementation("sdpa")  # plain transformers
    phase, wall = timed(lambda: hf_generate_phase(model, tokenizer, episodes, args.temperature))
    result["hf_generate"] = report(phase, wall)
    ray.init(address="local", num_cpus=launch.RAY_LOGICAL_CPUS, num_gpus=1, include_dashboard=False)
    try:
        started, phase, wall = asyncio.run(vllm_phases(path, tokenizer, episodes, args))
    finally:
        ray.shutdown()
    result["vllm_replica"] = {**report(phase, wall), "server_start_s": round(started, 1)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

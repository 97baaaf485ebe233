"""Dry-run checker for the SELF-EMO recipes: each round's config, refused here where the cluster would refuse it.

    python recipes/check_config.py ROUND_DIR/overrides.txt [...]

Each file holds one Hydra override per line (exactly the arguments `python -m selfemo_verl.main` gets in that
round), the files in round order. For each file: compose `selfemo_verl/config/selfemo_trainer.yaml` with the
overrides (what `python -m selfemo_verl.main --cfg job ...` prints), run the checks `selfemo_verl.main` runs before
training and verl's `validate_config`, resolve the estimator, the reward function and the default agent loop with
verl's own loaders, then the pre-flight checks of `selfemo_verl.preflight` (what verl only finds on the cluster:
batch arithmetic that `use_dynamic_bsz` skips, parallel sizes against the GPU count, memory fractions, the model
path and its chat template, the response budget of one episode counted with the model's tokenizer, the backends'
packages, CPU-backend settings, overrides the v1 trainer ignores), and write the resolved config beside the file
as `config.yaml`. A round whose model.path lies in an earlier round's `trainer.default_local_dir` starts from that
round's export (checked between rounds by `python -m selfemo_verl.round_inputs export`) and is measured with the
earlier round's model.

Output: per file an `ok` line and a memory line on stdout; `check_config: warning: ...` lines on stderr. The first
failure prints `check_config: error: <file>: <key=value>: <reason>` on stderr and exits 2.

Environment: GPU_MEM_GB (80) the card the rough memory estimate is compared with (a warning above it);
SKIP_IMPORT_CHECK=1 skips the package check (missing CUDA-only packages are warnings anyway on a machine without
CUDA; megatron-core, which installs anywhere, is an error); SELFEMO_CACHE (<repo>/.cache/selfemo) where the Qwen
vocabulary is converted once for a model.path that is a hub id.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

# verl warns about engines and accelerators missing here; check_imports reports what the cluster needs instead
warnings.simplefilter("ignore")
logging.disable(logging.WARNING)

import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import verl  # noqa: E402, F401  (loads the selfemo plugin: estimator, agent loops)
from verl.trainer.ppo.core_algos import get_adv_estimator_fn  # noqa: E402
from verl.trainer.ppo.reward import get_custom_reward_fn  # noqa: E402
from verl.trainer.ppo.utils import need_critic, need_reference_policy  # noqa: E402
from verl.utils.config import validate_config  # noqa: E402
from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder  # noqa: E402

# Relies on verl 0.9.1 private _agent_loop_registry (no public accessor exists).
from verl.experimental.agent_loop.agent_loop import _agent_loop_registry  # noqa: E402

from selfemo_verl import preflight  # noqa: E402
from selfemo_verl.labels import LABEL_SPACES  # noqa: E402
from selfemo_verl.main import check_config as check_selfemo  # noqa: E402
from selfemo_verl.prompts import recognize_messages, role_switch_message  # noqa: E402

CACHE = Path(os.environ.get("SELFEMO_CACHE") or Path(__file__).resolve().parents[1] / ".cache" / "selfemo")
EPISODE = [{"speaker": "Rachel", "text": "Guess what? I got the job at Ralph Lauren!"},
           {"speaker": "Monica", "text": "Oh my God, that's amazing! When do you start?"},
           {"speaker": "Rachel", "text": "Monday. I'm so nervous I can't even think straight."}]
ANSWER = "<emotion>fear, joy</emotion>"


def role_switch_tokens(tokenizer, model_type: str, chat_template_kwargs: dict) -> int:
    """Tokens the role switch adds to an episode, counted as the agent loop adds them (verl's continuous-token
    builder): recognize prompt -> the recognizer's answer -> the role-switch message; the longest over label spaces."""
    builder = create_continuous_token_builder(tokenizer, hf_model_type=model_type,
                                              chat_template_kwargs=chat_template_kwargs)
    counts = []
    for space in LABEL_SPACES:
        messages = recognize_messages(EPISODE, space)
        answer = tokenizer.encode(ANSWER, add_special_tokens=False) + [tokenizer.eos_token_id]
        ids = builder.merge_assistant_tokens(builder.build_initial_tokens(messages), answer).token_ids
        messages = [*messages, {"role": "assistant", "content": ANSWER}]
        merged = builder.merge_context_tokens(messages, [*messages, role_switch_message("Monica", space)], ids)
        counts.append(len(merged.token_ids) - len(ids))
    return max(counts)


class Model:
    """model.path's facts (`preflight.resolve_model`) and its role-switch token count, measured once."""

    def __init__(self, config):
        self.facts = preflight.resolve_model(config.actor_rollout_ref.model.path)
        tokenizer = preflight.episode_tokenizer(self.facts, CACHE / "qwen-vocabulary-0.3.0",
                                                config.actor_rollout_ref.model.custom_chat_template)
        model_type = (self.facts.hf_config or {}).get("model_type", "qwen3")
        kwargs = OmegaConf.to_container(config.data.get("apply_chat_template_kwargs") or OmegaConf.create({}))
        self.switch = role_switch_tokens(tokenizer, model_type, kwargs)
        self.vocabulary = "its own tokenizer" if self.facts.local else "the Qwen vocabulary, model not local"


def check(overrides_file: Path, exports: dict[str, Model]) -> tuple[list[str], list[str]]:
    """Compose + validate one round; (stdout lines, warnings). `exports`: earlier rounds' checkpoint dir -> model."""
    overrides = [line for line in overrides_file.read_text().splitlines() if line.strip()]
    with initialize_config_module(config_module="selfemo_verl.config", version_base=None):
        config = compose(config_name="selfemo_trainer", overrides=overrides)
    preflight.check_no_cpu_leak(config, os.environ)
    preflight.check_no_ignored_overrides(overrides)
    check_selfemo(config)
    has_ref = need_reference_policy(config)
    validate_config(config=config, use_reference_policy=has_ref, use_critic=need_critic(config))
    get_adv_estimator_fn(config.algorithm.adv_estimator)
    if get_custom_reward_fn(config) is None:
        raise ValueError("reward.custom_reward_function.path is not set")
    agent = config.actor_rollout_ref.rollout.agent.default_agent_loop
    if agent not in _agent_loop_registry:
        raise ValueError(f"agent loop {agent!r} is not registered; registered: {sorted(_agent_loop_registry)}")
    preflight.check_parallelism(config)
    preflight.check_batches(config, has_ref)
    resolved = OmegaConf.to_container(config, resolve=True)
    preflight.check_memory_fractions(resolved)
    path = config.actor_rollout_ref.model.path
    model = next((m for ckpt, m in exports.items() if path.startswith(ckpt + "/")), None) or Model(config)
    exports[config.trainer.default_local_dir] = model
    budget = preflight.check_response_budget(config, model.switch)
    skip_imports = os.environ.get("SKIP_IMPORT_CHECK") == "1"
    warns = [] if skip_imports else preflight.check_imports(config, torch.cuda.is_available())
    (overrides_file.parent / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    arf, name = config.actor_rollout_ref, overrides_file.parent.name
    lines = [f"{name}: ok | adv_estimator={config.algorithm.adv_estimator} strategy={arf.actor.strategy} "
             f"rollout={arf.rollout.name} model={path} reward={config.reward.custom_reward_function.path}:"
             f"{config.reward.custom_reward_function.name} agent_loop={agent} train_files={config.data.train_files}",
             f"{name}: response budget {arf.rollout.response_length} >= {budget} tokens ({model.vocabulary})"]
    lines.append(memory_line(config, name, model.facts.params, has_ref, warns))
    return lines, warns


def memory_line(config, name: str, params: float | None, has_ref: bool, warns: list[str]) -> str:
    """The rough per-GPU memory line; a warning (appended to `warns`) when it exceeds GPU_MEM_GB."""
    card = float(os.environ.get("GPU_MEM_GB") or 80)
    if params is None:
        return f"{name}: memory per GPU: unknown (no config.json and no size such as 8B in the model name)"
    estimate = preflight.memory_estimate_gb(config, params, card, has_ref)
    parts = " + ".join(f"{part} {gb:.1f}" for part, gb in estimate.items())
    line = (f"{name}: memory per GPU ~ {parts} = {sum(estimate.values()):.1f} GB of GPU_MEM_GB={card:g} "
            f"({params / 1e9:.2f}B parameters; rough, activations not counted)")
    if sum(estimate.values()) > card:
        warns.append(f"{line}: over the card; lower rollout.gpu_memory_utilization or offload (fsdp_config.*_offload)")
    return line


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    exports: dict[str, Model] = {}
    warned = set()
    for name in argv:
        try:
            lines, warns = check(Path(name), exports)
        except preflight.PreflightError as err:  # names the key first
            print(f"check_config: error: {name}: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
        except Exception as err:  # any composition/validation failure is reported as one line, exit 2
            print(f"check_config: error: {name}: {type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
        print("\n".join(lines))
        for warning in [w for w in warns if w not in warned]:  # each once, not once per round
            print(f"check_config: warning: {warning}", file=sys.stderr)
        warned.update(warns)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

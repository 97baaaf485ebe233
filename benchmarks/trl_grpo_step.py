"""TRL 1.16.0's GRPOTrainer on the recognize-only GRPO step that benchmarks/bench_vs_trl.py times; one JSON line.

    .venv-trl/bin/python benchmarks/trl_grpo_step.py --data ROWS.parquet [--steps 3] [--prompts 4] [--n 4]
        [--micro-batch 4] [--max-tokens 24] [--lr 1e-4] [--model DIR] [--threads N] [--out-dir DIR]

Runs in its own environment .venv-trl (requirements/bench-trl.txt; selfemo_verl installed there with --no-deps), so it
imports only selfemo_verl's core modules, never verl. The rows are the ones the verl runs train on (bench_vs_trl.py
writes them), in file order (no shuffling): prompt = `prompts.recognize_messages(extra_info.window, "meld")`, the
reward = `reward_fn.compute_score` on the completion text (r_rec: the smoothed IoU of the parsed <emotion> labels
with the gold labels, as verl's recognize-only arm scores it).

One optimizer step per generation batch: `--prompts` x `--n` completions are generated at once (transformers
`generate`, no vLLM), then trained in micro-batches of `--micro-batch` completions with gradient accumulation over the
whole batch (steps_per_generation = gradient_accumulation_steps, num_iterations 1: on-policy, no old log-prob pass),
beta 0 (no reference model), fp32, gradient checkpointing off, AdamW with verl's defaults (constant lr, weight decay
0.01, grad-norm clip 1.0), loss_type "dapo" (token mean over the batch, verl's "token-mean").
Per step: wall time from `on_step_begin` to `on_step_end` (generation included), the generation alone
(`GRPOTrainer._generate`), and making the batch (generation + reward + advantages, `_generate_and_score_completions`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import pyarrow.parquet as pq
import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from selfemo_verl.prompts import recognize_messages
from selfemo_verl.reward_fn import compute_score

SPACE = "meld"


def load_dataset(path: str, window: int) -> Dataset:
    """The bench rows as TRL's conversational prompts with their gold labels, in file order."""
    rows = pq.read_table(path).to_pylist()
    return Dataset.from_list([{"prompt": recognize_messages(r["extra_info"]["window"][-window:], SPACE),
                               "gold": r["reward_model"]["ground_truth"]} for r in rows])


def recognition_reward(completions, gold, **kwargs) -> list[float]:
    """R = r_rec of each completion (`reward_fn.compute_score`, the reward verl's recognize-only arm gets)."""
    return [compute_score(f"selfemo/{SPACE}", c[-1]["content"], g)["score"] for c, g in zip(completions, gold)]


class StepTimes(TrainerCallback):
    """Wall time of each optimizer step, from `on_step_begin` (before the generation) to `on_step_end`."""

    def __init__(self):
        self.start, self.walls, self.logs = 0.0, [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.walls.append(time.perf_counter() - self.start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


class TimedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that records how long each generation and each batch-making phase takes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gen_s, self.make_batch_s = [], []

    # Overrides trl 1.16.0 GRPOTrainer._generate; re-check on upgrade.
    def _generate(self, prompts):
        start = time.perf_counter()
        out = super()._generate(prompts)
        self.gen_s.append(time.perf_counter() - start)
        return out

    # Overrides trl 1.16.0 GRPOTrainer._generate_and_score_completions; re-check on upgrade.
    def _generate_and_score_completions(self, inputs):
        start = time.perf_counter()
        out = super()._generate_and_score_completions(inputs)
        self.make_batch_s.append(time.perf_counter() - start)
        return out


def grpo_config(args, out_dir: str) -> GRPOConfig:
    accumulation = args.prompts * args.n // args.micro_batch
    return GRPOConfig(
        output_dir=out_dir, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0, seed=args.seed,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation, num_iterations=1, num_generations=args.n,
        max_completion_length=args.max_tokens, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0, loss_type="dapo", scale_rewards="group", shuffle_dataset=False,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, use_vllm=False,
        report_to="none", logging_steps=1, save_strategy="no", eval_strategy="no", dataloader_num_workers=0,
        disable_tqdm=True,
    )


def summary(trainer: TimedGRPOTrainer, timer: StepTimes, threads: int, config: GRPOConfig) -> dict:
    steps = [log for log in timer.logs if "loss" in log]
    return {
        "trl": trl.__version__, "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": threads,
        "step_wall_s": [round(s, 2) for s in timer.walls],
        "gen_s": [round(s, 2) for s in trainer.gen_s],
        "make_batch_s": [round(s, 2) for s in trainer.make_batch_s],
        "train_s": [round(w - b, 2) for w, b in zip(timer.walls, trainer.make_batch_s)],
        "completion_mean_length": [round(s.get("completions/mean_length", 0.0), 1) for s in steps],
        "reward_mean": [round(s.get("reward", 0.0), 3) for s in steps],
        "settings": {"per_device_train_batch_size": config.per_device_train_batch_size,
                     "gradient_accumulation_steps": config.gradient_accumulation_steps,
                     "steps_per_generation": config.steps_per_generation,
                     "generation_batch_size": config.generation_batch_size, "num_generations": config.num_generations,
                     "num_iterations": config.num_iterations, "beta": config.beta, "loss_type": config.loss_type,
                     "max_completion_length": config.max_completion_length, "learning_rate": config.learning_rate,
                     "gradient_checkpointing": config.gradient_checkpointing, "dtype": "float32"},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="parquet rows (bench_vs_trl.py writes them)")
    parser.add_argument("--model", default=None, help="HF model dir (default: the SmolLM2 demo asset)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step")
    parser.add_argument("--n", type=int, default=4, help="generations per prompt")
    parser.add_argument("--micro-batch", type=int, default=4, help="completions per forward/backward")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out-dir", default=None, help="TRL's output_dir (nothing is saved; default: a temp dir)")
    args = parser.parse_args(argv)
    from selfemo_verl.cpu.assets import smollm2_dir

    torch.set_num_threads(args.threads)
    path = args.model or str(smollm2_dir())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as tmp:
        config = grpo_config(args, args.out_dir or tmp)
        trainer = TimedGRPOTrainer(model=model, reward_funcs=recognition_reward, args=config,
                                   train_dataset=load_dataset(args.data, args.window), processing_class=tokenizer,
                                   callbacks=[timer])
        trainer.train()
    print(json.dumps({"model": path, **summary(trainer, timer, torch.get_num_threads(), config)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Prompt tokens the self-play AgentLoop sends per episode, against the minimum (every token encoded once).

A scripted fake server (tests/fakes.py `ScriptedServer`, the real Qwen vocabulary, verl 0.9.1's Qwen
continuous-token builder) records every `generate` call. Per request id, a call's prompt should extend the
previous call's prompt + answer token for token:

    re-encoded = len(previous prompt + answer) - common prefix with the new prompt     (target: 0)
    new        = len(new prompt) - common prefix   (tokens encoded for the first time: prompt, role switch)
    minimum    = sum of `new` over the episode's trained calls
    sent       = sum of len(prompt) over the trained calls (what a server without a prefix cache prefills)
    text loop  = tokens a loop that re-renders the chat from decoded text each turn would re-encode
                 (len(previous prompt + answer) per later call), for contrast

The blind judge has its own prompt (the dialogue + the reply as text, docs/method.md §6.2) and request ids; its
tokens are reported separately and never enter the trained sequence.

Usage: python benchmarks/bench_agent_tokens.py [--episodes 20]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
SPEAKERS = ("Ross", "Rachel", "Monica", "Chandler")
LINES = ("I got the job!", "Are you serious right now?", "Oh my God, that is amazing!", "We were on a break!",
         "Could this be any more awkward?", "I'm so sorry, I didn't mean it.")


def load_fakes():
    spec = importlib.util.spec_from_file_location("selfemo_bench_fakes", REPO / "tests" / "fakes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def count_tokens(calls: list) -> dict:
    """Aggregate `ScriptedServer.calls` into sent / new / re-encoded prompt tokens, trained vs judge."""
    last: dict[str, list] = {}
    totals = {"trained_sent": 0, "trained_new": 0, "re_encoded": 0, "judge_sent": 0, "trained_calls": 0,
              "text_loop": 0}
    for request_id, prompt, _, answer in calls:
        if "-judge" in request_id:
            totals["judge_sent"] += len(prompt)
            continue
        previous = last.get(request_id, [])
        common = 0
        while common < min(len(previous), len(prompt)) and previous[common] == prompt[common]:
            common += 1
        totals["re_encoded"] += len(previous) - common
        totals["text_loop"] += len(previous)
        totals["trained_new"] += len(prompt) - common
        totals["trained_sent"] += len(prompt)
        totals["trained_calls"] += 1
        last[request_id] = prompt + (answer or [])
    return totals


def window(i: int, n: int = 12) -> list[dict]:
    return [{"speaker": SPEAKERS[(i + k) % 2], "text": LINES[(i + k) % len(LINES)]} for k in range(n)]


async def run(episodes: int, turns: int, judge_samples: int, tok, fakes) -> dict:
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from selfemo_verl.agent_loop import SelfPlayAgentLoop
    from selfemo_verl.prompts import recognize_messages

    knobs = OmegaConf.merge(OmegaConf.load(REPO / "selfemo_verl/config/selfemo_trainer.yaml").selfemo.agent,
                            {"self_play_turns": turns, "judge_samples": judge_samples})
    config = OmegaConf.create({"actor_rollout_ref": {"rollout": {"prompt_length": 2048, "response_length": 1024}},
                               "data": {"apply_chat_template_kwargs": {}}, "selfemo": {"agent": knobs}})
    answers = ["<emotion>joy</emotion>"] + ["<emotion>surprise</emotion><reply>No way, really?</reply>"] * turns
    totals: dict[str, int] = {}
    for i in range(episodes):
        server = fakes.ScriptedServer(tok, trained=answers, judge=["<emotion>surprise</emotion>"])
        loop = SelfPlayAgentLoop(trainer_config=DictConfigWrap(config), server_manager=server, tokenizer=tok,
                                 processor=None, dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data),
                                 hf_model_type="qwen3")
        w = window(i)
        info = {"window": w, "label_space": "meld", "next_speaker": SPEAKERS[(i + 12) % 2], "index": i}
        await loop.run({"temperature": 1.0, "logprobs": True}, raw_prompt=recognize_messages(w, "meld"),
                       extra_info=info, data_source="selfemo/meld")
        for key, value in count_tokens(server.calls).items():
            totals[key] = totals.get(key, 0) + value
    return {key: value / episodes for key, value in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20)
    args = parser.parse_args()
    fakes = load_fakes()
    tok = fakes.qwen_tokenizer(REPO / ".cache" / "selfemo" / "qwen-tok")
    print(f"per episode, mean over {args.episodes} episodes (Qwen vocabulary, 12-turn window)")
    print(f"{'turns':>5} {'k':>3} {'calls':>6} {'sent':>7} {'minimum':>8} {'re-encoded':>11} {'judge sent':>11} "
          f"{'text loop':>10}")
    for turns, k in [(1, 1), (1, 3), (2, 1), (3, 1)]:
        r = asyncio.run(run(args.episodes, turns, k, tok, fakes))
        print(f"{turns:>5} {k:>3} {r['trained_calls']:>6.1f} {r['trained_sent']:>7.1f} {r['trained_new']:>8.1f} "
              f"{r['re_encoded']:>11.1f} {r['judge_sent']:>11.1f} {r['text_loop']:>10.1f}")


if __name__ == "__main__":
    main()

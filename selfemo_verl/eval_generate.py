"""Model-driven evaluation for `python -m selfemo_verl.evaluate generate|consistency` (DESIGN.md §9).

No verl, no ray. Generation is greedy and uses the training prompts: the parquet's `prompt` column (the
recognize step) or `prompts.respond_messages` / `prompts.judge_messages`, rendered with the tokenizer's
chat template (`--chat-template-kwargs` as in `data.apply_chat_template_kwargs`). Backend: vLLM offline
batch generation when vllm is importable (GPU), else transformers (CPU, or one CUDA device without vLLM).

Expression consistency (Assumption: the paper's exact protocol is not available): on dialogue prefixes that
have a next speaker, the model responds as that speaker (stated emotion E + reply), then reads the reply
blind (judge prompt, E hidden) -> P. A turn matches iff E and P parse and smoothed_iou(P, E) >= tau
(beta 0; tau 1.0 = the same set). The rate counts every turn (a failure at any step is a non-match);
`rate_valid` counts only turns where all three parses succeeded. By-emotion rows count a turn under each
label it states.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from selfemo_verl.evaluate import InputError, atomic_write, native, score
from selfemo_verl.labels import check_label_space, parse_emotions
from selfemo_verl.prompts import judge_messages, parse_reply, respond_messages
from selfemo_verl.rewards import smoothed_iou


def load_rows(path, limit=None):
    """The parquet as a DataFrame (first `limit` rows); InputError if missing or without the needed columns."""
    import pandas as pd

    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    frame = pd.read_parquet(path)
    missing = {"prompt", "extra_info"} - set(frame.columns)
    if missing:
        raise InputError(f"{path}: missing columns {sorted(missing)}")
    return frame if limit is None else frame.head(limit)


def _messages(chat) -> list[dict]:
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in chat]


def _prompt_ids(tokenizer, chats, template_kwargs) -> list[list[int]]:
    """Token ids of each chat with the chat template and the generation prompt (the call verl's agent loop makes)."""
    return [list(tokenizer.apply_chat_template(_messages(c), add_generation_prompt=True, tokenize=True,
                                               return_dict=False, **template_kwargs)) for c in chats]


class Generator:
    """Greedy batch generation over chat prompts with vLLM (GPU) or transformers (CPU)."""

    def __init__(self, model_path, backend="auto", batch_size=8, max_new_tokens=256, template_kwargs=None):
        from transformers import AutoTokenizer

        if not Path(model_path).exists():
            raise InputError(f"{model_path}: no such model directory")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model_path, self.batch_size, self.max_new_tokens = str(model_path), batch_size, max_new_tokens
        self.template_kwargs = dict(template_kwargs or {})
        use_vllm = backend == "vllm" or (backend == "auto" and importlib.util.find_spec("vllm") is not None)
        self._generate = self._vllm if use_vllm else self._hf
        self._model = None  # loaded on first use
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def __call__(self, chats, desc="generate") -> list[str]:
        return self._generate(_prompt_ids(self.tokenizer, chats, self.template_kwargs), desc)

    # GPU path: not exercised by the CPU tests (vLLM is not installed there).
    def _vllm(self, prompt_ids, desc):
        from vllm import LLM, SamplingParams

        if self._model is None:
            self._model = LLM(model=self.model_path)
        params = SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens)
        outputs = self._model.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params)
        return [out.outputs[0].text for out in outputs]

    def _load_hf(self):
        import torch
        from transformers import AutoModelForCausalLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        return AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(device).eval()

    def _hf(self, prompt_ids, desc):
        """Batches of left-padded prompts (sorted by length to cut padding), greedy, new tokens decoded
        without special tokens, returned in the input order."""
        import torch
        from tqdm.auto import tqdm

        if self._model is None:
            self._model = self._load_hf()
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        texts = []
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, unit="batch"):
            batch = [prompt_ids[i] for i in order[start : start + self.batch_size]]
            width = max(len(ids) for ids in batch)
            ids = torch.tensor([[self._pad_id] * (width - len(x)) + x for x in batch], device=self._model.device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=self._model.device)
            with torch.inference_mode():
                out = self._model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                           max_new_tokens=self.max_new_tokens, pad_token_id=self._pad_id)
            texts += self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [text for _, text in sorted(zip(order, texts))]


def _generator(args) -> Generator:
    return Generator(args.model, args.backend, args.batch_size, args.max_new_tokens, args.chat_template_kwargs)


def run_generate(args) -> dict:
    """Write OUT/predictions.jsonl ({"index", "output"} per row), then score it (`evaluate.score`)."""
    rows = load_rows(args.data, args.limit)
    outputs = _generator(args)(list(rows["prompt"]), desc="recognize")
    lines = [json.dumps({"index": native(extra["index"]), "output": text}, ensure_ascii=False)
             for extra, text in zip(rows["extra_info"], outputs)]
    predictions = Path(args.out) / "predictions.jsonl"
    atomic_write(predictions, "\n".join(lines) + "\n")
    name = Path(args.model).name
    metrics = score(predictions, args.data, args.out, name=name, backbone=name, limit=args.limit)
    print({k: metrics[k] for k in ("n", "accuracy", "weighted_f1", "parse_failure_rate")})
    return metrics


def _prefixes(rows) -> list[dict]:
    """Rows usable for consistency: extra_info with a window and a non-empty next_speaker."""
    keep = []
    for extra in rows["extra_info"]:
        window, speaker = extra.get("window"), extra.get("next_speaker")
        if window is not None and len(window) and speaker:
            keep.append({"window": [{"speaker": str(t["speaker"]), "text": str(t["text"])} for t in window],
                         "next_speaker": str(speaker), "label_space": str(extra["label_space"])})
    return keep


def consistency_summary(turns, tau: float, label_space: str) -> dict:
    """Share of turns whose blind reading matches the stated emotion, overall and by stated emotion.

    `turns`: dicts with stated, stated_status, reply_status, judged, judged_status. `parse_failures` counts,
    per step, the turns whose status is not "ok" (a turn whose reply failed counts as "not_judged").

    >>> ok = dict(stated_status="ok", reply_status="ok", judged_status="ok")
    >>> t = [dict(ok, stated={"joy"}, judged={"joy"}), dict(ok, stated={"joy"}, judged={"anger"})]
    >>> s = consistency_summary(t, 1.0, "meld")
    >>> s["rate"], s["by_emotion"]["joy"]
    (0.5, {'n': 2, 'matched': 1, 'rate': 0.5})
    """
    valid = [t["stated_status"] == t["reply_status"] == t["judged_status"] == "ok" for t in turns]
    match = [v and smoothed_iou(t["judged"], t["stated"]) >= tau for v, t in zip(valid, turns)]
    by_emotion = {}
    for label in check_label_space(label_space):
        hits = [m for t, m in zip(turns, match) if t["stated_status"] == "ok" and label in t["stated"]]
        by_emotion[label] = {"n": len(hits), "matched": sum(hits), "rate": sum(hits) / len(hits) if hits else None}
    failures = {step: sum(t[f"{step}_status"] != "ok" for t in turns) for step in ("stated", "reply", "judged")}
    return {"n": len(turns), "tau": tau, "matched": sum(match), "rate": sum(match) / len(turns) if turns else None,
            "n_valid": sum(valid), "rate_valid": sum(match) / sum(valid) if any(valid) else None,
            "parse_failures": failures, "by_emotion": by_emotion}


def _judge_turns(generate, prefixes, responses) -> list[dict]:
    """Parse each response; judge the parsable replies blind; return per-turn records."""
    turns = []
    for prefix, text in zip(prefixes, responses):
        stated, stated_status = parse_emotions(text, prefix["label_space"])
        reply, reply_status = parse_reply(text)
        turns.append(dict(response=text[:1000], stated=stated, stated_status=stated_status, reply=reply,
                          reply_status=reply_status, judged=frozenset(), judged_status="not_judged"))
    todo = [i for i, t in enumerate(turns) if t["reply_status"] == "ok"]
    chats = [judge_messages(prefixes[i]["window"], prefixes[i]["next_speaker"], turns[i]["reply"],
                            prefixes[i]["label_space"]) for i in todo]
    for i, text in zip(todo, generate(chats, desc="judge") if chats else []):
        turns[i]["judged"], turns[i]["judged_status"] = parse_emotions(text, prefixes[i]["label_space"])
    return turns


def run_consistency(args) -> dict:
    """Respond then judge on up to `--limit` usable prefixes; write OUT/consistency.json."""
    prefixes = _prefixes(load_rows(args.data))[: args.limit]
    if not prefixes:
        raise InputError(f"{args.data}: no rows with extra_info.window and next_speaker")
    spaces = {p["label_space"] for p in prefixes}
    if len(spaces) != 1:
        raise InputError(f"{args.data}: expected one label space, got {sorted(spaces)}")
    generate = _generator(args)
    chats = [respond_messages(p["window"], p["next_speaker"], p["label_space"]) for p in prefixes]
    turns = _judge_turns(generate, prefixes, generate(chats, desc="respond"))
    space = spaces.pop()
    summary = {"model": str(args.model), "data": str(args.data), "label_space": space,
               **consistency_summary(turns, args.tau, space)}
    summary["examples"] = [{k: (sorted(v) if isinstance(v, frozenset) else v) for k, v in t.items()} for t in turns[:5]]
    atomic_write(Path(args.out) / "consistency.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print({k: summary[k] for k in ("n", "rate", "rate_valid", "parse_failures")})
    return summary

"""Model-driven evaluation for `python -m selfemo_verl.eval generate|consistency` (docs/method.md §9).

No verl, no ray. Generation is greedy and uses the training prompts: the parquet's `prompt` column (the
recognize step) or `prompts.respond_messages` / `prompts.judge_messages`, rendered with the tokenizer's
chat template (`--chat-template-kwargs` as in `data.apply_chat_template_kwargs`). Backend: vLLM offline
batch generation when vllm is importable (GPU), else transformers (CPU, or one CUDA device without vLLM).

Window: every role sees the last `selfemo.agent.window` turns (`agent_window`, same sources as the budgets), as
in training; the recognize prompt is rebuilt from `extra_info.window` like the training agent loop does.

Token budgets: each role gets the budget training gives it, `selfemo.agent.max_tokens.<role>` read from
selfemo_trainer.yaml (`role_budgets`), then from the user's training config (`--train-config`) and Hydra-style
overrides (`--train-override`), so evaluation cuts answers where training does; `--max-new-tokens` overrides
every role. (Training also caps the responder by what is left of `data.max_response_length`; evaluation does not.)

`--selection FILE` (written by `python -m selfemo_verl.model_select select`) evaluates the checkpoint chosen
on val and names it (round, step, path, val weighted-F1) in metrics.json / consistency.json.

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

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from selfemo_verl.eval.inputs import InputError, load_rows, native, read_selection
from selfemo_verl.eval.report import score
from selfemo_verl.files import atomic_write
from selfemo_verl.labels import check_label_space, parse_emotions
from selfemo_verl.prompts import judge_messages, parse_reply, recognize_messages, respond_messages
from selfemo_verl.rewards import smoothed_iou
from selfemo_verl.selfplay import recent_turns

ROLES = ("recognize", "respond", "judge")
TRAINER_YAML = Path(__file__).parent.parent / "config" / "selfemo_trainer.yaml"
BUDGET_KEY = "selfemo.agent.max_tokens"  # the key training's agent loop reads (selfemo_verl.agent_loop)
WINDOW_KEY = "selfemo.agent.window"  # dialogue turns every role sees, as in training
_EVAL_KEYS = (BUDGET_KEY, WINDOW_KEY)


def _budget_overrides(overrides) -> list[str]:
    """The Hydra-style overrides (leading + / ++ dropped) that set `selfemo.agent.max_tokens` (or a role of it)
    or `selfemo.agent.window`."""
    keep = []
    for item in overrides:
        key = item.lstrip("+").partition("=")[0]
        if any(key == k or key.startswith(k + ".") for k in _EVAL_KEYS):
            keep.append(item.lstrip("+"))
    return keep


def _layer(source):
    """One config layer: a YAML file, or a list of `key=value` overrides."""
    if isinstance(source, list):
        return OmegaConf.from_dotlist(source)
    if not Path(source).is_file():
        raise InputError(f"{source}: no such file")
    return OmegaConf.load(source)


def training_config(train_config=None, overrides=()):
    """selfemo_trainer.yaml, then `train_config` (the user's training YAML), then the Hydra-style `overrides` of
    `selfemo.agent.max_tokens` / `selfemo.agent.window` (others ignored), merged; later wins. Returns (config,
    the layers merged)."""
    dotlist = _budget_overrides(overrides)
    layers = [TRAINER_YAML, *([train_config] if train_config is not None else []), *([dotlist] if dotlist else [])]
    config = OmegaConf.create()
    for layer in layers:
        try:
            config = OmegaConf.merge(config, _layer(layer))
        except (yaml.YAMLError, OmegaConfBaseException) as err:  # a user file or override: one line naming it
            raise InputError(f"{layer}: not a valid config ({' '.join(str(err).split())[:200]})") from None
    return config, layers


def role_budgets(train_config=None, overrides=(), every_role=None) -> dict[str, int]:
    """Tokens each role may generate, from the key training reads: `selfemo.agent.max_tokens.<role>`.

    Sources (`training_config`), then `every_role` for all roles (`--max-new-tokens`).

    >>> role_budgets(overrides=["selfemo.agent.max_tokens.respond=200", "trainer.save_freq=5"])["respond"]
    200
    >>> role_budgets(every_role=6)
    {'recognize': 6, 'respond': 6, 'judge': 6}
    """
    config, layers = training_config(train_config, overrides)
    budgets = {role: every_role if every_role is not None else OmegaConf.select(config, f"{BUDGET_KEY}.{role}")
               for role in ROLES}
    for role, value in budgets.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{BUDGET_KEY}.{role} = {value!r} (from {', '.join(map(str, layers))}): "
                             "expected an integer >= 1")
    return budgets


def agent_window(train_config=None, overrides=()) -> int:
    """Dialogue turns every role sees, from the key training reads: `selfemo.agent.window` (<= 0: all).

    >>> agent_window(), agent_window(overrides=["selfemo.agent.window=4"])
    (12, 4)
    """
    config, layers = training_config(train_config, overrides)
    value = OmegaConf.select(config, WINDOW_KEY)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{WINDOW_KEY} = {value!r} (from {', '.join(map(str, layers))}): expected an integer")
    return value


def _turns(window) -> list[dict]:
    return [{"speaker": str(t["speaker"]), "text": str(t["text"])} for t in window]


def recognize_chats(rows, window: int) -> list:
    """The recognize prompt of each row as training's agent loop builds it: `recognize_messages` on the last
    `window` turns of `extra_info.window`; the parquet's `prompt` for a row without a window."""
    chats = []
    for prompt, extra in zip(rows["prompt"], rows["extra_info"]):
        turns = extra.get("window")
        chats.append(recognize_messages(recent_turns(_turns(turns), window), str(extra["label_space"]))
                     if turns is not None and len(turns) else prompt)
    return chats


def _messages(chat) -> list[dict]:
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in chat]


def _prompt_ids(tokenizer, chats, template_kwargs) -> list[list[int]]:
    """Token ids of each chat with the chat template and the generation prompt (the call verl's agent loop makes)."""
    return [list(tokenizer.apply_chat_template(_messages(c), add_generation_prompt=True, tokenize=True,
                                               return_dict=False, **template_kwargs)) for c in chats]


class Generator:
    """Greedy batch generation over chat prompts with vLLM (GPU) or transformers (CPU); `budgets` maps each
    role (recognize | respond | judge) to its max new tokens (`role_budgets`)."""

    def __init__(self, model_path, budgets: dict, backend="auto", batch_size=8, template_kwargs=None):
        from transformers import AutoTokenizer

        if not Path(model_path).exists():
            raise InputError(f"{model_path}: no such model directory")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model_path, self.batch_size, self.budgets = str(model_path), batch_size, dict(budgets)
        self.template_kwargs = dict(template_kwargs or {})
        use_vllm = backend == "vllm" or (backend == "auto" and importlib.util.find_spec("vllm") is not None)
        self._generate = self._vllm if use_vllm else self._hf
        self._model = None  # loaded on first use
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def __call__(self, chats, desc="recognize") -> list[str]:
        """Answers to `chats`; `desc` is the role generating them: its token budget and the progress label."""
        return self._generate(_prompt_ids(self.tokenizer, chats, self.template_kwargs), self.budgets[desc], desc)

    # GPU path: not exercised by the CPU tests (vLLM is not installed there).
    def _vllm(self, prompt_ids, max_new_tokens, desc):
        from vllm import LLM, SamplingParams

        if self._model is None:
            self._model = LLM(model=self.model_path)
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        outputs = self._model.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params)
        return [out.outputs[0].text for out in outputs]

    def _load_hf(self):
        import torch
        from transformers import AutoModelForCausalLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        return AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(device).eval()

    def _hf(self, prompt_ids, max_new_tokens, desc):
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
                                           max_new_tokens=max_new_tokens, pad_token_id=self._pad_id)
            texts += self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [text for _, text in sorted(zip(order, texts))]


def add_model_arguments(parser, command: str) -> None:
    """The flags of `python -m selfemo_verl.eval generate` / `... consistency`."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="HF model directory")
    which.add_argument("--selection", help="evaluate the checkpoint chosen in this model_select JSON")
    for flag in ("--data", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-config", default=None, help="training YAML whose selfemo.agent.max_tokens to use")
    parser.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                        help="training Hydra override (selfemo.agent.max_tokens.* used, others ignored); repeatable")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="every role's budget (default: selfemo.agent.max_tokens.<role> of the training config)")
    parser.add_argument("--backend", choices=("auto", "vllm", "hf"), default="auto")
    parser.add_argument("--chat-template-kwargs", type=json.loads, default={},
                        help='JSON passed to apply_chat_template, e.g. \'{"enable_thinking": false}\'')
    if command == "consistency":
        parser.add_argument("--tau", type=float, default=1.0, help="match if smoothed_iou(judged, stated) >= tau")


def _model(args) -> tuple[str, dict | None]:
    """(model dir, the chosen checkpoint or None) from --model or --selection."""
    if args.selection is None:
        return str(args.model), None
    chosen = read_selection(args.selection)
    return str(chosen["path"]), chosen


def _generator(args, model: str, roles) -> tuple[Generator, dict]:
    budgets = role_budgets(args.train_config, args.train_override, args.max_new_tokens)
    budgets = {role: budgets[role] for role in roles}
    return Generator(model, budgets, args.backend, args.batch_size, args.chat_template_kwargs), budgets


def run_generate(args) -> dict:
    """Write OUT/predictions.jsonl ({"index", "output"} per row), then score it (`report.score`)."""
    model, checkpoint = _model(args)
    generate, budgets = _generator(args, model, ["recognize"])
    rows = load_rows(args.data, args.limit)
    outputs = generate(recognize_chats(rows, agent_window(args.train_config, args.train_override)), desc="recognize")
    lines = [json.dumps({"index": native(extra["index"]), "output": text}, ensure_ascii=False)
             for extra, text in zip(rows["extra_info"], outputs)]
    predictions = Path(args.out) / "predictions.jsonl"
    atomic_write(predictions, "\n".join(lines) + "\n")
    name = Path(model).name if checkpoint is None else f"round_{checkpoint['round']}/global_step_{checkpoint['step']}"
    extra = {"max_tokens": budgets, **({"checkpoint": checkpoint} if checkpoint else {})}
    metrics = score(predictions, args.data, args.out, name=name, backbone=name, limit=args.limit, extra=extra)
    print({k: metrics[k] for k in ("n", "accuracy", "weighted_f1", "parse_failure_rate")})
    return metrics


def _prefixes(rows, window: int) -> list[dict]:
    """Rows usable for consistency: extra_info with a window and a non-empty next_speaker; the last `window` turns."""
    keep = []
    for extra in rows["extra_info"]:
        turns, speaker = extra.get("window"), extra.get("next_speaker")
        if turns is not None and len(turns) and speaker:
            keep.append({"window": recent_turns(_turns(turns), window),
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
    prefixes = _prefixes(load_rows(args.data), agent_window(args.train_config, args.train_override))[: args.limit]
    if not prefixes:
        raise InputError(f"{args.data}: no rows with extra_info.window and next_speaker")
    spaces = {p["label_space"] for p in prefixes}
    if len(spaces) != 1:
        raise InputError(f"{args.data}: expected one label space, got {sorted(spaces)}")
    model, checkpoint = _model(args)
    generate, budgets = _generator(args, model, ["respond", "judge"])
    chats = [respond_messages(p["window"], p["next_speaker"], p["label_space"]) for p in prefixes]
    turns = _judge_turns(generate, prefixes, generate(chats, desc="respond"))
    space = spaces.pop()
    summary = {"model": model, "data": str(args.data), "label_space": space, "max_tokens": budgets,
               **({"checkpoint": checkpoint} if checkpoint else {}), **consistency_summary(turns, args.tau, space)}
    summary["examples"] = [{k: (sorted(v) if isinstance(v, frozenset) else v) for k, v in t.items()} for t in turns[:5]]
    atomic_write(Path(args.out) / "consistency.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print({k: summary[k] for k in ("n", "rate", "rate_valid", "parse_failures")})
    return summary

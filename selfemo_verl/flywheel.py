"""Data flywheel (docs/method.md §7): round r's episode dumps + the parquet D_r it trained on -> D_{r+1}.

Core module: no verl, no ray; `data_prep/flywheel.py` is the CLI (reads the dumps, writes the files). `round` is
the index of the dataset being built (D_1 comes from the dumps of round 0, which trained on D_0 = prepare_erc's
train.parquet).
Assumption (whole module): the paper describes the flywheel only in words ("keeps the good ones by smoothed
IoU"); every rule below is this project's, stated precisely so that runs can be reproduced.

1. **Synthetic rows.** An episode's first self-play turn (selfemo keys stated, judged, reply, judge_agreement)
   becomes a new target when both parse statuses are "ok", the reply is non-empty, every stated label is in
   the row's label space, sIoU(judged, stated) >= tau_con (beta = 0, so tau_con = 1 means judged == stated)
   and judge_agreement >= min_agreement (missing fails). Window = parent window + {speaker: parent's
   next_speaker, text: reply}, cut to the longest window of D_r (= prepare_erc's --window once any dialogue
   is that long; a parent near a dialogue's start keeps its context); prompt = recognize_messages(window);
   ground_truth = sorted stated labels; agent_name "selfemo_self_play"; extra_info = the parent's with
   turn + 1, speaker = parent's next_speaker, next_speaker "", next_gold [], origin "synthetic",
   round = `round`, the new window (the parent is (dialogue_id, turn - 1)). A parent with next_speaker ""
   yields none; `later_turns` are not used (they carry no speaker).
2. **Difficulty re-weighting** of base rows (real, and synthetic carried from earlier rounds): mean score over
   all dumped episodes of the row (all steps, pooled over duplicate rows), where an episode's score is
   recomputed at beta = 0 (docs/method.md §7.4), not read from the dumped r_rec (the run's beta and r_invalid):
   sIoU(pred, ground_truth) if pred_status is "ok", else 0.0; no pred_status: counted ("no_pred"), skipped.
   hard (lo <= mean <= hi): `hard_copies` copies (default 2); easy (mean > hi) and hopeless (mean < lo): kept
   once iff u(seed, "downsample", key) < easy_keep_prob (default 0.5), else dropped; unseen (no episode): kept
   once. u = SHA-256 of the seed and parts mapped to [0, 1): a row's fate depends on the seed and its key only.
3. **Dedupe** by key = normalised dialogue text of the window (NFKC, casefold, whitespace runs -> one space)
   + sorted labels. Base rows first (base order), then synthetic candidates (dump order); the first row with
   a key wins, later ones are dropped as "duplicate" (D_r's up-sampled copies collapse before re-weighting).
4. **Synthetic cap.** With R real output rows at most floor(share * R / (1 - share)) synthetic rows
   (share < 1), i.e. synthetic <= share of the output; the cap keeps the synthetic rows (new and carried)
   with the smallest u(seed, "cap", key, copy).
5. Output: base rows in base order (copies adjacent), then new synthetic rows in dump order;
   extra_info.index renumbered 0..n-1. Every step is a function of the inputs and the seed.
Rules 1 and 2 skip episodes of an unknown index or another data_source and those with infra_error = 1
(docs/method.md §3.5: a server failure hit them, their fields are not the model's answers), each counted by reason.
"""

from __future__ import annotations

import copy
import hashlib
import math
import unicodedata
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from selfemo_verl.labels import LABEL_SPACES
from selfemo_verl.prompts import format_dialogue, recognize_messages
from selfemo_verl.rewards import as_label_set, is_ok, smoothed_iou

REQUIRED_COLUMNS = ("data_source", "prompt", "ability", "reward_model", "extra_info", "agent_name")
REQUIRED_EXTRA = ("split", "index", "dialogue_id", "turn", "speaker", "next_speaker", "next_gold",
                  "label_space", "origin", "round", "window")
ORIGINS = ("real", "synthetic")
SELF_PLAY_AGENT = "selfemo_self_play"


class FlywheelError(ValueError):
    """A bad user input (base parquet, dump directory, option); the message is one line naming the culprit."""


@dataclass(frozen=True)
class FlywheelConfig:
    """Flywheel knobs (CLI flags of data_prep/flywheel.py); `check()` raises FlywheelError on a bad value."""

    round: int
    tau_con: float = 1.0
    min_agreement: float = 0.5
    hard_range: tuple[float, float] = (0.2, 0.8)
    max_synthetic_share: float = 0.5
    hard_copies: int = 2
    easy_keep_prob: float = 0.5
    seed: int = 0
    eps: float = 0.1

    def check(self) -> FlywheelConfig:
        lo, hi = self.hard_range
        problems = [
            (self.round < 1, f"--round must be >= 1 (the dataset being built), got {self.round}"),
            (not lo <= hi, f"--hard-range needs lo <= hi, got {lo} {hi}"),
            (not 0 <= self.max_synthetic_share <= 1,
             f"--max-synthetic-share must be in [0, 1], got {self.max_synthetic_share}"),
            (not 0 <= self.easy_keep_prob <= 1, f"--easy-keep-prob must be in [0, 1], got {self.easy_keep_prob}"),
            (self.hard_copies < 1, f"--hard-copies must be >= 1, got {self.hard_copies}"),
            (self.eps < 0, f"--eps must be >= 0, got {self.eps}"),
        ]
        for bad, message in problems:
            if bad:
                raise FlywheelError(message)
        return self


def unit_hash(seed: int, *parts) -> float:
    """A seeded, order-independent pseudo-random number in [0, 1): SHA-256 of the seed and the parts.

    >>> unit_hash(0, "cap", "x") == unit_hash(0, "cap", "x") != unit_hash(1, "cap", "x")
    True
    """
    digest = hashlib.sha256("\x1f".join(map(str, (seed, *parts))).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def normalise_text(text: str) -> str:
    """NFKC, casefold, whitespace runs -> one space, stripped (punctuation kept: it carries emotion).

    >>> normalise_text("  Oh\\u00a0MY   God!! ")
    'oh my god!!'
    """
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def dedupe_key(window: list[dict], labels) -> str:
    """Normalised dialogue text of the window + the sorted labels.

    >>> dedupe_key([{"speaker": "Ross", "text": "Hi!"}], ["joy"])
    'ross: hi!||joy'
    """
    return normalise_text(format_dialogue(window)) + "||" + ",".join(sorted(labels))


def row_key(row: dict) -> str:
    """dedupe_key of a parquet row."""
    return dedupe_key(row["extra_info"]["window"], row["reward_model"]["ground_truth"])


def difficulty_class(mean_r_rec: float | None, lo: float, hi: float) -> str:
    """hard (lo <= mean <= hi), easy (mean > hi), hopeless (mean < lo), unseen (no episode).

    >>> [difficulty_class(m, 0.2, 0.8) for m in (0.5, 0.9, 0.1, None)]
    ['hard', 'easy', 'hopeless', 'unseen']
    """
    if mean_r_rec is None:
        return "unseen"
    return "hopeless" if mean_r_rec < lo else "easy" if mean_r_rec > hi else "hard"


def synthetic_cap(n_real: int, share: float) -> int | None:
    """Most synthetic rows allowed beside n_real real rows so that synthetic <= share of all (None: no cap).

    >>> synthetic_cap(10, 0.5), synthetic_cap(10, 0.2), synthetic_cap(10, 0.0), synthetic_cap(10, 1.0)
    (10, 2, 0, None)
    """
    return None if share >= 1 else math.floor(share * n_real / (1 - share) + 1e-9)  # 1e-9: float round-off


def _finite(value) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _stated_labels(selfemo: dict, label_space: str) -> tuple[list[str] | None, str]:
    """Checked first-turn fields -> (sorted stated labels, "ok") or (None, drop reason)."""
    if "stated_status" not in selfemo:
        return None, "no_response"
    if selfemo.get("stated_status") != "ok":
        return None, "stated_unparsed"
    if selfemo.get("judged_status") != "ok":
        return None, "judged_unparsed"
    reply = selfemo.get("reply")
    if not isinstance(reply, str) or not reply.strip():
        return None, "no_reply"
    stated = selfemo.get("stated")
    if not isinstance(stated, list) or not stated or not all(s in LABEL_SPACES[label_space] for s in stated):
        return None, "unknown_label"  # a non-string member fails too
    return sorted(set(stated)), "ok"


def synthetic_check(selfemo: dict, parent: dict, cfg: FlywheelConfig) -> tuple[list[str] | None, str]:
    """Does this episode's first responder turn make a synthetic row? -> (labels, "ok") or (None, reason)."""
    info = parent["extra_info"]
    space = info["label_space"]
    if selfemo.get("label_space", space) != space:
        return None, "label_space_mismatch"
    if not info["next_speaker"]:
        return None, "no_next_speaker"
    stated, reason = _stated_labels(selfemo, space)
    if stated is None:
        return None, reason
    if smoothed_iou(as_label_set(selfemo.get("judged")), stated, label_space=space, eps=cfg.eps) < cfg.tau_con:
        return None, "inconsistent"
    agreement = _finite(selfemo.get("judge_agreement"))
    if agreement is None:
        return None, "no_judge_agreement"
    return (stated, "ok") if agreement >= cfg.min_agreement else (None, "low_agreement")


def synthetic_row(parent: dict, reply: str, labels: list[str], round_: int, max_window: int) -> dict:
    """The new recognition row: parent window + the reply turn, cut to the last `max_window` turns."""
    info = parent["extra_info"]
    speaker = info["next_speaker"]
    window = [*info["window"], {"speaker": speaker, "text": reply.strip()}][-max_window:]
    row = copy.deepcopy(parent)
    row["prompt"] = recognize_messages(window, info["label_space"])
    row["reward_model"] = {**row["reward_model"], "ground_truth": list(labels)}
    row["agent_name"] = SELF_PLAY_AGENT
    row["extra_info"].update(
        turn=info["turn"] + 1, speaker=speaker, next_speaker="", next_gold=[],
        origin="synthetic", round=round_, window=window,
    )
    return row


def index_records(records, base_by_index: dict[int, dict], counts: Counter) -> list:
    """Records the flywheel uses: same index and data_source as a base row, no infra_error; count the others."""
    matched = []
    for rec in records:
        parent = base_by_index.get(rec.index)
        if parent is None:
            counts["unknown_index"] += 1
        elif parent["data_source"] != rec.data_source:
            counts["data_source_mismatch"] += 1
        elif rec.selfemo.get("infra_error") == 1:  # docs/method.md §3.5: a server failure, not the model's answers
            counts["infra_error"] += 1
        else:
            matched.append(rec)
    return matched


def recognition_score(selfemo: dict, gold: list[str], eps: float) -> float | None:
    """Rule 2's episode score: sIoU(pred, gold; eps, beta = 0) if pred_status == "ok" else 0.0; None: no status.

    >>> [recognition_score({"pred": p, "pred_status": s}, ["joy"], 0.1) for p, s in ((["joy"], "ok"), ([], "no_tag"))]
    [1.0, 0.0]
    """
    if "pred_status" not in selfemo:
        return None
    ok = is_ok(selfemo["pred_status"])  # else a policy failure (no tag, empty, cut): 0, whatever the run's r_invalid
    return smoothed_iou(as_label_set(selfemo.get("pred")), gold, eps=eps, beta=0.0) if ok else 0.0


def mean_score_by_key(records, base_by_index: dict[int, dict], eps: float, counts: Counter) -> dict[str, float]:
    """Mean beta = 0 recognition score per dedupe key over the matched episodes (no pred_status: counted, skipped)."""
    scores: dict[str, list[float]] = defaultdict(list)
    for rec in records:
        parent = base_by_index[rec.index]
        score = recognition_score(rec.selfemo, parent["reward_model"]["ground_truth"], eps)
        if score is None:
            counts["no_pred"] += 1
            continue
        scores[row_key(parent)].append(score)
    return {key: sum(vals) / len(vals) for key, vals in scores.items()}


def reweight_base(base_rows: list[dict], means: dict[str, float], cfg: FlywheelConfig, seen: set, counts: Counter):
    """Dedupe base rows and apply the difficulty rule -> list of (row, key, copy number)."""
    lo, hi = cfg.hard_range
    out = []
    for row in base_rows:
        key = row_key(row)
        if key in seen:
            counts["duplicate"] += 1
            continue
        seen.add(key)
        kind = difficulty_class(means.get(key), lo, hi)
        copies = cfg.hard_copies if kind == "hard" else 1
        if kind in ("easy", "hopeless") and unit_hash(cfg.seed, "downsample", key) >= cfg.easy_keep_prob:
            counts[f"downsampled_{kind}"] += 1
            continue
        counts[f"kept_{kind}"] += 1
        out.extend((row, key, c) for c in range(copies))
    return out


def new_synthetic(records, base_by_index: dict[int, dict], cfg: FlywheelConfig, seen: set, counts: Counter):
    """Synthetic candidates that pass the filters and are not duplicates -> list of (row, key, 0)."""
    out, max_window = [], max(len(row["extra_info"]["window"]) for row in base_by_index.values())
    for rec in records:
        parent = base_by_index[rec.index]
        labels, reason = synthetic_check(rec.selfemo, parent, cfg)
        if labels is None:
            counts[reason] += 1
            continue
        row = synthetic_row(parent, rec.selfemo["reply"], labels, cfg.round, max_window)
        key = row_key(row)
        if key in seen:
            counts["duplicate"] += 1
            continue
        seen.add(key)
        counts["passed"] += 1
        out.append((row, key, 0))
    return out


def apply_cap(entries: list, cfg: FlywheelConfig, counts: Counter) -> list:
    """Drop synthetic entries beyond the share cap, by seeded hash order; keep the order of the rest."""
    synthetic = [i for i, (row, _, _) in enumerate(entries) if row["extra_info"]["origin"] == "synthetic"]
    cap = synthetic_cap(len(entries) - len(synthetic), cfg.max_synthetic_share)
    if cap is None or len(synthetic) <= cap:
        return entries
    ranked = sorted(synthetic, key=lambda i: (unit_hash(cfg.seed, "cap", entries[i][1], entries[i][2]), i))
    dropped = set(ranked[cap:])
    counts["synthetic_cap"] += len(dropped)
    return [entry for i, entry in enumerate(entries) if i not in dropped]


def renumber(entries: list) -> list[dict]:
    """Fresh row dicts with extra_info.index = 0..n-1 in entry order."""
    return [{**row, "extra_info": {**row["extra_info"], "index": n}} for n, (row, _, _) in enumerate(entries)]


def build_next_round(base_rows: list[dict], records, cfg: FlywheelConfig) -> tuple[list[dict], dict]:
    """D_{r+1} rows and the summary counts from D_r's rows (validated) and round r's episode records.

    >>> from selfemo_verl.episodes import EpisodeRecord
    >>> win = [{"speaker": "A", "text": "Hi."}]
    >>> info = {"split": "train", "index": 0, "dialogue_id": "d", "turn": 0, "speaker": "A", "next_speaker": "B",
    ...         "next_gold": ["joy"], "label_space": "meld", "origin": "real", "round": 0, "window": win}
    >>> base = [{"data_source": "selfemo/meld", "prompt": [], "ability": "emotion_recognition", "agent_name": "x",
    ...          "reward_model": {"style": "rule", "ground_truth": ["neutral"]}, "extra_info": info}]
    >>> sp = {"pred": ["joy", "neutral"], "pred_status": "ok", "stated": ["joy"], "stated_status": "ok",
    ...       "judged": ["joy"], "judged_status": "ok", "reply": "Great!", "judge_agreement": 1.0}
    >>> rows, summary = build_next_round(base, [EpisodeRecord(0, "u", 0, "selfemo/meld", sp, {})],
    ...                                  FlywheelConfig(round=1))  # score 1.1 / 2.1 = 0.52: hard, two copies
    >>> [(r["extra_info"]["origin"], r["extra_info"]["window"][-1]["text"]) for r in rows]
    [('real', 'Hi.'), ('real', 'Hi.'), ('synthetic', 'Great!')]
    """
    cfg.check()
    base_by_index = {row["extra_info"]["index"]: row for row in base_rows}
    rec_counts, base_counts, syn_counts = Counter(), Counter(), Counter()
    matched = index_records(records, base_by_index, rec_counts)
    means = mean_score_by_key(matched, base_by_index, cfg.eps, rec_counts)
    entries = reweight_base(base_rows, means, cfg, seen := set(), base_counts)
    entries += new_synthetic(matched, base_by_index, cfg, seen, syn_counts)
    rows = renumber(apply_cap(entries, cfg, syn_counts))
    return rows, _summary(cfg, base_rows, records, rows, rec_counts, base_counts, syn_counts)


def _summary(cfg, base_rows, records, rows, rec_counts, base_counts, syn_counts) -> dict:
    origins = Counter(row["extra_info"]["origin"] for row in rows)
    return {
        "config": {**asdict(cfg), "hard_range": list(cfg.hard_range)},
        "inputs": {"base_rows": len(base_rows), "episodes": len(records), **dict(sorted(rec_counts.items()))},
        "base": dict(sorted(base_counts.items())),
        "synthetic": dict(sorted(syn_counts.items())),
        "output": {"rows": len(rows), **{o: origins[o] for o in ORIGINS},
                   "synthetic_share": round(origins["synthetic"] / len(rows), 6) if rows else 0.0},
    }


def _check_schema(schema, path) -> None:
    """Base parquet columns and extra_info keys (docs/method.md §13); raise FlywheelError naming what is missing."""
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise FlywheelError(f"{path}: base parquet lacks column(s) {missing}; found {schema.names}")
    extra = schema.field("extra_info").type
    names = [extra.field(i).name for i in range(extra.num_fields)] if pa.types.is_struct(extra) else []
    lacking = [k for k in REQUIRED_EXTRA if k not in names]
    if lacking:
        raise FlywheelError(f"{path}: base parquet extra_info lacks key(s) {lacking}; found {names}")


def _row_problem(row: dict, seen_index: set) -> str | None:
    """What is wrong with one base row, or None."""
    info = row["extra_info"] or {}
    space, index, window = info.get("label_space"), info.get("index"), info.get("window")
    gold = (row["reward_model"] or {}).get("ground_truth")
    if space not in LABEL_SPACES:
        return f"unknown label_space {space!r}; expected one of {sorted(LABEL_SPACES)}"
    if not isinstance(index, int) or index in seen_index:
        return f"extra_info.index {index!r} is missing or not unique"
    if not isinstance(gold, list) or not gold or not set(gold) <= set(LABEL_SPACES[space]):
        return f"ground_truth {gold!r} is not a non-empty list of {space} labels {list(LABEL_SPACES[space])}"
    if not isinstance(window, list) or not window or not all(isinstance(t, dict) and "speaker" in t for t in window):
        return "extra_info.window is not a non-empty list of {speaker, text} turns"
    if info.get("origin") not in ORIGINS or not isinstance(info.get("turn"), int):
        return f"extra_info.origin {info.get('origin')!r} not in {ORIGINS} or turn not an int"
    return None


def read_base(path) -> tuple[list[dict], pa.Schema]:
    """Rows and schema (metadata dropped) of the round's training parquet, validated row by row."""
    path = Path(path)
    if not path.is_file():
        raise FlywheelError(f"{path}: base parquet not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise FlywheelError(f"{path}: not a readable parquet file ({' '.join(str(err).split())})") from None
    _check_schema(table.schema, path)
    rows, seen = table.to_pylist(), set()
    if not rows:
        raise FlywheelError(f"{path}: base parquet has no rows")
    for i, row in enumerate(rows):
        problem = _row_problem(row, seen)
        if problem:
            raise FlywheelError(f"{path}: row {i}: {problem}")
        seen.add(row["extra_info"]["index"])
    return rows, table.schema.remove_metadata()

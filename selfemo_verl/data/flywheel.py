"""Data flywheel (docs/method.md §7): round r's episode dumps + the parquet D_r it trained on -> D_{r+1}.

    python -m selfemo_verl.data.flywheel --dumps R0/dumps --base D0.parquet --out R1/train.parquet --round 1 \\
        [--tau-con 1.0 --min-agreement 0.5 --hard-range 0.2 0.8 --max-synthetic-share 0.5 --seed 0]

Core module: no verl, no ray. The CLI (also `data_prep/flywheel.py`) reads D_r (`data.parquet.read_base`) and the
dumps, writes D_{r+1} and OUT.summary.json (counts by reason, also printed) atomically, the same bytes for the same
inputs; a bad input is one line on stderr naming the file (and row), exit 2; corrupt dump lines are counted.
`round` is the index of the dataset being built (D_1 comes from round 0's dumps; round 0 trained on D_0).
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

import argparse
import copy
import hashlib
import json
import math
import sys
import unicodedata
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow as pa

from selfemo_verl.data.episode_dump import read_dumps
from selfemo_verl.data.parquet import ORIGINS, read_base, write_parquet
from selfemo_verl.files import atomic_write
from selfemo_verl.labels import LABEL_SPACES
from selfemo_verl.prompts import format_dialogue, recognize_messages
from selfemo_verl.rewards import as_label_set, is_ok, smoothed_iou

SELF_PLAY_AGENT = "selfemo_self_play"


class FlywheelError(ValueError):
    """A bad user input (base parquet, dump directory, option); the message is one line naming the culprit."""


@dataclass(frozen=True)
class FlywheelConfig:
    """Flywheel knobs (the CLI's flags); `check()` raises FlywheelError on a bad value."""

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

    >>> from selfemo_verl.data.episode_dump import EpisodeRecord
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


def run(dumps, base, out, cfg: FlywheelConfig) -> dict:
    """Read D_r and round r's dumps, build D_{r+1}, write OUT and OUT.summary.json atomically; return the summary."""
    cfg.check()
    try:
        base_rows, schema = read_base(base)
        records, n_corrupt = read_dumps(dumps)
    except ValueError as err:  # a BaseParquetError, or read_dumps' missing dump directory
        raise FlywheelError(str(err)) from None
    rows, summary = build_next_round(base_rows, records, cfg)
    summary["inputs"] = {"base": str(base), "dumps": str(dumps), "corrupt_lines": n_corrupt, **summary["inputs"]}
    write_parquet(out, pa.Table.from_pylist(rows, schema=schema))
    atomic_write(Path(f"{out}.summary.json"), json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dumps", required=True, help="episode dump directory of round r (step_*.jsonl)")
    parser.add_argument("--base", required=True, help="the parquet round r trained on (D_r)")
    parser.add_argument("--out", required=True, help="output parquet D_{r+1}")
    parser.add_argument("--round", type=int, required=True, help="index r+1 of the dataset being built (>= 1)")
    parser.add_argument("--tau-con", type=float, default=FlywheelConfig.tau_con, help="min sIoU(judged, stated)")
    parser.add_argument("--min-agreement", type=float, default=FlywheelConfig.min_agreement, help="min judge_agreement")
    parser.add_argument("--hard-range", type=float, nargs=2, default=list(FlywheelConfig.hard_range),
                        metavar=("LO", "HI"), help="mean beta=0 recognition score range of hard rows (inclusive)")
    parser.add_argument("--max-synthetic-share", type=float, default=FlywheelConfig.max_synthetic_share)
    parser.add_argument("--hard-copies", type=int, default=FlywheelConfig.hard_copies, help="copies of a hard row")
    parser.add_argument("--easy-keep-prob", type=float, default=FlywheelConfig.easy_keep_prob,
                        help="keep probability of an easy or hopeless row")
    parser.add_argument("--eps", type=float, default=FlywheelConfig.eps,
                        help="sIoU smoothing of the consistency test and the difficulty score")
    parser.add_argument("--seed", type=int, default=FlywheelConfig.seed)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    knobs = {f.name: getattr(args, f.name) for f in fields(FlywheelConfig)}  # every flag is named after its field
    try:
        cfg = FlywheelConfig(**{**knobs, "hard_range": tuple(args.hard_range)})
        summary = run(args.dumps, args.base, args.out, cfg)
    except FlywheelError as err:
        print(f"flywheel: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True))
    if summary["output"]["rows"] == 0:
        print(f"flywheel: warning: {args.out} has no rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

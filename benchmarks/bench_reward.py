"""Median cost of one SELF-EMO compute_score call vs verl's gsm8k compute_score, same process, same run.

    .venv/bin/python benchmarks/bench_reward.py [--n 10000] [--rounds 3] [--seed 0]

Inputs (seeded): 10k recognition outputs (reasoning preamble of 0-600 chars + an <emotion> answer; a mix of
hits, synonyms, multi-label, missing tags, unknown words) scored on the single-turn path (solution_str parsed),
the same 10k as self-play episodes (labels in extra_info["selfemo"], nothing parsed), and 10k gsm8k-like
solutions (reasoning of 0-600 chars ending "#### <number>"). Each call is timed alone (perf_counter_ns); the
script prints the median microseconds per call of each and the ratio ours / gsm8k.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from verl.utils.reward_score.gsm8k import compute_score as gsm8k_score

from selfemo_verl.labels import LABEL_SPACES, data_source, parse_emotions
from selfemo_verl.reward_fn import compute_score

WORDS = "the speaker sounds like she is reacting to what he said before and her tone seems quite".split()
ANSWER_FORMS = [
    lambda labs, rng: f"<emotion>{', '.join(labs)}</emotion>",  # canonical
    lambda labs, rng: f"<emotion>{labs[0].capitalize()}</emotion>",  # case
    lambda labs, rng: f"<emotion>{rng.choice(['joyful', 'angry', 'sad', 'scared', 'shocked'])}</emotion>",  # synonym
    lambda labs, rng: f"The emotion is {labs[0]}.",  # no tag
    lambda labs, rng: "<emotion>bewildered</emotion>",  # unknown word
]


def _prose(rng: random.Random, max_chars: int = 600) -> str:
    n = rng.randint(0, max_chars)
    out, size = [], 0
    while size < n:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


def make_emotion_cases(n: int, rng: random.Random) -> list[tuple]:
    cases = []
    for _ in range(n):
        space = rng.choice(sorted(LABEL_SPACES))
        labels = LABEL_SPACES[space]
        gold = [rng.choice(labels)]
        pred = rng.sample(labels, rng.choice([1, 1, 1, 2]))
        form = rng.choices(ANSWER_FORMS, weights=[70, 10, 10, 5, 5])[0]
        text = f"<think>{_prose(rng)}</think>\n{form(pred, rng)}"
        cases.append((data_source(space), text, gold, space))
    return cases


def make_self_play_cases(emotion_cases, rng: random.Random) -> list[tuple]:
    out = []
    for source, text, gold, space in emotion_cases:
        labels = LABEL_SPACES[space]
        pred, status = parse_emotions(text, space)  # what the agent loop would hand over
        stated, judged = [rng.choice(labels)], [rng.choice(labels)]
        selfemo = {"label_space": space, "pred": sorted(pred), "pred_status": status, "stated": stated,
                   "stated_status": "ok", "reply": _prose(rng, 120), "judged": judged, "judged_status": "ok",
                   "judge_agreement": 1.0}
        extra = {"split": "train", "index": 0, "label_space": space, "next_gold": [rng.choice(labels)],
                 "selfemo": selfemo}
        out.append((source, text + "<reply>" + selfemo["reply"] + "</reply>", gold, extra))
    return out


def make_gsm8k_cases(n: int, rng: random.Random) -> list[tuple]:
    cases = []
    for _ in range(n):
        answer = str(rng.randint(0, 5000))
        tail = f"#### {answer}" if rng.random() < 0.9 else f"The answer is {answer}"
        truth = answer if rng.random() < 0.6 else str(rng.randint(0, 5000))
        cases.append((f"{_prose(rng)} so the total is {answer}.\n{tail}", truth))
    return cases


# What verl passes on every call from reward.custom_reward_function.reward_kwargs (docs/method.md §3 defaults).
REWARD_KWARGS = {"eps": 0.1, "beta": 0.0, "sigma": 0.5, "r_invalid": 0.0, "w_rec": 1.0, "w_con": 0.5, "w_und": 0.25}


def _median_us(fn, cases, rounds: int, **kwargs) -> float:
    for case in cases[:200]:  # warm-up (regex caches, lru caches)
        fn(*case, **kwargs)
    samples = []
    clock = time.perf_counter_ns
    for _ in range(rounds):
        for case in cases:
            t0 = clock()
            fn(*case, **kwargs)
            samples.append(clock() - t0)
    return statistics.median(samples) / 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    emo = make_emotion_cases(args.n, rng)
    single = [(ds, text, gold, {"label_space": space}) for ds, text, gold, space in emo]
    self_play = make_self_play_cases(emo, rng)
    gsm = make_gsm8k_cases(args.n, rng)

    t_gsm = _median_us(gsm8k_score, gsm, args.rounds)
    t_single = _median_us(compute_score, single, args.rounds, **REWARD_KWARGS)
    t_play = _median_us(compute_score, self_play, args.rounds, **REWARD_KWARGS)
    t_smooth = _median_us(compute_score, self_play, args.rounds, **{**REWARD_KWARGS, "beta": 0.3})
    t_gsm2 = _median_us(gsm8k_score, gsm, args.rounds)  # again, to see drift on a shared machine
    ref = (t_gsm + t_gsm2) / 2
    print(f"n={args.n} rounds={args.rounds} (median us per call)")
    print(f"verl gsm8k.compute_score           {t_gsm:7.2f} / {t_gsm2:7.2f} (before / after)")
    print(f"selfemo compute_score, single-turn {t_single:7.2f}   ratio {t_single / ref:5.2f}x")
    print(f"selfemo compute_score, self-play   {t_play:7.2f}   ratio {t_play / ref:5.2f}x")
    print(f"  ... self-play with beta=0.3      {t_smooth:7.2f}   ratio {t_smooth / ref:5.2f}x")


if __name__ == "__main__":
    main()

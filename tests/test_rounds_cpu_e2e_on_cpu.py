"""CPU end-to-end of two self-evolution rounds (recipes/run_cpu_rounds.sh, about 2.5 minutes on 2 cores).

Round 0 trains the tiny random Qwen3 for STEPS steps on D_0 (8 MELD rows from 8 dialogues, each with another
next speaker) with episode dumps on and the HF model saved; the flywheel turns round 0's dumps + D_0 into D_1;
round 1 trains STEPS steps on D_1, starting from round 0's HF model. Each round validates at its last step (the
step it saves), and model selection on val (selfemo_verl.model_select) writes OUT_DIR/selection.json. The whole
recipe is watched as one process tree: exit status 0, peak memory (PSS) within 8 GiB, no process left behind.

With 4 prompts a step, STEPS = 2 steps are exactly one epoch of D_0, so round 0 sees every row. A random model
never writes a parsable answer, so every episode's reward is r_rec = r_invalid = 0.25, while the flywheel's own
β = 0 difficulty score of an unparsed answer is 0 (it recomputes it from the dump); the run passes the flywheel
`--hard-range 0 1`, so every D_0 row is "hard" and comes into D_1 twice (adjacent copies), and D_1 has 16 rows
with fresh indices 0..15, while D_0 keeps MELD's original (sparse) indices.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from selfemo_verl.cpu.assets import tiny_model_dir
from selfemo_verl.cpu.watch import run_watched
from selfemo_verl.data.episode_dump import read_dumps

REPO = Path(__file__).resolve().parents[1]
STEPS = 2
PROMPTS_PER_STEP = 4  # data.train_batch_size of run_cpu_smoke.sh
ROLLOUT_N = 2  # actor_rollout_ref.rollout.n of run_cpu_smoke.sh
D0_ROWS = STEPS * PROMPTS_PER_STEP  # one epoch of D_0 in round 0
HARD_COPIES = 2  # flywheel default --hard-copies
PEAK_GIB = 8.0
R_INVALID = 0.25
HF_SUBDIR = "actor/huggingface"


def _write_d0(raw_dir: Path, work: Path) -> Path:
    """D_0: the first D0_ROWS MELD train rows with a next speaker, one per dialogue and next speaker."""
    full, d0 = work / "full", work / "d0"
    cmd = [sys.executable, str(REPO / "data_prep/prepare_erc.py"), "--dataset", "meld", "--raw-dir", str(raw_dir),
           "--out-dir", str(full), "--window", "4"]
    subprocess.run(cmd, check=True, capture_output=True)
    table = pq.read_table(full / "train.parquet")
    keep, speakers, dialogues = [], set(), set()
    for i, info in enumerate(table.column("extra_info").to_pylist()):
        if info["next_speaker"] and info["next_speaker"] not in speakers and info["dialogue_id"] not in dialogues:
            keep.append(i)
            speakers.add(info["next_speaker"])
            dialogues.add(info["dialogue_id"])
        if len(keep) == D0_ROWS:
            break
    d0.mkdir()
    pq.write_table(table.take(keep), d0 / "train.parquet")
    pq.write_table(table.take(keep), d0 / "val.parquet")  # validated at each round's last step (model selection)
    return d0


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _metrics(round_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (round_dir / "metrics.jsonl").read_text().splitlines()]


def _records(round_dir: Path) -> list:
    records, n_corrupt = read_dumps(round_dir / "dumps")
    assert n_corrupt == 0
    return records


@pytest.fixture(scope="module")
def rounds(tmp_path_factory, data_dir):
    work = tmp_path_factory.mktemp("rounds")
    d0 = _write_d0(data_dir / "meld", work)
    out = work / "out"
    env = {**os.environ, "OUT_DIR": str(out), "DATA_DIR": str(d0), "STEPS": str(STEPS), "ROUNDS": "2",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FLYWHEEL_ARGS": "--hard-range 0 1"}
    cmd = ["bash", str(REPO / "recipes/run_cpu_rounds.sh"), f"selfemo.reward.r_invalid={R_INVALID}"]
    report = run_watched(cmd, env=env, log_path=str(work / "run.log"))
    assert report.returncode == 0, (work / "run.log").read_text(errors="replace")[-4000:]
    return {"report": report, "d0": d0 / "train.parquet", "r0": out / "round_0", "r1": out / "round_1",
            "d1": out / "round_1/data/train.parquet", "selection": out / "selection.json"}


def test_two_rounds_run_through_the_recipe_within_memory_and_leave_no_process(rounds):
    report = rounds["report"]
    assert report.leftovers == [], f"processes left behind: {report.leftovers}"
    assert report.peak_pss_gib <= PEAK_GIB, f"peak PSS {report.peak_pss_gib:.2f} GiB"
    for r in ("r0", "r1"):
        assert [s["step"] for s in _metrics(rounds[r])] == list(range(1, STEPS + 1))


def test_model_selection_chose_a_saved_checkpoint_by_val_weighted_f1_over_both_rounds(rounds):
    key = "val-core/selfemo/weighted_f1/meld"
    val = {(r, s["step"]): s["data"][key] for r, name in enumerate(("r0", "r1")) for s in _metrics(rounds[name])
           if key in s["data"]}
    assert sorted(val) == [(0, STEPS), (1, STEPS)]  # reason: test_freq = save_freq = STEPS, no val_before_train
    choice = json.loads(rounds["selection"].read_text())
    chosen = choice["chosen"]
    assert (Path(chosen["path"]) / "config.json").is_file()
    round_dir = rounds[("r0", "r1")[chosen["round"]]]
    assert chosen["path"] == str(round_dir / f"ckpt/global_step_{chosen['step']}/{HF_SUBDIR}")
    # reason: the rule itself: the best value, and among equal values (a random model scores 0 in both) the earlier
    assert (chosen["round"], chosen["step"]) == min(rs for rs, v in val.items() if v == max(val.values()))
    assert chosen["val_weighted_f1"] == max(val.values())


def test_flywheel_summary_counts_exactly_round_0s_dumped_episodes(rounds):
    records = _records(rounds["r0"])
    d0_index = {row["extra_info"]["index"] for row in _rows(rounds["d0"])}
    assert len(records) == D0_ROWS * ROLLOUT_N
    assert {rec.index for rec in records} == d0_index  # one epoch: every D_0 row, by its D_0 index
    assert {rec.step for rec in records} == set(range(1, STEPS + 1))
    summary = json.loads(Path(f"{rounds['d1']}.summary.json").read_text())
    assert summary["inputs"]["dumps"] == str(rounds["r0"] / "dumps")
    assert summary["inputs"]["base"] == str(rounds["d0"])
    assert summary["inputs"]["episodes"] == len(records) and summary["inputs"]["base_rows"] == D0_ROWS
    assert summary["inputs"]["corrupt_lines"] == 0
    assert not {"unknown_index", "data_source_mismatch", "no_r_rec"} & set(summary["inputs"])
    # reason: nothing parses: the reward is r_invalid, the flywheel's score 0, in --hard-range [0, 1]: all hard
    assert {rec.rewards["r_rec"] for rec in records} == {R_INVALID}
    assert summary["base"] == {"kept_hard": D0_ROWS}
    assert summary["output"]["real"] == HARD_COPIES * D0_ROWS
    assert summary["output"]["rows"] == len(_rows(rounds["d1"])) == HARD_COPIES * D0_ROWS + summary["output"]["synthetic"]


def test_flywheel_output_holds_each_hard_round_0_row_twice_with_fresh_indices(rounds):
    d0, d1 = _rows(rounds["d0"]), _rows(rounds["d1"])
    assert [row["extra_info"]["index"] for row in d1] == list(range(len(d1)))
    real = [row for row in d1 if row["extra_info"]["origin"] == "real"]

    def strip_index(row):
        return {**row, "extra_info": {k: v for k, v in row["extra_info"].items() if k != "index"}}

    assert [strip_index(row) for row in real] == [strip_index(row) for row in d0 for _ in range(HARD_COPIES)]


def test_round_1_trains_on_the_flywheel_output(rounds):
    d0_index = {row["extra_info"]["index"] for row in _rows(rounds["d0"])}
    d1 = {row["extra_info"]["index"]: row for row in _rows(rounds["d1"])}
    records = _records(rounds["r1"])
    assert len(records) == STEPS * PROMPTS_PER_STEP * ROLLOUT_N
    for rec in records:
        row = d1[rec.index]  # KeyError: an index that D_1 does not have
        assert rec.data_source == row["data_source"]
        assert rec.selfemo["label_space"] == row["extra_info"]["label_space"]
        # the responder speaks as the row's next speaker: D_0 rows all have different ones (see _write_d0)
        assert rec.selfemo["reply_speaker"] == row["extra_info"]["next_speaker"]
    seen = {rec.index for rec in records}
    assert len(seen) == STEPS * PROMPTS_PER_STEP  # distinct rows within the epoch
    assert seen - d0_index, "round 1 only saw indices that D_0 also has"


def test_round_1_logs_finite_grad_norm_and_reward_components(rounds):
    for step in _metrics(rounds["r1"]):
        data = step["data"]
        for key in ("actor/grad_norm", "critic/score/mean", "selfemo/r_rec", "selfemo/r_con", "selfemo/parse_ok"):
            assert math.isfinite(data[key]), key
        assert data["selfemo/r_rec"] == pytest.approx(R_INVALID)


def _median_relative_change(weights: dict, start: dict) -> float:
    keys = sorted(start)
    assert sorted(weights) == keys and all(weights[k].shape == start[k].shape for k in keys)
    w, m = (torch.cat([t[k].flatten().double() for k in keys]) for t in (weights, start))
    big = m.abs() > 1e-2
    return ((w - m) / m)[big].median().item()


def test_round_1_starts_from_round_0s_saved_hf_model(rounds):
    # reason: with every reward equal, every advantage and gradient is 0, so AdamW's decoupled weight decay is the
    # only update: each step scales every weight by (1 - lr * weight_decay). Round 0 moves the weights by a
    # relative s0 < 0; round 1 then moves them by 2 * s0 from the tiny model if it started from round 0's HF
    # model, and by s0 if it started from the tiny model again.
    for r in ("r0", "r1"):
        assert all(s["data"]["actor/grad_norm"] == 0.0 for s in _metrics(rounds[r]))
    start = load_file(tiny_model_dir() / "model.safetensors")
    w0, w1 = (load_file(rounds[r] / f"ckpt/global_step_{STEPS}/{HF_SUBDIR}/model.safetensors") for r in ("r0", "r1"))
    s0, s1 = _median_relative_change(w0, start), _median_relative_change(w1, start)
    assert s0 < -1e-6, s0
    assert s1 == pytest.approx(2 * s0, rel=0.1), (s0, s1)

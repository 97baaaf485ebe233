"""selfemo_verl.eval: ERC metrics, the score/generate/consistency/report CLI (docs/method.md §9)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, f1_score

from selfemo_verl.eval import generate
from selfemo_verl.eval.__main__ import main
from selfemo_verl.eval.inputs import read_gold
from selfemo_verl.eval.metrics import FAILURE, corpus_metrics, mean_sd, metrics_by_source, single_label
from selfemo_verl.labels import LABEL_SPACES

MELD = list(LABEL_SPACES["meld"])


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def meld_test(tmp_path_factory, repo_root, data_dir) -> Path:
    """MELD test parquet written by data_prep/prepare_erc.py from the raw CSVs."""
    out = tmp_path_factory.mktemp("meld")
    cmd = [sys.executable, str(repo_root / "data_prep" / "prepare_erc.py"), "--dataset", "meld",
           "--raw-dir", str(data_dir / "meld"), "--out-dir", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return out / "test.parquet"


@pytest.fixture(scope="session")
def meld_gold(meld_test):
    return read_gold(meld_test)


def write_predictions(path: Path, pairs) -> Path:
    path.write_text("".join(json.dumps({"index": i, "output": o}) + "\n" for i, o in pairs), encoding="utf-8")
    return path


def load_fakes():
    """tests/fakes.py, loaded by file (--import-mode=importlib keeps tests/ off sys.path)."""
    spec = importlib.util.spec_from_file_location("selfemo_eval_fakes", Path(__file__).with_name("fakes.py"))
    fakes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fakes)
    return fakes


def hand_weighted_f1(y_true, y_pred, classes) -> float:
    """Reference: per-class P/R/F1 from TP/FP/FN counts, weighted by gold support."""
    total = 0.0
    for c in classes:
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
        fp = sum(t != c and p == c for t, p in zip(y_true, y_pred))
        fn = sum(t == c and p != c for t, p in zip(y_true, y_pred))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        total += f1 * sum(t == c for t in y_true)
    return total / len(y_true)


# ------------------------------------------------------------------------------------------ core metrics


def test_single_label_rule_takes_first_in_label_space_order_and_fails_on_empty():
    assert single_label({"anger", "joy"}, "meld") == "joy"  # joy (id 4) precedes anger (id 6)
    assert single_label({"Neutral", "Joyful"}, "emorynlp") == "Joyful"  # id 0 beats id 3
    assert single_label(frozenset(), "meld") == FAILURE  # nothing parsed -> sentinel
    with pytest.raises(ValueError, match="bogus"):
        single_label({"bogus"}, "meld")  # inside the code, a label outside the space is a bug


def test_worked_example_counts_failures_and_missing_rows_as_wrong():
    preds = ["<emotion>joy</emotion>",  # ok, right
             "I feel joy",  # prose without tag -> no_tag failure, wrong although it mentions the gold
             "<emotion>anger, joy</emotion>",  # multi-label -> joy (first in MELD order), right
             None,  # missing row
             "<emotion>fear</emotion>"]  # ok, wrong
    golds = ["joy", "joy", "joy", "anger", ["anger"]]
    m = corpus_metrics(preds, golds, "meld")
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert m["parse_failure_rate"] == pytest.approx(2 / 5)  # no_tag + missing
    assert m["missing_rate"] == pytest.approx(1 / 5)
    assert m["status_counts"] == {"missing": 1, "no_tag": 1, "ok": 3}
    assert m["multi_label_rate"] == pytest.approx(1 / 5)
    assert m["strict_accuracy"] == pytest.approx(1 / 5)  # only the single-label joy equals {gold}
    assert m["lenient_accuracy"] == pytest.approx(2 / 5)  # gold in set: rows 1 and 3
    # joy: TP 2, FN 1 (the failure), FP 0 -> F1 0.8 (support 3); anger: TP 0 -> F1 0 (support 2)
    assert m["weighted_f1"] == pytest.approx(0.8 * 3 / 5)
    assert m["per_class"]["joy"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8),
                                     "support": 3}
    assert m["confusion"]["columns"][-1] == FAILURE
    assert m["confusion"]["counts"][MELD.index("anger")][-1] == 1  # the missing anger row sits in the fail column


label_sets = st.frozensets(st.sampled_from(MELD), max_size=3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(MELD), label_sets | st.none()), min_size=1, max_size=60))
def test_weighted_f1_equals_sklearn_and_a_hand_computation(pairs):
    golds = [g for g, _ in pairs]
    preds = [p for _, p in pairs]
    m = corpus_metrics(preds, golds, "meld")
    y_pred = [min(p, key=MELD.index) if p else FAILURE for p in preds]  # the documented rule, by hand
    assert m["weighted_f1"] == pytest.approx(hand_weighted_f1(golds, y_pred, MELD), abs=1e-12)
    assert m["weighted_f1"] == pytest.approx(f1_score(golds, y_pred, average="weighted", zero_division=0), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(golds, y_pred))
    assert m["parse_failure_rate"] == pytest.approx(sum(not p for p in preds) / len(preds))


def test_metrics_by_source_keeps_data_sources_apart():
    preds = ["<emotion>joy</emotion>", "<emotion>anger</emotion>", "<emotion>Mad</emotion>", "nonsense"]
    golds = [["joy"], ["joy"], ["Mad"], ["Mad"]]
    sources = ["selfemo/meld", "selfemo/meld", "selfemo/emorynlp", "selfemo/emorynlp"]
    out = metrics_by_source(preds, golds, sources, ["meld", "meld", "emorynlp", "emorynlp"])
    assert set(out) == {"selfemo/meld", "selfemo/emorynlp"}
    assert out["selfemo/meld"]["accuracy"] == 0.5 and out["selfemo/meld"]["parse_failure_rate"] == 0.0
    assert out["selfemo/emorynlp"]["accuracy"] == 0.5 and out["selfemo/emorynlp"]["parse_failure_rate"] == 0.5
    assert out["selfemo/emorynlp"]["weighted_f1"] == pytest.approx(2 / 3)  # Mad: P 1, R 1/2 -> F1 2/3


def test_bitmasks_from_compute_score_give_the_same_metrics_as_the_texts():
    import numpy as np

    from selfemo_verl.rewards import labels_to_mask

    texts = ["<emotion>joy</emotion>", "<emotion>anger, joy</emotion>", "garbage", "<emotion>fear</emotion>"]
    golds = ["joy", "anger", "fear", "fear"]
    # as selfemo_verl.reward_fn reports them: pred_mask 0 when parsing failed, gold_mask one bit
    pred_masks = [np.int64(labels_to_mask({"joy"}, "meld")), labels_to_mask({"anger", "joy"}, "meld"), 0,
                  labels_to_mask({"fear"}, "meld")]
    gold_masks = [labels_to_mask({g}, "meld") for g in golds]
    from_text, from_masks = corpus_metrics(texts, golds, "meld"), corpus_metrics(pred_masks, gold_masks, "meld")
    for key in ("accuracy", "weighted_f1", "macro_f1", "parse_failure_rate"):
        assert from_masks[key] == pytest.approx(from_text[key]), key
    assert from_text["accuracy"] == 0.5  # joy right; {anger, joy} -> joy, wrong; failure; fear right


def test_mean_sd_is_sample_sd_and_nan_for_one_run():
    assert mean_sd([0.2, 0.4, 0.6]) == (pytest.approx(0.4), pytest.approx(0.2))  # ddof 1
    mean, sd = mean_sd([0.3])
    assert mean == 0.3 and math.isnan(sd)


# ------------------------------------------------------------------------------------------------- score


def test_meld_all_correct_scores_one(meld_test, meld_gold, tmp_path):
    preds = write_predictions(tmp_path / "p.jsonl", [(i, f"<emotion>{g}</emotion>")
                                                     for i, g in zip(meld_gold.indices, meld_gold.labels)])
    assert main(["score", "--predictions", str(preds), "--data", str(meld_test), "--out", str(tmp_path / "o")]) == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["n"] == 2610 and m["accuracy"] == 1.0 and m["weighted_f1"] == 1.0 and m["macro_f1"] == 1.0
    assert m["parse_failure_rate"] == 0.0 and m["data_source"] == "selfemo/meld"


def test_meld_all_neutral_gives_the_majority_baseline(meld_test, meld_gold, tmp_path):
    preds = write_predictions(tmp_path / "p.jsonl", [(i, "<emotion>neutral</emotion>") for i in meld_gold.indices])
    out = tmp_path / "o"
    assert main(["score", "--predictions", str(preds), "--data", str(meld_test), "--out", str(out),
                 "--name", "majority"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert round(100 * m["accuracy"], 1) == 48.1  # MELD majority baseline, docs/method.md §13.3
    assert round(100 * m["weighted_f1"], 1) == 31.3
    assert m["per_class"]["neutral"]["support"] == 1256 and m["per_class"]["fear"]["support"] == 50
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    row = (out / "results_row.md").read_text()
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    assert len(cells) == 8  # method, backbone, 3 datasets, acc, source, notes
    assert cells[0] == "majority" and cells[2:6] == ["–", "31.27", "–", "48.12"]


def test_parse_failures_and_missing_rows_count_as_wrong_and_are_reported(meld_test, meld_gold, tmp_path):
    pairs = [(i, f"<emotion>{g}</emotion>") for i, g in zip(meld_gold.indices, meld_gold.labels)]
    pairs[:10] = [(i, "I am not sure.") for i, _ in pairs[:10]]  # 10 parse failures
    pairs[10:15] = [(i, "<emotion>happy, bogus</emotion>") for i, _ in pairs[10:15]]  # 5 unknown labels
    del pairs[-20:]  # 20 missing rows
    preds = write_predictions(tmp_path / "p.jsonl", pairs)
    assert main(["score", "--predictions", str(preds), "--data", str(meld_test), "--out", str(tmp_path / "o")]) == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["n"] == 2610
    assert m["status_counts"] == {"missing": 20, "no_tag": 10, "ok": 2575, "unknown_label": 5}
    assert m["parse_failure_rate"] == pytest.approx(35 / 2610)
    assert m["accuracy"] == pytest.approx(2575 / 2610)
    assert sum(row[-1] for row in m["confusion"]["counts"]) == 35


@pytest.mark.parametrize("case", ["unknown_id", "duplicate_id", "malformed_json", "no_output"])
def test_bad_predictions_file_exits_2_with_one_line_and_writes_nothing(case, meld_test, meld_gold, tmp_path, capsys):
    lines = [json.dumps({"index": i, "output": "<emotion>neutral</emotion>"}) for i in meld_gold.indices[:5]]
    bad = {"unknown_id": json.dumps({"index": 999999, "output": "x"}), "duplicate_id": lines[1],
           "malformed_json": '{"index": 7, "output": ', "no_output": json.dumps({"index": 7})}[case]
    preds = tmp_path / "p.jsonl"
    preds.write_text("\n".join([*lines, bad]) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    assert main(["score", "--predictions", str(preds), "--data", str(meld_test), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{preds}:6" in err  # file and line named
    assert not out.exists()


def test_parquet_with_two_gold_labels_is_rejected_naming_the_row(meld_test, tmp_path, capsys):
    frame = pd.read_parquet(meld_test).head(3)
    frame.at[2, "reward_model"] = {"style": "rule", "ground_truth": ["joy", "anger"]}
    bad = tmp_path / "bad.parquet"
    frame.to_parquet(bad)
    preds = write_predictions(tmp_path / "p.jsonl", [(0, "x")])
    assert main(["score", "--predictions", str(preds), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:row 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ report


def fake_run(path: Path, space: str, acc: float, wf1: float, n: int = 100) -> Path:
    metrics = {"label_space": space, "n": n, "accuracy": acc, "weighted_f1": wf1, "macro_f1": wf1 / 2,
               "parse_failure_rate": 0.01}
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def test_report_gives_mean_and_sd_over_two_seeds(tmp_path, capsys):
    a = fake_run(tmp_path / "seed1", "meld", 0.60, 0.50)
    b = fake_run(tmp_path / "seed2", "meld", 0.64, 0.56)
    out = tmp_path / "report.md"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())["meld n=100"]
    assert summary["weighted_f1"]["mean"] == pytest.approx(0.53)
    assert summary["weighted_f1"]["sd"] == pytest.approx(0.0424264, abs=1e-6)  # |0.56-0.50| / sqrt(2)
    text = out.read_text()
    assert "| meld n=100 | 2 | 62.00 ± 2.83 | 53.00 ± 4.24 | 26.50 ± 2.12 | 1.00 ± 0.00 |" in text
    assert f"| {a} | meld | 100 | 60.00 | 50.00 | 25.00 | 1.00 |" in text
    assert text in capsys.readouterr().out


def test_report_never_pools_runs_on_different_test_sets(tmp_path):
    a = fake_run(tmp_path / "full", "meld", 0.60, 0.50)
    b = fake_run(tmp_path / "subset", "meld", 0.10, 0.10, n=20)  # e.g. a --limit 20 run
    c = fake_run(tmp_path / "other", "emorynlp", 0.30, 0.20)
    assert main(["report", str(a), str(b), str(c), "--out", str(tmp_path / "r.md")]) == 0
    summary = json.loads((tmp_path / "r.json").read_text())
    assert set(summary) == {"meld n=100", "meld n=20", "emorynlp n=100"}
    assert summary["meld n=100"]["accuracy"] == {"mean": 0.60, "sd": None}  # one run: no sd


def test_report_on_a_dir_without_metrics_exits_2(tmp_path):
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r.md")]) == 2
    assert not (tmp_path / "r.md").exists()


# ----------------------------------------------------------------------------------- generate/consistency


@pytest.fixture(scope="session")
def tiny_model():
    from selfemo_verl.cpu.assets import tiny_model_dir

    return tiny_model_dir()


def test_generate_on_cpu_writes_a_valid_predictions_file_and_scores_it(tiny_model, meld_test, meld_gold, tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(tiny_model), "--data", str(meld_test), "--out", str(out),
                 "--limit", "20", "--batch-size", "8", "--max-new-tokens", "6", "--backend", "hf"]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(meld_gold.indices[:20])
    assert all(isinstance(r["output"], str) for r in records)
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 20 and m["limit"] == 20 and 0.0 <= m["weighted_f1"] <= 1.0
    assert sum(m["status_counts"].values()) == 20 and "missing" not in m["status_counts"]


@pytest.mark.parametrize("command", ["generate", "consistency"])
def test_missing_model_dir_exits_2_with_one_line_and_writes_nothing(command, meld_test, tmp_path, capsys):
    out = tmp_path / "o"
    assert main([command, "--model", str(tmp_path / "no"), "--data", str(meld_test), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such model" in err
    assert not out.exists()


def test_module_cli_exits_2_on_a_bad_input(meld_test, tmp_path):
    out = tmp_path / "o"
    result = subprocess.run([sys.executable, "-m", "selfemo_verl.eval", "generate", "--model", str(tmp_path / "no"),
                             "--data", str(meld_test), "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no such model" in result.stderr
    assert not out.exists()


def test_hf_generation_left_pads_and_returns_answers_in_input_order(tiny_model, meld_test):
    gen = generate.Generator(tiny_model, {"recognize": 1}, backend="hf", batch_size=4)
    token_of = lambda n: 100 + n % 900  # noqa: E731  an ordinary (non-special) token per prompt length
    gen._model = load_fakes().EchoLengthModel(token_of)  # the fake asserts left padding under a 0 mask
    chats = list(pd.read_parquet(meld_test)["prompt"][:10])
    lengths = [len(ids) for ids in generate._prompt_ids(gen.tokenizer, chats, {})]
    assert len(set(lengths)) >= 5  # reason: telling answers apart needs prompts of different lengths
    assert gen(chats) == [gen.tokenizer.decode([token_of(n)], skip_special_tokens=True) for n in lengths]
    assert gen._model.widths == sorted(gen._model.widths) and len(gen._model.widths) == 3  # sorted batches


def test_consistency_on_cpu_writes_a_valid_report(tiny_model, meld_test, tmp_path):
    out = tmp_path / "con"
    assert main(["consistency", "--model", str(tiny_model), "--data", str(meld_test), "--out", str(out),
                 "--limit", "4", "--max-new-tokens", "6", "--backend", "hf"]) == 0
    report = json.loads((out / "consistency.json").read_text())
    assert report["n"] == 4 and report["tau"] == 1.0 and report["label_space"] == "meld"
    assert 0 <= report["matched"] <= report["n_valid"] <= 4
    assert set(report["parse_failures"]) == {"stated", "reply", "judged"}
    assert set(report["by_emotion"]) == set(MELD)


# ------------------------------------------------------------------------------- token budgets, selection

ANSWERS = {"recognize": "<emotion>neutral</emotion>", "respond": "<emotion>joy</emotion><reply>Great!</reply>",
           "judge": "<emotion>joy</emotion>"}


@pytest.fixture
def spy_generation(monkeypatch):
    """Replace the HF generation of generate.Generator: record (role, max new tokens, n prompts) per call and
    answer each role with a fixed parsable text (the tokenizer and chat template stay real)."""
    calls = []

    def fake_hf(self, prompt_ids, max_new_tokens, desc):
        calls.append((desc, max_new_tokens, len(prompt_ids)))
        return [ANSWERS[desc]] * len(prompt_ids)

    monkeypatch.setattr(generate.Generator, "_hf", fake_hf)
    return calls


def _yaml_budgets(path=generate.TRAINER_YAML) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path).selfemo.agent.max_tokens)


def test_eval_budgets_default_to_the_budgets_training_composes_from_the_yaml():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="selfemo_verl.config", version_base=None):
        training = compose(config_name="selfemo_trainer").selfemo.agent.max_tokens
    assert generate.role_budgets() == dict(training) == _yaml_budgets()
    assert _yaml_budgets()["respond"] != 128  # reason: the old hard-coded eval budget cut the responder short


def test_consistency_uses_the_respond_and_judge_budgets_of_a_changed_yaml(spy_generation, monkeypatch, tiny_model,
                                                                            meld_test, tmp_path):
    text = generate.TRAINER_YAML.read_text()
    assert "      respond: 160\n" in text and "      judge: 64\n" in text  # reason: the copy below edits these
    copy = tmp_path / "selfemo_trainer.yaml"
    copy.write_text(text.replace("      respond: 160\n", "      respond: 177\n").replace("      judge: 64\n",
                                                                                          "      judge: 33\n"))
    monkeypatch.setattr(generate, "TRAINER_YAML", copy)
    out = tmp_path / "con"
    assert main(["consistency", "--model", str(tiny_model), "--data", str(meld_test), "--out", str(out),
                 "--limit", "3", "--backend", "hf"]) == 0
    assert spy_generation == [("respond", 177, 3), ("judge", 33, 3)]
    assert json.loads((out / "consistency.json").read_text())["max_tokens"] == {"respond": 177, "judge": 33}


def test_generate_uses_the_recognize_budget_of_training_overrides_and_config(spy_generation, tiny_model, meld_test,
                                                                             tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("selfemo:\n  agent:\n    max_tokens:\n      recognize: 40\n")
    base = ["generate", "--model", str(tiny_model), "--data", str(meld_test), "--limit", "2", "--backend", "hf"]
    assert main([*base, "--out", str(tmp_path / "a"), "--train-config", str(config)]) == 0
    # reason: overrides come after the config file, the last override of a key wins, other keys are ignored
    assert main([*base, "--out", str(tmp_path / "b"), "--train-config", str(config), "--train-override",
                 "+selfemo.agent.max_tokens.recognize=12", "--train-override", "trainer.save_freq=5",
                 "--train-override", "selfemo.agent.max_tokens.recognize=24"]) == 0
    assert main([*base, "--out", str(tmp_path / "c"), "--train-override", "selfemo.agent.max_tokens.recognize=24",
                 "--max-new-tokens", "7"]) == 0  # reason: the explicit flag overrides every role
    assert [budget for _, budget, _ in spy_generation] == [40, 24, 7]
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["max_tokens"] == {"recognize": 24}


@pytest.mark.parametrize("flags, message", [
    (["--train-override", "selfemo.agent.max_tokens.judge=0"], "selfemo.agent.max_tokens.judge = 0"),
    (["--train-override", "selfemo.agent.max_tokens.respond=lots"], "selfemo.agent.max_tokens.respond = 'lots'"),
    (["--train-config", "/no/such/train.yaml"], "/no/such/train.yaml: no such file"),
])
def test_a_bad_token_budget_exits_2_naming_its_source(flags, message, meld_test, tiny_model, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["consistency", "--model", str(tiny_model), "--data", str(meld_test), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not out.exists()


def test_selection_file_picks_the_model_and_metrics_and_report_name_the_checkpoint(spy_generation, tiny_model,
                                                                                   meld_test, tmp_path):
    chosen = {"round": 1, "step": 20, "path": str(tiny_model), "val_weighted_f1": 0.5123}
    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps({"metric": "val-core/selfemo/weighted_f1/meld", "chosen": chosen}))
    out = tmp_path / "test_generate"
    assert main(["generate", "--selection", str(selection), "--data", str(meld_test), "--out", str(out),
                 "--limit", "2", "--backend", "hf"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checkpoint"] == chosen and metrics["name"] == "round_1/global_step_20"
    assert main(["report", str(out), "--out", str(tmp_path / "report.md")]) == 0
    assert f"- {out}: round 1, global step 20, val weighted-F1 51.23 %, {tiny_model}" in (
        tmp_path / "report.md").read_text()


def test_a_bad_selection_file_exits_2_and_model_and_selection_exclude_each_other(meld_test, tmp_path, capsys):
    bad = tmp_path / "selection.json"
    bad.write_text(json.dumps({"chosen": {"round": 0}}))
    assert main(["generate", "--selection", str(bad), "--data", str(meld_test), "--out", str(tmp_path / "o")]) == 2
    assert "chosen.{round, step, path, val_weighted_f1}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--selection", str(bad), "--model", "m", "--data", str(meld_test), "--out", "o"])


def test_consistency_judge_is_blind_and_matches_by_smoothed_iou(meld_test):
    ScriptedGenerate = load_fakes().ScriptedGenerate
    prefixes = generate._prefixes(pd.read_parquet(meld_test).head(40), 12)[:3]
    responses = ["<emotion>joy</emotion><reply>Great news!</reply>",  # judged joy -> match
                 "<emotion>anger</emotion><reply>Leave me alone.</reply>",  # judged sadness -> no match
                 "<emotion>fear</emotion> no reply tags"]  # reply fails -> not judged, counted as non-match
    judge = ScriptedGenerate(["<emotion>joy</emotion>", "<emotion>sadness</emotion>"])
    turns = generate._judge_turns(judge, prefixes, responses)
    assert len(judge.calls) == 1 and len(judge.calls[0]) == 2  # only the two parsable replies are judged
    shown = judge.calls[0][0][-1]["content"]
    assert "Great news!" in shown and "<emotion>joy" not in shown  # the stated emotion is hidden
    s = generate.consistency_summary(turns, 1.0, "meld")
    assert (s["n"], s["matched"], s["rate"], s["n_valid"], s["rate_valid"]) == (3, 1, 1 / 3, 2, 0.5)
    assert s["parse_failures"] == {"stated": 0, "reply": 1, "judged": 1}
    assert s["by_emotion"]["fear"] == {"n": 1, "matched": 0, "rate": 0.0}
    assert s["by_emotion"]["disgust"] == {"n": 0, "matched": 0, "rate": None}


def test_prefixes_skip_rows_without_a_next_speaker(meld_test):
    frame = pd.read_parquet(meld_test)
    kept = generate._prefixes(frame, 12)
    assert len(kept) == sum(bool(e["next_speaker"]) for e in frame["extra_info"]) < len(frame)
    assert all(p["window"] and p["next_speaker"] for p in kept)


def test_eval_prompts_show_the_training_window_to_every_role(meld_test):
    # reason (docs/method.md §6.3): one window for all roles; evaluation cuts the dialogue where training does
    frame = pd.read_parquet(meld_test).head(60)
    long_rows = [i for i, e in enumerate(frame["extra_info"]) if len(e["window"]) > 3 and e["next_speaker"]]
    assert long_rows, "the test needs rows with more than 3 turns of context"
    window = generate.agent_window(overrides=["selfemo.agent.window=3", "trainer.save_freq=5"])
    assert window == 3 and generate.agent_window() == 12  # reason: the YAML default
    chats = generate.recognize_chats(frame, window)
    for i in long_rows:
        turns = list(frame["extra_info"][i]["window"])[-3:]
        dialogue = "\n".join(f"{t['speaker']}: {t['text']}" for t in turns)
        user = chats[i][-1]["content"]
        assert f"Dialogue:\n{dialogue}\n\n" in user  # reason: exactly the last 3 turns, nothing before them
    prefixes = generate._prefixes(frame, window)
    assert all(len(p["window"]) <= 3 for p in prefixes) and any(len(p["window"]) == 3 for p in prefixes)


# ---------------------------------------------------------------------------------------------- wiring


def test_majority_baseline_is_the_most_frequent_gold_of_the_scored_rows():
    from selfemo_verl.eval.metrics import majority_baseline

    golds = ["neutral", "joy", "neutral", "anger"]
    m = majority_baseline(golds, ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"])
    assert m["majority_class"] == "neutral" and m["majority_accuracy"] == 0.5
    # reason: F1(neutral) = 2 * (2/4 * 1) / (2/4 + 1) = 2/3 with weight 2/4; the other classes score 0
    assert m["majority_weighted_f1"] == pytest.approx(0.5 * 2 / 3)
    tie = majority_baseline(["joy", "anger"], ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"])
    assert tie["majority_class"] == "joy"  # reason: a tie goes to the label that comes first in the label space


def test_corpus_metrics_counts_classes_predicted_without_parse_failures():
    m = corpus_metrics(["<emotion>joy</emotion>", "nonsense", "<emotion>anger</emotion>", "<emotion>joy</emotion>"],
                       ["joy", "joy", "anger", "fear"], "meld")
    assert m["classes_predicted"] == 2  # reason: joy and anger; the parse failure is not a class

"""selfemo_verl.reward_fn.compute_score: the verl reward-function contract, fuzzed, run through verl's reward loop."""

import doctest
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import selfemo_verl.reward_fn as reward_mod
from selfemo_verl.labels import LABEL_SPACES
from selfemo_verl.reward_fn import compute_score

KEYS = {"score", "r_rec", "r_con", "r_und", "has_con", "has_und", "parse_ok", "pred_mask", "n_pred", "gold_mask",
        "infra_error"}
MAX_SCORE = 1.0 + 0.5 + 0.25  # default weights, every term in [0, 1]


def _selfemo(pred=("joy",), stated=("anger",), judged=("anger",), **extra):
    d = {"label_space": "meld", "pred": list(pred), "pred_status": "ok", "stated": list(stated),
         "stated_status": "ok", "reply": "How dare you!", "judged": list(judged), "judged_status": "ok",
         "judge_agreement": 1.0}
    d.update(extra)
    return d


def _check_contract(result):
    assert set(result) == KEYS
    for key, value in result.items():
        assert isinstance(value, (int, float)) and not isinstance(value, bool), key
        assert math.isfinite(value), key
    assert 0.0 <= result["score"] <= MAX_SCORE + 1e-9


def test_docstring_examples_hold():
    failures, tried = doctest.testmod(reward_mod)
    assert tried > 0 and failures == 0


@pytest.mark.parametrize(
    "data_source, solution, gt, extra, expected",
    [
        ("selfemo/meld", "<emotion>joy</emotion>", ["joy"], None, 1.0),  # reason: single-turn hit
        ("selfemo/meld", "Hmm <emotion>anger</emotion> no: <emotion>Joyful</emotion>", ["joy"], {}, 1.0),
        # reason: last tag wins, synonym mapped
        ("selfemo/meld", "she is angry", ["anger"], {}, 0.0),  # reason: prose without a tag is invalid
        ("selfemo/meld", "<emotion>joy</emotion>", np.array(["joy"]), {}, 1.0),  # reason: parquet numpy gold
        ("selfemo/meld", "<emotion>joy</emotion>", "joy", {}, 1.0),  # reason: string gold
        ("selfemo/emorynlp", "<emotion>joy</emotion>", ["Joyful"], {}, 1.0),  # reason: emorynlp synonym table
        ("whatever", "<emotion>joy</emotion>", ["Joyful"], {"label_space": "emorynlp"}, 1.0),
        # reason: extra_info label_space beats data_source
        ("openai/gsm8k", "<emotion>joy</emotion>", ["joy"], {}, 0.0),  # reason: no label space -> invalid
    ],
)
def test_single_turn_scores(data_source, solution, gt, extra, expected):
    result = compute_score(data_source, solution, gt, extra)
    _check_contract(result)
    assert result["score"] == pytest.approx(expected)
    assert result["has_con"] == result["has_und"] == 0.0


def test_self_play_fields_are_used_instead_of_the_concatenated_response():
    # The response text ends with the responder's stated emotion; parsing it would score "anger" against gold joy.
    text = "<emotion>joy</emotion> ... <emotion>anger</emotion><reply>How dare you!</reply>"
    result = compute_score("selfemo/meld", text, ["joy"], {"selfemo": _selfemo(), "next_gold": ["anger"]})
    _check_contract(result)
    assert (result["r_rec"], result["r_con"], result["r_und"]) == (1.0, 1.0, 1.0)
    assert result["score"] == pytest.approx(MAX_SCORE)
    assert result["pred_mask"] == 1 << LABEL_SPACES["meld"].index("joy")
    assert (result["n_pred"], result["has_con"], result["has_und"]) == (1, 1.0, 1.0)


def test_self_play_failures_score_r_invalid_per_term():
    sp = _selfemo(stated_status="no_tag", later_turns=[{"stated": ["joy"], "stated_status": "ok",
                                                         "judged": ["joy"], "judged_status": "ok"}])
    result = compute_score("selfemo/meld", "", ["joy"], {"selfemo": sp, "next_gold": ["anger"]}, r_invalid=-1.0)
    assert result["r_con"] == pytest.approx((-1.0 + 1.0) / 2)  # reason: mean of a failed and a perfect turn
    assert result["r_und"] == -1.0  # reason: the first turn's stated emotion did not parse
    missing = compute_score("selfemo/meld", "<emotion>joy</emotion>", ["joy"], {"selfemo": {"label_space": "meld"}})
    assert (missing["parse_ok"], missing["score"], missing["has_con"]) == (0.0, 0.0, 0.0)  # reason: no pred given


def test_selfemo_value_that_is_not_a_dict_scores_as_missing_recognition():
    result = compute_score("selfemo/meld", "<emotion>joy</emotion>", ["joy"], {"selfemo": ["junk"]})
    _check_contract(result)
    assert (result["score"], result["parse_ok"]) == (0.0, 0.0)


def test_knobs_arrive_as_kwargs():
    extra = {"selfemo": _selfemo(pred=("excited",)), "next_gold": []}
    plain = compute_score("selfemo/iemocap", "", ["happy"], {**extra, "label_space": "iemocap"})
    smooth = compute_score("selfemo/iemocap", "", ["happy"], {**extra, "label_space": "iemocap"}, beta=0.3)
    assert smooth["r_rec"] > plain["r_rec"]  # reason: excited is a near miss of happy
    weighted = compute_score("selfemo/meld", "", ["joy"], {"selfemo": _selfemo()}, w_rec=2.0, w_con=0.0)
    assert weighted["score"] == pytest.approx(2.0)


def test_unknown_knob_is_a_config_error_but_verl_kwargs_are_accepted():
    with pytest.raises(ValueError, match="bata"):
        compute_score("selfemo/meld", "", ["joy"], {}, bata=0.3)
    _check_contract(compute_score("selfemo/meld", "", ["joy"], {}, reward_router_address=None,
                                  reward_model_tokenizer=None))


meld_words = st.lists(st.sampled_from(list(LABEL_SPACES["meld"]) + ["Joy", "xx", ""]), max_size=4)
arrays = st.one_of(  # parquet round-trips turn lists into numpy arrays; 0-d and 2-d ones are not label lists
    meld_words.map(np.array), st.text(max_size=5).map(np.array), meld_words.map(lambda w: np.array([w, w])),
)
labels_or_junk = st.one_of(
    meld_words, arrays, st.text(max_size=10), st.none(), st.integers(), st.floats(), st.binary(max_size=5),
)
junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.binary(max_size=6) | arrays,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8,
)
selfemo_like = st.fixed_dictionaries(
    {},
    optional={
        "label_space": st.sampled_from(["meld", "MELD", "iemocap", "nope"]) | junk,
        "pred": labels_or_junk, "pred_status": st.sampled_from(["ok", "no_tag", "missing"]) | junk,
        "stated": labels_or_junk, "stated_status": st.sampled_from(["ok", "empty"]) | junk,
        "judged": labels_or_junk, "judged_status": st.sampled_from(["ok", "too_many"]) | junk,
        "later_turns": st.lists(st.dictionaries(st.sampled_from(["stated", "stated_status", "judged",
                                                                 "judged_status"]), labels_or_junk), max_size=2)
        | junk,
    },
)
extra_infos = st.one_of(
    junk,
    st.fixed_dictionaries({}, optional={"selfemo": selfemo_like | junk, "next_gold": labels_or_junk,
                                        "label_space": st.sampled_from(["meld", "emorynlp"]) | junk}),
)
solutions = st.one_of(
    st.text(max_size=200),
    st.builds(lambda a, b: f"{a}<emotion>{b}</emotion>", st.text(max_size=30), st.text(max_size=30)),
    st.binary(max_size=50), st.none(),
)


@given(st.sampled_from(["selfemo/meld", "selfemo/iemocap", "selfemo/emorynlp", "x", ""]) | junk,
       solutions, labels_or_junk, extra_infos)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_compute_score_is_total_on_arbitrary_inputs(data_source, solution, gt, extra):
    _check_contract(compute_score(data_source, solution, gt, extra))


@given(solutions, extra_infos)
@settings(max_examples=100, deadline=None)
def test_compute_score_is_total_with_semantic_smoothing(solution, extra):
    _check_contract(compute_score("selfemo/iemocap", solution, ["happy"], extra, beta=0.3))


def test_reward_file_re_exports_compute_score(repo_root):
    from verl.utils.import_utils import load_extern_object

    by_file = load_extern_object(str(repo_root / "reward_fns" / "selfemo_reward.py"), "compute_score")
    by_pkg = load_extern_object("pkg://selfemo_verl.reward_fn", "compute_score")
    assert by_file is compute_score and by_pkg is compute_score


@pytest.fixture(scope="module")
def tokenizer():
    # --import-mode=importlib keeps tests/ off sys.path, so load tests/fakes.py by file.
    spec = importlib.util.spec_from_file_location("selfemo_test_fakes", Path(__file__).with_name("fakes.py"))
    fakes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fakes)
    return fakes.tiny_bpe_tokenizer()


def _trajectory(tokenizer, response: str, extra_info: dict, tool_extra_fields: dict, gt):
    """One trajectory DataProto shaped like verl 0.9.1's AgentLoopWorker._compute_score builds it."""
    import torch
    from tensordict import TensorDict
    from verl import DataProto

    prompt = torch.tensor([tokenizer.encode("Speaker A: I won!")])
    resp = tokenizer.encode(response)
    responses = torch.tensor([resp + [tokenizer.pad_token_id] * 3])  # right padding, masked out
    attention = torch.cat([torch.ones_like(prompt), torch.tensor([[1] * len(resp) + [0] * 3])], dim=1)
    batch = TensorDict(
        {"prompts": prompt, "responses": responses, "attention_mask": attention,
         "input_ids": torch.cat([prompt, responses], dim=1), "position_ids": torch.cumsum(attention, dim=1) - 1},
        batch_size=1,
    )
    non_tensor = {
        "data_source": np.array(["selfemo/meld"]),
        "reward_model": np.array([{"style": "rule", "ground_truth": gt}], dtype=object),
        "extra_info": np.array([extra_info], dtype=object),
        "tool_extra_fields": np.array([tool_extra_fields], dtype=object),
        "__num_turns__": np.array([3]),
    }
    return DataProto(batch=batch, non_tensor_batch=non_tensor)


@pytest.mark.parametrize("path", ["reward_fns/selfemo_reward.py", "pkg://selfemo_verl.reward_fn"])
def test_compute_score_runs_in_verls_naive_reward_loop(path, tokenizer, repo_root, monkeypatch):
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import load_reward_manager

    monkeypatch.chdir(repo_root)  # verl resolves a relative reward file against the working directory
    config = OmegaConf.create({"reward": {
        "custom_reward_function": {"path": path, "name": "compute_score", "reward_kwargs": {"w_und": 1.0}},
        "reward_manager": {"source": "register", "name": "naive"},
    }})
    rm = load_reward_manager(config, tokenizer)
    assert type(rm).__name__ == "NaiveRewardManager"
    # Self-play: the agent loop's extra_fields reach compute_score through extra_info.
    gt = np.array(["joy"], dtype=object)
    data = _trajectory(tokenizer, "<emotion>joy</emotion> <emotion>sadness</emotion><reply>Oh no.</reply>",
                       {"index": 0, "next_gold": ["anger"], "label_space": "meld"},
                       {"selfemo": _selfemo(stated=("sadness",), judged=("sadness",))}, gt)
    out = rm.loop.run_until_complete(rm.run_single(data))
    info = out["reward_extra_info"]
    _check_contract(info)
    assert out["reward_score"] == info["score"] == pytest.approx(1.0 + 0.5 + 1.0 * 0.1 / 2.1)  # w_und=1 via kwargs
    assert (info["r_rec"], info["r_con"], info["has_und"]) == (1.0, 1.0, 1.0)
    # Single-turn: no selfemo dict, so the decoded response text is parsed.
    data = _trajectory(tokenizer, "Thinking... <emotion>surprise, joy</emotion>", {"index": 1}, {}, gt)
    info = rm.loop.run_until_complete(rm.run_single(data))["reward_extra_info"]
    assert info["score"] == pytest.approx(1.1 / 2.1) and info["n_pred"] == 2


def test_gold_mask_carries_the_gold_labels_for_corpus_metrics():
    # reason: the trainer's validation step computes weighted-F1 from pred_mask vs gold_mask
    from selfemo_verl.rewards import mask_to_labels

    result = compute_score("selfemo/meld", "<emotion>anger</emotion>", ["joy"])
    assert mask_to_labels(result["gold_mask"], "meld") == {"joy"}
    assert mask_to_labels(result["pred_mask"], "meld") == {"anger"}
    assert compute_score("unknown/source", "<emotion>joy</emotion>", ["joy"])["gold_mask"] == 0


def test_judge_server_failure_is_never_charged_to_the_policy():
    import torch

    from selfemo_verl.advantage import self_grpo_advantage

    base = {"pred": ["joy"], "pred_status": "ok", "stated": ["anger"], "stated_status": "ok"}
    wrong = compute_score("selfemo/meld", "", ["joy"], {"selfemo": {**base, "judged": ["fear"], "judged_status": "ok"},
                                                        "next_gold": ["anger"]})
    infra = compute_score("selfemo/meld", "", ["joy"], {"selfemo": {**base, "judged": [], "judged_status": "judge_error",
                                                                    "infra_error": 1}, "next_gold": ["anger"]})
    # reason: the judge answered "fear" to "anger": r_con = 0.1/2.1, R = 1 + 0.5 * 0.048 + 0.25 = 1.274
    assert wrong["score"] == pytest.approx(1.0 + 0.5 * 0.1 / 2.1 + 0.25) and wrong["infra_error"] == 0.0
    # reason: the judge never answered: no r_con, R = 1.25 < 1.274 - scored alone it would look like the policy's
    # failure, so the episode carries infra_error and SELF-GRPO leaves it out of training
    assert (infra["has_con"], infra["r_und"], infra["infra_error"]) == (0.0, 1.0, 1.0)
    assert infra["score"] == pytest.approx(1.25) and infra["score"] < wrong["score"]
    scores = torch.tensor([[wrong["score"]], [infra["score"]], [wrong["score"] - 0.5]])
    member = [info["infra_error"] == 0.0 for info in (wrong, infra, wrong)]
    charged, _ = self_grpo_advantage(scores, torch.ones(3, 1), ["g"] * 3)
    fair, _ = self_grpo_advantage(scores, torch.ones(3, 1), ["g"] * 3, None, member)
    assert charged[1, 0] != 0.0  # reason: without the flag the infrastructure failure would move the policy
    assert fair[1, 0] == 0.0 and fair[0, 0] > 0 > fair[2, 0]


def test_an_unjudged_reply_is_the_policys_fault():
    base = {"pred": ["joy"], "pred_status": "ok", "stated": ["anger"], "stated_status": "ok", "judged": []}
    # reason: the responder wrote no parsable reply, so nothing was judged: r_con = r_invalid, no infra flag
    model = compute_score("selfemo/meld", "", ["joy"], {"selfemo": {**base, "judged_status": "missing"},
                                                        "next_gold": ["anger"]}, r_invalid=0.0)
    assert (model["has_con"], model["r_con"], model["infra_error"]) == (1.0, 0.0, 0.0)
    assert model["score"] == pytest.approx(1.25)


@pytest.mark.parametrize("flag", [None, 0, "1", [1], 2, float("nan")])
def test_only_an_exact_infra_flag_marks_an_infrastructure_failure(flag):
    rec = {"pred": ["joy"], "pred_status": "ok", "infra_error": flag}
    assert compute_score("selfemo/meld", "", ["joy"], {"selfemo": rec})["infra_error"] == 0.0

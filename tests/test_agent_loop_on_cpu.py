"""The self-play AgentLoop (selfemo_verl/agent_loop.py) on verl 0.9.1, driven by fake rollout servers.

Adapter contracts with fakes (tests/fakes.py): the trained sequence's exact token/mask layout with the real Qwen
vocabulary and verl's Qwen continuous-token builder, the blind judge kept out of the sequence, the record the
reward reads, one dialogue window for all three roles, the trained-role temperature rule, and every failure
mode ending in a valid AgentLoopOutput whose record tells infrastructure failures (`infra_error`) from the
policy's own. Wiring: a parquet row's `agent_name` selects the loop inside verl's own AgentLoopWorker, whose
streaming reward path scores it with our reward. (verl's v1 post-processing and metric casts on failed episodes:
tests/test_agent_loop_verl_postprocess_on_cpu.py.)
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import pytest
from omegaconf import OmegaConf

from selfemo_verl.agent_loop import RecognizeAgentLoop, SelfPlayAgentLoop, check_role_temperatures
from selfemo_verl.labels import parse_emotions
from selfemo_verl.prompts import format_dialogue, recognize_messages, role_switch_message
from selfemo_verl.reward_fn import compute_score
from verl.experimental.agent_loop.agent_loop import DictConfigWrap
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.workers.rollout.replica import TokenOutput

# --import-mode=importlib keeps tests/ off sys.path, so load tests/fakes.py by file.
_spec = importlib.util.spec_from_file_location("selfemo_agent_fakes", Path(__file__).with_name("fakes.py"))
fakes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fakes)
HFModelServer, InlineRewardWorker = fakes.HFModelServer, fakes.InlineRewardWorker
ScriptedServer, qwen_tokenizer = fakes.ScriptedServer, fakes.qwen_tokenizer

REPO = Path(__file__).resolve().parents[1]
YAML = REPO / "selfemo_verl" / "config" / "selfemo_trainer.yaml"
QWEN_TOK_DIR = REPO / ".cache" / "selfemo" / "qwen-tok"
WINDOW = [
    {"speaker": "Ross", "text": "I got the job at the museum."},
    {"speaker": "Rachel", "text": "Oh my God, that is amazing!"},
]
ROW = {"window": WINDOW, "label_space": "meld", "next_speaker": "Ross", "next_gold": ["joy"], "index": 3}
STEP = 5  # the trainer step verl's v1 worker passes to run() as `global_steps`
SERVER_STEPS = 7  # the weight version ScriptedServer reports (its default)
RECOGNIZE = "<emotion>joy</emotion>"
RESPOND = "<emotion>surprise</emotion><reply>I know, I can't believe it!</reply>"
JUDGE = "<emotion>surprise</emotion>"


@pytest.fixture(scope="session")
def tok():
    return qwen_tokenizer(QWEN_TOK_DIR)


def trainer_config(response_length=512, prompt_length=1024, rollout_temperature=1.0, **agent):
    """verl's keys the loop reads + `selfemo.agent` from the project YAML with `agent` overrides."""
    knobs = OmegaConf.merge(OmegaConf.load(YAML).selfemo.agent, agent)
    rollout = {"prompt_length": prompt_length, "response_length": response_length,
               "temperature": rollout_temperature}
    return OmegaConf.create({
        "actor_rollout_ref": {"rollout": rollout},
        "data": {"apply_chat_template_kwargs": {}},
        "selfemo": {"agent": knobs},
    })


def make_loop(tok, server, cls=SelfPlayAgentLoop, config=None):
    config = config if config is not None else trainer_config()
    return cls(trainer_config=DictConfigWrap(config), server_manager=server, tokenizer=tok, processor=None,
               dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data), hf_model_type="qwen3")


async def run_episode(loop, row=ROW, params=None, raw_prompt=None):
    """One episode with the kwargs verl 0.9.1's v1 worker passes (`global_steps` = STEP among them)."""
    params = {"temperature": 1.0, "top_p": 1.0, "logprobs": True} if params is None else params
    raw_prompt = recognize_messages(WINDOW, "meld") if raw_prompt is None else raw_prompt
    return await loop.run(params, raw_prompt=raw_prompt, extra_info=dict(row), data_source="selfemo/meld",
                          index=row["index"], global_steps=STEP)


def assert_valid(out, response_length):
    """What verl's post-processing needs from any episode, failed or not."""
    n = len(out.response_ids)
    assert 1 <= n <= response_length
    assert len(out.response_mask) == n
    assert out.response_logprobs is None or len(out.response_logprobs) == n
    assert set(out.response_mask) <= {0, 1}
    assert out.prompt_ids and out.metrics is not None
    assert isinstance(out.extra_fields["selfemo"], dict)


def segments(mask):
    """Run-length of a mask: [1,1,0,1] -> [(1, 2), (0, 1), (1, 1)]."""
    runs = []
    for m in mask:
        if runs and runs[-1][0] == m:
            runs[-1][1] += 1
        else:
            runs.append([m, 1])
    return [tuple(r) for r in runs]


# ---------------------------------------------------------------- layout of the trained sequence (real Qwen vocab)

async def test_trained_sequence_is_recognize_then_switch_then_respond_with_mask_1_0_1(tok):
    server = ScriptedServer(tok, trained=[RECOGNIZE, RESPOND], judge=[JUDGE + " JUDGE-ONLY"])
    out = await run_episode(make_loop(tok, server))
    im_end = "<|im_end|>"
    switch = role_switch_message("Ross", "meld")["content"]
    expected = f"{RECOGNIZE}{im_end}\n<|im_start|>user\n{switch}{im_end}\n<|im_start|>assistant\n{RESPOND}{im_end}"
    assert tok.decode(out.response_ids) == expected
    n_rec, n_resp = len(server.encode_answer(RECOGNIZE)), len(server.encode_answer(RESPOND))
    n_switch = len(out.response_ids) - n_rec - n_resp
    assert out.response_mask == [1] * n_rec + [0] * n_switch + [1] * n_resp
    # logprobs: the server's -0.5 on generated tokens, 0.0 on the injected role switch
    assert out.response_logprobs == [-0.5] * n_rec + [0.0] * n_switch + [-0.5] * n_resp
    assert "JUDGE-ONLY" not in tok.decode(out.prompt_ids + out.response_ids)


async def test_judge_runs_on_its_own_prompt_and_request_id_and_never_enters_the_sequence(tok):
    server = ScriptedServer(tok, trained=[RECOGNIZE, RESPOND], judge=[JUDGE])
    out = await run_episode(make_loop(tok, server))
    trained = [c for c in server.calls if "-judge" not in c[0]]
    judge = [c for c in server.calls if "-judge" in c[0]]
    assert len(trained) == 2 and len(judge) == 1
    assert trained[0][0] == trained[1][0]  # one request id for the trained sequence (prefix-cache reuse)
    assert judge[0][0] != trained[0][0]
    judge_prompt = tok.decode(judge[0][1])
    assert "I can't believe it!" in judge_prompt  # the reply is shown ...
    assert "<emotion>surprise</emotion>" not in judge_prompt  # ... but not the stated emotion
    full = out.prompt_ids + out.response_ids
    assert full[: len(judge[0][1])] != judge[0][1]  # the judge prompt is not a prefix of the trained sequence
    assert judge[0][3] == server.encode_answer(JUDGE)  # its answer was generated and dropped


async def test_each_trained_call_extends_the_previous_prompt_and_answer_without_re_encoding(tok):
    server = ScriptedServer(tok, trained=[RECOGNIZE, RESPOND])
    out = await run_episode(make_loop(tok, server))
    (_, p1, _, a1), (_, p2, _, a2) = [c for c in server.calls if "-judge" not in c[0]]
    assert p2[: len(p1) + len(a1)] == p1 + a1
    assert out.prompt_ids == p1 and out.prompt_ids + out.response_ids == p2 + a2


async def test_record_carries_the_parsed_roles_the_reward_reads(tok):
    server = ScriptedServer(tok, trained=[RECOGNIZE, RESPOND], judge=[JUDGE])
    out = await run_episode(make_loop(tok, server))
    rec = out.extra_fields["selfemo"]
    assert (rec["pred"], rec["pred_status"], rec["stated"], rec["stated_status"]) == (["joy"], "ok", ["surprise"], "ok")
    assert (rec["reply"], rec["reply_speaker"], rec["judged"], rec["judge_agreement"]) == (
        "I know, I can't believe it!", "Ross", ["surprise"], 1.0)
    assert rec["later_turns"] == [] and rec["error"] is None and rec["label_space"] == "meld"
    assert out.extra_fields["turn_scores"] == [] and out.extra_fields["tool_rewards"] == []
    # what verl's naive reward manager does: extra_info.update(extra_fields)
    score = compute_score("selfemo/meld", "ignored", ["joy"], {**ROW, **out.extra_fields})
    # reason: r_rec = 1 (joy = joy), r_con = 1 (judged = stated), r_und = sIoU({surprise}, {joy}) = 0.1/2.1
    assert score["r_rec"] == 1.0 and score["r_con"] == 1.0
    assert score["r_und"] == pytest.approx(0.1 / 2.1)


async def test_judge_majority_set_and_agreement_over_k_samples(tok):
    server = ScriptedServer(tok, trained=[RECOGNIZE, RESPOND],
                            judge=["<emotion>joy</emotion>", "<emotion>sadness</emotion>", "<emotion>joy</emotion>"])
    out = await run_episode(make_loop(tok, server, config=trainer_config(judge_samples=3)))
    rec = out.extra_fields["selfemo"]
    assert rec["judged"] == ["joy"] and rec["judge_agreement"] == pytest.approx(2 / 3)
    assert len({c[0] for c in server.calls if "-judge" in c[0]}) == 3


async def test_two_self_play_turns_alternate_speakers_and_judge_the_extended_dialogue(tok):
    second = "<emotion>joy</emotion><reply>Congratulations, Ross!</reply>"
    server = ScriptedServer(tok, trained=[RECOGNIZE, RESPOND, second], judge=[JUDGE, "<emotion>joy</emotion>"])
    out = await run_episode(make_loop(tok, server, config=trainer_config(self_play_turns=2)))
    assert [m for m, _ in segments(out.response_mask)] == [1, 0, 1, 0, 1]
    assert "Now reply as Rachel" in tok.decode(out.response_ids)  # turn 2: the other speaker answers
    rec = out.extra_fields["selfemo"]
    assert rec["later_turns"][0]["reply_speaker"] == "Rachel"
    assert rec["later_turns"][0]["stated"] == ["joy"] and rec["later_turns"][0]["judged"] == ["joy"]
    judge_prompts = [tok.decode(c[1]) for c in server.calls if "-judge" in c[0]]
    assert "Ross: I know, I can't believe it!" in judge_prompts[1]  # turn 1's reply is context for turn 2


async def test_role_max_tokens_and_judge_temperature_reach_the_server_and_greedy_stays_greedy(tok):
    config = trainer_config(max_tokens={"recognize": 11, "respond": 22, "judge": 33},
                            temperature={"recognize": None, "respond": 1.0, "judge": 0.3})
    server = ScriptedServer(tok, trained=[RECOGNIZE, RESPOND], judge=[JUDGE])
    await run_episode(make_loop(tok, server, config=config))
    params = [c[2] for c in server.calls]
    assert [p["max_tokens"] for p in params] == [11, 22, 33]
    assert [p["temperature"] for p in params] == [1.0, 1.0, 0.3]  # trained: the rollout's; judge: its own
    assert params[2]["logprobs"] is False
    greedy = ScriptedServer(tok, trained=[RECOGNIZE, RESPOND], judge=[JUDGE])
    await run_episode(make_loop(tok, greedy, config=config), params={"temperature": 0, "logprobs": False})
    assert [c[2]["temperature"] for c in greedy.calls] == [0, 0, 0]
    sampled_val = ScriptedServer(tok, trained=[RECOGNIZE, RESPOND], judge=[JUDGE])
    await run_episode(make_loop(tok, sampled_val, config=config), params={"temperature": 0.6, "logprobs": False})
    # reason: trained roles keep verl's temperature (val_kwargs here), never the config's copy of the rollout's
    assert [c[2]["temperature"] for c in sampled_val.calls] == [0.6, 0.6, 0.3]


@pytest.mark.parametrize("role", ["recognize", "respond"])
def test_trained_role_temperature_off_the_rollout_temperature_is_rejected(tok, role):
    config = trainer_config(rollout_temperature=1.0, temperature={role: 0.7})
    message = rf"selfemo.agent.temperature.{role}=0.7 differs from actor_rollout_ref.rollout.temperature=1.0"
    with pytest.raises(ValueError, match=message):
        check_role_temperatures(config)  # the start-up check
    with pytest.raises(ValueError, match=message):
        make_loop(tok, ScriptedServer(tok), config=config)  # agent_knobs


def test_judge_temperature_may_differ_and_null_or_equal_trained_temperatures_pass(tok):
    config = trainer_config(rollout_temperature=0.8, temperature={"recognize": None, "respond": 0.8, "judge": 0.2})
    check_role_temperatures(config)
    make_loop(tok, ScriptedServer(tok), config=config)
    check_role_temperatures(OmegaConf.load(YAML))  # reason: the YAML's nulls need no rollout temperature


# ---------------------------------------------------------------- one dialogue window for all three roles

LONG_WINDOW = [{"speaker": s, "text": f"turn {i} text"} for i, s in enumerate(["Ross", "Rachel", "Joey", "Monica"])]


async def test_window_knob_cuts_the_dialogue_alike_for_recognizer_responder_and_judge(tok):
    server = ScriptedServer(tok, trained=[RECOGNIZE, RESPOND], judge=[JUDGE])
    row = {**ROW, "window": LONG_WINDOW, "next_speaker": "Ross"}
    # the parquet's pre-rendered prompt shows all 4 turns (data prep's window); the knob says 2
    await run_episode(make_loop(tok, server, config=trainer_config(window=2)), row=row,
                      raw_prompt=recognize_messages(LONG_WINDOW, "meld"))
    (_, recognize, _, _), (_, respond, _, _), (_, judge, _, _) = server.calls
    last_two = f"Dialogue:\n{format_dialogue(LONG_WINDOW[2:])}\n"
    reply = "Ross: I know, I can't believe it!"
    for prompt, shown in ((recognize, last_two + "\n"), (respond, last_two + "\n"), (judge, last_two + reply)):
        text = tok.decode(prompt)
        assert shown in text and text.count("Dialogue:") == 1  # the responder continues the same sequence
        assert "turn 0 text" not in text and "turn 1 text" not in text
    assert "What emotion(s) does Monica express" in tok.decode(recognize)


async def test_recognize_loop_uses_the_same_window_knob(tok):
    server = ScriptedServer(tok, trained=[RECOGNIZE])
    row = {**ROW, "window": LONG_WINDOW}
    await run_episode(make_loop(tok, server, cls=RecognizeAgentLoop, config=trainer_config(window=2)), row=row,
                      raw_prompt=recognize_messages(LONG_WINDOW, "meld"))
    text = tok.decode(server.calls[0][1])
    assert f"Dialogue:\n{format_dialogue(LONG_WINDOW[2:])}\n\n" in text and "turn 1 text" not in text


async def test_recognize_loop_runs_step_1_only_with_the_same_record_shape(tok):
    server = ScriptedServer(tok, trained=[RECOGNIZE, RESPOND])
    out = await run_episode(make_loop(tok, server, cls=RecognizeAgentLoop))
    assert len(server.calls) == 1 and out.response_mask == [1] * len(server.encode_answer(RECOGNIZE))
    rec = out.extra_fields["selfemo"]
    assert rec["mode"] == "recognize" and rec["pred"] == ["joy"] and "stated_status" not in rec
    assert compute_score("selfemo/meld", "", ["joy"], {**ROW, **out.extra_fields})["has_con"] == 0.0


def test_missing_selfemo_section_is_a_clear_config_error(tok):
    config = trainer_config()
    del config["selfemo"]
    with pytest.raises(ValueError, match="selfemo.agent"):
        make_loop(tok, ScriptedServer(tok), config=config)


async def test_recognize_loop_needs_no_dialogue_window_and_then_uses_the_rows_prompt(tok):
    server = ScriptedServer(tok, trained=[RECOGNIZE])
    loop = make_loop(tok, server, cls=RecognizeAgentLoop, config=trainer_config(window=1))
    out = await run_episode(loop, row={**ROW, "window": None, "next_speaker": None})
    assert out.extra_fields["selfemo"]["pred"] == ["joy"]
    # reason: single-turn rows have no window to cut: the pre-rendered prompt (both turns) is sent as is
    assert f"Dialogue:\n{format_dialogue(WINDOW)}\n\n" in tok.decode(server.calls[0][1])


async def test_self_play_row_without_window_raises_naming_the_row(tok):
    loop = make_loop(tok, ScriptedServer(tok, trained=[RECOGNIZE]))
    with pytest.raises(ValueError, match="window.*index=3"):
        await run_episode(loop, row={**ROW, "window": []})


async def test_malformed_row_raises_naming_the_row(tok):
    loop = make_loop(tok, ScriptedServer(tok, trained=[RECOGNIZE]))
    with pytest.raises(ValueError, match="index=3"):
        await run_episode(loop, row={**ROW, "label_space": "klingon"})


# ---------------------------------------------------------------- robustness: every failure returns a valid output

ABORTED_EMPTY = TokenOutput(token_ids=[], log_probs=None, stop_reason="aborted", extra_fields={"global_steps": 7})
ABORTED_PARTIAL = TokenOutput(token_ids=[27, 1, 2], log_probs=[-0.1] * 3, stop_reason="aborted",
                              extra_fields={"global_steps": 7})


def _not_a_token_output(ids, params):
    # passes the real client (it has extra_fields) but is no TokenOutput
    return SimpleNamespace(token_ids=[5, 6], log_probs=[0.0, 0.0], stop_reason="completed", extra_fields={})


FAILURES = {
    # name: (trained script, judge script, expected error prefix or None, expected pred_status, infra_error)
    "server_raises_at_recognize": ([RuntimeError("replica died")], [JUDGE], "recognize: server error", "missing", 1),
    "server_times_out_at_recognize": ([asyncio.TimeoutError()], [JUDGE], "recognize: server error TimeoutError",
                                      "missing", 1),
    "every_call_raises": ([RuntimeError("down")], [RuntimeError("down")], "recognize: server error", "missing", 1),
    "server_raises_at_respond": ([RECOGNIZE, RuntimeError("boom")], [JUDGE], "respond: server error", "ok", 1),
    "server_raises_at_judge": ([RECOGNIZE, RESPOND], [RuntimeError("judge down")], "judge: 1/1 samples failed",
                               "ok", 1),
    "aborted_at_recognize": ([ABORTED_EMPTY], [JUDGE], "recognize: server aborted", "missing", 1),
    "aborted_with_tokens_at_respond": ([RECOGNIZE, ABORTED_PARTIAL], [JUDGE], "respond: server aborted", "ok", 1),
    "aborted_judge": ([RECOGNIZE, RESPOND], [ABORTED_EMPTY], "judge: 1/1 samples failed: server aborted", "ok", 1),
    "negative_token_ids": ([TokenOutput(token_ids=[-3, 5], log_probs=[0.0, 0.0])], [JUDGE], "recognize: invalid",
                           "missing", 1),
    "unaligned_logprobs": ([TokenOutput(token_ids=[5, 6, 7], log_probs=[0.0])], [JUDGE], "recognize: invalid",
                           "missing", 1),
    "undecodable_token_ids": ([TokenOutput(token_ids=[5, 2**40], log_probs=[0.0, 0.0])], [JUDGE],
                              "recognize: invalid server output OverflowError", "missing", 1),
    "logprobs_missing_when_asked": ([TokenOutput(token_ids=[5, 6, 7])], [JUDGE], "recognize: invalid", "missing", 1),
    "not_a_token_output": ([_not_a_token_output], [JUDGE], "recognize: invalid server output: SimpleNamespace",
                           "missing", 1),
    "object_the_client_chokes_on": ([lambda ids, p: object()], [JUDGE], "recognize: server error AttributeError",
                                    "missing", 1),
    "empty_generation": ([TokenOutput(token_ids=[], log_probs=[])], [JUDGE], "recognize: empty", "missing", 0),
    "garbage_text": (["%%% ]]] <emo", "<reply>no emotion tag</reply>"], ["???"], None, "no_tag", 0),
    "cut_answer": (["<emotion>jo" + " y" * 100, RESPOND], [JUDGE], None, "no_tag", 0),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
async def test_failure_returns_a_valid_output_whose_record_tells_infra_from_policy(tok, case):
    trained, judge, error, pred_status, infra = FAILURES[case]
    out = await run_episode(make_loop(tok, ScriptedServer(tok, trained=trained, judge=judge)))
    assert_valid(out, 512)
    rec = out.extra_fields["selfemo"]
    assert rec["pred_status"] == pred_status
    assert (rec["error"] or "").startswith(error) if error else rec["error"] is None
    assert rec["infra_error"] == infra and type(rec["infra_error"]) is int
    # reason: verl's v1 metric step casts both to int for every row (trainer_base._compute_metrics)
    versions = np.array([out.extra_fields["min_global_steps"], out.extra_fields["max_global_steps"]], dtype=int)
    answered = pred_status != "missing"
    assert versions.tolist() == ([SERVER_STEPS] * 2 if answered else [STEP - 1] * 2)
    score = compute_score("selfemo/meld", tok.decode(out.response_ids, skip_special_tokens=True), ["joy"],
                          {**ROW, **out.extra_fields})
    assert math.isfinite(score["score"])


async def test_one_failed_judge_sample_of_three_marks_the_episode_infra_and_the_rest_still_vote(tok):
    judge = [JUDGE, RuntimeError("one replica down"), JUDGE]
    server = ScriptedServer(tok, trained=[RECOGNIZE, RESPOND], judge=judge)
    rec = (await run_episode(make_loop(tok, server, config=trainer_config(judge_samples=3)))).extra_fields["selfemo"]
    # reason: 2 of 3 samples agree on the answer; the missing one is the server's fault, flagged, not scored as ok
    assert (rec["judged"], rec["judged_status"], rec["judge_agreement"]) == (["surprise"], "ok", pytest.approx(2 / 3))
    assert rec["infra_error"] == 1 and rec["error"].startswith("judge: 1/3 samples failed: server error RuntimeError")


async def test_a_healthy_episode_has_infra_error_0_and_the_servers_weight_versions(tok):
    server = ScriptedServer(tok, trained=[RECOGNIZE, RESPOND], judge=[JUDGE], global_steps=11)
    out = await run_episode(make_loop(tok, server))
    assert out.extra_fields["selfemo"]["infra_error"] == 0
    assert [out.extra_fields[k] for k in ("global_steps", "min_global_steps", "max_global_steps")] == [11, 11, 11]


async def test_weight_versions_span_the_trained_calls(tok):
    def versioned(text, steps):
        return lambda ids, params: ScriptedServer(tok, global_steps=steps).server_output(text, params)

    server = ScriptedServer(tok, trained=[versioned(RECOGNIZE, 3), versioned(RESPOND, 4)], judge=[JUDGE])
    out = await run_episode(make_loop(tok, server))
    # reason: weights were updated between the two trained calls (an async trainer's partial rollout)
    assert (out.extra_fields["min_global_steps"], out.extra_fields["max_global_steps"]) == (3, 4)


async def test_judge_failure_marks_the_turn_unjudged(tok):
    server = ScriptedServer(tok, trained=[RECOGNIZE, RESPOND], judge=[RuntimeError("judge down")])
    rec = (await run_episode(make_loop(tok, server))).extra_fields["selfemo"]
    # reason: an infrastructure failure is marked as such, so the reward leaves r_con out instead of penalising
    assert rec["stated"] == ["surprise"] and rec["judged_status"] == "judge_error" and rec["judge_agreement"] == 0.0


async def test_failed_recognize_gives_one_mask_0_eos_token(tok):
    out = await run_episode(make_loop(tok, ScriptedServer(tok, trained=[RuntimeError("x")])), params={"logprobs": True})
    assert out.response_ids == [tok.eos_token_id] and out.response_mask == [0] and out.response_logprobs == [0.0]


async def test_length_cut_answer_is_closed_with_a_mask_0_eos_before_the_role_switch(tok):
    server = ScriptedServer(tok, trained=["<emotion>joy</emotion> because she is so happy", RESPOND])
    out = await run_episode(make_loop(tok, server, config=trainer_config(max_tokens={"recognize": 7})))
    assert_valid(out, 512)
    assert [m for m, _ in segments(out.response_mask)] == [1, 0, 1]
    assert out.response_ids[7] == tok.eos_token_id and out.response_mask[:8] == [1] * 7 + [0]
    assert tok.decode(out.response_ids[7:9]) == "<|im_end|>\n"
    assert out.extra_fields["selfemo"]["pred"] == ["joy"]


async def test_responder_cut_before_its_reply_tag_closes_leaves_the_judge_unrun(tok):
    server = ScriptedServer(tok, trained=[RECOGNIZE, RESPOND], judge=[JUDGE])
    out = await run_episode(make_loop(tok, server, config=trainer_config(max_tokens={"respond": 9})))
    assert_valid(out, 512)
    rec = out.extra_fields["selfemo"]
    assert segments(out.response_mask)[-1] == (1, 9)
    assert (rec["stated"], rec["reply_status"], rec["judged_status"]) == (["surprise"], "no_tag", "missing")
    assert not [c for c in server.calls if "-judge" in c[0]]  # nothing to judge, no judge call


async def test_an_answer_that_ends_with_eos_is_not_closed_twice(tok):
    server = ScriptedServer(tok, trained=[RECOGNIZE, RESPOND])
    out = await run_episode(make_loop(tok, server))
    assert out.response_ids.count(tok.eos_token_id) == 3  # recognize, role switch, respond: one each


async def test_server_ignoring_max_tokens_is_cut_to_the_role_budget(tok):
    long = "<emotion>joy</emotion>" + " blah" * 100
    server = ScriptedServer(tok, trained=[long, RESPOND])
    out = await run_episode(make_loop(tok, server, config=trainer_config(max_tokens={"recognize": 10})))
    assert segments(out.response_mask)[0] == (1, 10)


@pytest.mark.parametrize("response_length", [1, 5, 12, 40])
async def test_truncation_to_response_length_keeps_ids_mask_logprobs_aligned(tok, response_length):
    server = ScriptedServer(tok, trained=[RECOGNIZE + " and more words here", RESPOND], judge=[JUDGE])
    out = await run_episode(make_loop(tok, server, config=trainer_config(response_length=response_length)))
    assert_valid(out, response_length)
    full = ScriptedServer(tok, trained=[RECOGNIZE + " and more words here", RESPOND], judge=[JUDGE])
    ref = await run_episode(make_loop(tok, full))
    n = len(out.response_ids)
    assert out.response_ids == ref.response_ids[:n]  # a prefix of the uncut episode ...
    assert out.response_mask == ref.response_mask[:n] and out.response_logprobs == ref.response_logprobs[:n]
    # ... and the recognition the reward scores is parsed from exactly the trained (kept) tokens
    first = segments(out.response_mask)[0][1]
    labels, status = parse_emotions(tok.decode(out.response_ids[:first], skip_special_tokens=True), "meld")
    rec = out.extra_fields["selfemo"]
    assert (sorted(labels), status) == (rec["pred"], rec["pred_status"])


async def test_no_logprobs_requested_gives_none_everywhere(tok):
    server = ScriptedServer(tok, trained=[RECOGNIZE, RESPOND])
    out = await run_episode(make_loop(tok, server), params={"temperature": 1.0, "logprobs": False})
    assert out.response_logprobs is None and len(out.response_mask) == len(out.response_ids)


# ---------------------------------------------------------------- wiring: verl's own worker, a real tiny model

def _rows_parquet(path):
    import pandas as pd

    rows = []
    for i, agent in enumerate(["selfemo_self_play", "selfemo_recognize"]):
        info = dict(split="train", index=i, dialogue_id="d0", turn=1, speaker="Rachel", next_speaker="Ross",
                    next_gold=["joy"], label_space="meld", origin="real", round=0, window=WINDOW)
        rows.append(dict(data_source="selfemo/meld", ability="emotion_recognition",
                         prompt=recognize_messages(WINDOW, "meld"), agent_name=agent, extra_info=info,
                         reward_model={"style": "rule", "ground_truth": ["joy"]}))
    pd.DataFrame(rows).to_parquet(path)
    return path


def _composed_config(model_dir):
    """The project's Hydra config (selfemo_trainer.yaml over verl's ppo_trainer), sized for a CPU test."""
    from hydra import compose, initialize_config_dir

    overrides = [
        f"actor_rollout_ref.model.path={model_dir}", "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.prompt_length=512", "actor_rollout_ref.rollout.response_length=96",
        "data.max_prompt_length=512", "data.max_response_length=96",
        "selfemo.agent.max_tokens.recognize=16", "selfemo.agent.max_tokens.respond=24",
        "selfemo.agent.max_tokens.judge=8",
        f"reward.custom_reward_function.path={REPO / 'reward_fns' / 'selfemo_reward.py'}",
    ]
    with initialize_config_dir(config_dir=str(YAML.parent), version_base=None):
        return compose(config_name=YAML.stem, overrides=overrides)


@pytest.fixture(scope="module")
def tiny_dir():
    from selfemo_verl.cpu.assets import tiny_model_dir

    return tiny_model_dir()


async def test_parquet_agent_name_selects_our_loops_in_verls_worker_and_its_reward_scores_them(tiny_dir, tmp_path):
    """parquet -> RLHFDataset -> verl's AgentLoopWorker.generate_sequences (registry lookup + hydra instantiate +
    post-processing + streaming reward through verl's naive reward manager and reward_fns/selfemo_reward.py).

    The v1 worker (AgentLoopWorkerTQ, a Ray actor that writes to TransferQueue) inherits `_run_agent_loop` and
    `_compute_score` from this class unchanged; only its storage step differs (see the TransferQueue test below).
    """
    import torch
    from transformers import AutoTokenizer

    from verl import DataProto
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker
    from verl.trainer.ppo.reward import load_reward_manager
    from verl.utils.dataset.rl_dataset import collate_fn

    config = _composed_config(tiny_dir)
    server = HFModelServer(tiny_dir)
    reward_manager = load_reward_manager(config, AutoTokenizer.from_pretrained(tiny_dir))
    worker = AgentLoopWorker(config, llm_client=server, reward_loop_worker_handles=[InlineRewardWorker(reward_manager)])
    dataset = RLHFDataset(data_files=str(_rows_parquet(tmp_path / "rows.parquet")), tokenizer=worker.tokenizer,
                          config=config.data)
    batch = DataProto.from_single_dict(collate_fn([dataset[i] for i in range(len(dataset))]))

    out = await worker.generate_sequences(batch)

    records = out.non_tensor_batch["selfemo"]
    assert [r["mode"] for r in records] == ["self_play", "recognize"]  # agent_name picked each loop
    assert all(r["error"] is None for r in records)
    assert [len(c[3]) > 0 for c in server.calls].count(True) == len(server.calls)
    trained_ids = {c[0] for c in server.calls if "-judge" not in c[0]}
    assert len(trained_ids) == 2  # one request id per episode
    mask = out.batch["response_mask"]
    assert [m for m, _ in segments(mask[0].tolist())][:3] == [1, 0, 1]  # recognize, switch, respond
    assert torch.isfinite(out.batch["rm_scores"]).all()
    scores = out.non_tensor_batch["score"]
    assert len(scores) == 2 and all(math.isfinite(float(s)) for s in scores)
    assert set(out.non_tensor_batch["reward_extra_info"][0]) >= {"r_rec", "r_con", "r_und", "pred_mask"}
    assert out.non_tensor_batch["has_con"].tolist() == [1.0, 0.0]  # the recognize row has no consistency term


async def test_rollout_logprobs_are_the_models_own_at_every_trained_position(tiny_dir):
    """Token-in/token-out: every mask-1 token sits where the model generated it (teacher-forced logprobs match)."""
    import torch
    from transformers import AutoTokenizer

    tiny_tok = AutoTokenizer.from_pretrained(tiny_dir)
    server = HFModelServer(tiny_dir)
    config = trainer_config(response_length=96, max_tokens={"recognize": 12, "respond": 20, "judge": 6})
    loop = SelfPlayAgentLoop(trainer_config=DictConfigWrap(config), server_manager=server, tokenizer=tiny_tok,
                             processor=None, dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data),
                             hf_model_type="qwen3")
    out = await run_episode(loop)
    assert_valid(out, 96)
    ids = torch.tensor([out.prompt_ids + out.response_ids])
    with torch.no_grad():
        logits = server.model(ids).logits[0, len(out.prompt_ids) - 1 : -1]
    forced = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, len(out.prompt_ids):, None]).squeeze(-1)
    mask = torch.tensor(out.response_mask, dtype=torch.bool)
    rollout = torch.tensor(out.response_logprobs)
    assert mask.sum() > 0 and (~mask).sum() > 0
    torch.testing.assert_close(rollout[mask], forced[mask], atol=1e-4, rtol=1e-4)
    assert (rollout[~mask] == 0).all()
    score = compute_score("selfemo/meld", tiny_tok.decode(out.response_ids, skip_special_tokens=True), ["joy"],
                          {**ROW, **out.extra_fields})
    assert math.isfinite(score["score"])


def test_record_survives_verl_v1_transfer_queue_packing(tok):
    """v1 stores `AgentLoopOutput.as_dict()` rows with `list_of_dict_to_tensordict`; the record must come back whole."""
    import asyncio

    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    async def two():
        loop = make_loop(tok, ScriptedServer(tok, trained=[RECOGNIZE, RESPOND], judge=[JUDGE]))
        return [await run_episode(loop), await run_episode(loop)]

    outs = asyncio.run(two())
    td = list_of_dict_to_tensordict([o.as_dict() for o in outs])
    assert td["extra_fields"][1]["selfemo"] == outs[1].extra_fields["selfemo"]


class _Remote:
    """A Ray actor method stand-in: `.remote(...)` calls `fn` (awaitable when `fn` is async, like an ObjectRef)."""

    def __init__(self, fn):
        self.remote = fn


def _real_client_returns(server_output):
    """What verl 0.9.1's real `LLMServerClient.generate` hands an agent loop for one server return."""
    from verl.workers.rollout.llm_server import LLMServerClient

    async def acquire_fields():
        return []

    async def acquire_server(request_id, **fields):
        return "server0", SimpleNamespace(generate=_Remote(serve))

    async def serve(**kwargs):
        return server_output

    balancer = SimpleNamespace(require_acquire_fields=_Remote(acquire_fields),
                               require_release_fields=_Remote(acquire_fields),
                               acquire_server=_Remote(acquire_server), release_server=_Remote(lambda **kw: None))
    config = OmegaConf.create({"actor_rollout_ref": {"rollout": {"name": "vllm", "full_determinism": False}}})
    client = LLMServerClient(config, load_balancer_handle=balancer)
    return asyncio.run(client.generate("rid", prompt_ids=[1, 2], sampling_params={"max_tokens": 4}))


@pytest.mark.parametrize("extra_fields", [
    {"global_steps": 3},                                              # reason: a server that reports its version
    {},                                                               # reason: one that reports none (None versions)
    {"global_steps": 5, "min_global_steps": 4, "max_global_steps": 5},  # reason: a resumed partial rollout
])
def test_contract_fake_client_output_equals_verls_llm_server_client(extra_fields):
    def server_output():
        return TokenOutput(token_ids=[7, 8], log_probs=[-0.1, -0.2], stop_reason="completed",
                           extra_fields=dict(extra_fields))

    real, fake = _real_client_returns(server_output()), fakes.as_client_output(server_output())
    assert real.model_dump() == fake.model_dump()
    assert real.extra_fields["min_global_steps"] == extra_fields.get("min_global_steps", extra_fields.get("global_steps"))


def test_contract_real_and_fake_client_both_raise_on_a_return_without_extra_fields():
    # reason: the agent loop's own check of an invalid server return only sees what survives the client
    with pytest.raises(AttributeError):
        _real_client_returns(object())
    with pytest.raises(AttributeError):
        fakes.as_client_output(object())

"""The SELF-EMO self-play episode as a verl 0.9.1 AgentLoop (docs/method.md §6), plus a recognize-only loop.

Adapter: moves tokens between verl's rollout server and the continuous-token (`ct_*`) helpers; every decision
about labels, speakers and the record handed to the reward lives in the core module `selfemo_verl.selfplay`.

- `selfemo_self_play` (train rows): recognize (mask 1) -> role switch (mask 0) -> respond (mask 1), one sequence
  and one request id per episode; a blind judge on a separate prompt that is never trained in this sequence;
  `selfemo.agent.self_play_turns` repeats respond + judge on the dialogue extended by the synthetic reply.
- `selfemo_recognize` (val/test rows): step 1 only, with the same `extra_fields["selfemo"]` record (no turn
  keys), so the reward and evaluation read validation exactly like training. verl's `single_turn_agent` would
  also work (the reward then parses the decoded response), but only this loop records the parse status
  the same way and reads the same knobs.

Knobs: `selfemo.agent.{window, self_play_turns, judge_samples, max_tokens.<role>, temperature.<role>}` of the
trainer config the loop receives (`selfemo_verl/config/selfemo_trainer.yaml` holds the defaults).
- `window`: one window for all three roles. The recognize prompt is rebuilt from `extra_info.window` cut to its
  last `window` turns (`prompts.recognize_messages`), not taken from the row's pre-rendered `prompt` (data prep
  rendered it with its own window); the responder continues that sequence and the judge sees the same turns.
  A row without a window (single-turn rows, recognize loop only) uses its `raw_prompt` as is.
- `temperature.<role>`: the judge (never trained) may sample at its own temperature (sampled requests only: a
  greedy request such as validation stays greedy). A trained role (recognize, respond) must sample at the
  temperature the actor recomputes its log-probs with (`actor_rollout_ref.rollout.temperature`, verl 0.9.1 v1
  `PPOTrainer._step_once`), so anything but null or that value is rejected (`check_role_temperatures`, also
  callable at start-up); trained roles always keep the temperature verl passes (rollout or val_kwargs).

Failures (docs/method.md §3.5): a server call that raised (a timeout included: verl 0.9.1's `LLMServerClient.generate`
has no timeout of its own, so one arrives as an exception from below), returned stop_reason "aborted", or returned
an invalid object (not a `TokenOutput`, negative ids, log-probs not aligned with the tokens) at any step, one
judge sample included, sets `infra_error = 1` in the record; an empty, unparseable or cut answer and an exhausted
`rollout.response_length` budget are the policy's (`error` set, `infra_error = 0`). Either way the episode ends
with what it has and never raises into verl: the output always has >= 1 response token (a mask-0 EOS when
nothing was generated: verl places the reward on the last response position), `response_ids`,
`response_mask`, `response_logprobs` of equal length, and every field verl reads from a normal output:
`extra_fields` `global_steps` / `min_global_steps` / `max_global_steps` (ints; verl's v1 metric step casts the
latter two to int for every row), `turn_scores`, `tool_rewards`. When no trained call answered, there is no
weight version: the loop reports `global_steps - 1` of the row (`no_answer_weight_version`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

from omegaconf import OmegaConf

from selfemo_verl.labels import check_label_space
from selfemo_verl.prompts import judge_messages, recognize_messages, role_switch_message
from selfemo_verl.selfplay import SelfPlayRecord, SelfPlayTurn, extend_window, recent_turns, responder_name
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput, register
from verl.workers.rollout.replica import TokenOutput

logger = logging.getLogger(__name__)

ROLES = ("recognize", "respond", "judge")
TRAINED_ROLES = ("recognize", "respond")  # their tokens carry mask 1 and are trained
ABORTED = ("aborted", "abort")  # TokenOutput.stop_reason of a request the server aborted (verl 0.9.1 uses both)
WEIGHT_KEYS = ("global_steps", "min_global_steps", "max_global_steps")  # server weight versions in extra_fields


def check_role_temperatures(config) -> None:
    """Reject a trained role's temperature that differs from `actor_rollout_ref.rollout.temperature`.

    The actor recomputes old log-probs at the rollout temperature (verl 0.9.1 v1 `PPOTrainer._step_once` sets
    `batch.extra_info["temperature"]` from it), so a recognize/respond answer sampled at another temperature would
    be trained off-policy with mismatched log-probs. null means "use the rollout temperature"; the judge is never
    trained and may use any temperature. Call it at start-up with the full trainer config.
    """
    temperatures = OmegaConf.select(config, "selfemo.agent.temperature") or {}
    rollout = OmegaConf.select(config, "actor_rollout_ref.rollout.temperature")
    for role in TRAINED_ROLES:
        value = temperatures.get(role)
        if value is not None and (rollout is None or float(value) != float(rollout)):
            raise ValueError(
                f"selfemo.agent.temperature.{role}={value} differs from actor_rollout_ref.rollout.temperature="
                f"{rollout}: a trained role must sample at the rollout temperature (set it to null)")


@dataclass(frozen=True)
class AgentKnobs:
    """`selfemo.agent.*` as read from the trainer config (no defaults here: the YAML holds them)."""

    window: int
    self_play_turns: int
    judge_samples: int
    max_tokens: dict
    temperature: dict


def agent_knobs(config) -> AgentKnobs:
    """Read and check `selfemo.agent` from the full trainer config; a missing section or key is a config error."""
    section = OmegaConf.select(config, "selfemo.agent") if OmegaConf.is_config(config) else None
    if section is None:
        raise ValueError(
            "trainer config has no `selfemo.agent` section (needed by the selfemo agent loops); launch with "
            "--config-path pkg://selfemo_verl.config --config-name selfemo_trainer")
    try:
        knobs = AgentKnobs(
            window=int(section.window), self_play_turns=int(section.self_play_turns),
            judge_samples=int(section.judge_samples),
            max_tokens={role: int(section.max_tokens[role]) for role in ROLES},
            temperature={role: section.temperature[role] for role in ROLES},
        )
    except Exception as exc:  # omegaconf raises its own key/type errors; name the section
        raise ValueError(f"bad `selfemo.agent` config section: {exc}") from exc
    if knobs.self_play_turns < 1 or knobs.judge_samples < 1 or min(knobs.max_tokens.values()) < 1:
        raise ValueError(f"`selfemo.agent` needs self_play_turns, judge_samples, max_tokens.* >= 1; got {knobs}")
    check_role_temperatures(config)
    return knobs


def no_answer_weight_version(kwargs: dict) -> int:
    """The weight version reported when no trained server call answered: the row's `global_steps` - 1, else -1.

    verl 0.9.1's v1 worker passes the batch's `global_steps` (the trainer step that issued the row) to `run()`, and
    the v1 metric step casts every row's `min_global_steps` / `max_global_steps` to int. The loop cannot read the
    servers' weight version, but in the synchronous trainer (the only mode `selfemo_verl.main` runs) step s rolls
    out on the weights pushed by `update_weights(s - 1)` (`PPOTrainerSync.on_init_end` / `on_step_end`), which
    is what an answering server would have reported; staleness metrics stay at 0, not -1. Without `global_steps`
    (verl's v0 worker, which does not cast) -1, verl's "not available".
    """
    steps = kwargs.get("global_steps")
    return int(steps) - 1 if steps is not None else -1


@dataclass(frozen=True)
class Row:
    """The dataset fields an episode reads (docs/method.md §6.1; parquet schema §13)."""

    messages: list
    window: list
    label_space: str
    next_speaker: str | None


def read_row(kwargs: dict, need_window: bool) -> Row:
    """Pick the episode's inputs out of verl's per-sample kwargs; a malformed row raises naming its index."""
    info = kwargs.get("extra_info") or {}
    where = f"row index={info.get('index', kwargs.get('index'))!r} ({kwargs.get('data_source')!r})"
    window = info.get("window")
    if window is None or len(window) == 0:
        if need_window:
            raise ValueError(f"extra_info.window is missing or empty in {where} (needed by the self-play loop)")
        window = []
    try:
        check_label_space(str(info.get("label_space")))
    except ValueError as exc:
        raise ValueError(f"{exc} in {where}") from None
    turns = [{"speaker": str(t["speaker"]), "text": str(t["text"])} for t in window]
    return Row(messages=list(kwargs["raw_prompt"]), window=turns, label_space=str(info["label_space"]),
               next_speaker=info.get("next_speaker"))


def recognize_prompt(row: Row, window: list) -> list:
    """The recognize messages on the knob's `window` (the same turns every role sees); the row's prompt without one."""
    return recognize_messages(window, row.label_space) if window else list(row.messages)


@dataclass
class TokenState:
    """Mutable token state of one episode's trained sequence (prompt + response so far) and the episode's record."""

    request_id: str
    record: SelfPlayRecord
    messages: list
    ids: list = field(default_factory=list)
    mask: list = field(default_factory=list)
    logprobs: list | None = None
    server_fields: dict = field(default_factory=dict)  # weight versions etc. of the trained calls that answered
    generate_s: float = 0.0
    num_preempted: int = -1
    cut: bool = False  # the last trained answer used its whole token budget without EOS


@register("selfemo_self_play")
class SelfPlayAgentLoop(AgentLoopBase):
    """Recognizer <-> responder self-play with a blind judge (docs/method.md §6); one AgentLoopOutput per episode."""

    mode = "self_play"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.knobs = agent_knobs(self.config)
        self.response_length = int(self.rollout_config.response_length)
        self.eos_id = self.tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the selfemo agent loops need a tokenizer with an eos_token (the chat turn's end)")

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> AgentLoopOutput:
        row = read_row(kwargs, need_window=self.mode == "self_play")
        window = recent_turns(row.window, self.knobs.window)  # the one window all three roles see
        state = TokenState(request_id=uuid4().hex, record=SelfPlayRecord(row.label_space, self.mode),
                           messages=recognize_prompt(row, window),
                           logprobs=[] if sampling_params.get("logprobs") else None)
        # 1. recognize: the window's prompt, tokenized once; the answer is trained (mask 1) -> P_t.
        state.ids = await self.ct_build_initial_tokens(state.messages)
        state.record.recognize_text = await self._trained_turn(state, "recognize", sampling_params)
        speaker = responder_name(window, row.next_speaker)
        turns = self.knobs.self_play_turns if self.mode == "self_play" else 0
        for _ in range(turns if state.record.recognize_text is not None else 0):
            # 2. respond: role switch (mask 0), then the responder's answer (mask 1) -> E_{t+1}, reply.
            turn = await self._respond(state, speaker, row.label_space, sampling_params)
            if turn is None:
                break
            # 3. judge: a separate, untrained generation on the window + reply only -> P-hat_{t+1}.
            await self._judge(state, turn, window, row.label_space, sampling_params)
            state.record.turns.append(turn)
            # 4. next self-play turn: the synthetic reply joins the dialogue; the other speaker answers.
            if turn.reply_status != "ok":
                break
            window = recent_turns(extend_window(window, turn), self.knobs.window)
            speaker = responder_name(window)
        # 5. one output, truncated to rollout.response_length, with the parsed record for the reward.
        return self._output(state, no_answer_weight_version(kwargs))

    async def _respond(self, state: TokenState, speaker: str, label_space: str, sampling_params) -> SelfPlayTurn | None:
        """Append the role switch (mask 0) and generate the responder's answer; None when it could not run."""
        self._close_turn(state)
        switch = [*state.messages, role_switch_message(speaker, label_space)]
        merge, mask, logprobs = await self.ct_merge_context_msg(state.messages, switch, state.ids, state.mask,
                                                                state.logprobs)
        state.ids, state.mask, state.logprobs, state.messages = merge.token_ids, mask, logprobs, switch
        text = await self._trained_turn(state, "respond", sampling_params)
        if text is None:
            return None
        turn = SelfPlayTurn(speaker)
        turn.read_answer(text, label_space)
        return turn

    async def _judge(self, state: TokenState, turn: SelfPlayTurn, window: list, label_space: str,
                     sampling_params) -> None:
        """k blind judge samples on their own prompt and request ids; their tokens never enter the sequence."""
        if turn.reply_status != "ok":
            return  # nothing to judge: the responder wrote no reply (judged_status stays "missing")
        prompt = await self.ct_build_initial_tokens(judge_messages(window, turn.speaker, turn.reply, label_space))
        params = dict(self._params(sampling_params, "judge", self.knobs.max_tokens["judge"]), logprobs=False)
        base = uuid4().hex
        calls = [self._generate(state, f"{base}-judge{i}", prompt, params, trained=False)
                 for i in range(self.knobs.judge_samples)]
        outs = await asyncio.gather(*calls)
        # None = the server returned nothing usable (infrastructure); an empty generation is the model's ("empty")
        turn.read_judge([out[2] if out is not None else None for out, _ in outs], label_space)
        errors = [error for out, error in outs if out is None]
        if errors:
            state.record.infra_fail(f"judge: {len(errors)}/{len(outs)} samples failed: {errors[0]}")

    async def _trained_turn(self, state: TokenState, role: str, sampling_params) -> str | None:
        """Generate one trained answer on the episode's token state (mask 1); its decoded text, or None."""
        budget = self.response_length - len(state.mask)
        if budget <= 0:
            state.record.fail(f"{role}: rollout.response_length reached")
            return None
        params = self._params(sampling_params, role, min(self.knobs.max_tokens[role], budget))
        out, error = await self._generate(state, state.request_id, state.ids, params, trained=True)
        if out is None:  # the server's fault: raised, aborted or invalid
            state.record.infra_fail(f"{role}: {error}")
            return None
        if not out[0]:  # the model's answer was empty
            state.record.fail(f"{role}: empty generation")
            return None
        tokens, logprobs, text = out
        state.cut = len(tokens) >= params["max_tokens"] and tokens[-1] != self.eos_id
        merge, state.mask, state.logprobs = await self.ct_merge_assistant_token(
            state.ids, tokens, state.mask, state.logprobs, assistant_logprobs=logprobs)
        state.ids = merge.token_ids
        state.messages = [*state.messages, {"role": "assistant", "content": text}]
        return text

    async def _generate(self, state: TokenState, request_id: str, prompt_ids: list, params: dict, trained: bool):
        """One server call -> ((tokens, logprobs, text), None), or (None, reason) on an infrastructure failure.

        Never raises."""
        start = time.perf_counter()
        try:
            output = await self.server_manager.generate(request_id=request_id, prompt_ids=prompt_ids,
                                                        sampling_params=params)
        except Exception as exc:  # a rollout server may fail in any way (a timeout included); the episode returns
            logger.warning("selfemo agent loop: server error on %s: %r", request_id, exc)
            return None, f"server error {type(exc).__name__}: {exc}"[:300]
        finally:
            state.generate_s += time.perf_counter() - start
        return self._checked(output, params, state if trained else None)

    def _checked(self, output, params: dict, state: TokenState | None):
        """Validate a TokenOutput: not aborted, ids >= 0 and decodable, at most max_tokens, logprobs aligned when
        wanted; decode it."""
        if not isinstance(output, TokenOutput):
            return None, f"invalid server output: {type(output).__name__}, not a TokenOutput"
        if output.stop_reason in ABORTED:
            return None, f"server aborted the request (stop_reason {output.stop_reason!r})"
        want = state is not None and state.logprobs is not None
        try:
            tokens = [int(t) for t in output.token_ids][: params["max_tokens"]]
            logprobs = [float(x) for x in output.log_probs][: len(tokens)] if want else None
            fields = dict(output.extra_fields or {})
            preempted = None if output.num_preempted is None else int(output.num_preempted)
            bad_logprobs = want and (len(logprobs) != len(tokens) or any(x != x for x in logprobs))  # x != x: NaN
            if any(t < 0 for t in tokens) or bad_logprobs:
                return None, "invalid server output (negative ids, unaligned or NaN logprobs)"
            text = self._decode(tokens)  # an id no tokenizer has (e.g. 2**40) raises here, not later in verl
        except Exception as exc:  # server output is untrusted: wrong types (pydantic checks only at init), bad ids
            return None, f"invalid server output {type(exc).__name__}: {exc}"[:300]
        if state is not None:
            self._absorb_server_fields(state, fields, preempted)
        return (tokens, logprobs, text), None

    @staticmethod
    def _absorb_server_fields(state: TokenState, fields: dict, preempted) -> None:
        """Keep the first trained call's server extra_fields (weight versions etc.) and the latest max_global_steps."""
        if not state.server_fields:
            state.server_fields = fields
        elif fields.get("max_global_steps") is not None:
            state.server_fields["max_global_steps"] = fields["max_global_steps"]
        if preempted is not None:
            state.num_preempted = max(state.num_preempted, 0) + preempted

    def _params(self, sampling_params: dict, role: str, max_tokens: int) -> dict:
        """Per-role copy of verl's sampling params: max_tokens, and the judge's temperature when sampling.

        Trained roles keep verl's temperature (check_role_temperatures allows them no other).
        """
        params = dict(sampling_params, max_tokens=int(max_tokens))
        role_temperature = self.knobs.temperature[role]
        sampled = float(params.get("temperature") or 0.0) > 0.0
        if role not in TRAINED_ROLES and role_temperature is not None and sampled:
            params["temperature"] = float(role_temperature)
        return params

    def _close_turn(self, state: TokenState) -> None:
        """An answer cut by its token limit has no EOS: append one (mask 0) so the next message is well formed."""
        if state.cut:
            state.cut = False
            state.ids, state.mask = [*state.ids, self.eos_id], [*state.mask, 0]
            state.logprobs = None if state.logprobs is None else [*state.logprobs, 0.0]

    def _decode(self, tokens: list) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _output(self, state: TokenState, no_answer_version: int) -> AgentLoopOutput:
        """Split prompt/response, guarantee >= 1 response token, truncate all three lists alike; fill every
        weight-version field a server that answered would have set (verl casts them to int)."""
        if not state.mask:  # nothing generated: one mask-0 EOS so verl has a last position for the reward
            state.ids, state.mask = [*state.ids, self.eos_id], [0]
            state.logprobs = None if state.logprobs is None else [0.0]
        n, cap = len(state.mask), self.response_length
        versions = {key: no_answer_version for key in WEIGHT_KEYS if state.server_fields.get(key) is None}
        extra = {**state.server_fields, **versions, "turn_scores": [], "tool_rewards": [],
                 "selfemo": state.record.as_fields()}
        return AgentLoopOutput(
            prompt_ids=state.ids[: len(state.ids) - n], response_ids=state.ids[-n:][:cap],
            response_mask=state.mask[:cap],
            response_logprobs=None if state.logprobs is None else state.logprobs[:cap],
            num_turns=sum(1 for message in state.messages if message.get("role") != "system"),
            metrics=AgentLoopMetrics(generate_sequences=state.generate_s, num_preempted=state.num_preempted),
            extra_fields=extra,
        )


@register("selfemo_recognize")
class RecognizeAgentLoop(SelfPlayAgentLoop):
    """Step 1 only (validation/test rows): the recognizer's answer and the same record, without self-play turns."""

    mode = "recognize"

"""The SELF-EMO self-play episode as a verl 0.9.1 AgentLoop (DESIGN.md §4), plus a recognize-only loop.

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
trainer config the loop receives (`selfemo_verl/config/selfemo_trainer.yaml` holds the defaults). A role
temperature replaces the rollout's only for sampled requests: a greedy request (temperature 0, e.g.
validation) stays greedy.

Robustness: a server that raises, an empty or malformed generation, a length cut and an exhausted
`rollout.response_length` budget end the episode with what it has and `error` set in the record; the output
always has >= 1 response token (a mask-0 EOS when nothing was generated: verl places the reward on the last
response position) and `response_ids`, `response_mask`, `response_logprobs` of equal length.
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
from selfemo_verl.prompts import judge_messages, role_switch_message
from selfemo_verl.selfplay import SelfPlayRecord, SelfPlayTurn, extend_window, recent_turns, responder_name
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput, register

logger = logging.getLogger(__name__)

ROLES = ("recognize", "respond", "judge")


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
    return knobs


@dataclass(frozen=True)
class Row:
    """The dataset fields an episode reads (DESIGN §8)."""

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


@dataclass
class Episode:
    """Mutable token state of the trained sequence (prompt + response so far) and the episode's record."""

    request_id: str
    record: SelfPlayRecord
    messages: list
    ids: list = field(default_factory=list)
    mask: list = field(default_factory=list)
    logprobs: list | None = None
    server_fields: dict = field(default_factory=dict)
    generate_s: float = 0.0
    num_preempted: int = -1
    cut: bool = False  # the last trained answer used its whole token budget without EOS


@register("selfemo_self_play")
class SelfPlayAgentLoop(AgentLoopBase):
    """Recognizer <-> responder self-play with a blind judge (DESIGN §4); one AgentLoopOutput per episode."""

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
        ep = Episode(request_id=uuid4().hex, record=SelfPlayRecord(row.label_space, self.mode),
                     messages=list(row.messages), logprobs=[] if sampling_params.get("logprobs") else None)
        # 1. recognize: the row's prompt, tokenized once; the answer is trained (mask 1) -> P_t.
        ep.ids = await self.ct_build_initial_tokens(ep.messages)
        ep.record.recognize_text = await self._trained_turn(ep, "recognize", sampling_params)
        window = recent_turns(row.window, self.knobs.window)
        speaker = responder_name(window, row.next_speaker)
        turns = self.knobs.self_play_turns if self.mode == "self_play" else 0
        for _ in range(turns if ep.record.recognize_text is not None else 0):
            # 2. respond: role switch (mask 0), then the responder's answer (mask 1) -> E_{t+1}, reply.
            turn = await self._respond(ep, speaker, row.label_space, sampling_params)
            if turn is None:
                break
            # 3. judge: a separate, untrained generation on the window + reply only -> P-hat_{t+1}.
            await self._judge(ep, turn, window, row.label_space, sampling_params)
            ep.record.turns.append(turn)
            # 4. next self-play turn: the synthetic reply joins the dialogue; the other speaker answers.
            if turn.reply_status != "ok":
                break
            window = recent_turns(extend_window(window, turn), self.knobs.window)
            speaker = responder_name(window)
        # 5. one output, truncated to rollout.response_length, with the parsed record for the reward.
        return self._output(ep)

    async def _respond(self, ep: Episode, speaker: str, label_space: str, sampling_params) -> SelfPlayTurn | None:
        """Append the role switch (mask 0) and generate the responder's answer; None when it could not run."""
        self._close_turn(ep)
        switch = [*ep.messages, role_switch_message(speaker, label_space)]
        merge, mask, logprobs = await self.ct_merge_context_msg(ep.messages, switch, ep.ids, ep.mask, ep.logprobs)
        ep.ids, ep.mask, ep.logprobs, ep.messages = merge.token_ids, mask, logprobs, switch
        text = await self._trained_turn(ep, "respond", sampling_params)
        if text is None:
            return None
        turn = SelfPlayTurn(speaker)
        turn.read_answer(text, label_space)
        return turn

    async def _judge(self, ep: Episode, turn: SelfPlayTurn, window: list, label_space: str, sampling_params) -> None:
        """k blind judge samples on their own prompt and request ids; their tokens never enter the sequence."""
        if turn.reply_status != "ok":
            return  # nothing to judge: the responder wrote no reply (judged_status stays "missing")
        prompt = await self.ct_build_initial_tokens(judge_messages(window, turn.speaker, turn.reply, label_space))
        params = dict(self._params(sampling_params, "judge", self.knobs.max_tokens["judge"]), logprobs=False)
        base = uuid4().hex
        calls = [self._generate(ep, f"{base}-judge{i}", prompt, params, trained=False)
                 for i in range(self.knobs.judge_samples)]
        outs = await asyncio.gather(*calls)
        # None = the server returned nothing (infrastructure); an empty generation is the model's answer ("empty")
        turn.read_judge([self._decode(out[0]) if out is not None else None for out, _ in outs], label_space)

    async def _trained_turn(self, ep: Episode, role: str, sampling_params) -> str | None:
        """Generate one trained answer on the episode's token state (mask 1); its decoded text, or None."""
        budget = self.response_length - len(ep.mask)
        if budget <= 0:
            ep.record.fail(f"{role}: rollout.response_length reached")
            return None
        params = self._params(sampling_params, role, min(self.knobs.max_tokens[role], budget))
        out, error = await self._generate(ep, ep.request_id, ep.ids, params, trained=True)
        if out is None or not out[0]:
            ep.record.fail(f"{role}: {error or 'empty generation'}")
            return None
        tokens, logprobs = out
        ep.cut = len(tokens) >= params["max_tokens"] and tokens[-1] != self.eos_id
        merge, ep.mask, ep.logprobs = await self.ct_merge_assistant_token(
            ep.ids, tokens, ep.mask, ep.logprobs, assistant_logprobs=logprobs)
        ep.ids = merge.token_ids
        text = self._decode(tokens)
        ep.messages = [*ep.messages, {"role": "assistant", "content": text}]
        return text

    async def _generate(self, ep: Episode, request_id: str, prompt_ids: list, params: dict, trained: bool):
        """One server call -> ((tokens, logprobs), None) or (None, reason); never raises."""
        start = time.perf_counter()
        try:
            output = await self.server_manager.generate(request_id=request_id, prompt_ids=prompt_ids,
                                                        sampling_params=params)
        except Exception as exc:  # a rollout server may fail in any way; the episode must still return
            logger.warning("selfemo agent loop: server error on %s: %r", request_id, exc)
            return None, f"server error {type(exc).__name__}: {exc}"[:300]
        finally:
            ep.generate_s += time.perf_counter() - start
        return self._checked(output, params, ep if trained else None)

    def _checked(self, output, params: dict, ep: Episode | None):
        """Validate a TokenOutput: ids >= 0, at most max_tokens, logprobs aligned when the trained turn wants them."""
        want = ep is not None and ep.logprobs is not None
        try:
            tokens = [int(t) for t in output.token_ids][: params["max_tokens"]]
            logprobs = [float(x) for x in output.log_probs][: len(tokens)] if want else None
            fields, preempted = dict(output.extra_fields or {}), output.num_preempted
        except Exception as exc:  # server output is untrusted: a garbage object instead of a TokenOutput
            return None, f"invalid server output {type(exc).__name__}: {exc}"[:300]
        if any(t < 0 for t in tokens) or (want and len(logprobs) != len(tokens)):
            return None, "invalid server output (negative ids or unaligned logprobs)"
        if ep is not None:
            self._absorb_server_fields(ep, fields, preempted)
        return (tokens, logprobs), None

    @staticmethod
    def _absorb_server_fields(ep: Episode, fields: dict, preempted) -> None:
        """Keep the first call's server extra_fields (weight versions etc.) and the latest max_global_steps."""
        if not ep.server_fields:
            ep.server_fields = fields
        elif fields.get("max_global_steps") is not None:
            ep.server_fields["max_global_steps"] = fields["max_global_steps"]
        if preempted is not None:
            ep.num_preempted = max(ep.num_preempted, 0) + int(preempted)

    def _params(self, sampling_params: dict, role: str, max_tokens: int) -> dict:
        """Per-role copy of verl's sampling params: max_tokens, and the role temperature when sampling."""
        params = dict(sampling_params, max_tokens=int(max_tokens))
        role_temperature = self.knobs.temperature[role]
        if role_temperature is not None and float(params.get("temperature") or 0.0) > 0.0:
            params["temperature"] = float(role_temperature)
        return params

    def _close_turn(self, ep: Episode) -> None:
        """An answer cut by its token limit has no EOS: append one (mask 0) so the next message is well formed."""
        if ep.cut:
            ep.cut = False
            ep.ids, ep.mask = [*ep.ids, self.eos_id], [*ep.mask, 0]
            ep.logprobs = None if ep.logprobs is None else [*ep.logprobs, 0.0]

    def _decode(self, tokens: list) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _output(self, ep: Episode) -> AgentLoopOutput:
        """Split prompt/response, guarantee >= 1 response token, truncate all three lists alike."""
        if not ep.mask:  # nothing generated: one mask-0 EOS so verl has a last position for the reward
            ep.ids, ep.mask = [*ep.ids, self.eos_id], [0]
            ep.logprobs = None if ep.logprobs is None else [0.0]
        n, cap = len(ep.mask), self.response_length
        extra = {**ep.server_fields, "turn_scores": [], "tool_rewards": [], "selfemo": ep.record.as_fields()}
        return AgentLoopOutput(
            prompt_ids=ep.ids[: len(ep.ids) - n], response_ids=ep.ids[-n:][:cap], response_mask=ep.mask[:cap],
            response_logprobs=None if ep.logprobs is None else ep.logprobs[:cap],
            num_turns=sum(1 for message in ep.messages if message.get("role") != "system"),
            metrics=AgentLoopMetrics(generate_sequences=ep.generate_s, num_preempted=ep.num_preempted),
            extra_fields=extra,
        )


@register("selfemo_recognize")
class RecognizeAgentLoop(SelfPlayAgentLoop):
    """Step 1 only (validation/test rows): the recognizer's answer and the same record, without self-play turns."""

    mode = "recognize"

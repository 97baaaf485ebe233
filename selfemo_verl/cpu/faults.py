"""Fault injection for the `hf` rollout server: fail a fixed share of first calls, to test infra-error handling.

Off unless the environment sets it (read once, when the server starts; Ray workers inherit the driver's env):

    SELFEMO_HF_FAIL_FIRST_CALLS=0.25   share in [0, 1] of the request ids the server sees for the first time
                                       whose call fails (0 or unset: off)
    SELFEMO_HF_FAIL_MODE=raise         raise InjectedServerError (default), or `abort`: return no tokens with
                                       stop_reason "aborted", as a vLLM server does when a request is aborted
    SELFEMO_HF_FAIL_SEED=0             phase of the failure pattern

Which calls fail is deterministic given the order in which new request ids arrive: the n-th new id (n = 0, 1,
...) fails when floor((n + 1) * share + phase) > floor(n * share + phase), phase in [0, 1) drawn from the seed,
so among the first N new ids exactly floor(N * share) or that plus one fail — never a run without faults by
chance. A call whose request id was seen before never fails.

What a "first call" is under verl 0.9.1: `LLMServerClient.generate` sends a fresh uuid per call unless
`actor_rollout_ref.rollout.full_determinism=true`, so on verl's path every call (recognize, respond, judge,
a retry) is a first call and the knob fails that share of all calls. With `full_determinism=true` the agent
loop's own ids reach the server: one id per episode for the trained sequence (recognize, then respond) and one
per judge sample, so only an episode's first call and its judge calls can fail. In `abort` mode verl's v1
client retries an aborted call after 1 s (`FullyAsyncLLMServerClient.generate`); with per-call uuids the
retry may be aborted again (a geometric number of retries), with stable ids it succeeds.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field

SHARE_ENV = "SELFEMO_HF_FAIL_FIRST_CALLS"
MODE_ENV = "SELFEMO_HF_FAIL_MODE"
SEED_ENV = "SELFEMO_HF_FAIL_SEED"
MODES = ("raise", "abort")


class InjectedServerError(RuntimeError):
    """The failure the `raise` mode injects (the agent loop sees it as a server error)."""


@dataclass
class FirstCallFaults:
    """Decides, per call, whether the server fails it; counts what it saw and what it failed."""

    share: float
    mode: str = "raise"
    seed: int = 0
    seen: set = field(default_factory=set)
    new_ids: int = 0
    failed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"{SHARE_ENV}={self.share!r}: expected a share in [0, 1]")
        if self.mode not in MODES:
            raise ValueError(f"{MODE_ENV}={self.mode!r}: expected one of {MODES}")
        self._phase = random.Random(self.seed).random()

    def should_fail(self, request_id) -> bool:
        """True when this call must fail: its id is new and its rank among new ids falls on the pattern.

        >>> faults = FirstCallFaults(share=0.25, seed=0)
        >>> sum(faults.should_fail(f"r{i}") for i in range(40)), faults.should_fail("r0")
        (10, False)
        """
        if request_id in self.seen:
            return False
        self.seen.add(request_id)
        n, self.new_ids = self.new_ids, self.new_ids + 1
        fail = math.floor((n + 1) * self.share + self._phase) > math.floor(n * self.share + self._phase)
        self.failed += int(fail)
        return fail

    def error(self, request_id) -> InjectedServerError:
        return InjectedServerError(f"injected fault ({SHARE_ENV}={self.share}): request {request_id!r} "
                                   f"(new id #{self.new_ids}, failure #{self.failed})")


def faults_from_env(environ=os.environ) -> FirstCallFaults | None:
    """The configured fault injector, or None when SELFEMO_HF_FAIL_FIRST_CALLS is unset, empty or 0.

    >>> faults_from_env({}) is None, faults_from_env({SHARE_ENV: "0.5", MODE_ENV: "abort"}).mode
    (True, 'abort')
    """
    raw = environ.get(SHARE_ENV, "").strip()
    if not raw:
        return None
    try:
        share, seed = float(raw), int(environ.get(SEED_ENV, "0"))
    except ValueError:
        raise ValueError(f"{SHARE_ENV}={raw!r} / {SEED_ENV}={environ.get(SEED_ENV)!r}: expected a float share "
                         "and an int seed") from None
    if share == 0.0:
        return None
    return FirstCallFaults(share=share, mode=environ.get(MODE_ENV, "raise").strip() or "raise", seed=seed)

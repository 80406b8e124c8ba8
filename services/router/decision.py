"""The routing decision as a pure function: what to do with one Predict call, and why. A
Generate, which has no confidence to judge, is decided as a Predict with no local answer when
no runtime answered it (or in api_only).

The servicer gathers the facts (the mode, the local answer or its absence, the threshold,
whether a fallback is configured, what the policies would allow right now), calls `decide`,
and carries the decision out. Every `route_reason` a response can carry comes from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

Mode = Literal["local_only", "hybrid", "api_only"]


class Action(Enum):
    LOCAL = "local"  # answer with the local model
    FALLBACK = "fallback"  # send the call to the API model
    DEGRADED = "degraded"  # answer locally, flagged: it should have gone to the API
    FAIL = "fail"  # no answer: an error status


@dataclass(frozen=True)
class LocalAnswer:
    parsed: bool
    confidence: float


@dataclass(frozen=True)
class Gates:
    """What the fallback policies allow now, in the order they are consulted."""

    breaker_closed: bool = True  # or half-open with its probe free
    under_rate_cap: bool = True
    budget_left: bool = True

    def blocked(self) -> str | None:
        if not self.breaker_closed:
            return "circuit_open"
        if not self.under_rate_cap:
            return "fallback_rate_cap"
        if not self.budget_left:
            return "budget_exhausted"
        return None


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""  # the response's route_reason
    blocked: str | None = None  # the policy that kept the call from the API
    status: Literal["", "UNAVAILABLE", "FAILED_PRECONDITION"] = ""  # with FAIL
    message: str = ""  # with FAIL


def fallback_reason(local: LocalAnswer, threshold: float) -> str | None:
    """Why a local answer should go to the API; None when it is good enough."""
    if not local.parsed:
        return "unparsed"
    if local.confidence < threshold:
        return "low_confidence"
    return None


def decide(
    *, mode: Mode, local: LocalAnswer | None, threshold: float, has_fallback: bool, gates: Gates
) -> Decision:
    """`local` is None when no local runtime answered (or, in api_only, none was asked)."""
    if mode == "api_only":
        return _api_only(has_fallback, gates)
    if local is None:
        return _no_local_answer(mode, has_fallback, gates)
    reason = fallback_reason(local, threshold) if mode == "hybrid" else None
    if reason is None:
        return Decision(Action.LOCAL)
    if not has_fallback:
        return Decision(Action.DEGRADED, f"{reason}:no_fallback_configured")
    blocked = gates.blocked()
    if blocked is not None:
        return Decision(Action.DEGRADED, f"{reason}:{blocked}", blocked=blocked)
    return Decision(Action.FALLBACK, reason)


def after_api_error(decision: Decision, local: LocalAnswer | None, error: str = "") -> Decision:
    """What a FALLBACK decision becomes when the API call fails (`error`: how, in a line)."""
    if local is not None:
        return Decision(Action.DEGRADED, f"{decision.reason}:api_error")
    said = f" ({error})" if error else ""
    if decision.reason == "api_only":
        return _fail("UNAVAILABLE", f"the API model failed{said}")
    return _fail("UNAVAILABLE", f"no local runtime is available and the API fallback failed{said}")


def _api_only(has_fallback: bool, gates: Gates) -> Decision:
    if not has_fallback:
        return _fail("FAILED_PRECONDITION", "no fallback model configured")
    blocked = gates.blocked()
    if blocked is not None:
        return _fail("UNAVAILABLE", f"API fallback blocked: {blocked}")
    return Decision(Action.FALLBACK, "api_only")


def _no_local_answer(mode: Mode, has_fallback: bool, gates: Gates) -> Decision:
    if mode != "hybrid":
        why = f"mode is {mode}"
    elif not has_fallback:
        why = "no fallback is configured"
    elif (blocked := gates.blocked()) is not None:
        why = f"the API fallback is blocked: {blocked}"
    else:
        return Decision(Action.FALLBACK, "local_unavailable")
    return _fail("UNAVAILABLE", f"no local runtime is available and {why}")


def _fail(status: Literal["UNAVAILABLE", "FAILED_PRECONDITION"], message: str) -> Decision:
    return Decision(Action.FAIL, status=status, message=message)

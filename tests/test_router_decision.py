"""The routing decision without a process: one case per route_reason and per failure."""

from __future__ import annotations

import pytest

from services.router.decision import (
    Action,
    Decision,
    Gates,
    LocalAnswer,
    Mode,
    after_api_error,
    decide,
)
from services.router.policy import BreakerState, CallBudget, CircuitBreaker

CONFIDENT = LocalAnswer(parsed=True, confidence=0.9)
UNSURE = LocalAnswer(parsed=True, confidence=0.4)
UNPARSED = LocalAnswer(parsed=False, confidence=0.0)
OPEN = Gates()


def route(
    local: LocalAnswer | None,
    mode: Mode = "hybrid",
    has_fallback: bool = True,
    gates: Gates = OPEN,
) -> Decision:
    return decide(mode=mode, local=local, threshold=0.5, has_fallback=has_fallback, gates=gates)


def test_a_confident_answer_stays_local() -> None:
    assert route(CONFIDENT) == Decision(Action.LOCAL)


def test_the_threshold_itself_is_confident_enough() -> None:
    at = LocalAnswer(parsed=True, confidence=0.5)
    assert route(at).action is Action.LOCAL


@pytest.mark.parametrize(("local", "reason"), [(UNSURE, "low_confidence"), (UNPARSED, "unparsed")])
def test_a_weak_answer_goes_to_the_api(local: LocalAnswer, reason: str) -> None:
    assert route(local) == Decision(Action.FALLBACK, reason)


def test_local_only_never_falls_back() -> None:
    assert route(UNPARSED, mode="local_only").action is Action.LOCAL
    assert route(UNSURE, mode="local_only", has_fallback=False).action is Action.LOCAL


def test_no_fallback_configured_is_a_flagged_local_answer() -> None:
    decided = route(UNSURE, has_fallback=False)
    assert decided == Decision(Action.DEGRADED, "low_confidence:no_fallback_configured")


@pytest.mark.parametrize(
    ("gates", "blocked"),
    [
        (Gates(breaker_closed=False), "circuit_open"),
        (Gates(under_rate_cap=False), "fallback_rate_cap"),
        (Gates(budget_left=False), "budget_exhausted"),
        # consulted in order: the breaker first, then the rate cap, then the budget
        (Gates(breaker_closed=False, under_rate_cap=False, budget_left=False), "circuit_open"),
        (Gates(under_rate_cap=False, budget_left=False), "fallback_rate_cap"),
    ],
)
def test_a_blocked_fallback_is_a_flagged_local_answer(gates: Gates, blocked: str) -> None:
    decided = route(UNPARSED, gates=gates)
    assert decided == Decision(Action.DEGRADED, f"unparsed:{blocked}", blocked=blocked)


def test_an_api_error_after_a_local_answer_is_a_flagged_local_answer() -> None:
    decided = after_api_error(route(UNSURE), UNSURE)
    assert decided == Decision(Action.DEGRADED, "low_confidence:api_error")


def test_no_local_runtime_goes_to_the_api_in_hybrid() -> None:
    assert route(None) == Decision(Action.FALLBACK, "local_unavailable")


@pytest.mark.parametrize(
    ("mode", "has_fallback", "gates", "why"),
    [
        ("local_only", True, OPEN, "mode is local_only"),
        ("hybrid", False, OPEN, "no fallback is configured"),
        ("hybrid", True, Gates(budget_left=False), "the API fallback is blocked: budget_exhausted"),
    ],
)
def test_no_local_runtime_and_no_way_to_the_api_is_unavailable(
    mode: Mode, has_fallback: bool, gates: Gates, why: str
) -> None:
    decided = route(None, mode=mode, has_fallback=has_fallback, gates=gates)
    assert decided.action is Action.FAIL and decided.status == "UNAVAILABLE"
    assert decided.message == f"no local runtime is available and {why}"


def test_no_local_runtime_and_a_failed_api_call_is_unavailable() -> None:
    decided = after_api_error(route(None), None)
    assert (decided.action, decided.status) == (Action.FAIL, "UNAVAILABLE")
    assert decided.message == "no local runtime is available and the API fallback failed"


def test_api_only_sends_every_call_to_the_api() -> None:
    assert route(None, mode="api_only") == Decision(Action.FALLBACK, "api_only")
    assert route(CONFIDENT, mode="api_only") == Decision(Action.FALLBACK, "api_only")


@pytest.mark.parametrize(
    ("has_fallback", "gates", "status", "message"),
    [
        (False, OPEN, "FAILED_PRECONDITION", "no fallback model configured"),
        (True, Gates(breaker_closed=False), "UNAVAILABLE", "API fallback blocked: circuit_open"),
    ],
)
def test_api_only_without_a_usable_api_fails(
    has_fallback: bool, gates: Gates, status: str, message: str
) -> None:
    decided = route(None, mode="api_only", has_fallback=has_fallback, gates=gates)
    assert (decided.action, decided.status, decided.message) == (Action.FAIL, status, message)


def test_api_only_with_a_failed_api_call_fails() -> None:
    decided = after_api_error(route(None, mode="api_only"), None)
    assert (decided.status, decided.message) == ("UNAVAILABLE", "the API model failed")
    said = "AdapterParseError: Failed to parse field age"
    decided = after_api_error(route(None, mode="api_only"), None, said)
    assert decided.message == f"the API model failed ({said})"
    decided = after_api_error(route(None), None, said)
    assert decided.message.endswith(f"the API fallback failed ({said})")


def test_asking_the_breaker_takes_no_probe() -> None:
    """The decision peeks at the breaker; only a call really sent becomes the half-open probe."""
    now = [0.0]
    breaker = CircuitBreaker(failures=1, reset_s=10, clock=lambda: now[0])
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.admits()
    now[0] = 10.0
    assert breaker.admits() and breaker.admits()  # peeking twice leaves the probe free
    assert breaker.allow()  # the call that is sent takes it
    assert not breaker.admits() and not breaker.allow()


def test_a_cancelled_probe_frees_the_half_open_breaker() -> None:
    """A client that leaves mid-call (a stream it stops reading) gives no verdict on the API:
    the probe is free again rather than held forever."""
    now = [0.0]
    breaker = CircuitBreaker(failures=1, reset_s=10, clock=lambda: now[0])
    breaker.record_failure()
    now[0] = 10.0
    assert breaker.allow() and not breaker.admits()
    breaker.abandon()
    assert breaker.state is BreakerState.HALF_OPEN and breaker.admits() and breaker.allow()


def test_asking_the_budget_spends_nothing() -> None:
    budget = CallBudget(per_minute=1, per_day=None, clock=lambda: 0.0)
    assert budget.has_room() and budget.has_room()
    assert budget.try_spend()
    assert not budget.has_room() and not budget.try_spend()


def test_the_lm_clients_own_read_timeout_counts_as_a_timeout() -> None:
    """DSPy's LM times out at the same limit as the router's wait and wraps the socket's
    timeout in its transport error: that is a timeout (retried, counted as one); a refused
    connection or a parse error is not."""
    from dspy.utils import exceptions as lm

    from services.router.fallback import retryable, timed_out

    def wrapped(cause: BaseException) -> lm.LMTransportError:
        try:
            try:
                raise cause
            except BaseException as inner:
                raise RuntimeError("read timed out waiting for headers") from inner
        except RuntimeError as middle:
            err = lm.LMTransportError("[openai/x] read timed out")
            err.__cause__ = middle
            return err

    assert timed_out(wrapped(TimeoutError("timed out")))  # socket.timeout is TimeoutError
    assert timed_out(TimeoutError())
    assert not timed_out(wrapped(ConnectionRefusedError())) and retryable(
        wrapped(ConnectionRefusedError())
    )
    assert not timed_out(ValueError("the answer did not parse"))

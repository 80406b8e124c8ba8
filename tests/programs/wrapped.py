"""One predictor inside a module of the author's own: Python around the call."""

import asyncio

import dspy

from tests.programs.two_step import Classify, Estimate


class Joined(dspy.Module):
    """The request's subject and body are joined into the ticket the predictor reads."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict(Classify)

    def forward(self, subject: str, body: str) -> dspy.Prediction:
        return self.classify(ticket=f"{subject}\n{body}")


def build() -> dspy.Module:
    return Joined()


class Bare(dspy.Module):
    """A wrapper that takes whatever it is given: served from the predictor's signature."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict(Classify)

    def forward(self, **kwargs: str) -> dspy.Prediction:
        return self.classify(**kwargs)


def build_bare() -> dspy.Module:
    return Bare()


class JoinedEstimate(dspy.Module):
    """Its one output is optional: the first row's None is an answer it carries."""

    def __init__(self) -> None:
        super().__init__()
        self.estimate = dspy.Predict(Estimate)

    def forward(self, subject: str, body: str) -> dspy.Prediction:
        return self.estimate(ticket=f"{subject}\n{body}")


def build_estimate() -> dspy.Module:
    return JoinedEstimate()


class WithQueue(Joined):
    """Returns fields its Python computes beside the predictor's answer."""

    def forward(self, subject: str, body: str) -> dspy.Prediction:
        category = super().forward(subject, body).category
        return dspy.Prediction(category=category, queue=f"team-{category}",
                               escalate=category == "security")  # fmt: skip


def build_with_queue() -> dspy.Module:
    return WithQueue()


def a_known_team(args: dict[str, str], prediction: dspy.Prediction) -> float:
    return float(prediction.category != "billing")


def build_refined() -> dspy.Module:
    """DSPy's Refine around the predictor: up to three attempts, kept by a reward."""
    return dspy.Refine(module=dspy.Predict(Classify), N=3, reward_fn=a_known_team, threshold=1.0)


class BestOfJoined(Joined):
    """DSPy's BestOfN inside a module of the author's own: each attempt calls a copy of the
    predictor that BestOfN makes as it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.best = dspy.BestOfN(self.classify, N=3, reward_fn=a_known_team, threshold=1.0)
        del self.classify

    def forward(self, subject: str, body: str) -> dspy.Prediction:
        return self.best(ticket=f"{subject}\n{body}")


def build_best_of() -> dspy.Module:
    return BestOfJoined()


class EachTicket(dspy.Module):
    """Classifies every ticket of a list, the calls run on threads as Module.batch runs them
    (dspy.Parallel)."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict(Classify)

    def forward(self, tickets: list[str]) -> dspy.Prediction:
        asked = [dspy.Example(ticket=ticket).with_inputs("ticket") for ticket in tickets]
        found = self.classify.batch(asked, num_threads=3, disable_progress_bar=True)
        return dspy.Prediction(categories=[prediction.category for prediction in found])


def build_each_ticket() -> dspy.Module:
    return EachTicket()


class AsyncJoined(dspy.Module):
    """Written async only, as DSPy allows (an `aforward`, called with `acall`): no forward."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict(Classify)

    async def aforward(self, subject: str, body: str) -> dspy.Prediction:
        await asyncio.sleep(0)  # where an author's program awaits its own I/O
        return await self.classify.acall(ticket=f"{subject}\n{body}")


def build_async() -> dspy.Module:
    return AsyncJoined()

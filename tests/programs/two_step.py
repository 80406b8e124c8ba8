"""A two-step program for the tests: classify an IT ticket, then draft a reply for its team."""

from typing import Literal

import dspy

from tests.programs.signatures import Draft


class Classify(dspy.Signature):
    """Route an IT support ticket to the team that should handle it."""

    ticket: str = dspy.InputField()
    category: Literal["network", "hardware", "software", "access", "security", "billing"] = (
        dspy.OutputField()
    )


class TwoStep(dspy.Module):
    """Classify, then draft: the second predictor reads the first one's answer."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict(Classify)
        self.draft = dspy.Predict(Draft)

    def forward(self, ticket: str) -> dspy.Prediction:
        category = self.classify(ticket=ticket).category
        reply = self.draft(ticket=ticket, category=category).reply
        return dspy.Prediction(category=category, reply=reply)


def build() -> dspy.Module:
    return TwoStep()


class LastStepOnly(TwoStep):
    """Returns the last predictor's prediction: the category is an intermediate answer."""

    def forward(self, ticket: str) -> dspy.Prediction:
        category = self.classify(ticket=ticket).category
        return self.draft(ticket=ticket, category=category)


def build_last_step() -> dspy.Module:
    return LastStepOnly()


class WithTone(TwoStep):
    """A forward parameter with a default: an input rows and requests may leave out."""

    def forward(self, ticket: str, tone: str = "plain") -> dspy.Prediction:
        return super().forward(ticket if tone == "plain" else f"{ticket} ({tone})")


def build_with_tone() -> dspy.Module:
    return WithTone()


class WithLength(TwoStep):
    """A typed forward parameter no predictor takes, used by the Python between the calls."""

    def forward(self, ticket: str, max_words: int = 40) -> dspy.Prediction:
        found = super().forward(ticket)
        return dspy.Prediction(
            category=found.category, reply=" ".join(found.reply.split()[:max_words])
        )


def build_with_length() -> dspy.Module:
    return WithLength()


class SkipsSpam(TwoStep):
    """Python answers some tickets itself: its `none` is no value of `category`'s Literal."""

    def forward(self, ticket: str) -> dspy.Prediction:
        if ticket.startswith("SPAM"):
            return dspy.Prediction(category="none", reply="")
        return super().forward(ticket)


def build_skips_spam() -> dspy.Module:
    return SkipsSpam()


class AsksTwice(TwoStep):
    """Classifies the ticket and its first sentence: one predictor, two inputs per row."""

    def forward(self, ticket: str) -> dspy.Prediction:
        self.classify(ticket=ticket.split(".")[0] + " (first sentence)")
        return super().forward(ticket)


def build_asks_twice() -> dspy.Module:
    return AsksTwice()


class Estimate(dspy.Signature):
    """Estimate how many people the ticket's problem affects, if it says."""

    ticket: str = dspy.InputField()
    affected: int | None = dspy.OutputField()


class EstimateThenDraft(dspy.Module):
    """An optional number as the intermediate answer; the reply is the only output."""

    def __init__(self) -> None:
        super().__init__()
        self.estimate = dspy.Predict(Estimate)
        self.draft = dspy.Predict(Draft)

    def forward(self, ticket: str) -> dspy.Prediction:
        affected = self.estimate(ticket=ticket).affected
        return self.draft(ticket=ticket, category=f"{affected or 'unknown'} affected")


def build_estimate_then_draft() -> dspy.Module:
    return EstimateThenDraft()


class InlineNote(dspy.Module):
    """A second predictor made inside forward, not held by the module: nothing could serve it."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict(Classify)

    def forward(self, ticket: str) -> dspy.Prediction:
        category = self.classify(ticket=ticket).category
        note = dspy.Predict("ticket -> note")(ticket=ticket).note
        return dspy.Prediction(category=category, note=note)


def build_inline_note() -> dspy.Module:
    return InlineNote()

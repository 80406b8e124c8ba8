"""Support pipeline: triage an IT ticket in three steps, with Python between them.

1. classify the ticket's category (as in ticket_triage);
2. extract the affected system and the urgency;
3. draft a one-sentence first reply, conditioned on the category, system and urgency.
"""

import re
from collections import Counter
from typing import Any, Literal

import dspy

Category = Literal["network", "hardware", "software", "access", "security", "billing"]
Urgency = Literal["low", "medium", "high"]


class Classify(dspy.Signature):
    """Route an IT support ticket to the team that should handle it."""

    ticket: str = dspy.InputField(desc="the ticket as the user wrote it")
    category: Category = dspy.OutputField(
        desc=(
            "network: connectivity, Wi-Fi, VPN, DNS; hardware: physical devices; "
            "software: application or OS errors, installs, updates; access: passwords, "
            "accounts, permissions, MFA; security: phishing, malware, suspicious activity, lost "
            "devices; billing: invoices, charges, subscriptions, refunds"
        )
    )


class Extract(dspy.Signature):
    """Find the system the ticket is about and how urgent it is."""

    ticket: str = dspy.InputField(desc="the ticket as the user wrote it")
    system: str = dspy.OutputField(desc="the affected system, in the ticket's own words")
    urgency: Urgency = dspy.OutputField(
        desc="high: people are blocked or it says urgent; low: it says there is no rush; "
        "medium: otherwise"
    )


class Draft(dspy.Signature):
    """Write a one-sentence first reply to the ticket's author."""

    ticket: str = dspy.InputField(desc="the ticket as the user wrote it")
    category: Category = dspy.InputField(desc="the team the ticket goes to")
    system: str = dspy.InputField(desc="the affected system")
    urgency: Urgency = dspy.InputField(desc="how urgent the ticket is")
    reply: str = dspy.OutputField(desc="one sentence: who is on it and what happens next")


class SupportPipeline(dspy.Module):
    """Triage an IT ticket: its team, the affected system, its urgency and a first reply."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict(Classify)
        self.extract = dspy.Predict(Extract)
        self.draft = dspy.Predict(Draft)

    def forward(self, ticket: str) -> dspy.Prediction:
        category = self.classify(ticket=ticket).category
        found = self.extract(ticket=ticket)
        system = found.system.strip().rstrip(".")
        reply = self.draft(
            ticket=ticket, category=category, system=system, urgency=found.urgency
        ).reply
        return dspy.Prediction(
            category=category, system=system, urgency=found.urgency, reply=reply
        )


def build() -> dspy.Module:
    return SupportPipeline()


def _words(text: Any) -> list[str]:
    return re.findall(r"\w+", str(text).lower())


def token_f1(gold: Any, guess: Any) -> float:
    common = sum((Counter(_words(gold)) & Counter(_words(guess))).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(_words(guess)), common / len(_words(gold))
    return 2 * precision * recall / (precision + recall)


def metric(example: Any, prediction: Any, trace: Any = None) -> float:
    """Exact match on category and urgency, token F1 on the reply: their mean."""
    same = [
        str(example[k]).strip().lower() == str(prediction.get(k, "")).strip().lower()
        for k in ("category", "urgency")
    ]
    return (sum(same) + token_f1(example["reply"], prediction.get("reply", ""))) / 3

"""Inbox routing: send an email from the shared inbox to the department that owns it, and say
whether someone has to answer it."""

from typing import Literal

import dspy

Department = Literal["sales", "support", "finance", "hr"]


class InboxRouting(dspy.Signature):
    """Route an email that arrived in the company's shared inbox."""

    subject: str = dspy.InputField(desc="the email's subject line")
    body: str = dspy.InputField(desc="the email's text")
    department: Department = dspy.OutputField(
        desc=(
            "sales: quotes, pricing, demos, new orders, contract renewals from prospects and "
            "customers; support: problems using the product, bugs, outages, how-to questions; "
            "finance: invoices, payments, refunds, receipts, supplier bills; "
            "hr: job applications, interviews, employment references, staff matters"
        )
    )
    needs_reply: bool = dspy.OutputField(
        desc=(
            "True when the sender asks a question or asks us to do something; False for "
            "notifications, confirmations, thank-yous and FYIs that expect no answer"
        )
    )


def build() -> dspy.Module:
    return dspy.Predict(InboxRouting)

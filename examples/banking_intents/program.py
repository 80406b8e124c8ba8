"""Banking intents: name the intent of a retail-bank customer's chat message.

The labels are intent names in the style of the Banking77 benchmark: snake_case phrases of
3 to 9 tokens, some sharing their first words (`card_arrival`, `card_payment_fee_charged`).
A label's token count says nothing about how sure the model is, which is what the router's
confidence has to see through.
"""

from typing import Literal

import dspy

Intent = Literal[
    "card_arrival",
    "card_payment_fee_charged",
    "lost_or_stolen_card",
    "declined_card_payment",
    "pending_transfer",
    "failed_transfer",
    "refund_not_showing_up",
    "exchange_rate",
]


class BankingIntent(dspy.Signature):
    """Classify a bank customer's chat message by the intent the support team handles it under."""

    message: str = dspy.InputField(desc="the customer's message, as typed in the app's chat")
    intent: Intent = dspy.OutputField(
        desc=(
            "card_arrival: a new or replacement card has not arrived yet; "
            "card_payment_fee_charged: an unexpected fee on a card payment; "
            "lost_or_stolen_card: the card is lost, stolen or in someone else's hands; "
            "declined_card_payment: a card payment was refused; "
            "pending_transfer: a transfer is sent but still processing; "
            "failed_transfer: a transfer was rejected or bounced back; "
            "refund_not_showing_up: a merchant's refund is not on the account; "
            "exchange_rate: the rate applied to, or offered for, a currency conversion"
        )
    )


def build() -> dspy.Module:
    return dspy.Predict(BankingIntent)

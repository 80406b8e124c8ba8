"""A DSPy ReAct agent (`forward(**input_args)`): its inputs are its signature's."""

import dspy

PRICES = {"mug": 8, "lamp": 25}


def price(item: str) -> int:
    """The price of an item in dollars."""
    return PRICES.get(item.lower(), 0)


class Quote(dspy.Signature):
    """Answer how much the items cost in total."""

    question: str = dspy.InputField()
    total: int = dspy.OutputField()


def build() -> dspy.Module:
    return dspy.ReAct(Quote, tools=[price], max_iters=3)

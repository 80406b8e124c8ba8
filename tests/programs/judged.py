"""A metric of the user's own that asks an LM, as DSPy users write one: a judge predictor."""

from typing import Any

import dspy


class Correct(dspy.Signature):
    """Is the answer a team that exists?"""

    answer: str = dspy.InputField()
    correct: bool = dspy.OutputField()


judge = dspy.Predict(Correct)


def metric(example: Any, prediction: Any, trace: Any = None) -> float:
    return float(judge(answer=prediction.category).correct)

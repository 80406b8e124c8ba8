"""Technical Q&A: short, exact answers to engineering questions, reasoning first.

The seed's TechnicalQA signature under dspy.ChainOfThought: the teacher (an API model) writes a
`reasoning` field before the `answer`, and the student learns to do the same. Distill it from an
API teacher (`teacher.model`); the dataset's answers are references for the metric (token F1),
not reasoning traces, so a `gold` teacher has nothing to teach the reasoning field.
"""

import dspy


class TechnicalQA(dspy.Signature):
    """Answer a technical question accurately and concisely."""

    question: str = dspy.InputField(desc="a question about software, systems or networking")
    answer: str = dspy.OutputField(desc="the answer in a few words or one short sentence")


def build() -> dspy.Module:
    return dspy.ChainOfThought(TechnicalQA)

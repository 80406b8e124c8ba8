"""A local module the two-step program imports: shipped with it in the bundle."""

import dspy


class Draft(dspy.Signature):
    """Write a one-sentence first reply to the ticket's author."""

    ticket: str = dspy.InputField()
    category: str = dspy.InputField(desc="the team the ticket goes to")
    reply: str = dspy.OutputField()

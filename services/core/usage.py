"""Token accounting on the wire: one call's `Usage`, or the sum of a program's calls (the
runtime's own, and the API model's calls the router lists the same way)."""

from __future__ import annotations

from typing import Protocol

from services.core.api import pb


class Counted(Protocol):
    """What a finished completion reports: the runtime's `Finished` and a program's `LmCall`."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def cached_prompt_tokens(self) -> int: ...
    @property
    def decode_steps(self) -> int | None: ...


def usage_of(*counted: Counted) -> pb.Usage:
    """The token accounting of one call, or the sum of a program's calls."""
    return pb.Usage(
        prompt_tokens=sum(c.prompt_tokens for c in counted),
        completion_tokens=sum(c.completion_tokens for c in counted),
        cached_prompt_tokens=sum(c.cached_prompt_tokens for c in counted),
        decode_steps=sum(decode_steps(c) for c in counted),
    )


def decode_steps(counted: Counted) -> int:
    """Tokens sampled: every completion token unless typed decoding forced some."""
    steps = counted.decode_steps
    return counted.completion_tokens if steps is None else steps

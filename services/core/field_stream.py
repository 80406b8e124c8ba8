"""Output fields' text as the model writes it, from ChatAdapter's answer format
(`[[ ## name ## ]]`, the value, a blank line, the next header), for PredictStream. Pure."""

from __future__ import annotations

import re
from collections.abc import Collection

MARK = "[[ ## "  # every header starts so
_HEADER = re.compile(r"\[\[ ## (\w+) ## \]\]")


class FieldStream:
    """Feed the answer's text as it comes; get (field, text) pieces of each output value.

    A piece is given once it cannot be part of the next header: trailing whitespace and a
    tail that could begin `[[ ## ` wait for what follows. Joined, a field's pieces are its
    value as ChatAdapter splits it (stripped); headers, the completed marker and fields that
    are not `outputs` give nothing."""

    def __init__(self, outputs: Collection[str]) -> None:
        self._outputs = set(outputs)
        self._field: str | None = None  # the output whose value is being written
        self._pending = ""  # text not given yet
        self._fresh = True  # nothing of this value given yet: its leading whitespace is not

    def feed(self, text: str) -> list[tuple[str, str]]:
        self._pending += text
        pieces: list[tuple[str, str]] = []
        held = None
        while (mark := self._pending.find(MARK)) >= 0:
            header = _HEADER.match(self._pending, mark)
            if header is None and self._pending.find("]]", mark) < 0:
                # maybe a header being written: it and the whitespace before it wait
                held = len(self._pending) - len(self._pending[:mark].rstrip())
                break
            if header is None:  # `[[ ## ` that is no header: the value's own text
                self._give(self._pending[: mark + len(MARK)], pieces)
                self._pending = self._pending[mark + len(MARK) :]
                continue
            self._give(self._pending[:mark].rstrip(), pieces)
            name = header.group(1)
            self._field = name if name in self._outputs else None
            self._fresh = True
            self._pending = self._pending[header.end() :]
        held = _held_back(self._pending) if held is None else held
        self._give(self._pending[: len(self._pending) - held], pieces)
        self._pending = self._pending[len(self._pending) - held :]
        return pieces

    def close(self) -> list[tuple[str, str]]:
        """What is left when the answer ends (a value cut short, with no blank line after)."""
        pieces: list[tuple[str, str]] = []
        self._give(self._pending.rstrip(), pieces)  # `feed` left no whole header in it
        self._pending = ""
        return pieces

    def _give(self, text: str, pieces: list[tuple[str, str]]) -> None:
        if self._field is None:  # text outside an output's value
            return
        if self._fresh:
            text = text.lstrip()
        if text:
            self._fresh = False
            pieces.append((self._field, text))


def _held_back(text: str) -> int:
    """How many trailing characters must wait: whitespace (the blank line before a header, or
    the value's own) and a tail that could begin a header."""
    for size in range(min(len(MARK), len(text)), 0, -1):
        if MARK.startswith(text[-size:]):
            return size + len(text[:-size]) - len(text[:-size].rstrip())
    return len(text) - len(text.rstrip())

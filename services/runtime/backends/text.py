"""Incremental detokenization with stop strings held back until ruled out."""

from __future__ import annotations

import codecs


class StopStringBuffer:
    """Accumulates generated text; releases only what cannot become a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.full_text = ""  # everything decoded so far
        self._released = 0  # chars of full_text already handed out
        self.stopped_by = ""  # the stop string that ended the text

    @property
    def stopped(self) -> bool:
        return bool(self.stopped_by)  # stop strings are never empty

    def feed(self, piece: bytes) -> tuple[str, int, int]:
        """Add one token's bytes. Returns (text to release now, token start, token end)."""
        start = len(self.full_text)
        self.full_text += self._decoder.decode(piece)
        end = len(self.full_text)
        found = [
            (index, stop)
            for stop in self._stops
            if (index := self.full_text.find(stop, max(0, self._released - len(stop)))) != -1
        ]
        if found:  # the earliest, when one piece of text holds several
            index, self.stopped_by = min(found)
            self.full_text = self.full_text[:index]
            return self._release(index), min(start, index), min(end, index)
        return self._release(len(self.full_text) - self._held_suffix()), start, end

    def flush(self) -> str:
        """At the end: release whatever was held back."""
        if not self.stopped:
            self.full_text += self._decoder.decode(b"", final=True)
        return self._release(len(self.full_text))

    def _held_suffix(self) -> int:
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self.full_text)), longest, -1):
                if self.full_text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _release(self, upto: int) -> str:
        if upto <= self._released:
            return ""
        text = self.full_text[self._released : upto]
        self._released = upto
        return text

"""Generated tokens' log-probabilities, sent with the chunk that shows each token's text.

A backend holds text back while it might begin a stop string, so a token's text can reach
the client a few chunks after the token: its log-probability waits with it. A token the stop
string swallowed whole is never shown, and neither is its log-probability (as OpenAI's API).
"""

from __future__ import annotations

from services.core.api import pb
from services.runtime.backends.base import TokenPiece


def token_logprob(token: bytes, logprob: float = 0.0, token_id: int | None = None
                  ) -> pb.TokenLogprob:  # fmt: skip
    """A token's text (U+FFFD for bytes that are not whole UTF-8), bytes, log-probability
    (0 where none is given: Tokenize's pieces) and id, when known."""
    return pb.TokenLogprob(token=token.decode("utf-8", "replace"), logprob=logprob, bytes=token,
                           id=token_id)  # fmt: skip


class ShownLogprobs:
    """The log-probabilities of one generation's tokens, released as their text is shown."""

    def __init__(self) -> None:
        self._waiting: list[TokenPiece] = []
        self._shown = 0  # characters of the generated text sent so far

    def add(self, piece: TokenPiece) -> None:
        if piece.logprob is not None:
            self._waiting.append(piece)

    def shown(self, text: str, last: bool = False) -> list[pb.GeneratedTokenLogprob]:
        """The tokens whose text is now shown, `text` having just been sent; with `last`,
        also a token cut short by a stop string (its shown part begins before the end)."""
        self._shown += len(text)
        ready = 0
        for piece in self._waiting:
            if not (piece.end <= self._shown or (last and piece.start < self._shown)):
                break
            ready += 1
        released, self._waiting = self._waiting[:ready], self._waiting[ready:]
        return [_listed(piece) for piece in released]


def _listed(piece: TokenPiece) -> pb.GeneratedTokenLogprob:
    """A token's entry: itself and the likeliest at its position, with their ids if known."""
    ids: list[int | None] = [*piece.top_ids] or [None] * len(piece.top)
    return pb.GeneratedTokenLogprob(
        token=token_logprob(piece.token, piece.logprob or 0.0, piece.token_id),
        top_logprobs=[token_logprob(text, value, token_id)
                      for (text, value), token_id in zip(piece.top, ids, strict=True)],
    )  # fmt: skip

"""PredictStream: a Predict whose output values are sent as the model writes them (the runtime's
model, or a router's API model)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

from services.core.api import pb
from services.core.field_stream import FieldStream

Emit = Callable[[pb.OutputDelta], None]


class Deltas:
    """One predictor call's answer text, handed on as OutputDelta pieces as it comes."""

    def __init__(
        self,
        predictor: str,
        outputs: Iterable[str],
        emit: Emit,
        served_by: pb.ServedBy = pb.SERVED_BY_LOCAL,
    ) -> None:
        self._predictor = predictor
        self._stream = FieldStream(list(outputs))
        self._emit = emit
        self._served_by = served_by

    def text(self, piece: str) -> None:
        self._hand(self._stream.feed(piece))

    def close(self) -> None:
        self._hand(self._stream.close())

    def _hand(self, pieces: list[tuple[str, str]]) -> None:
        for field, text in pieces:
            self._emit(pb.OutputDelta(predictor=self._predictor, field=field, text=text,
                                      served_by=self._served_by))  # fmt: skip


async def chunks(
    answer: Awaitable[pb.PredictResponse], sent: asyncio.Queue[pb.PredictChunk]
) -> AsyncIterator[pb.PredictChunk]:
    """Each chunk as the answer's calls put it in `sent`, then the response; the answer's
    failure is raised after the chunks sent before it."""
    task = asyncio.ensure_future(answer)
    try:
        while True:
            waiting = asyncio.ensure_future(sent.get())
            done, _ = await asyncio.wait({waiting, task}, return_when=asyncio.FIRST_COMPLETED)
            if waiting not in done:
                waiting.cancel()
                break
            yield waiting.result()
        while not sent.empty():
            yield sent.get_nowait()
        yield pb.PredictChunk(response=task.result())
    finally:
        task.cancel()


def restart_note(restart: pb.StreamRestart) -> str:
    """A router's restart in a line, for a client showing the values as they come."""
    if restart.served_by == pb.SERVED_BY_FALLBACK:
        return f"the router falls back to the API model ({restart.reason}); its answer:"
    return f"the API model's answer failed; back to the local answer ({restart.reason}):"

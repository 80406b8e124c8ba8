"""PredictStream: a Predict whose output values are sent as the model writes them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

from services.core.api import pb
from services.core.field_stream import FieldStream

Emit = Callable[[pb.OutputDelta], None]


class Deltas:
    """One predictor call's answer text, handed on as OutputDelta pieces as it comes."""

    def __init__(self, predictor: str, outputs: Iterable[str], emit: Emit) -> None:
        self._predictor = predictor
        self._stream = FieldStream(list(outputs))
        self._emit = emit

    def text(self, piece: str) -> None:
        self._hand(self._stream.feed(piece))

    def close(self) -> None:
        self._hand(self._stream.close())

    def _hand(self, pieces: list[tuple[str, str]]) -> None:
        for field, text in pieces:
            self._emit(pb.OutputDelta(predictor=self._predictor, field=field, text=text))


async def chunks(
    answer: Awaitable[pb.PredictResponse], deltas: asyncio.Queue[pb.OutputDelta]
) -> AsyncIterator[pb.PredictChunk]:
    """Each delta as the answer's calls put it in `deltas`, then the response; the answer's
    failure is raised after the deltas sent before it."""
    task = asyncio.ensure_future(answer)
    try:
        while True:
            waiting = asyncio.ensure_future(deltas.get())
            done, _ = await asyncio.wait({waiting, task}, return_when=asyncio.FIRST_COMPLETED)
            if waiting not in done:
                waiting.cancel()
                break
            yield pb.PredictChunk(delta=waiting.result())
        while not deltas.empty():
            yield pb.PredictChunk(delta=deltas.get_nowait())
        yield pb.PredictChunk(response=task.result())
    finally:
        task.cancel()

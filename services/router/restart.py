"""A router's PredictStream when it falls back: the API model's values streamed after a
restart that withdraws the local deltas, and the local answer sent again when the API fails
after its own deltas went out."""

from __future__ import annotations

import asyncio

from services.core.api import pb
from services.core.predict_stream import Emit


class FallbackStream:
    """Puts the API model's deltas in the stream's queue, a restart to the API model before
    the first. Its emitters are called from the fallback's worker thread."""

    def __init__(self, sent: asyncio.Queue[pb.PredictChunk], program: str) -> None:
        self._sent = sent
        self._program = program
        self._loop = asyncio.get_running_loop()
        self.restarted = False

    def emitter(self, reason: str) -> Emit:
        """An emit for the API model's call, sent to the API for `reason`."""

        def emit(delta: pb.OutputDelta) -> None:
            self._loop.call_soon_threadsafe(self._put, delta, reason)

        return emit

    def _put(self, delta: pb.OutputDelta, reason: str) -> None:
        if not self.restarted:
            self.restarted = True
            restart = pb.StreamRestart(served_by=pb.SERVED_BY_FALLBACK, reason=reason)
            self._sent.put_nowait(pb.PredictChunk(restart=restart))
        self._sent.put_nowait(pb.PredictChunk(delta=delta))

    def before(self, answer: pb.PredictResponse, order: list[str]) -> list[pb.PredictChunk]:
        """What goes before the answer: nothing, unless the API's deltas went out and the
        answer is the local one after all (the API failed mid-answer): then a restart back to
        it and its output values, whole, in the signature's `order`, named by the program."""
        if not self.restarted or answer.served_by == pb.SERVED_BY_FALLBACK:
            return []
        restart = pb.StreamRestart(served_by=pb.SERVED_BY_LOCAL, reason=answer.route_reason)
        values = [
            pb.PredictChunk(delta=self._local_value(name, answer.outputs[name]))
            for name in order
            if answer.outputs.get(name)
        ]
        return [pb.PredictChunk(restart=restart), *values]

    def _local_value(self, field: str, text: str) -> pb.OutputDelta:
        return pb.OutputDelta(predictor=self._program, field=field, text=text,
                              served_by=pb.SERVED_BY_LOCAL)  # fmt: skip

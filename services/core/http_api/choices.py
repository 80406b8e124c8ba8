"""OpenAI's `n`: several choices for one completion request, each its own Generate call (so
each meets the queue, the limits and the batching as any call does)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from services.core.api import pb

# The most choices one request may ask for: each is a call, and a runtime holds `--parallel`
# running calls plus `--max-queue` waiting ones.
CHOICES_LIMIT = 16


def choice_calls(call: pb.GenerateRequest, n: int) -> list[pb.GenerateRequest]:
    """The Generate call of each choice: with a seed, choice i samples with seed + i (the
    same seed would give the same text n times); without, each call draws its own."""
    calls = []
    for index in range(n):
        choice = pb.GenerateRequest()
        choice.CopyFrom(call)
        if index and call.options.HasField("seed"):
            choice.options.seed = (call.options.seed + index) % 2**32
        calls.append(choice)
    return calls


class Interleaved:
    """The chunks of several Generate streams as they arrive, each as (choice index, chunk).
    A failed stream cancels the others and raises its error. One stream (the usual `n` = 1)
    is read as it is, with no thread between."""

    def __init__(self, streams: list[Any]) -> None:
        self._streams = streams
        self._arrived: queue.Queue[tuple[int, pb.GenerateChunk | grpc.RpcError | None]] = (
            queue.Queue()
        )
        self._open = len(streams)
        self._single = iter(streams[0]) if len(streams) == 1 else None
        for index, stream in enumerate(streams if self._single is None else []):
            threading.Thread(target=self._pump, args=(index, stream), daemon=True).start()

    def __iter__(self) -> Iterator[tuple[int, pb.GenerateChunk]]:
        return self

    def __next__(self) -> tuple[int, pb.GenerateChunk]:
        if self._single is not None:
            return 0, next(self._single)
        while self._open:
            index, item = self._arrived.get()
            if item is None:
                self._open -= 1
            elif isinstance(item, grpc.RpcError):
                self.cancel()
                raise item
            else:
                return index, item
        raise StopIteration

    def cancel(self) -> None:
        for stream in self._streams:
            stream.cancel()

    def _pump(self, index: int, stream: Any) -> None:
        try:
            for chunk in stream:
                self._arrived.put((index, chunk))
        except grpc.RpcError as err:
            self._arrived.put((index, err))
        self._arrived.put((index, None))

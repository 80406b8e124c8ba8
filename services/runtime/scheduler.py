"""The one owner of the model: a worker thread fed by a bounded queue.

llama.cpp contexts are not thread-safe, so every generation runs on this thread. gRPC handlers
(on the asyncio loop) submit jobs and read their events back through an asyncio.Queue. A job
stops within one decode step once its call is cancelled or its deadline passes.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.runtime.backends import (
    Backend,
    Finished,
    GenerationParams,
    PreparedPrompt,
    TokenPiece,
)

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Admission control: more calls are waiting than max_queue allows."""


class SchedulerClosed(Exception):
    """The scheduler is shutting down and takes no new work."""


@dataclass
class Job:
    prompt: PreparedPrompt
    params: GenerationParams
    loop: asyncio.AbstractEventLoop
    deadline: float | None  # time.monotonic() value, or None
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    _events: asyncio.Queue[TokenPiece | Finished | BaseException] = field(
        default_factory=asyncio.Queue
    )
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def should_stop(self) -> bool:
        if self._cancelled.is_set():
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _push(self, event: TokenPiece | Finished | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._cancelled.set()

    async def events(self) -> AsyncIterator[TokenPiece | Finished]:
        """The job's tokens, then its Finished. Raises what the backend raised."""
        while True:
            event = await self._events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Finished):
                return


class Scheduler:
    """Runs one job at a time on a dedicated thread; at most `max_queue` jobs wait."""

    def __init__(self, backend: Backend, max_queue: int) -> None:
        self._backend = backend
        self._max_queue = max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="model-scheduler", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    def submit(
        self,
        prompt: PreparedPrompt,
        params: GenerationParams,
        *,
        deadline: float | None,
    ) -> Job:
        job = Job(prompt=prompt, params=params, loop=asyncio.get_running_loop(), deadline=deadline)
        with self._lock:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            # One job runs; max_queue more may wait behind it.
            if self._waiting + self._running >= self._max_queue + 1:
                raise QueueFull(
                    f"{self._waiting} calls wait for the model (max_queue={self._max_queue})"
                )
            self._waiting += 1
        self._jobs.put(job)
        return job

    def close(self, timeout: float | None = None) -> None:
        with self._lock:
            self._closed = True
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                self._running += 1
            try:
                self._execute(job)
            finally:
                with self._lock:
                    self._running -= 1

    def _execute(self, job: Job) -> None:
        job.started_at = time.monotonic()
        if job.should_stop():  # cancelled or expired while queued: never touch the model
            job._push(Finished(reason="cancelled", prompt_tokens=0, completion_tokens=0))
            return
        try:
            for event in self._backend.generate(job.prompt, job.params, job.should_stop):
                job._push(event)
        except Exception as err:  # reported to the caller; the worker keeps serving
            log.exception("generation failed")
            job._push(err)

"""The one owner of the model: a worker thread fed by a bounded queue.

With a batching backend the same thread steps all running jobs together (continuous
batching); otherwise it runs one job at a time.

llama.cpp contexts are not thread-safe, so every generation runs on this thread. gRPC handlers
(on the asyncio loop) submit jobs and read their events back through an asyncio.Queue. A job
stops within one decode step once its call is cancelled or its deadline passes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Generator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from services.runtime.backends import (
    Backend,
    BackendError,
    BatchingBackend,
    Finished,
    GenerationParams,
    HoldsContext,
    KeepsPrefixes,
    PreparedPrompt,
    SlotState,
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
    decoded: int = 0  # tokens generated so far
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


@dataclass
class SideWork:
    """Model work besides generation (embedding), as steps: each `next` one bounded piece
    (a decode), the generator's return value its result, set on `future`."""

    steps: Generator[None, None, Any]
    future: Future[Any] = field(default_factory=Future)


_WAKE = object()  # a queue item that only wakes the worker: side work is waiting


class Scheduler:
    """Runs jobs on a dedicated thread; `slots` run at once and at most `max_queue` wait.

    Side work (`submit_steps`) runs on the same thread, a step at a time between generation
    steps: every llama.cpp computation belongs on one thread (see BatchedLlamaCpp.set_prefix).
    """

    slots = 1

    def __init__(self, backend: Backend, max_queue: int) -> None:
        self._backend = backend
        self._max_queue = max_queue
        self._jobs: queue.Queue[Job | object | None] = queue.Queue()
        self._side: collections.deque[SideWork] = collections.deque()
        self._side_due = 0.0  # time.monotonic() before which generation keeps the thread
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._closed = False
        self._current: Job | None = None  # the job generating (one at a time)
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="model-scheduler", daemon=True)
        self._thread.start()

    def wait_ready(self) -> None:
        """Block until the worker has done its one-time work; raise what that work raised."""
        self._ready.wait()
        if self._failed is not None:
            raise self._failed

    def _get_ready(self) -> None:
        """Run `_warm` on this thread (the only one that touches the model), then say ready."""
        try:
            self._warm()
        except BaseException as err:
            log.exception("warming the model failed")
            self._failed = err
        self._ready.set()

    def _warm(self) -> None:
        """The backend's one-time work: its program prefix, evaluated before calls come."""
        if not isinstance(self._backend, KeepsPrefixes):
            return
        started = time.perf_counter()
        self._backend.warm()
        if self._backend.prefix_tokens:
            log.info(
                "program prefix cached",
                extra={"prefix_tokens": self._backend.prefix_tokens,
                       "seconds": round(time.perf_counter() - started, 2)},
            )  # fmt: skip

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
            # `slots` jobs run; max_queue more may wait behind them.
            if self._waiting + self._running >= self._max_queue + self.slots:
                raise QueueFull(
                    f"{self._waiting} calls wait for the model (max_queue={self._max_queue})"
                )
            self._waiting += 1
        self._jobs.put(job)
        return job

    def submit_steps(self, steps: Generator[None, None, Any]) -> Future[Any]:
        """Side work run on the model's thread, interleaved with generation; its future
        holds the result (or what it raised). Admission is the caller's."""
        with self._lock:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
        work = SideWork(steps)
        self._side.append(work)
        self._jobs.put(_WAKE)
        return work.future

    def _advance_side(self, generating: bool = False) -> None:
        """One step of the side work first in line, which then goes to the back of it (so
        a token waits for one decode, however many calls embed). While calls generate, side
        work takes at most half the thread's time: after a step took t, generation has the
        next t (else a stream of embeddings would stall every token behind one)."""
        if not self._side or (generating and time.monotonic() < self._side_due):
            return
        started = time.monotonic()
        self._step_side()
        ended = time.monotonic()
        self._side_due = ended + (ended - started)

    def _step_side(self) -> None:
        work = self._side.popleft()
        if not _claimed(work.future):  # its caller cancelled it before it started
            work.steps.close()
            return
        try:
            next(work.steps)
        except StopIteration as done:
            work.future.set_result(done.value)
        except Exception as err:  # the caller's to report; the worker keeps serving
            work.future.set_exception(err)
        else:
            self._side.append(work)

    def _close_side(self) -> None:
        while self._side:
            work = self._side.popleft()
            work.steps.close()
            if _claimed(work.future):
                work.future.set_exception(SchedulerClosed("the server is shutting down"))

    def close(self, timeout: float | None = None) -> None:
        with self._lock:
            self._closed = True
        self._jobs.put(None)
        self._thread.join(timeout)

    def _take(self, job: Job) -> bool:
        """Move a dequeued job to running; False (and it is answered) if it already stopped."""
        with self._lock:
            self._waiting -= 1
            self._running += 1
        job.started_at = time.monotonic()
        if job.should_stop():  # cancelled or expired while queued: never touch the model
            self._done(job, Finished(reason="cancelled", prompt_tokens=0, completion_tokens=0))
            return False
        return True

    def _done(self, job: Job, event: Finished | BaseException) -> None:
        if self._current is job:  # its slot is free before its caller hears it ended
            self._current = None
        job._push(event)
        with self._lock:
            self._running -= 1

    def _run(self) -> None:
        self._get_ready()
        while True:
            try:
                job = self._jobs.get(block=not self._side)
            except queue.Empty:  # nothing generates: a side step, then the queue again
                self._advance_side()
                continue
            if job is None:
                self._close_side()
                return
            if isinstance(job, Job) and self._take(job):
                self._execute(job)

    def slot_states(self) -> list[SlotState]:
        """The one slot: the job generating in it, or idle (a snapshot, off the model's
        thread)."""
        backend = self._backend
        held = backend.held_tokens if isinstance(backend, HoldsContext) else 0
        job = self._current
        if job is None:
            return [SlotState(0, False, held)]
        prompt = len(job.prompt.tokens or ())
        return [SlotState(0, True, held, prompt_tokens=prompt, decoded_tokens=job.decoded)]

    def _execute(self, job: Job) -> None:
        self._current = job
        try:
            for event in self._backend.generate(job.prompt, job.params, job.should_stop):
                if isinstance(event, Finished):
                    self._done(job, event)
                    return
                job.decoded += 1
                job._push(event)
                if self._side:  # a step of side work between two tokens, in its turn
                    self._advance_side(generating=True)
        except Exception as err:  # reported to the caller; the worker keeps serving
            log.exception("generation failed")
            self._done(job, err)
            return
        self._done(job, BackendError("the backend ended a generation without finishing it"))


class BatchScheduler(Scheduler):
    """Continuous batching: jobs join a running batch between decode steps.

    The worker admits queued jobs into free slots, drops the ones cancelled or past their
    deadline, runs one decode step across all active jobs and hands each its events.
    """

    def __init__(self, engine: BatchingBackend, max_queue: int) -> None:
        self._engine = engine
        self.slots = engine.slots
        self._active: list[Job] = []
        super().__init__(engine, max_queue)

    def _run(self) -> None:
        engine = self._engine
        self._get_ready()
        while True:
            self._advance_side(generating=bool(self._active))
            # Block for work only when nothing is decoding or waiting; else admit what is there.
            while engine.free_slots:
                try:
                    job = self._jobs.get(block=not self._active and not self._side)
                except queue.Empty:
                    break
                if job is None:
                    self._stop_all()
                    return
                if not isinstance(job, Job):  # a wake-up: side work waits
                    break
                if self._take(job):
                    try:
                        engine.start(job, job.prompt, job.params)
                    except Exception as err:
                        log.exception("could not start a generation")
                        self._done(job, err)
                        continue
                    self._active.append(job)
            for job in [j for j in self._active if j.should_stop()]:
                finished = engine.cancel(job)
                self._active.remove(job)
                self._done(job, finished or BackendError("the job was not running"))
            if not self._active:
                continue
            try:
                events = engine.step()
            except Exception as err:  # the batch is lost; every caller in it is told
                log.exception("batched decode failed")
                for job in self._active:
                    engine.cancel(job)
                    self._done(job, err)
                self._active.clear()
                continue
            for job, event in events:
                if isinstance(event, Finished):
                    self._active.remove(job)
                    self._done(job, event)
                else:
                    job._push(event)

    def slot_states(self) -> list[SlotState]:
        return self._engine.slot_states()

    def _stop_all(self) -> None:
        for job in self._active:
            finished = self._engine.cancel(job)
            self._done(job, finished or BackendError("stopped"))
        self._active.clear()
        self._close_side()


def _claimed(future: Future[Any]) -> bool:
    """True when the future is the worker's to answer: running, so its caller can no longer
    cancel it (setting a result on a future cancelled meanwhile would raise on the model's
    thread); False when the caller cancelled it first."""
    return future.running() or future.set_running_or_notify_cancel()


def make_scheduler(backend: Backend, max_queue: int) -> Scheduler:
    if isinstance(backend, BatchingBackend):
        return BatchScheduler(backend, max_queue)
    return Scheduler(backend, max_queue)

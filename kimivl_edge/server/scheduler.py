"""The one worker thread that owns the model: jobs run one at a time, first come first served.

A job is a function ``work(emit, cancelled)`` run on the worker thread; it reports through ``emit`` (delivered to
the job's asyncio queue on the event loop) and stops early when ``cancelled`` is set. The worker first runs the
loader; until it returns, ``ready`` is False. Past ``max_queue`` waiting jobs, ``submit`` raises QueueFull. A job
that raises hands the exception to its reader and the worker goes on with the next one."""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

log = logging.getLogger("kimivl_edge.server")

Emit = Callable[[Any], None]
Work = Callable[[Emit, threading.Event], None]
_DONE = object()


class QueueFull(Exception):
    pass


class Job:
    """A submitted piece of work and the events it emits, read on the event loop with ``events()``."""

    def __init__(self, work: Work, loop: asyncio.AbstractEventLoop):
        self.work = work
        self.cancelled = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue[Any] = asyncio.Queue()

    def emit(self, event: Any) -> None:
        """From the worker thread: hand an event to the reader."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()

    async def events(self) -> AsyncIterator[Any]:
        """The job's events until it ends; an exception the job raised is raised here."""
        while True:
            ev = await self._events.get()
            if ev is _DONE:
                return
            if isinstance(ev, BaseException):
                raise ev
            yield ev


class Scheduler:
    def __init__(self, loader: Callable[[], Any], max_queue: int, on_load_error: Callable[[], None] | None = None):
        self.max_queue = max_queue
        self._on_load_error = on_load_error
        self.model: Any = None
        self.load_error: str | None = None
        self._loader = loader
        self._jobs: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._current: Job | None = None
        self._thread = threading.Thread(target=self._run, name="kimivl-worker", daemon=True)

    @property
    def ready(self) -> bool:
        return self.model is not None

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Cancel what waits, let the running job see its cancel flag, close the model."""
        with self._cv:
            self._stopping = True
            for job in self._jobs:
                job.cancel()
                job.emit(_DONE)
            self._jobs.clear()
            if self._current is not None:
                self._current.cancel()
            self._cv.notify()
        self._thread.join()

    def submit(self, job: Job) -> None:
        with self._cv:
            if len(self._jobs) >= self.max_queue:
                raise QueueFull
            self._jobs.append(job)
            self._cv.notify()

    def _run(self) -> None:
        try:
            self.model = self._loader()
        except Exception as e:  # reported by /health and every request; the server keeps answering
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("model failed to load: %s", self.load_error)
            if self._on_load_error is not None:
                self._on_load_error()
            return
        try:
            while True:
                with self._cv:
                    while not self._jobs and not self._stopping:
                        self._cv.wait()
                    if self._stopping:
                        break
                    job = self._current = self._jobs.popleft()
                self._run_job(job)
                self._current = None
        finally:
            self.model.close()

    @staticmethod
    def _run_job(job: Job) -> None:
        try:
            if not job.cancelled.is_set():
                job.work(job.emit, job.cancelled)
        except Exception as e:  # the job's failure is its reader's; the worker serves the next job
            job.emit(e)
        job.emit(_DONE)

"""The one worker thread that owns the model: jobs run one at a time, first come first served.

A job is a function ``work(emit, cancelled)`` run on the worker thread; it reports through ``emit`` (delivered to
the job's asyncio queue on the event loop) and stops early when ``cancelled`` is set. The worker first runs the
loader; until it returns, ``ready`` is False. Past ``max_queue`` waiting jobs, ``submit`` raises QueueFull. A job
that raises hands the exception to its reader and the worker goes on with the next one.

A job may also have a ``prepare(model)`` step that does not need the worker (``KimiVL.pre_encode``: rendering and
the vision encoder). The encoder thread runs it for the job next in line while the worker runs the current job, so
an image's encode does not stall the decode of the request before it; the worker starts a job once its
``prepare`` has finished. ``prepare`` only warms caches: its errors are ignored (the job itself meets them).
Only the next ``parallel`` jobs in line (those the worker may start next) are prepared ahead, so what they put in
the model's caches is still there when they run (unless they hold more images than the embedding cache).

With ``parallel`` > 1 the worker runs up to that many chat turns at once (``batch.BatchRunner``: one llama_decode
per step for all of them); such jobs carry their ``turn`` and their ``work`` is not used. The batched worker starts
a job only once its ``prepare`` has finished and keeps stepping the running turns meanwhile, so a new request's
vision encode (on the encoder thread) never pauses the others' decode.

A cancelled job stops inside long work too: ``check_cancelled`` (a progress callback: the prefill's per chunk, the
vision encoder's per layer) raises ``Cancelled`` when the job the calling thread works for has been cancelled; the
worker ends that job quietly (its reader has gone)."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

log = logging.getLogger("kimivl_edge.server")

Emit = Callable[[Any], None]
Work = Callable[[Emit, threading.Event], None]
Prepare = Callable[[Any], object]
_DONE = object()


class QueueFull(Exception):
    pass


class Cancelled(Exception):
    """Raised by ``Scheduler.check_cancelled`` inside a cancelled job's work; ends the job without an event."""


class Job:
    """A submitted piece of work and the events it emits, read on the event loop with ``events()``."""

    def __init__(self, work: Work, loop: asyncio.AbstractEventLoop, prepare: Prepare | None = None,
                 turn: Any = None):
        self.work = work
        self.turn = turn  # the chat turn (completion.Turn), for the batched worker
        self.prepare = prepare
        self.claimed = prepare is None    # the encoder thread has taken (or the worker has skipped) ``prepare``
        self.prepared = threading.Event()  # ``prepare`` has finished (or there is none)
        if prepare is None:
            self.prepared.set()
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
    def __init__(self, loader: Callable[[], Any], max_queue: int, on_load_error: Callable[[], None] | None = None,
                 parallel: int = 1):
        self.max_queue, self.parallel = max_queue, parallel
        self._on_load_error = on_load_error
        self.model: Any = None
        self.load_error: str | None = None
        self._loader = loader
        self._jobs: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._current: Job | None = None
        self._working = threading.local()  # .job: the job this thread works for (worker or encoder thread)
        self._thread = threading.Thread(target=self._run, name="kimivl-worker", daemon=True)
        self._encoder = threading.Thread(target=self._prepare_loop, name="kimivl-encoder", daemon=True)

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
            self._cv.notify_all()
        self._thread.join()

    def check_cancelled(self, *_: object) -> None:
        """A progress callback: raise Cancelled when the job this thread works for has been cancelled."""
        job = getattr(self._working, "job", None)
        if job is not None and job.cancelled.is_set():
            raise Cancelled

    @contextlib.contextmanager
    def _working_for(self, job: Job) -> Iterator[None]:
        self._working.job = job
        try:
            yield
        finally:
            self._working.job = None

    def submit(self, job: Job) -> None:
        with self._cv:
            if len(self._jobs) >= self.max_queue:
                raise QueueFull
            self._jobs.append(job)
            self._cv.notify_all()

    def _run(self) -> None:
        try:
            self.model = self._loader()
        except Exception as e:  # reported by /health and every request; the server keeps answering
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("model failed to load: %s", self.load_error)
            if self._on_load_error is not None:
                self._on_load_error()
            return
        self._encoder.start()
        try:
            if self.parallel > 1:
                self._serve_batched()
            else:
                self._serve()
        finally:
            with self._cv:
                self._stopping = True
                self._cv.notify_all()
            self._encoder.join()
            self.model.close()

    def _take(self) -> Job:
        """Under the lock: the job first in line, out of the queue."""
        job = self._jobs.popleft()
        if not job.claimed:  # the encoder thread is busy elsewhere: the job encodes for itself
            job.claimed = True
            job.prepared.set()
        self._cv.notify_all()  # the next job is now first in line
        return job

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                job = self._current = self._take()
            job.prepared.wait()
            self._run_job(job)
            self._current = None

    def _serve_batched(self) -> None:
        from .batch import BatchRunner

        runner = BatchRunner(self.model, self.parallel)
        try:
            while True:
                with self._cv:
                    while not (runner.running or self._startable(runner) or self._stopping):
                        self._cv.wait()
                    if self._stopping:
                        return
                    starting: list[Job] = []
                    while self._startable(runner) and len(starting) < len(runner.free):
                        starting.append(self._take())
                for job in starting:
                    self._start_batched(runner, job)
                for job in runner.step() if runner.running else []:
                    job.emit(_DONE)
        finally:
            for t in runner.running.values():
                t.job.emit(_DONE)
            runner.close()

    def _startable(self, runner: Any) -> bool:
        """Under the lock: the job first in line is prepared and a slot is free (an unprepared job waits for the
        encoder thread while the running turns go on decoding)."""
        return bool(self._jobs) and self._jobs[0].prepared.is_set() and bool(runner.free)

    def _start_batched(self, runner: Any, job: Job) -> None:
        try:
            with self._working_for(job):
                if not job.cancelled.is_set() and runner.start(job):
                    return  # running: its _DONE comes when a step ends it
        except Cancelled:
            pass
        except Exception as e:  # the job's failure is its reader's; the others go on
            job.emit(e)
        job.emit(_DONE)

    def _prepare_loop(self) -> None:
        """The encoder thread: ``prepare`` the first unclaimed job of the next ``parallel`` in line, while the worker
        runs the ones before them."""
        while True:
            with self._cv:
                while not self._stopping and (job := self._unclaimed()) is None:
                    self._cv.wait()
                if self._stopping or job is None:
                    return
                job.claimed = True
            try:
                with self._working_for(job):
                    if not job.cancelled.is_set():
                        assert job.prepare is not None  # jobs without one are claimed from the start
                        job.prepare(self.model)
            except Exception as e:  # the job meets the same error when it runs, and reports it
                log.debug("prepare failed: %s", e)
            finally:
                with self._cv:
                    job.prepared.set()
                    self._cv.notify_all()  # the batched worker may be waiting for it

    def _unclaimed(self) -> Job | None:
        """Under the lock: the first job not yet claimed among the next ``parallel`` in line."""
        return next((j for j in itertools.islice(self._jobs, self.parallel) if not j.claimed), None)

    def _run_job(self, job: Job) -> None:
        try:
            with self._working_for(job):
                if not job.cancelled.is_set():
                    job.work(job.emit, job.cancelled)
        except Cancelled:
            pass
        except Exception as e:  # the job's failure is its reader's; the worker serves the next job
            job.emit(e)
        job.emit(_DONE)

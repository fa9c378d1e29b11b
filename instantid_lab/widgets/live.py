"""Work off the kernel's thread, newest request first: what keeps a widget live while it generates.

`LatestOnly` runs one job at a time in a worker thread. A new job supersedes the others: the one
waiting is dropped and the one running is cancelled at its next step (`Job.step`, which the job calls
from the pipeline's `callback_on_step_end`), so a slider dragged across ten values starts ten images
and finishes the last. The kernel's thread only submits, so it never waits for a picture.

    runner = LatestOnly(on_progress=lambda done, total: bar.value = done / total)
    future = runner.submit(lambda job: pipe(..., callback_on_step_end=job.callback(steps)))
    future.result()        # the images; raises `Cancelled` if a newer job superseded this one
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


class Cancelled(Exception):
    """A newer job superseded this one before it finished."""


@dataclass
class Job:
    """One submitted piece of work, as the work function sees it."""

    work: Callable[["Job"], Any]
    future: Future = field(default_factory=Future)
    cancel: threading.Event = field(default_factory=threading.Event)
    on_progress: Optional[Callable[[int, int], None]] = None

    def step(self, done: int, total: int) -> None:
        """Report progress (`done` of `total` steps); raises `Cancelled` if a newer job was submitted."""
        if self.cancel.is_set():
            raise Cancelled("superseded by a newer request")
        if self.on_progress is not None:
            self.on_progress(done, total)

    def callback(self, total: int) -> Callable:
        """A pipeline `callback_on_step_end` that calls `step(i + 1, total)` after denoising step i."""

        def on_step_end(pipe, i, t, tensors) -> dict:
            self.step(i + 1, total)
            return {}

        return on_step_end


class LatestOnly:
    """One worker thread; a new job cancels the running one and replaces the waiting one.

    :param on_progress: called in the worker thread with (done, total) whenever a job reports a step.
    """

    def __init__(self, on_progress: Optional[Callable[[int, int], None]] = None):
        self.on_progress = on_progress
        self.finished = self.cancelled = 0
        self._waiting: Optional[Job] = None
        self._running: Optional[Job] = None
        self._wake = threading.Condition()
        self._closed = False
        self._thread: Optional[threading.Thread] = None

    def submit(self, work: Callable[[Job], Any]) -> Future:
        """Queue `work(job)` to run next, superseding every earlier job; returns its `Future`."""
        job = Job(work, on_progress=self.on_progress)
        with self._wake:
            if self._closed:
                raise RuntimeError("this runner is closed")
            if self._waiting is not None:
                self._waiting.future.set_exception(Cancelled("superseded before it started"))
                self.cancelled += 1
            if self._running is not None:
                self._running.cancel.set()
            self._waiting = job
            self._start_thread()
            self._wake.notify()
        return job.future

    @property
    def busy(self) -> bool:
        """Whether a job is running or waiting."""
        with self._wake:
            return self._running is not None or self._waiting is not None

    def close(self) -> None:
        """Cancel what runs or waits and stop the worker thread."""
        with self._wake:
            self._closed = True
            if self._waiting is not None:
                self._waiting.future.set_exception(Cancelled("the runner was closed"))
                self._waiting = None
            if self._running is not None:
                self._running.cancel.set()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _start_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._serve, name="instantid-lab-worker", daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        while True:
            with self._wake:
                while self._waiting is None and not self._closed:
                    self._wake.wait()
                if self._waiting is None:  # closed and nothing left
                    return
                job, self._waiting = self._waiting, None
                self._running = job
            self._run(job)
            with self._wake:
                self._running = None

    def _run(self, job: Job) -> None:
        job.future.set_running_or_notify_cancel()
        try:
            result = job.work(job)
        except Cancelled as stop:
            self.cancelled += 1
            job.future.set_exception(stop)
        except BaseException as error:  # noqa: BLE001 - handed to whoever holds the future
            job.future.set_exception(error)
        else:
            self.finished += 1
            job.future.set_result(result)


def run_now(work: Callable[[Job], Any]) -> Future:
    """Run `work(job)` in the calling thread and return its finished `Future` (as `LatestOnly.submit`, no thread)."""
    job = Job(work)
    job.future.set_running_or_notify_cancel()
    try:
        job.future.set_result(work(job))
    except BaseException as error:  # noqa: BLE001 - handed to whoever holds the future
        job.future.set_exception(error)
    return job.future

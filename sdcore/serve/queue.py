"""One job at a time per device: a bounded FIFO queue and the worker thread that runs it.

The HTTP handlers only validate, submit and wait; the worker thread owns the pipeline (model switches, LoRA
merges, the scheduler), so nothing the GPU works on is shared between requests. A full queue refuses at
once (the handler answers 503 with Retry-After) instead of letting waiting requests pile up in memory. A
queued job can be cancelled (its client went away); the running one can be interrupted or skipped, which
the pipeline sees at its next denoising step through the step callback (sdcore.StopDenoising)."""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time

log = logging.getLogger("sdcore.serve")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class Closed(Exception):
    """The server is shutting down: no new job starts."""


class Job:
    """``run(job)`` runs on the worker thread; ``future`` holds its result. The progress fields are written by
    the worker and read by /progress (plain attribute writes, each atomic in Python)."""

    def __init__(self, run, description: str = ""):
        self.run, self.description = run, description
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.interrupted = self.skipped = False
        self.job_no, self.job_count = 0, 1          # A1111's: which of the n_iter batches is running
        self.step, self.steps = 0, 0                # denoising step within it
        self.started: float | None = None
        self.latents = None                         # the last step's, for the preview

    def check_stop(self) -> None:
        """In the step callback: stop the loop if the job was interrupted or its current batch skipped."""
        from sdcore import StopDenoising

        if self.interrupted or self.skipped:
            raise StopDenoising

    def progress(self) -> float:
        if self.started is None:
            return 0.0
        done = self.job_no + (min(self.step, self.steps) / self.steps if self.steps else 0.0)
        return min(done / max(self.job_count, 1), 1.0)


class JobQueue:
    """At most ``capacity`` jobs wait; one runs. ``close()`` refuses new jobs, fails the waiting ones with
    Closed and lets the running one finish; ``join()`` waits for the worker to end."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._closed = False
        self.current: Job | None = None
        self._seconds = 10.0  # running mean of a job's time, for Retry-After
        self._thread = threading.Thread(target=self._work, name="sdcore-serve-worker", daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def closed(self) -> bool:
        return self._closed

    def retry_after(self) -> int:
        return max(1, round(self._seconds * (len(self._waiting) + 1) / 2))

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._closed:
                raise Closed("the server is shutting down")
            if len(self._waiting) >= self.capacity:
                raise QueueFull(self.retry_after())
            self._waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> bool:
        """Take a waiting job out of the queue; False if it already started (or ended)."""
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return False
        job.future.cancel()
        return True

    def interrupt(self) -> None:
        job = self.current
        if job is not None:
            job.interrupted = True

    def skip(self) -> None:
        job = self.current
        if job is not None:
            job.skipped = True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._cond.notify_all()
        for job in waiting:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(Closed("the server is shutting down; the job did not start"))

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if not self._waiting:
                return None
            job = self._waiting.popleft()
            self.current = job
            return job

    def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            try:
                if not job.future.set_running_or_notify_cancel():
                    continue
                start = job.started = time.monotonic()
                result = error = None
                try:
                    result = job.run(job)
                except BaseException as exc:  # handed to the waiting request, which answers for it
                    error = exc
                self._seconds = 0.7 * self._seconds + 0.3 * (time.monotonic() - start)
                # Off /progress before the answer goes out: a client that has its images sees no job running.
                self.current = None
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(result)
            finally:
                self.current = None

"""APScheduler 3 on the controller's database and event loop: the persisted job store (a small
synchronous engine on the same database, its queries in a worker thread, never on the loop) and
an executor that runs the coroutine jobs (the campaign rounds) as tasks on the loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from datetime import datetime
from functools import partial
from typing import Any

from apscheduler.executors.base import BaseExecutor, run_coroutine_job
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.base import STATE_STOPPED, BaseScheduler
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import StaticPool

from controller.storage.db import PG_CONNECT_TIMEOUT_S, PG_POOL_RECYCLE_S, set_sqlite_pragmas

log = logging.getLogger(__name__)

#: Sync drivers for the job store, by the scheme of the controller's database URL.
SYNC_DRIVERS = {
    "sqlite": "sqlite",
    "sqlite+aiosqlite": "sqlite",
    "sqlite+pysqlite": "sqlite",
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "postgresql+asyncpg": "postgresql+psycopg",
}


def sync_url(url: str) -> str:
    """The database URL with a synchronous driver, for APScheduler's job store: SQLite keeps
    pysqlite, PostgreSQL gets psycopg 3; a bare path is a SQLite file."""
    if "://" not in url:
        return f"sqlite:///{url}"
    scheme, _, rest = url.partition("://")
    driver = SYNC_DRIVERS.get(scheme)
    return f"{driver}://{rest}" if driver else url


def job_store_engine(url: str) -> Engine:
    """A small synchronous engine for the job store, on the controller's database."""
    target = make_url(sync_url(url))
    backend = target.get_backend_name()
    if backend == "sqlite":
        if target.database in (None, "", ":memory:"):
            # One in-memory database shared by the scheduler's threads (nothing persists).
            engine = create_engine(target, poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            engine = create_engine(target)
        event.listen(engine, "connect", set_sqlite_pragmas)
        return engine
    if backend == "postgresql":
        return create_engine(
            target,
            pool_size=1,
            max_overflow=2,
            pool_pre_ping=True,
            pool_recycle=PG_POOL_RECYCLE_S,
            connect_args={
                "connect_timeout": int(PG_CONNECT_TIMEOUT_S),
                "application_name": "probe-fleet-scheduler",
            },
        )
    return create_engine(target)


class LoopExecutor(BaseExecutor):  # type: ignore[misc]  # APScheduler 3 is untyped
    """Runs coroutine jobs as tasks on the event loop. Jobs are submitted from the worker thread
    that reads the job store, so a task is started through ``call_soon_threadsafe``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        #: Jobs handed over meanwhile are dropped, not started: this instance does not lead.
        self.paused = False

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        coroutine = run_coroutine_job(job, job._jobstore_alias, run_times, self._logger.name)
        self._loop.call_soon_threadsafe(self._start_task, job.id, coroutine)

    def _start_task(self, job_id: str, coroutine: Coroutine[Any, Any, Any]) -> None:
        if self._closed or self.paused:
            coroutine.close()
            self._run_job_success(job_id, [])
            return
        task = self._loop.create_task(coroutine, name=f"schedule-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(partial(self._done, job_id))

    def _done(self, job_id: str, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            self._run_job_success(job_id, [])
        elif (error := task.exception()) is not None:
            self._run_job_error(job_id, error, error.__traceback__)
        else:
            self._run_job_success(job_id, task.result())

    def shutdown(self, wait: bool = True) -> None:
        """Start no more jobs (called from any thread); ``aclose`` ends the running ones."""
        self._closed = True

    async def aclose(self) -> None:
        """On the loop: cancel the jobs still running and wait until they have ended."""
        self._closed = True
        await self.cancel_running()

    async def cancel_running(self) -> None:
        """Cancel the jobs running now and wait until they have ended (a round rolls back)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OffLoopScheduler(AsyncIOScheduler):  # type: ignore[misc]  # APScheduler 3 is untyped
    """An AsyncIOScheduler whose job-store work (``_process_jobs``: due jobs, next run times) runs
    in a worker thread, so a slow or locked database never stalls the event loop."""

    def __init__(self, **options: Any) -> None:
        self._processing: asyncio.Future[float | None] | None = None
        self._again = False
        super().__init__(**options)

    def wakeup(self) -> None:
        loop = self._eventloop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._stop_timer()
        if self.state == STATE_STOPPED:
            return
        if self._processing is not None:
            self._again = True  # woken while processing: look again when that pass ends
            return
        self._processing = self._eventloop.run_in_executor(None, self._process_locked)
        self._processing.add_done_callback(self._processed)

    def _process_locked(self) -> float | None:
        with self._jobstores_lock:
            if self.state == STATE_STOPPED:
                return None
            wait_s: float | None = self._process_jobs()
            return wait_s

    def _processed(self, future: asyncio.Future[float | None]) -> None:
        self._processing = None
        if future.cancelled() or self.state == STATE_STOPPED:
            return
        error = future.exception()
        if error is not None:
            log.error("scheduler: reading the job store failed", exc_info=error)
            wait_s: float | None = self.jobstore_retry_interval
        else:
            wait_s = future.result()
        if self._again:
            self._again = False
            self._wake()
        else:
            self._start_timer(wait_s)

    def shutdown(self, wait: bool = True) -> None:
        """Stop processing, executors and job stores; call it off the loop (it may wait for a
        job-store pass to finish), then ``_stop_timer`` on the loop."""
        BaseScheduler.shutdown(self, wait)

    async def finished(self) -> None:
        """Wait for a job-store pass still running in its thread."""
        if self._processing is not None:
            await asyncio.gather(self._processing, return_exceptions=True)

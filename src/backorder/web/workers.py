"""Worker processes for the CPU-heavy work: large ``POST /v1/predict`` requests and uploads.

The event loop answers light requests (a few records: about 1-2 ms of work) itself, where they
are cheapest. Heavy work must not run there, and a thread is not enough: TreeSHAP holds the GIL
for ~230 ms in one C call, stalling every other client. So it runs in a worker process, which
loads the model itself by version (the version the request took from the holder, so that one
request is answered by one model) and keeps the latest ``KEPT_VERSIONS``.

Workers are forked from a forkserver that has imported the package once (a fresh interpreter
spends ~6 s on imports; the server itself has threads, so it is never forked), use one thread
each and run at a lower CPU priority than the server, so that a light request never waits for a
core. A job that overruns its time limit has its worker killed and replaced; nothing else is
disturbed. ``Workers`` holds the two pools: ``predict`` (``serve_workers`` processes) and
``uploads`` (``upload_concurrency`` processes, one per upload being scored).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.context
import os
import signal
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from backorder.api_schema import SkuRecord, records_frame
from backorder.compiled import CompiledTreesUnavailable
from backorder.config import Settings
from backorder.logs import configure_json
from backorder.model import LoadedModel
from backorder.predict import score_with_reasons
from backorder.registry import Registry
from backorder.web.holder import FORM_DEFAULTS

log = logging.getLogger("backorder.serve")
T = TypeVar("T")

KEPT_VERSIONS = 2  # the serving model and, for requests still in flight after a swap, the last
WORKER_NICENESS = 10  # the server preempts a worker as soon as a light request arrives
START_TIMEOUT_SECONDS = 300.0  # imports and a model load on a busy 2-core machine
RESTART_DELAY_SECONDS = 5.0  # between attempts to replace a worker that could not start
WAITING_PER_WORKER = 8  # heavy requests queued per predict worker before the server says busy
ACQUIRE_TIMEOUT_SECONDS = 60.0  # longest a heavy request waits for a free worker
_PRELOAD = ["backorder.web.workers"]  # imported once by the forkserver, shared by every worker


class JobRefused(Exception):
    """Raised by a job for input the server refuses; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


class WorkerFailed(Exception):
    """A worker could not start, stopped (killed, out of memory) or a job raised unexpectedly."""


class JobTimedOut(Exception):
    """A job ran past its time limit; its worker was killed and is being replaced."""


class PoolBusy(Exception):
    """Every worker is busy and enough requests are waiting already."""


class WorkerState:
    """What a job gets in the worker: the settings and the models loaded so far, by version."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._models: dict[str, LoadedModel] = {}

    def model(self, version: str) -> LoadedModel:
        model = self._models.get(version)
        if model is None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CompiledTreesUnavailable)
                model = Registry(self.settings).load_for_scoring(version)
            for warning in caught:
                log.warning(str(warning.message), extra={"model_version": version})
            # Built on first use (path tables, compiled trees): the first job pays nothing.
            score_with_reasons(model, records_frame([SkuRecord(**FORM_DEFAULTS)]), self.settings)
            self._models[version] = model
            while len(self._models) > KEPT_VERSIONS:
                del self._models[next(iter(self._models))]  # the oldest
        return model

    @property
    def versions(self) -> list[str]:
        return list(self._models)


def load_model(state: WorkerState, version: str) -> list[str]:
    """The job run before any other that needs a version the worker has not loaded, outside
    that job's time limit; answers the versions the worker holds."""
    state.model(version)
    return state.versions


Job = tuple[Callable[..., Any], tuple[Any, ...]]


def _serve_jobs(conn: Connection, settings_values: dict[str, Any], warm: str | None) -> None:
    """A worker's life: load the model to warm up, say ready, then run jobs until the pipe
    closes. Every reply is ("ok", value), ("refused", status, message) or ("failed", message)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops us
    os.nice(WORKER_NICENESS)
    configure_json()
    warnings.showwarning = _log_warning  # JSON lines only on the server's stderr
    from threadpoolctl import threadpool_limits

    limits = threadpool_limits(1)  # OpenMP (LightGBM) and BLAS: one thread, kept for life
    try:
        state = WorkerState(Settings(**settings_values))
        if warm is not None:
            state.model(warm)
    except Exception as exc:
        log.exception("scoring worker could not start")
        conn.send(("failed", f"scoring worker could not start: {exc}"))
        return
    conn.send(("ready", state.versions))
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):  # the server closed the pipe: stop
            break
        try:
            reply: tuple[Any, ...] = ("ok", fn(state, *args))
        except JobRefused as exc:
            reply = ("refused", exc.status, exc.message)
        except Exception as exc:
            log.exception("scoring job failed")
            reply = ("failed", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except OSError:  # the server is gone (or gave up on this job): nobody to answer
            break
    limits.restore_original_limits()


def _log_warning(message: Warning | str, category: type[Warning], *where: Any, **more: Any) -> None:
    log.warning(f"{category.__name__}: {message}")


def _forkserver() -> multiprocessing.context.ForkServerContext:
    """The forkserver context, its server started (importing ``_PRELOAD``) if it was not."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    forkserver.ensure_running()
    return context


class Worker:
    """One worker process and the server's end of its pipe (blocking calls: run them in a
    thread)."""

    def __init__(self, settings_values: dict[str, Any], warm: str | None) -> None:
        self.settings_values = settings_values
        self.warm = warm
        self.process: BaseProcess | None = None
        self.conn: Connection | None = None
        self.dead = False
        self.versions: list[str] = []  # the model versions the worker holds

    def start(self) -> None:
        context = _forkserver()
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_serve_jobs,
            args=(theirs, self.settings_values, self.warm),
            name="backorder-scoring-worker",
            daemon=True,
        )
        process.start()
        theirs.close()
        self.process, self.conn = process, ours
        if not ours.poll(START_TIMEOUT_SECONDS):
            self.kill()
            raise WorkerFailed(f"scoring worker not ready within {START_TIMEOUT_SECONDS:.0f} s")
        try:
            reply = ours.recv()
        except (EOFError, OSError):
            reply = ("failed", f"scoring worker exited with code {process.exitcode}")
        if reply[0] != "ready":
            self.kill()
            raise WorkerFailed(reply[1])
        self.versions = reply[1]

    def call(self, job: Job) -> tuple[Any, ...]:
        assert self.conn is not None
        self.conn.send(job)
        reply: tuple[Any, ...] = self.conn.recv()
        return reply

    def kill(self) -> None:
        self.dead = True
        if self.process is not None:
            self.process.kill()
            self.process.join(timeout=10)
        if self.conn is not None:
            self.conn.close()

    def stop(self) -> None:
        """Close the pipe (the worker exits when it sees that) and wait a little for it."""
        self.dead = True
        if self.conn is not None:
            self.conn.close()
        if self.process is not None:
            self.process.join(timeout=5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout=5)


class WorkerPool:
    """``size`` worker processes. A job takes an idle worker (``acquire``, ``try_acquire``),
    runs on it (``run``) and gives it back (``release``); ``call`` does all three.

    Workers start lazily, on their first job, unless ``start(wait=True)`` starts them all.
    """

    def __init__(
        self,
        name: str,
        size: int,
        settings_values: dict[str, Any],
        threads: ThreadPoolExecutor,
        max_waiting: int | None = None,
    ) -> None:
        self.name = name
        self.size = size
        self.settings_values = settings_values
        self.max_waiting = max_waiting
        self._threads = threads
        self._idle: asyncio.Queue[Worker] = asyncio.Queue()
        self._workers: list[Worker] = []
        self._waiting = 0
        self._restarts: set[asyncio.Task[None]] = set()
        self._closed = False
        self.latest: str | None = None  # the last version asked for: replacements load it

    async def start(self, warm: str | None, wait: bool) -> None:
        self.latest = warm
        self._workers = [Worker(self.settings_values, warm) for _ in range(self.size)]
        if wait:
            await asyncio.gather(*(self._started(w) for w in self._workers))
        for worker in self._workers:
            self._idle.put_nowait(worker)

    def try_acquire(self) -> Worker | None:
        """An idle worker, or None when all are busy (or being replaced)."""
        try:
            return self._idle.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def acquire(self) -> Worker:
        """The next idle worker; ``PoolBusy`` when ``max_waiting`` requests wait already, or
        none was free within ``ACQUIRE_TIMEOUT_SECONDS``."""
        if self.max_waiting is not None and self._waiting >= self.max_waiting:
            raise PoolBusy(f"{self._waiting} requests are waiting for the {self.name} workers")
        self._waiting += 1
        try:
            return await asyncio.wait_for(self._idle.get(), ACQUIRE_TIMEOUT_SECONDS)
        except TimeoutError:
            raise PoolBusy(
                f"no {self.name} worker free for {ACQUIRE_TIMEOUT_SECONDS:g} s"
            ) from None
        finally:
            self._waiting -= 1

    def release(self, worker: Worker) -> None:
        if not worker.dead and not self._closed:
            self._idle.put_nowait(worker)

    async def call(self, fn: Callable[..., T], *args: Any, version: str) -> T:
        worker = await self.acquire()
        try:
            return await self.run(worker, fn, *args, version=version)
        finally:
            self.release(worker)

    async def run(
        self,
        worker: Worker,
        fn: Callable[..., T],
        *args: Any,
        version: str,
        timeout: float | None = None,
    ) -> T:
        """``fn(state, *args)`` in ``worker``, which first loads model ``version`` if it has not
        (outside the time limit). Past ``timeout`` seconds the worker is killed and replaced,
        and ``JobTimedOut`` raised."""
        try:
            await self._started(worker)
        except WorkerFailed:
            self._replace(worker)  # retried in the background; this job fails now
            raise
        self.latest = version
        if version not in worker.versions:
            worker.versions = await self._job(worker, load_model, (version,), None)
        return await self._job(worker, fn, args, timeout)

    async def _job(
        self, worker: Worker, fn: Callable[..., T], args: tuple[Any, ...], timeout: float | None
    ) -> T:
        loop = asyncio.get_running_loop()
        try:
            reply = await asyncio.wait_for(
                loop.run_in_executor(self._threads, worker.call, (fn, args)), timeout
            )
        except TimeoutError:
            self._replace(worker)
            raise JobTimedOut(f"{self.name} job took longer than {timeout:g} s") from None
        except (EOFError, OSError) as exc:
            self._replace(worker)
            code = worker.process.exitcode if worker.process else None
            raise WorkerFailed(f"{self.name} worker stopped (exit code {code})") from exc
        except BaseException:
            # Cancelled mid-job: the reply would be read by the next job. Start afresh.
            self._replace(worker)
            raise
        if reply[0] == "ok":
            result: T = reply[1]
            return result
        if reply[0] == "refused":
            raise JobRefused(reply[1], reply[2])
        raise WorkerFailed(reply[1])

    async def _started(self, worker: Worker) -> None:
        if worker.process is None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._threads, worker.start)
            log.info("scoring worker started", extra={"pool": self.name})

    def _replace(self, worker: Worker) -> None:
        worker.dead = True
        if worker.process is not None:
            worker.process.kill()  # at once; reaping it waits for a thread
        fresh = Worker(self.settings_values, self.latest)
        self._workers = [fresh if w is worker else w for w in self._workers]
        task = asyncio.get_running_loop().create_task(self._bring_up(fresh, worker))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _bring_up(self, worker: Worker, replaced: Worker) -> None:
        """Reap the replaced worker and start its replacement, which joins the idle workers
        once ready (retried until it is)."""
        await asyncio.get_running_loop().run_in_executor(self._threads, replaced.kill)
        while not self._closed:
            try:
                await self._started(worker)
            except Exception:
                log.exception("could not replace a scoring worker", extra={"pool": self.name})
                worker.process = None
                worker.dead = False
                await asyncio.sleep(RESTART_DELAY_SECONDS)
                continue
            if self._closed:
                worker.stop()
            else:
                self._idle.put_nowait(worker)
            return

    async def close(self) -> None:
        self._closed = True
        for task in list(self._restarts):
            task.cancel()
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._threads, w.stop) for w in self._workers),
            return_exceptions=True,
        )


class Workers:
    """The app's worker pools: ``predict`` for heavy API requests, ``uploads`` for uploads."""

    def __init__(self, settings: Settings, prepare: bool = False) -> None:
        """``prepare``: start the forkserver now, so that its imports overlap the caller's work
        (the first worker otherwise waits for them)."""
        if prepare:
            _forkserver()
        values = settings.model_dump()
        # One thread a worker: the cores are shared with the server and the other workers.
        values["lightgbm"] = {**values["lightgbm"], "n_jobs": 1}
        # Threads that wait on workers (a job's reply, a start, a reap): a few per worker.
        self._threads = ThreadPoolExecutor(
            max_workers=3 * (settings.serve_workers + settings.upload_concurrency),
            thread_name_prefix="scoring-worker-pipe",
        )
        self.predict = WorkerPool(
            "predict",
            settings.serve_workers,
            values,
            self._threads,
            max_waiting=WAITING_PER_WORKER * settings.serve_workers,
        )
        self.uploads = WorkerPool("upload", settings.upload_concurrency, values, self._threads)

    async def start(self, warm: str | None, wait: bool) -> None:
        """Start both pools; with ``wait``, return once every worker has loaded ``warm``."""
        await asyncio.gather(self.predict.start(warm, wait), self.uploads.start(warm, wait))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.gather(self.predict.close(), self.uploads.close())
        self._threads.shutdown(wait=False, cancel_futures=True)


async def app_workers(request: Request) -> Workers | None:
    """The app's worker pools; None in an app whose lifespan has not run."""
    workers: Workers | None = getattr(request.app.state, "workers", None)
    return workers


WorkersDep = Annotated[Workers | None, Depends(app_workers)]

"""Reader processes that live as long as the process using them, across slides.

A :class:`ReaderPool` holds ``workers`` processes. A *job* is one slide's reading: its
``open_slide`` arguments, grid and stain step (``RegionJob``), sent once to every worker; then
its regions go out as small ``(job, seq, region)`` tasks on one shared queue and come back as
``(idx, uint8 patches, read_s, stain_s, unreadable)``. :meth:`ReaderPool.map` yields them in
region order and keeps at most ``window`` regions submitted but not yet handed out, so memory is
bounded by the window, never by the slide. Each worker keeps the slide handles it opened
(the last :data:`SLIDES_PER_WORKER`), so a slide is opened once per worker, not per region,
and the processes are started once, not per slide (the torch ``DataLoader`` they replace
restarted its workers for every slide).

:func:`shared_pool` gives the process its one pool, created on first use with the asked
worker count and closed at exit (or by :func:`close_shared_pool`). This module does not import
torch: a worker imports it only when the job's stain step needs it.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing as mp
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from histotile.errors import HistotileError

if TYPE_CHECKING:
    from histotile.grid import PatchGrid
    from histotile.patches import Region
    from histotile.slide import Slide

log = logging.getLogger(__name__)

SLIDES_PER_WORKER = 2  # open handles a worker keeps (the current slide and the one before)
JOBS_PER_WORKER = 4  # job descriptions a worker keeps
POLL_S = 0.5  # how often a waiting consumer checks that the workers are alive
#: how reader processes start: from a clean server process, not by forking this one (a fork
#: copies OpenCV's and OpenMP's thread-pool state without their threads, and a forked reader
#: hung in ``cv2.setNumThreads`` once the parent had resized or detected tissue with OpenCV).
#: The server costs one interpreter start per pool, and the pool lives across slides.
START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"

#: one region read: (idx int64 (n,), uint8 (n, P, P, 3), read_s, stain_s, unreadable int64 (m,));
#: from a reader process a sixth value follows: the CPU seconds that process spent on it
RegionItem = tuple[Any, ...]


class ReaderProcessError(HistotileError):
    """A reader process stopped without answering (killed, e.g. out of memory)."""


@dataclass(frozen=True)
class RegionJob:
    """What a worker needs to read one slide's regions (picklable)."""

    slide_spec: dict[str, Any]
    grid: PatchGrid
    stain: Callable[[np.ndarray], np.ndarray] | None = None
    reader: Callable[[Slide, PatchGrid, Region], tuple[np.ndarray, np.ndarray]] | None = None


def read_region_item(slide: Slide, job: RegionJob, region: Region) -> RegionItem:
    """Read ``region`` of ``job`` from ``slide``: its readable patches (stain step applied)
    and the grid rows it could not decode."""
    t0 = time.perf_counter()
    failed: list[int] = []
    if job.reader is None:
        from histotile.patches import read_region_patches

        idx, patches = read_region_patches(slide, job.grid, region, unreadable=failed)
    else:
        idx, patches = job.reader(slide, job.grid, region)
    t1 = time.perf_counter()
    if job.stain is not None and len(idx):
        patches = job.stain(patches)
    t2 = time.perf_counter()
    return (np.asarray(idx, dtype=np.int64), np.ascontiguousarray(patches, dtype=np.uint8),
            t1 - t0, t2 - t1, np.asarray(failed, dtype=np.int64))


def _spec_key(spec: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(sorted((k, str(v)) for k, v in spec.items()))


def _worker_main(tasks: Any, results: Any, control: Any) -> None:
    """A reader process: take tasks until ``None``; job descriptions arrive on ``control``."""
    import os
    import sys

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"  # one core per reader process, also for torch imported later
    import cv2

    cv2.setNumThreads(1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    jobs: OrderedDict[int, RegionJob] = OrderedDict()
    slides: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
    try:
        while True:
            task = tasks.get()
            if task is None:
                return
            job_id, seq, region = task
            try:
                while True:  # the parent sends a job to every worker before its first task
                    try:
                        jid, job = control.get(block=job_id not in jobs)
                    except queue.Empty:
                        break
                    jobs[jid] = job
                    while len(jobs) > JOBS_PER_WORKER:
                        jobs.popitem(last=False)
                job = jobs[job_id]
                cpu = time.process_time()
                item = read_region_item(_slide(slides, job.slide_spec), job, region)
                item = (*item, time.process_time() - cpu)  # this process's CPU for it
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, in order
                results.put((job_id, seq, False, _picklable(exc)))
            else:
                results.put((job_id, seq, True, item))
    except KeyboardInterrupt:  # the parent is being interrupted too; it reports
        return
    finally:
        for slide in slides.values():
            slide.close()


def _slide(cache: OrderedDict[tuple[Any, ...], Any], spec: dict[str, Any]) -> Slide:
    """This worker's handle for ``spec`` (opened once; the oldest beyond the cache closed)."""
    key = _spec_key(spec)
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    from histotile.slide import open_slide

    cache[key] = slide = open_slide(**spec)
    while len(cache) > SLIDES_PER_WORKER:
        cache.popitem(last=False)[1].close()
    return slide


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - an exception type that does not survive the pipe
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class ReaderPool:
    """``workers`` reader processes shared by every slide of this process (module docstring).

    ``window``: regions submitted and not yet handed out, per :meth:`map` (default
    ``2 * workers + 2``: each worker has its next region queued while the consumer holds one).
    """

    def __init__(self, workers: int, window: int | None = None,
                 start_method: str | None = None) -> None:
        if workers < 1:
            raise ValueError("a reader pool needs at least one worker")
        self.workers = int(workers)
        self.window = max(1, int(window) if window is not None else 2 * self.workers + 2)
        method = start_method or START_METHOD
        ctx: Any = mp.get_context(method)
        self._tasks = ctx.Queue()
        self._results = ctx.Queue()
        self._controls = [ctx.Queue() for _ in range(self.workers)]
        self._procs = [ctx.Process(target=_worker_main, name=f"histotile-reader-{i}",
                                   args=(self._tasks, self._results, self._controls[i]),
                                   daemon=True) for i in range(self.workers)]
        for p in self._procs:
            p.start()
        self._ids = itertools.count()
        self._lock = threading.Lock()  # one consumer reads the result queue at a time
        self._buffers: dict[int, dict[int, tuple[bool, Any]]] = {}
        self._closed = False
        self.max_inflight = 0  # the most regions one map() had out at once (tests, stats)

    @property
    def alive(self) -> bool:
        return not self._closed and all(p.is_alive() for p in self._procs)

    def map(self, job: RegionJob, regions: Sequence[Region]) -> Iterator[RegionItem]:
        """Read ``regions`` of ``job`` in the workers; items in region order. A region that
        fails raises its error here, in order; closing the iterator early drops the rest."""
        if self._closed:
            raise RuntimeError("the reader pool is closed")
        job_id = next(self._ids)
        for control in self._controls:
            control.put((job_id, job))
        buffer: dict[int, tuple[bool, Any]] = {}
        with self._lock:
            self._buffers[job_id] = buffer
        submitted = done = 0
        try:
            while done < len(regions):
                while submitted < len(regions) and submitted - done < self.window:
                    self._tasks.put((job_id, submitted, regions[submitted]))
                    submitted += 1
                self.max_inflight = max(self.max_inflight, submitted - done)
                while done not in buffer:
                    self._receive(job_id, done)
                ok, payload = buffer.pop(done)
                done += 1
                if not ok:
                    raise payload
                yield payload
        finally:
            with self._lock:
                self._buffers.pop(job_id, None)  # results still coming are dropped

    def _receive(self, job_id: int, seq: int) -> None:
        """Take one result off the queue into its job's buffer (dropped when its job is gone)
        unless ``seq`` of ``job_id`` is already there; raise :class:`ReaderProcessError` when
        a worker died."""
        with self._lock:
            if seq in self._buffers.get(job_id, {}):
                return  # another consumer took it off the queue for us
            try:
                jid, rseq, ok, payload = self._results.get(timeout=POLL_S)
            except queue.Empty:
                dead = [p for p in self._procs if not p.is_alive()]
                if dead:
                    self.close()
                    raise ReaderProcessError(
                        f"reader process {dead[0].name} stopped (exit code "
                        f"{dead[0].exitcode}) while reading", "it may have run out of "
                        "memory: lower --workers or --batch-size, or use --workers 0"
                        ) from None
                return
            target = self._buffers.get(jid)
            if target is not None:
                target[rseq] = (ok, payload)

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._procs:
            self._tasks.put(None)
        deadline = time.monotonic() + 5.0
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(timeout=1.0)
        for q in (self._tasks, self._results, *self._controls):
            q.cancel_join_thread()
            q.close()

    def __enter__(self) -> ReaderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_shared: ReaderPool | None = None
_shared_lock = threading.Lock()


def shared_pool(workers: int) -> ReaderPool:
    """This process's reader pool with ``workers`` processes: created on first use, reused by
    every later slide, replaced when a different count is asked or a worker died."""
    global _shared
    with _shared_lock:
        if _shared is not None and (_shared.workers != workers or not _shared.alive):
            _shared.close()
            _shared = None
        if _shared is None:
            _shared = ReaderPool(workers)
            log.debug("started %d reader processes", workers)
        return _shared


def close_shared_pool() -> None:
    """Stop this process's reader pool, if any (a later :func:`shared_pool` starts a new one)."""
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.close()
            _shared = None


atexit.register(close_shared_pool)

"""Streaming inference: regions of the kept grid → uint8 batches → model → class probabilities.

Data path (one slide)::

    RegionDataset[i]  (reader: own slide handle, reads one tile-aligned region, slices its
          │            patches, applies the slide's stain fit)  -> (idx, uint8 (n,P,P,3))
    rebatch()          variable-size regions -> fixed ``batch_size`` uint8 batches (pinned on CUDA)
    classify()         non-blocking copy, mean/std on the device, channels_last, autocast
                       (bf16/fp16 on CUDA, fp32 on CPU), ``torch.inference_mode``; on CUDA the
                       next batches are queued before a batch's probabilities are fetched
          │
          ▼  (idx, coords, probs float32)   consumed chunk by chunk by the stitcher/exporters

Reading overlaps compute: with ``workers >= 1`` the process's reader pool
(:mod:`histotile.readers`: started once, reused by every slide, a bounded window of regions in
flight, results in region order) reads in worker processes, each with its own slide handles.
With ``workers = 0`` a background *thread* reads ahead (OpenSlide, JPEG decoding, resizing and
torch ops release the GIL), so there is still overlap without a process.

Default reader count (``default_workers``): on CUDA ``min(8, cpus - 1)`` reader processes feed
the GPU. On the CPU reading runs in one background thread (no process).

CPU compute (``compute_plan``): two forward passes run at once in two threads (``streams``),
each with ``cpus // 2`` torch threads (OpenMP/MKL thread counts are per calling thread, so
each stream sets its own). PyTorch releases the GIL inside its ops, and two single-threaded
ResNet-18 passes on 2 cores beat one two-threaded pass: 182 vs 149 patches/s (96 px, batch
64, quiet 2-core machine, BENCHMARKS.md). Grad-CAM / attention hooks keep per-pass state,
so explained runs use one stream with ``cpus - 1`` threads. On CUDA (``histotile.inflight``)
batches ``k+1, k+2`` are queued before batch ``k``'s probabilities are fetched: uploads on
their own stream, non-blocking copies to and from pinned host buffers, an event per batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch

from histotile.readers import ReaderPool, RegionItem, RegionJob, read_region_item, shared_pool

if TYPE_CHECKING:
    from histotile.grid import PatchGrid
    from histotile.inflight import AsyncDevice
    from histotile.models.loading import LoadedModel
    from histotile.patches import Region
    from histotile.slide import Slide
    from histotile.stain import MacenkoNormalizer, StainFit

#: what ``classify`` runs: a loaded model, or a zero-argument callable that loads it (lazily)
ModelSource: TypeAlias = "LoadedModel | Callable[[], LoadedModel]"
log = logging.getLogger(__name__)


def cpu_count() -> int:
    """CPUs this process may use (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return max(1, os.cpu_count() or 1)


def default_workers(device: torch.device) -> int:
    """Reader processes for ``device``: CPU → 0 (a reader thread), CUDA → up to 8."""
    cpus = cpu_count()
    if device.type == "cuda":
        return max(0, min(8, cpus - 1))
    return 0


@dataclass(frozen=True)
class ComputePlan:
    """``streams`` concurrent forward passes, each with ``threads`` torch intra-op threads."""

    streams: int = 1
    threads: int = 1


def compute_plan(device: torch.device, workers: int, explain: bool = False) -> ComputePlan:
    """How to spread the model over this machine's cores (see the module docstring).

    ``workers`` reader processes take their cores; a reader thread (``workers`` 0) shares them.
    """
    cpus = cpu_count()
    if device.type != "cpu":
        return ComputePlan(1, cpus)
    if explain:
        return ComputePlan(1, max(1, cpus - max(workers, 1)))
    free = max(1, cpus - max(workers, 0))
    streams = 2 if free >= 2 else 1
    return ComputePlan(streams, max(1, free // streams))


def configure_threads(device: torch.device, workers: int, explain: bool = False) -> ComputePlan:
    """Set this thread's torch thread count for ``compute_plan`` and return the plan."""
    plan = compute_plan(device, workers, explain)
    torch.set_num_threads(plan.threads)
    return plan


@dataclass
class EngineStats:
    """Counters and seconds for one run.

    ``read_s``/``stain_s``/``forward_s`` are summed over readers or streams (busy seconds);
    ``model_s`` is the wall time the pipeline waited for the model (loading included) and
    ``wait_s`` the time it waited for patches.
    """

    patches: int = 0
    batches: int = 0
    regions: int = 0
    read_s: float = 0.0
    stain_s: float = 0.0
    wait_s: float = 0.0
    model_s: float = 0.0
    model_load_s: float = 0.0
    forward_s: float = 0.0
    stream_s: float = 0.0  # wall time from the first region asked to the last batch handed on
    reader_cpu_s: float = 0.0  # CPU seconds of reader processes (not threads) on the regions
    cpu_s: float = 0.0  # CPU seconds of the stream: this process's (all threads) + reader_cpu_s
    streams: int = 1
    unreadable: list[int] = field(default_factory=list)  # grid rows that could not be decoded

    def to_dict(self) -> dict[str, float]:
        out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()
               if k != "unreadable"}
        out["unreadable_patches"] = len(self.unreadable)
        return out


@dataclass
class StainStep:
    """A per-slide stain fit applied in the readers: ``normalizer.normalize(patches, fit)``."""

    normalizer: MacenkoNormalizer
    fit: StainFit | None

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        out = self.normalizer.normalize(patches, self.fit)
        if isinstance(out, torch.Tensor):
            out = out.numpy()
        return np.ascontiguousarray(out, dtype=np.uint8)


# --------------------------------------------------------------------------- reading
class RegionDataset:
    """Item ``i`` = region ``i`` of the grid → ``(idx int64 (n,), uint8 (n,P,P,3), read_s,
    stain_s, unreadable int64 (m,))`` (:func:`histotile.readers.read_region_item`). The slide
    is opened lazily per process from ``slide_spec``. A region with a damaged tile is read patch
    by patch; the patches that still cannot be decoded are left out of ``idx`` and listed in
    ``unreadable``."""

    def __init__(self, slide_spec: dict[str, Any], grid: PatchGrid, regions: list[Region],
                 stain: Callable[[np.ndarray], np.ndarray] | None = None,
                 reader: Callable[[Slide, PatchGrid, Region], tuple[np.ndarray, np.ndarray]]
                 | None = None,
                 ) -> None:
        self.job = RegionJob(dict(slide_spec), grid, stain, reader)
        self.regions = regions
        self._slide: Slide | None = None
        self._pid = -1

    @property
    def slide_spec(self) -> dict[str, Any]:
        return self.job.slide_spec

    @property
    def grid(self) -> PatchGrid:
        return self.job.grid

    def __len__(self) -> int:
        return len(self.regions)

    def slide(self) -> Slide:
        """This process's own handle (reopened after a fork)."""
        if self._slide is None or self._pid != os.getpid():
            from histotile.slide import open_slide

            self._slide = open_slide(**self.slide_spec)
            self._pid = os.getpid()
        return self._slide

    def close(self) -> None:
        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide = None

    def __getitem__(self, i: int) -> RegionItem:
        return read_region_item(self.slide(), self.job, self.regions[i])


def _thread_prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, ``depth`` items ahead (torch ops there, e.g.
    stain normalisation, run single-threaded: the model has the cores)."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def run() -> None:
        torch.set_num_threads(1)
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((True, item))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put((False, exc))
            return
        q.put((True, done))

    thread = threading.Thread(target=run, name="histotile-reader", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.05)


def iter_regions(dataset: RegionDataset, workers: int,
                 pool: ReaderPool | None = None) -> Iterator[RegionItem]:
    """Regions in reading order: from ``workers`` reader processes (``pool``, default this
    process's :func:`histotile.readers.shared_pool`, which outlives the slide), or, with
    ``workers`` 0, from a background thread."""
    if workers >= 1 or pool is not None:
        if pool is None:
            try:
                pool = shared_pool(workers)
            except AssertionError as exc:  # "daemonic processes are not allowed to have children"
                log.warning("reader processes cannot start here (%s); reading in a thread", exc)
                pool = None
        if pool is not None:
            yield from pool.map(dataset.job, dataset.regions)
            return

    def serial() -> Iterator[RegionItem]:
        try:
            for i in range(len(dataset)):
                yield dataset[i]
        finally:
            dataset.close()

    yield from _thread_prefetch(serial())


def rebatch(regions: Iterable[tuple[Any, ...]], batch_size: int, pin: bool = False,
            stats: EngineStats | None = None, buffers: int = 2,
            ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Variable-size regions → ``(idx, uint8 (b,P,P,3))`` batches of exactly ``batch_size``
    (the last one shorter). ``buffers`` reusable output buffers (pinned when ``pin``) in a
    ring: a batch stays valid until ``buffers - 1`` more batches have been requested."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    ring: list[torch.Tensor] = []
    cur, n = 0, 0
    idx_parts: list[np.ndarray] = []
    wait_t = time.perf_counter()
    for item in regions:
        idx, patches = np.asarray(item[0], dtype=np.int64), torch.as_tensor(item[1])
        if stats is not None:
            stats.wait_s += time.perf_counter() - wait_t
            stats.regions += 1
            if len(item) >= 4:
                stats.read_s += float(item[2])
                stats.stain_s += float(item[3])
            if len(item) >= 5:
                stats.unreadable.extend(int(v) for v in item[4])
            if len(item) >= 6:
                stats.reader_cpu_s += float(item[5])
        if not ring and len(idx):
            shape = (batch_size, *patches.shape[1:])
            ring = [torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
                    for _ in range(max(2, buffers))]
        start = 0
        while start < len(idx):
            take = min(batch_size - n, len(idx) - start)
            ring[cur][n:n + take].copy_(patches[start:start + take])
            idx_parts.append(idx[start:start + take])
            n += take
            start += take
            if n == batch_size:
                yield np.concatenate(idx_parts), ring[cur]
                cur, n, idx_parts = (cur + 1) % len(ring), 0, []
        wait_t = time.perf_counter()
    if n:
        yield np.concatenate(idx_parts), ring[cur][:n]


# --------------------------------------------------------------------------- compute
def autocast_context(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 (or fp16 where bf16 is unsupported) autocast on CUDA; nothing (fp32) elsewhere."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def classify(batches: Iterable[tuple[np.ndarray, torch.Tensor]],
             model: ModelSource, device: torch.device, amp: bool = True,
             stats: EngineStats | None = None,
             on_batch: Callable[[int], None] | None = None,
             explain: Callable[[LoadedModel],
                               Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]
             | None = None, plan: ComputePlan | None = None,
             ) -> Iterator[tuple[np.ndarray, ...]]:
    """uint8 NHWC batches → ``(idx, probs float32 (b, classes))``, in input order.

    ``model`` is a ``LoadedModel`` or a zero-argument callable returning one, called when the
    first batch is ready (lazy loading). On CUDA up to ``inflight.DEFAULT_DEPTH`` batches are
    queued (non-blocking copies from and to pinned host buffers, an event per batch) before the
    oldest one's probabilities are fetched (:mod:`histotile.inflight`). With ``plan.streams > 1``
    (CPU, no ``explain``) that many batches are in flight at once, each in its own thread. The
    caller must keep :func:`batches_in_flight` batches valid (``rebatch(..., buffers=that + 1)``).

    ``explain``: ``factory(loaded) -> fn(x) -> (maps (b, h, w), probs (b, classes))``, built once
    the model is loaded (e.g. a :class:`histotile.gradcam.GradCAM`); its pass replaces the plain
    forward (probabilities from the same pass) and items become ``(idx, probs, maps float32)``.
    """
    if plan is not None and plan.streams > 1 and explain is None and device.type == "cpu":
        yield from _classify_streams(batches, model, device, plan, stats, on_batch)
        return
    if device.type == "cuda":
        from histotile.inflight import CudaDevice

        yield from _classify_queued(batches, model, device, CudaDevice(device), amp, stats,
                                    on_batch, explain)
        return
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None
    with _grad_mode(explain):
        for idx, batch in batches:
            if forward is None:
                forward = _forward(model, device, amp, stats, explain)
            t0 = time.perf_counter()
            out = [t.detach().cpu().float().numpy() for t in forward(batch)]
            seconds = time.perf_counter() - t0
            _count(stats, on_batch, len(idx), waited=seconds, busy=seconds)
            yield (idx, *out)


def batches_in_flight(device: torch.device, plan: ComputePlan | None = None,
                      explain: object | None = None) -> int:
    """Batches :func:`classify` may still read after asking for the next one: the batch
    source must keep that many valid (``rebatch(..., buffers=batches_in_flight(...) + 1)``)."""
    if device.type == "cuda":
        from histotile.inflight import DEFAULT_DEPTH

        return DEFAULT_DEPTH
    if plan is not None and explain is None and device.type == "cpu":
        return plan.streams
    return 1


def _grad_mode(explain: object | None) -> contextlib.AbstractContextManager[Any]:
    # the explainer differentiates through its layer: its input may not be an inference tensor
    return torch.inference_mode() if explain is None else torch.no_grad()


def _forward(model: ModelSource, device: torch.device, amp: bool, stats: EngineStats | None,
             explain: Callable[[LoadedModel], Callable[..., Any]] | None,
             ) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """Load the model (lazily, once) → ``fn(uint8 batch) -> (probs,)`` or ``(probs, maps)``."""
    from histotile.models.loading import preprocess

    loaded = _load(model, stats)
    explainer = explain(loaded) if explain is not None else None

    def forward(batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = preprocess(batch, loaded.card, device)
        with autocast_context(device) if amp else contextlib.nullcontext():
            if explainer is None:
                return (torch.softmax(loaded.module(x).float(), dim=1),)
            maps, probs = explainer(x)
            return (probs, maps)

    return forward


def _classify_queued(batches: Iterable[tuple[np.ndarray, torch.Tensor]], model: ModelSource,
                     device: torch.device, backend: AsyncDevice, amp: bool = True,
                     stats: EngineStats | None = None,
                     on_batch: Callable[[int], None] | None = None,
                     explain: Callable[[LoadedModel], Callable[..., Any]] | None = None,
                     depth: int | None = None) -> Iterator[tuple[np.ndarray, ...]]:
    """:func:`classify` on an asynchronous device (:meth:`histotile.inflight.InFlight.run`)."""
    from histotile.inflight import DEFAULT_DEPTH, InFlight

    with _grad_mode(explain):
        for idx, out, seconds in InFlight(backend, depth or DEFAULT_DEPTH).run(
                batches, lambda: _forward(model, device, amp, stats, explain)):
            _count(stats, on_batch, len(idx), waited=seconds, busy=seconds)
            yield (idx, *out)


def _count(stats: EngineStats | None, on_batch: Callable[[int], None] | None, n: int,
           waited: float, busy: float) -> None:
    """Book one finished batch of ``n`` patches: ``waited`` s of pipeline wall time on the
    model, ``busy`` s of forward pass."""
    if stats is not None:
        stats.model_s += waited
        stats.forward_s += busy
        stats.batches += 1
        stats.patches += n
    if on_batch is not None:
        on_batch(n)


def _load(model: ModelSource, stats: EngineStats | None) -> LoadedModel:
    t0 = time.perf_counter()
    loaded = model() if callable(model) else model
    if stats is not None:
        seconds = time.perf_counter() - t0
        stats.model_load_s += seconds
        stats.model_s += seconds
    return loaded


def _classify_streams(batches: Iterable[tuple[np.ndarray, torch.Tensor]], model: ModelSource,
                      device: torch.device, plan: ComputePlan, stats: EngineStats | None,
                      on_batch: Callable[[int], None] | None) -> Iterator[tuple[np.ndarray, ...]]:
    """CPU forward passes in ``plan.streams`` threads; results in input order."""
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    from histotile.models.loading import preprocess

    loaded: Any = None  # set before the first forward (a closure mypy cannot follow)

    def forward(batch: torch.Tensor) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            probs = torch.softmax(loaded.module(preprocess(batch, loaded.card, device)).float(),
                                  dim=1)
        return probs.numpy(), time.perf_counter() - t0

    inflight: deque[tuple[np.ndarray, Future[tuple[np.ndarray, float]]]] = deque()
    pool = ThreadPoolExecutor(plan.streams, thread_name_prefix="histotile-model",
                              initializer=torch.set_num_threads, initargs=(plan.threads,))

    def collect() -> tuple[np.ndarray, np.ndarray]:
        idx, future = inflight.popleft()
        t0 = time.perf_counter()
        probs, busy = future.result()
        _count(stats, on_batch, len(idx), waited=time.perf_counter() - t0, busy=busy)
        return idx, probs

    try:
        for idx, batch in batches:
            if loaded is None:
                loaded = _load(model, stats)
                if stats is not None:
                    stats.streams = plan.streams
            t0 = time.perf_counter()
            inflight.append((idx, pool.submit(forward, batch)))
            if stats is not None:
                stats.model_s += time.perf_counter() - t0
            if len(inflight) >= plan.streams:
                yield collect()
        while inflight:
            yield collect()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_inference(slide_spec: dict[str, Any], grid: PatchGrid, regions: list[Region],
                  model: ModelSource,
                  device: torch.device, batch_size: int = 256, workers: int | None = None,
                  stain: Callable[[np.ndarray], np.ndarray] | None = None,
                  stats: EngineStats | None = None,
                  on_batch: Callable[[int], None] | None = None,
                  reader: Callable[[Slide, PatchGrid, Region], tuple[np.ndarray, np.ndarray]]
                  | None = None,
                  explain: Callable[[LoadedModel], Callable[..., Any]] | None = None,
                  plan: ComputePlan | None = None,
                  ) -> Iterator[tuple[np.ndarray, ...]]:
    """Stream ``(idx, coords (b,2) level-0 x,y, probs float32 (b, classes))`` over ``regions``
    (plus ``maps float32 (b, h, w)`` last with ``explain``: see :func:`classify`).

    ``idx`` are row numbers into ``grid.coords``/``grid.indices``. Memory is bounded by
    ``batch_size`` times the batches in flight and the readers' prefetch, never by the slide.
    ``plan`` (default: a single stream in the calling thread) spreads the model over cores.
    Patches that cannot be decoded (a damaged tile) are not yielded; their grid rows end up in
    ``stats.unreadable`` once the stream is exhausted.
    """
    if workers is None:
        workers = default_workers(device)
    if stats is None:  # the unreadable patches are counted there
        stats = EngineStats()
    dataset = RegionDataset(slide_spec, grid, regions, stain=stain, reader=reader)
    regions_it = iter_regions(dataset, workers)
    batches = rebatch(regions_it, batch_size, pin=device.type == "cuda", stats=stats,
                      buffers=batches_in_flight(device, plan, explain) + 1)
    coords = np.asarray(grid.coords)
    t0, cpu0, reader_cpu0 = time.perf_counter(), time.process_time(), stats.reader_cpu_s
    for idx, *out in classify(batches, model, device, stats=stats, on_batch=on_batch,
                              explain=explain, plan=plan):
        yield (idx, coords[idx], *out)
    stats.stream_s += time.perf_counter() - t0
    stats.cpu_s += time.process_time() - cpu0 + stats.reader_cpu_s - reader_cpu0

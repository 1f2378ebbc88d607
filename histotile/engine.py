"""Streaming inference: regions of the kept grid → uint8 batches → model → class probabilities.

Data path (one slide)::

    RegionDataset[i]  (worker: own slide handle, reads one tile-aligned region, slices its
          │            patches, applies the slide's stain fit)  -> (idx, uint8 (n,P,P,3))
    rebatch()          variable-size regions -> fixed ``batch_size`` uint8 batches (pinned on CUDA)
    classify()         non-blocking copy, mean/std on the device, channels_last, autocast
                       (bf16/fp16 on CUDA, fp32 on CPU), ``torch.inference_mode``; on CUDA the
                       next batch is launched before the previous one's probabilities are fetched
          │
          ▼  (idx, coords, probs float32)   consumed chunk by chunk by the stitcher/exporters

Reading overlaps compute: with ``workers >= 1`` a torch ``DataLoader`` (``batch_size=None``, one
item per region) reads in worker processes; each opens its own slide handle lazily, keyed by
pid, so no handle crosses a fork. With ``workers = 0`` a background *thread* reads ahead
(OpenSlide, JPEG decoding, resizing and torch ops release the GIL), so there is still overlap
without a process fork.

Default worker count (``default_workers``) and torch threads (``configure_threads``): on CUDA
``min(8, cpus - 1)`` reader processes feed the GPU. On the CPU the model needs the cores, so
reading runs in one background thread (no process) and torch gets the other cores
(``torch.set_num_threads(max(1, cpus - max(workers, 1)))``). Measured on the 2-core dev machine
(shared, load average ~10 during the runs, so absolute figures are pessimistic), CMU-1-Small-
Region.svs, untrained smallcnn at 28 px, Macenko per slide, batch 256, min of 3 runs of
``run_inference`` (tissue detection and model loading excluded)::

    readers              torch threads   4 µm/px (42 patches)   1 µm/px (680 patches)
    none (serial)        2               1.61 s                 3.69 s
    1 thread             2               1.08 s                 3.71 s
    1 thread  (default)  1               0.48 s                 2.06 s
    1 process            1               0.66 s                 2.53 s
    1 process            2               0.94 s                 5.22 s

So the default on 2 CPUs is one reader thread + one torch thread; ``--workers N`` on the CPU
gives torch ``cpus - N`` threads.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


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


def configure_threads(device: torch.device, workers: int) -> int:
    """Give torch the cores the readers (a thread when ``workers`` is 0) leave free; returns
    the thread count set."""
    n = cpu_count() if device.type != "cpu" else max(1, cpu_count() - max(workers, 1))
    torch.set_num_threads(n)
    return n


@dataclass
class EngineStats:
    """Counters and seconds for one run (``read_s``/``stain_s`` are summed over readers)."""

    patches: int = 0
    batches: int = 0
    regions: int = 0
    read_s: float = 0.0
    stain_s: float = 0.0
    wait_s: float = 0.0
    model_s: float = 0.0
    model_load_s: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class StainStep:
    """A per-slide stain fit applied in the readers: ``normalizer.normalize(patches, fit)``."""

    normalizer: Any
    fit: Any

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        out = self.normalizer.normalize(patches, self.fit)
        if isinstance(out, torch.Tensor):
            out = out.numpy()
        return np.ascontiguousarray(out, dtype=np.uint8)


# --------------------------------------------------------------------------- reading
class RegionDataset(torch.utils.data.Dataset):
    """Item ``i`` = region ``i`` of the grid → ``(idx int64 (n,), uint8 (n,P,P,3), read_s,
    stain_s)``. The slide is opened lazily per process from ``slide_spec``."""

    def __init__(self, slide_spec: dict[str, Any], grid: Any, regions: list[Any],
                 stain: Callable[[np.ndarray], np.ndarray] | None = None,
                 reader: Callable[[Any, Any, Any], tuple[np.ndarray, np.ndarray]] | None = None,
                 ) -> None:
        self.slide_spec = dict(slide_spec)
        self.grid = grid
        self.regions = regions
        self.stain = stain
        self.reader = reader
        self._slide: Any = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.regions)

    def slide(self) -> Any:
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

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, float, float]:
        reader = self.reader
        if reader is None:
            from histotile.patches import read_region_patches as reader
        t0 = time.perf_counter()
        idx, patches = reader(self.slide(), self.grid, self.regions[i])
        t1 = time.perf_counter()
        if self.stain is not None and len(idx):
            patches = self.stain(patches)
        t2 = time.perf_counter()
        return (np.asarray(idx, dtype=np.int64), np.ascontiguousarray(patches, dtype=np.uint8),
                t1 - t0, t2 - t1)


def _thread_prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, ``depth`` items ahead."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def run() -> None:
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


def iter_regions(dataset: RegionDataset, workers: int) -> Iterator[tuple[Any, ...]]:
    """Regions in reading order: a ``DataLoader`` with ``workers`` processes, or a thread."""
    if workers <= 0:
        def serial() -> Iterator[tuple[Any, ...]]:
            try:
                for i in range(len(dataset)):
                    yield dataset[i]
            finally:
                dataset.close()

        yield from _thread_prefetch(serial())
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers,
        prefetch_factor=2, persistent_workers=False,
    )
    yield from loader


def rebatch(regions: Iterable[tuple[Any, ...]], batch_size: int, pin: bool = False,
            stats: EngineStats | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Variable-size regions → ``(idx, uint8 (b,P,P,3))`` batches of exactly ``batch_size``
    (the last one shorter). Two reusable output buffers (pinned when ``pin``): a batch stays
    valid until the next-but-one is requested."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    buffers: list[torch.Tensor] = []
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
        if not buffers and len(idx):
            shape = (batch_size, *patches.shape[1:])
            buffers = [torch.empty(shape, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        start = 0
        while start < len(idx):
            take = min(batch_size - n, len(idx) - start)
            buffers[cur][n:n + take].copy_(patches[start:start + take])
            idx_parts.append(idx[start:start + take])
            n += take
            start += take
            if n == batch_size:
                yield np.concatenate(idx_parts), buffers[cur]
                cur, n, idx_parts = cur ^ 1, 0, []
        wait_t = time.perf_counter()
    if n:
        yield np.concatenate(idx_parts), buffers[cur][:n]


# --------------------------------------------------------------------------- compute
def autocast_context(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 (or fp16 where bf16 is unsupported) autocast on CUDA; nothing (fp32) elsewhere."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def classify(batches: Iterable[tuple[np.ndarray, torch.Tensor]],
             model: Any, device: torch.device, amp: bool = True,
             stats: EngineStats | None = None,
             on_batch: Callable[[int], None] | None = None,
             explain: Callable[[Any], Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]
             | None = None,
             ) -> Iterator[tuple[np.ndarray, ...]]:
    """uint8 NHWC batches → ``(idx, probs float32 (b, classes))``.

    ``model`` is a ``LoadedModel`` or a zero-argument callable returning one, called when the
    first batch is ready (lazy loading). On CUDA batch ``k+1`` is queued before the
    probabilities of batch ``k`` are copied back.

    ``explain``: ``factory(loaded) -> fn(x) -> (maps (b, h, w), probs (b, classes))``, built once
    the model is loaded (e.g. a :class:`histotile.explain.GradCAM`); its pass replaces the plain
    forward (probabilities from the same pass) and items become ``(idx, probs, maps float32)``.
    """
    from histotile.models.loading import preprocess

    loaded = None
    explainer: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    pending: tuple[Any, ...] | None = None
    ctx = autocast_context(device) if amp else contextlib.nullcontext()
    # the explainer differentiates through its layer: its input may not be an inference tensor
    with torch.inference_mode() if explain is None else torch.no_grad():
        for idx, batch in batches:
            if loaded is None:
                t0 = time.perf_counter()
                loaded = model() if callable(model) else model
                explainer = explain(loaded) if explain is not None else None
                if stats is not None:
                    stats.model_load_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            x = preprocess(batch, loaded.card, device)
            with ctx:
                if explainer is None:
                    item: tuple[Any, ...] = (idx, torch.softmax(loaded.module(x).float(), dim=1))
                else:
                    maps, probs = explainer(x)
                    item = (idx, probs, maps)
            if device.type == "cuda":
                if pending is not None:
                    yield _finish(pending, stats, t0, on_batch)
                pending = item
                continue
            yield _finish(item, stats, t0, on_batch)
        if pending is not None:
            yield _finish(pending, stats, time.perf_counter(), on_batch)


def _finish(item: tuple[Any, ...], stats: EngineStats | None, t0: float,
            on_batch: Callable[[int], None] | None) -> tuple[np.ndarray, ...]:
    idx, *tensors = item
    out = [t.detach().to("cpu").float().numpy() for t in tensors]
    if stats is not None:
        stats.model_s += time.perf_counter() - t0
        stats.batches += 1
        stats.patches += len(idx)
    if on_batch is not None:
        on_batch(len(idx))
    return (idx, *out)


def run_inference(slide_spec: dict[str, Any], grid: Any, regions: list[Any], model: Any,
                  device: torch.device, batch_size: int = 256, workers: int | None = None,
                  stain: Callable[[np.ndarray], np.ndarray] | None = None,
                  stats: EngineStats | None = None,
                  on_batch: Callable[[int], None] | None = None,
                  reader: Callable[[Any, Any, Any], tuple[np.ndarray, np.ndarray]] | None = None,
                  explain: Callable[[Any], Any] | None = None,
                  ) -> Iterator[tuple[np.ndarray, ...]]:
    """Stream ``(idx, coords (b,2) level-0 x,y, probs float32 (b, classes))`` over ``regions``
    (plus ``maps float32 (b, h, w)`` last with ``explain``: see :func:`classify`).

    ``idx`` are row numbers into ``grid.coords``/``grid.indices``. Memory is bounded by
    ``batch_size`` and the readers' prefetch, never by the slide.
    """
    if workers is None:
        workers = default_workers(device)
    dataset = RegionDataset(slide_spec, grid, regions, stain=stain, reader=reader)
    regions_it = iter_regions(dataset, workers)
    batches = rebatch(regions_it, batch_size, pin=device.type == "cuda", stats=stats)
    coords = np.asarray(grid.coords)
    for idx, *out in classify(batches, model, device, stats=stats, on_batch=on_batch,
                              explain=explain):
        yield (idx, coords[idx], *out)

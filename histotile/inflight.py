"""Batches in flight on an asynchronous device: upload, forward, download, fetch in order.

One batch on CUDA (:class:`CudaDevice`)::

    upload stream   H2D(k) from the caller's pinned buffer
    compute stream         waits for H2D(k) ─ forward(k) ─ D2H(k) into a pinned slot ─ event(k)
    host            launch(k), launch(k+1), ... then event(k).synchronize(), copy out, release

The host launches up to ``depth`` batches before it waits for the oldest one, so the device
always has queued work while the host turns batch k's outputs into numpy arrays and reads the
next batch; the uploads run on their own stream, beside the forward pass of the batch before.
No call here blocks the host except :meth:`InFlight.fetch` waiting on the oldest event.

Host buffer invariants (what makes asynchronous copies safe):

- **outputs**: :class:`OutputRing` holds ``depth`` slots of host buffers (pinned on CUDA); a slot
  is taken at launch and released by :meth:`InFlight.fetch` only after its event completed and
  its contents were copied out. Taking a slot that is still in use raises ``RuntimeError`` (it
  cannot happen with at most ``depth`` batches in flight: slots go round in launch order).
- **inputs**: the uint8 batch lives in the caller's buffer (``engine.rebatch``'s ring). Its
  upload is complete once the batch's event completed (the compute stream waited for the upload
  before the download). The caller launches only while :attr:`InFlight.full` is false and asks
  its source for the next batch only after that, so when a batch is written at most
  ``depth - 1`` launched batches still hold an input buffer: a ring of ``>= depth`` buffers is
  never overwritten in flight (the engine gives ``rebatch`` ``depth + 1``, one spare).

:class:`AsyncDevice` is all that is device-specific; a test drives the same queue with a fake
device whose copies complete only when their event is waited on (tests/test_gpu_overlap.py).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch

#: batches queued on the device before the host waits for the oldest one
DEFAULT_DEPTH = 3


class Event(Protocol):
    """Marks a point in the device's queue (``torch.cuda.Event``)."""

    def synchronize(self) -> None: ...


class AsyncDevice(Protocol):
    """The asynchronous operations :class:`InFlight` needs from a device."""

    def upload(self, batch: torch.Tensor) -> torch.Tensor:
        """Queue the host→device copy of ``batch``; the result is usable by compute work."""

    def download(self, outputs: Sequence[torch.Tensor], into: Sequence[torch.Tensor]) -> Event:
        """Queue device→host copies ``outputs[i] → into[i]`` after the work queued so far; the
        event completes when they have landed."""

    def host_empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 host buffer the device can copy into asynchronously (pinned on CUDA)."""


class CudaDevice:
    """:class:`AsyncDevice` on a CUDA device: uploads on a side stream, compute and downloads on
    the current stream, pinned host buffers."""

    def __init__(self, device: torch.device) -> None:
        import torch

        self.device = device
        self.upload_stream = torch.cuda.Stream(device)

    def upload(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.upload_stream):
            x = batch.to(self.device, non_blocking=True)
        compute.wait_stream(self.upload_stream)
        x.record_stream(compute)  # allocated on the upload stream, freed after compute's use
        return x

    def download(self, outputs: Sequence[torch.Tensor], into: Sequence[torch.Tensor]) -> Event:
        import torch

        for src, dst in zip(outputs, into, strict=True):
            dst.copy_(src.detach(), non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def host_empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        return torch.empty(shape, dtype=torch.float32, pin_memory=True)


class OutputRing:
    """``size`` slots of host output buffers, taken in turn; a slot in use is never handed out."""

    def __init__(self, device: AsyncDevice, size: int) -> None:
        self.device = device
        self.slots: list[list[torch.Tensor]] = [[] for _ in range(size)]
        self.busy = [False] * size
        self.next = 0

    def take(self, outputs: Sequence[torch.Tensor]) -> tuple[int, list[torch.Tensor]]:
        """The next slot, with host views shaped like ``outputs`` (buffers grow on demand)."""
        i = self.next
        if self.busy[i]:
            raise RuntimeError(f"host output buffer {i} reused while its copy is in flight")
        bufs = self.slots[i]
        views = []
        for j, out in enumerate(outputs):
            shape = tuple(out.shape)
            if (j >= len(bufs) or tuple(bufs[j].shape[1:]) != shape[1:]
                    or bufs[j].shape[0] < shape[0]):
                buf = self.device.host_empty(shape)
                bufs[j:j + 1] = [buf]
            views.append(bufs[j][:shape[0]])
        self.busy[i] = True
        self.next = (i + 1) % len(self.slots)
        return i, views

    def release(self, i: int) -> None:
        self.busy[i] = False


@dataclass
class _Launched:
    idx: np.ndarray
    event: Event
    slot: int
    views: list[torch.Tensor]
    host_s: float  # host seconds spent launching it


class InFlight:
    """At most ``depth`` batches launched on ``device`` and not yet fetched, fetched in launch
    order (see the module docstring for the buffer invariants)."""

    def __init__(self, device: AsyncDevice, depth: int = DEFAULT_DEPTH) -> None:
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self.device = device
        self.depth = depth
        self.ring = OutputRing(device, depth)
        self.queue: deque[_Launched] = deque()

    def __len__(self) -> int:
        return len(self.queue)

    @property
    def full(self) -> bool:
        return len(self.queue) >= self.depth

    def launch(self, idx: np.ndarray, batch: torch.Tensor,
               forward: Callable[[torch.Tensor], Sequence[torch.Tensor]]) -> None:
        """Queue upload, ``forward`` and download of one batch (``forward`` queues device work
        and returns its output tensors)."""
        if self.full:
            raise RuntimeError(f"{self.depth} batches already in flight: fetch one first")
        t0 = time.perf_counter()
        outputs = [t.float() for t in forward(self.device.upload(batch))]
        slot, views = self.ring.take(outputs)
        event = self.device.download(outputs, views)
        self.queue.append(_Launched(idx, event, slot, views, time.perf_counter() - t0))

    def fetch(self) -> tuple[np.ndarray, list[np.ndarray], float]:
        """Wait for the oldest batch: ``(idx, outputs as numpy float32 copies, host seconds
        spent on it: launching and waiting)``; its host slot is free again."""
        item = self.queue.popleft()
        t0 = time.perf_counter()
        item.event.synchronize()
        out = [v.numpy().copy() for v in item.views]
        self.ring.release(item.slot)
        return item.idx, out, item.host_s + time.perf_counter() - t0

    def run(self, batches: Iterable[tuple[np.ndarray, torch.Tensor]],
            make_forward: Callable[[], Callable[[torch.Tensor], Sequence[torch.Tensor]]],
            ) -> Iterator[tuple[np.ndarray, list[np.ndarray], float]]:
        """Launch every batch, fetching the oldest whenever ``depth`` are queued (so the next
        batch is asked for with at most ``depth - 1`` in flight); :meth:`fetch`'s items in
        order. ``make_forward()`` is called once, when the first batch is ready."""
        forward = None
        for idx, batch in batches:
            if forward is None:
                forward = make_forward()
            self.launch(idx, batch, forward)
            if self.full:
                yield self.fetch()
        while self.queue:
            yield self.fetch()

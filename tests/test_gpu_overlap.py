"""The CUDA batch queue (histotile.inflight) driven on the CPU by a fake asynchronous device.

The fake queues every copy and performs it only when an event at or after it is waited on, as
a GPU stream would at its slowest: outputs read before their event would be NaN, and an input
buffer written while its upload is still queued raises. The engine's CUDA path
(``engine._classify_queued`` with ``inflight.CudaDevice``) runs the same code with real streams.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from helpers import make_untrained_model

from histotile import engine
from histotile.inflight import DEFAULT_DEPTH, InFlight, OutputRing


class FakeEvent:
    def __init__(self, device: FakeDevice, upto: int, batch: int) -> None:
        self.device, self.upto, self.batch = device, upto, batch

    def synchronize(self) -> None:
        self.device.log.append(("wait", self.batch))
        self.device.complete_through(self.upto)


class FakeDevice:
    """One in-order stream whose operations run only when an event behind them is waited on."""

    def __init__(self) -> None:
        self.ops: list[Callable[[], None]] = []
        self.done = 0
        self.launched = 0
        self.log: list[tuple[str, int]] = []

    def upload(self, batch: torch.Tensor) -> torch.Tensor:
        k = self.launched
        self.launched += 1
        self.log.append(("launch", k))
        held, snapshot = batch, batch.clone()

        def landed() -> None:  # the copy is only complete here: the buffer must be untouched
            if not torch.equal(held, snapshot):
                raise AssertionError(f"input buffer of batch {k} overwritten while its "
                                     "upload was in flight")

        self.ops.append(landed)
        return snapshot

    def download(self, outputs: Sequence[torch.Tensor], into: Sequence[torch.Tensor]
                 ) -> FakeEvent:
        values = [o.detach().clone() for o in outputs]

        def land() -> None:
            for v, dst in zip(values, into, strict=True):
                dst.copy_(v)

        self.ops.append(land)
        return FakeEvent(self, len(self.ops), self.launched - 1)

    def host_empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.full(shape, float("nan"))  # never-landed data shows up as NaN

    def complete_through(self, upto: int) -> None:
        while self.done < upto:
            self.ops[self.done]()
            self.done += 1


@pytest.fixture(scope="module")
def model28(tmp_path_factory: pytest.TempPathFactory):
    from histotile.models.loading import load_model

    folder = make_untrained_model(tmp_path_factory.mktemp("m") / "generated-untrained-28")
    return load_model(folder, "cpu")


def _regions(n_regions: int = 9, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Variable-size regions of distinct random patches (as the readers yield them)."""
    rng = np.random.default_rng(seed)
    out, start = [], 0
    for _ in range(n_regions):
        n = int(rng.integers(1, 9))
        out.append((np.arange(start, start + n),
                    rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)))
        start += n
    return out


def _sequential(model, regions, explain=None) -> list[tuple[np.ndarray, ...]]:
    batches = engine.rebatch(iter(regions), 5)
    return list(engine.classify(batches, model, torch.device("cpu"), explain=explain))


def _explain(loaded):
    """A stand-in explainer: (maps (b, h, w), probs) from one pass."""
    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.mean(dim=1), torch.softmax(loaded.module(x), dim=1)
    return fn


@pytest.mark.parametrize("buffers", [DEFAULT_DEPTH,  # the least the invariant allows
                                     engine.batches_in_flight(torch.device("cuda")) + 1])
def test_issue19_cuda_queue_launches_ahead_and_matches_sequential(model28, buffers: int
                                                                   ) -> None:
    """The CUDA path fetched batch k with a blocking copy issued after forward(k+1): no overlap.
    Now batch k is waited for only once k+1.. are queued, results equal the sequential path,
    and no reused input buffer of engine.rebatch is written while its upload is queued."""
    regions = _regions()
    want = _sequential(model28, regions)
    device = FakeDevice()
    batches = engine.rebatch(iter(regions), 5, buffers=buffers)
    stats = engine.EngineStats()
    got = list(engine._classify_queued(batches, model28, torch.device("cpu"), device,  # noqa: SLF001 - the CUDA path, CPU device
                                       stats=stats))
    total = sum(len(idx) for idx, _ in regions)
    assert len(got) == len(want) == -(-total // 5) >= 2 * DEFAULT_DEPTH
    for (gi, gp), (wi, wp) in zip(got, want, strict=True):
        np.testing.assert_array_equal(gi, wi)
        assert gp.dtype == np.float32 and not np.isnan(gp).any()
        np.testing.assert_array_equal(gp, wp)
    assert stats.batches == len(got) and stats.patches == total
    # each wait comes after the next DEFAULT_DEPTH - 1 batches were launched
    n, d = len(got), DEFAULT_DEPTH
    expect = [("launch", k) for k in range(d)]
    for k in range(n):
        expect.append(("wait", k))
        if k + d < n:
            expect.append(("launch", k + d))
    assert device.log == expect


def test_issue19_fake_device_catches_a_ring_too_small_for_the_queue(model28) -> None:
    """The check above can fail: with fewer input buffers than batches in flight, a buffer is
    rewritten while its upload is still queued, and the fake device says so."""
    batches = engine.rebatch(iter(_regions()), 5, buffers=DEFAULT_DEPTH - 1)
    with pytest.raises(AssertionError, match="overwritten while its upload was in flight"):
        list(engine._classify_queued(batches, model28, torch.device("cpu"), FakeDevice()))  # noqa: SLF001 - the CUDA path, CPU device


def test_issue19_queued_explain_gives_maps_and_probs_like_sequential(model28) -> None:
    regions = _regions(seed=1)
    want = _sequential(model28, regions, explain=_explain)
    got = list(engine._classify_queued(engine.rebatch(iter(regions), 5), model28,  # noqa: SLF001 - the CUDA path, CPU device
                                       torch.device("cpu"), FakeDevice(), explain=_explain,
                                       depth=2))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert len(g) == len(w) == 3
        np.testing.assert_array_equal(g[0], w[0])
        np.testing.assert_array_equal(g[1], w[1])  # probs
        np.testing.assert_array_equal(g[2], w[2])  # maps (b, 28, 28), last batch shorter
    assert got[-1][2].shape[0] < got[0][2].shape[0]


def test_output_ring_refuses_a_slot_still_in_flight() -> None:
    ring = OutputRing(FakeDevice(), 2)
    outs = [torch.zeros(4, 3)]
    a, (va,) = ring.take(outs)
    b, _ = ring.take(outs)
    assert (a, b) == (0, 1) and va.shape == (4, 3)
    with pytest.raises(RuntimeError, match="reused while its copy is in flight"):
        ring.take(outs)
    ring.release(0)
    c, (vc,) = ring.take([torch.zeros(2, 3)])  # a shorter batch: a view of the same buffer
    assert c == 0 and vc.shape == (2, 3) and vc.data_ptr() == va.data_ptr()


def test_inflight_refuses_more_than_depth_and_fetches_in_order() -> None:
    device = FakeDevice()
    q = InFlight(device, depth=2)
    double = lambda x: (x.float() * 2,)  # noqa: E731
    q.launch(np.array([0]), torch.ones(1, 2), double)
    q.launch(np.array([1]), torch.full((1, 2), 3.0), double)
    assert q.full
    with pytest.raises(RuntimeError, match="already in flight"):
        q.launch(np.array([2]), torch.ones(1, 2), double)
    assert device.done == 0  # nothing has landed before a fetch waits
    idx, (out,), seconds = q.fetch()
    assert idx.tolist() == [0] and out.tolist() == [[2.0, 2.0]] and seconds >= 0
    assert device.done == 2  # only batch 0's upload and download
    idx, (out,), _ = q.fetch()
    assert idx.tolist() == [1] and out.tolist() == [[6.0, 6.0]] and len(q) == 0


def test_batches_in_flight_covers_every_path() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert engine.batches_in_flight(cuda) == DEFAULT_DEPTH
    assert engine.batches_in_flight(cpu, engine.ComputePlan(2, 1)) == 2
    assert engine.batches_in_flight(cpu, engine.ComputePlan(2, 1), explain=_explain) == 1
    assert engine.batches_in_flight(cpu) == 1


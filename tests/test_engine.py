"""The inference engine on the real CMU slide: regions, readers, re-batching, laziness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_untrained_model

from histotile.engine import (
    EngineStats,
    RegionDataset,
    _thread_prefetch,
    classify,
    iter_regions,
    rebatch,
    run_inference,
)


@pytest.fixture(scope="module")
def setup(cmu_small: Path, tmp_path_factory: pytest.TempPathFactory):
    from histotile.grid import make_grid
    from histotile.patches import plan_regions
    from histotile.slide import open_slide
    from histotile.tissue import detect_tissue

    slide = open_slide(cmu_small)
    # 28 px at 2 um/px: a few hundred patches, several regions of 512 level px
    grid = make_grid(slide, 28, target_mpp=2.0, tissue=detect_tissue(slide), min_tissue=0.5)
    regions = plan_regions(grid, slide, region_size=512)
    model = make_untrained_model(tmp_path_factory.mktemp("m") / "generated-untrained-28",
                                 mpp=2.0)
    yield slide, grid, regions, model
    slide.close()


def test_region_dataset_matches_single_patch_reads(setup) -> None:
    from histotile.patches import read_patch

    slide, grid, regions, _ = setup
    assert len(regions) > 3
    ds = RegionDataset(slide.spec, grid, regions)
    idx, patches, read_s, stain_s, unreadable = ds[1]
    assert len(unreadable) == 0
    assert patches.dtype == np.uint8 and patches.shape[1:] == (28, 28, 3)
    assert read_s > 0 and stain_s < read_s
    for k in (0, len(idx) - 1):
        np.testing.assert_array_equal(patches[k], read_patch(slide, grid, int(idx[k])))


def test_worker_processes_open_their_own_handle(setup) -> None:
    slide, grid, regions, _ = setup
    ds = RegionDataset(slide.spec, grid, regions)
    seen = list(iter_regions(ds, workers=1))
    assert ds._slide is None, "the main process must not open a handle for the workers"  # noqa: SLF001 - checks the main process opened no handle
    thread = list(iter_regions(RegionDataset(slide.spec, grid, regions), workers=0))
    assert len(seen) == len(thread) == len(regions)
    for a, b in zip(seen, thread, strict=True):
        np.testing.assert_array_equal(np.asarray(a[0]), b[0])
        np.testing.assert_array_equal(np.asarray(a[1]), b[1])


def test_rebatch_gives_fixed_batches_in_order(setup) -> None:
    slide, grid, regions, _ = setup
    items = [RegionDataset(slide.spec, grid, regions)[i] for i in range(4)]
    sizes = [len(it[0]) for it in items]
    stats = EngineStats()
    out = [(i.copy(), b.clone()) for i, b in rebatch(iter(items), 7, stats=stats)]
    total = sum(sizes)
    assert [len(i) for i, _ in out] == [7] * (total // 7) + ([total % 7] if total % 7 else [])
    np.testing.assert_array_equal(np.concatenate([i for i, _ in out]),
                                  np.concatenate([it[0] for it in items]))
    np.testing.assert_array_equal(torch.cat([b for _, b in out]).numpy(),
                                  np.concatenate([it[1] for it in items]))
    assert stats.regions == 4 and stats.read_s > 0


def test_thread_prefetch_passes_errors_on() -> None:
    def items():
        yield 1
        raise RuntimeError("reader failed")

    got = []
    with pytest.raises(RuntimeError, match="reader failed"):
        for item in _thread_prefetch(items()):
            got.append(item)
    assert got == [1]


def test_model_is_loaded_lazily_and_once(setup) -> None:
    from histotile.models.loading import load_model

    _, _, _, model = setup
    calls = []

    def lazy():
        calls.append(1)
        return load_model(model, "cpu")

    assert list(classify(iter([]), lazy, torch.device("cpu"))) == []
    assert calls == []
    batches = [(np.arange(3), torch.zeros(3, 28, 28, 3, dtype=torch.uint8)),
               (np.arange(3, 5), torch.full((2, 28, 28, 3), 200, dtype=torch.uint8))]
    out = list(classify(iter(batches), lazy, torch.device("cpu")))
    assert calls == [1]
    assert [len(i) for i, _ in out] == [3, 2]
    assert all(p.dtype == np.float32 and np.allclose(p.sum(1), 1, atol=1e-5) for _, p in out)


def test_results_do_not_depend_on_workers_or_batch_size(setup) -> None:
    from histotile.models.loading import load_model

    slide, grid, regions, model = setup
    loaded = load_model(model, "cpu")
    runs = {}
    for workers, batch in ((0, 256), (1, 7)):
        stats = EngineStats()
        idx, coords, probs = zip(*run_inference(slide.spec, grid, regions, loaded,
                                                torch.device("cpu"), batch_size=batch,
                                                workers=workers, stats=stats), strict=True)
        idx = np.concatenate(idx)
        order = np.argsort(idx)
        runs[workers] = (idx[order], np.concatenate(coords)[order], np.concatenate(probs)[order])
        assert stats.patches == len(grid) and stats.regions == len(regions)
    np.testing.assert_array_equal(runs[0][0], np.arange(len(grid)))
    np.testing.assert_array_equal(runs[0][1], grid.coords)
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_allclose(runs[0][2], runs[1][2], atol=1e-5)


def test_compute_plan_spreads_streams_over_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import histotile.engine as engine

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for cpus, workers, explain, want in ((2, 0, False, (2, 1)), (16, 0, False, (2, 8)),
                                         (16, 4, False, (2, 6)), (1, 0, False, (1, 1)),
                                         (2, 0, True, (1, 1)), (8, 0, True, (1, 7))):
        monkeypatch.setattr(engine, "cpu_count", lambda n=cpus: n)
        plan = engine.compute_plan(cpu, workers, explain)
        assert (plan.streams, plan.threads) == want, (cpus, workers, explain)
    assert engine.compute_plan(cuda, 4).streams == 1


def test_parallel_streams_give_the_same_results_in_order(setup) -> None:
    from histotile.engine import ComputePlan
    from histotile.models.loading import load_model

    slide, grid, regions, model = setup
    loaded = load_model(model, "cpu")
    runs = {}
    for streams in (1, 3):
        stats = EngineStats()
        # batch 5: many small batches, so several sit in the buffer ring at once
        out = list(run_inference(slide.spec, grid, regions, loaded, torch.device("cpu"),
                                 batch_size=5, workers=0, stats=stats,
                                 plan=ComputePlan(streams, 1)))
        runs[streams] = (np.concatenate([o[0] for o in out]), np.concatenate([o[2] for o in out]))
        assert stats.patches == len(grid) and stats.streams == streams
        assert stats.forward_s > 0 and stats.model_s > 0
    np.testing.assert_array_equal(runs[1][0], runs[3][0])  # same order, not only same set
    np.testing.assert_allclose(runs[1][1], runs[3][1], atol=1e-6)

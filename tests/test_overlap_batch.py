"""The batch runner's overlap of items (histotile.batch.pipeline): the next item prepared and the
previous one finished in background threads while one runs, with the runner's guarantees kept
(skip, lock, run record last, per-item errors, Ctrl-C, manifest, order)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from histotile.batch import ItemLock, run_batch
from histotile.batch.pipeline import is_staged
from histotile.errors import CorruptSlideError

FP = {"job": "overlap-test"}


class Staged:
    """A small real per-item job in stages: prepare reads the slide's thumbnail, run writes it,
    finish writes an info file. Records what happened where; hooks let a test act mid-run."""

    def __init__(self, hooks: dict[tuple[str, str], Any] | None = None) -> None:
        self.events: list[tuple[str, str, str]] = []  # (stage, item name, thread name)
        self.discarded: list[str] = []
        self.hooks = hooks or {}
        self._lock = threading.Lock()

    def _event(self, stage: str, item: Path) -> None:
        with self._lock:
            self.events.append((stage, item.name, threading.current_thread().name))
        hook = self.hooks.get((stage, item.name))
        if hook is not None:
            hook(item)

    def __call__(self, item: Path, tmp_dir: Path) -> dict[str, Any]:
        return self.finish(self.run(self.prepare(item), tmp_dir))

    def prepare(self, item: Path) -> dict[str, Any]:
        from histotile.slide import open_slide

        self._event("prepare", item)
        with open_slide(item) as slide:
            return {"item": item, "thumb": slide.thumbnail(64), "size": slide.dimensions}

    def run(self, prepared: dict[str, Any], tmp_dir: Path) -> dict[str, Any]:
        from PIL import Image

        self._event("run", prepared["item"])
        Image.fromarray(prepared["thumb"]).save(tmp_dir / "thumbnail.png")
        return {**prepared, "tmp": tmp_dir}

    def finish(self, running: dict[str, Any]) -> dict[str, Any]:
        self._event("finish", running["item"])
        (running["tmp"] / "info.json").write_text(json.dumps({"size": list(running["size"])}))
        return {"patches": int(np.prod(running["thumb"].shape[:2]))}

    def discard(self, prepared: dict[str, Any]) -> None:
        self.discarded.append(prepared["item"].name)

    def stages(self, name: str) -> dict[str, str]:
        return {stage: thread for stage, item, thread in self.events if item == name}


@pytest.fixture()
def folder(tmp_path: Path, cmu_small: Path) -> Path:
    src = tmp_path / "slides"
    src.mkdir()
    for name in ("a", "b", "c", "d"):
        shutil.copy(cmu_small, src / f"{name}.svs")
    return src


def _items(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.svs"))


def _manifest(out: Path) -> dict[str, str]:
    with open(out / "manifest.csv", newline="") as fh:
        return {Path(r["slide"]).stem: r["status"] for r in csv.DictReader(fh)}


def _leftovers(out: Path) -> list[str]:
    locks = out / ".locks"
    held = [p.name for p in locks.iterdir() if p.suffix == ".lock"] if locks.is_dir() else []
    return held + [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_overlap_prepares_next_item_while_one_runs(folder: Path, tmp_path: Path) -> None:
    started_b = threading.Event()
    # run(a) waits until b's preparation has begun: only an overlapped runner gets past it
    staged = Staged({("prepare", "b.svs"): lambda _: started_b.set(),
                     ("run", "a.svs"): lambda _: started_b.wait(30) or pytest.fail("no overlap")})
    assert is_staged(staged)
    summary = run_batch(_items(folder), tmp_path / "out", staged, FP, progress=False)
    assert [r.status for r in summary.results] == ["done"] * 4
    main = threading.current_thread().name
    for name in ("a.svs", "b.svs", "c.svs", "d.svs"):
        threads = staged.stages(name)
        assert threads["run"] == main
        assert threads["finish"] != main  # finished in the background
    assert staged.stages("b.svs")["prepare"] != main  # prepared ahead, in the background
    for name in "abcd":
        assert sorted(p.name for p in (tmp_path / "out" / name).iterdir()) == [
            "info.json", "run.json", "thumbnail.png"]
    assert _leftovers(tmp_path / "out") == []


def test_overlap_results_equal_one_at_a_time(folder: Path, tmp_path: Path) -> None:
    staged = Staged()
    plain = run_batch(_items(folder), tmp_path / "plain", lambda i, t: staged(i, t), FP,
                      progress=False)
    piped = run_batch(_items(folder), tmp_path / "piped", Staged(), FP, progress=False)
    assert [(r.status, r.patches) for r in plain.results] == \
        [(r.status, r.patches) for r in piped.results]
    for name in "abcd":
        for f in ("thumbnail.png", "info.json"):
            assert (tmp_path / "plain" / name / f).read_bytes() == \
                (tmp_path / "piped" / name / f).read_bytes()


def test_overlap_prepared_item_whose_lock_became_busy_is_discarded(folder: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    other = ItemLock(out, "b")  # another process takes b while b is being prepared here

    def take(_: Path) -> None:
        assert other.acquire()

    staged = Staged({("prepare", "b.svs"): take})
    try:
        summary = run_batch(_items(folder), out, staged, FP, progress=False)
    finally:
        other.release()
    assert [r.status for r in summary.results] == ["done", "busy", "done", "done"]
    assert "in progress elsewhere" in summary.results[1].error
    assert staged.discarded == ["b.svs"]
    assert "run" not in staged.stages("b.svs")  # never run, nothing written for it
    assert not (out / "b").exists()
    assert _manifest(out) == {"a": "done", "b": "busy", "c": "done", "d": "done"}


def test_overlap_prepared_item_finished_elsewhere_is_discarded(folder: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "out"
    record = {"status": "done", "fingerprint": FP, "patches": 7,
              "source": os.path.realpath(folder / "c.svs")}

    def finish_elsewhere(_: Path) -> None:  # another process commits c while it is prepared
        (out / "c").mkdir(parents=True)
        (out / "c" / "run.json").write_text(json.dumps(record))

    staged = Staged({("prepare", "c.svs"): finish_elsewhere})
    summary = run_batch(_items(folder), out, staged, FP, progress=False)
    assert [r.status for r in summary.results] == ["done", "done", "skipped", "done"]
    assert summary.results[2].patches == 7
    assert staged.discarded == ["c.svs"]
    assert "run" not in staged.stages("c.svs")
    assert json.loads((out / "c" / "run.json").read_text()) == record  # left as it was


def test_overlap_finished_items_are_not_prepared(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_batch(_items(folder)[:2], out, Staged(), FP, progress=False)
    staged = Staged()
    summary = run_batch(_items(folder), out, staged, FP, progress=False)
    assert [r.status for r in summary.results] == ["skipped", "skipped", "done", "done"]
    assert {item for _, item, _ in staged.events} == {"c.svs", "d.svs"}


def _boom(stage: str) -> Any:
    def hook(item: Path) -> None:
        raise CorruptSlideError(f"broken in {stage}", "re-copy it", subject=str(item))
    return hook


def test_overlap_failure_in_a_stage_fails_that_item_only(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    errors: list[str] = []
    staged = Staged({("prepare", "b.svs"): _boom("prepare"), ("finish", "c.svs"): _boom("finish")})
    summary = run_batch(_items(folder), out, staged, FP, progress=False,
                        on_error=lambda item, r: errors.append(r.error))
    assert [r.status for r in summary.results] == ["done", "failed", "failed", "done"]
    assert errors == [f"{folder / 'b.svs'}: broken in prepare (re-copy it)",
                      f"{folder / 'c.svs'}: broken in finish (re-copy it)"]
    assert [r.error for r in summary.results[1:3]] == errors
    assert not (out / "b").exists() and not (out / "c").exists()  # nothing marked done
    assert _manifest(out) == {"a": "done", "b": "failed", "c": "failed", "d": "done"}
    assert _leftovers(out) == []
    again = run_batch(_items(folder), out, Staged(), FP, progress=False)  # retried, not skipped
    assert [r.status for r in again.results] == ["skipped", "done", "done", "skipped"]


def test_overlap_ctrl_c_leaves_no_half_committed_output(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"

    def interrupt(_: Path) -> None:
        raise KeyboardInterrupt

    staged = Staged({("run", "c.svs"): interrupt})
    with pytest.raises(KeyboardInterrupt):
        run_batch(_items(folder), out, staged, FP, progress=False)
    assert (out / "b" / "run.json").is_file()  # b was finishing: completed
    assert not (out / "c").exists()
    assert _leftovers(out) == []  # no temporary folder, no lock left behind
    assert staged.discarded == ["d.svs"]  # prepared ahead, then dropped
    assert _manifest(out) == {"a": "done", "b": "done"}
    resumed = run_batch(_items(folder), out, Staged(), FP, progress=False)
    assert [r.status for r in resumed.results] == ["skipped", "skipped", "done", "done"]


def test_overlap_not_used_for_raise_errors(folder: Path, tmp_path: Path) -> None:
    staged = Staged({("prepare", "b.svs"): _boom("prepare")})
    with pytest.raises(CorruptSlideError, match="broken in prepare"):
        run_batch(_items(folder), tmp_path / "out", staged, FP, progress=False,
                  on_error="raise")
    main = threading.current_thread().name
    assert {thread for _, _, thread in staged.events} == {main}  # one at a time, here


# --------------------------------------------------------------------------- dask workers
_STAGED_ON_WORKER: list[Staged] = []


def _staged_factory() -> Staged:
    _STAGED_ON_WORKER.append(Staged())
    return _STAGED_ON_WORKER[-1]


def test_overlap_dask_task_runs_its_items_overlapped(folder: Path, tmp_path: Path) -> None:
    """A dask task (a run of consecutive items) overlaps them as a serial run does."""
    from histotile.hpc.dask_pool import _dask_items

    pairs = [(p, p.stem) for p in _items(folder)]
    results = _dask_items(pairs, tmp_path / "out", _staged_factory, FP, False, 60.0)
    assert [(Path(r.slide).name, r.status) for r in results] == [
        ("a.svs", "done"), ("b.svs", "done"), ("c.svs", "done"), ("d.svs", "done")]
    staged = _STAGED_ON_WORKER[-1]
    main = threading.current_thread().name
    assert {staged.stages(p.name)["finish"] for p, _ in pairs} != {main}
    assert (tmp_path / "out" / "d" / "run.json").is_file()


@pytest.mark.parametrize(("n", "jobs"), [(0, 2), (1, 2), (5, 2), (20, 2), (100, 3), (7, 1)])
def test_overlap_dask_chunks_cover_items_in_order(n: int, jobs: int) -> None:
    from histotile.hpc.dask_pool import MAX_CHUNK, chunk_pairs

    chunks = chunk_pairs([(Path(f"{i}.svs"), str(i)) for i in range(n)], jobs)
    assert [i for c in chunks for i in c] == list(range(n))
    assert all(1 <= len(c) <= MAX_CHUNK for c in chunks)
    if n >= jobs * 4:
        assert len(chunks) >= jobs * 4 or len(chunks[0]) == MAX_CHUNK

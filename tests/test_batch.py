"""Batch layer: inputs, shards, locks, failure isolation, kill-and-resume, two concurrent runs.

Slides are copies of the real CMU-1-Small-Region.svs (and the real DICOM folder); the corrupt
slide, the MIRAX layout and foreign locks are GENERATED edge cases, named as such.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import real_data

from histotile import batch
from histotile.batch import (
    ItemLock,
    expand_inputs,
    item_stems,
    parse_shard,
    process_item,
    read_list_file,
    resolve_shard,
    run_batch,
    shard_items,
)
from histotile.errors import InputNotFoundError, InvalidArgumentError

ROOT = Path(__file__).resolve().parents[1]


def make_slide_folder(folder: Path, names: list[str], corrupt: str | None = None) -> Path:
    """Copies of the real CMU slide under ``names``; plus a GENERATED corrupt .svs if asked."""
    src = real_data("slides/CMU-1-Small-Region.svs")
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(src, folder / name)
    if corrupt:
        (folder / corrupt).write_bytes(b"GENERATED: not a slide\n" * 400)
    return folder


def read_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def thumb_process(item: Path, tmp: Path) -> dict:
    """A real per-slide job: open the slide, write its thumbnail and size."""
    from PIL import Image

    from histotile.slide import open_slide

    with open_slide(item) as slide:
        Image.fromarray(slide.read_region((900, 1300), 0, (64, 64))).save(tmp / "thumb.png")
        (tmp / "size.txt").write_text(f"{slide.dimensions[0]}x{slide.dimensions[1]}\n")
        return {"patches": int(slide.dimensions[0] // 224 * (slide.dimensions[1] // 224))}


class Counting:
    """Wraps a process and counts calls per item (a recompute detector)."""

    def __init__(self, process=thumb_process) -> None:
        self.calls: list[str] = []
        self.process = process

    def __call__(self, item: Path, tmp: Path) -> dict:
        self.calls.append(item.name)
        return self.process(item, tmp)


# --------------------------------------------------------------------------- inputs

def test_expand_folder_sorted_recursive_and_skips(tmp_path: Path) -> None:
    root = make_slide_folder(tmp_path / "in", ["b.svs", "a.svs"])
    make_slide_folder(root / "sub", ["c.svs"])
    shutil.copytree(real_data("slides/CMU-1-Small-Region-dicom"), root / "dicom-case")
    # GENERATED: a MIRAX layout (x.mrxs + x/ data folder), a hidden folder, an output folder
    (root / "x.mrxs").write_bytes(b"generated")
    (root / "x").mkdir()
    (root / "x" / "Data0000.dat").write_bytes(b"generated")
    (root / "x" / "inner.tif").write_bytes(b"generated")
    make_slide_folder(root / ".hidden", ["h.svs"])
    (root / "done").mkdir()
    (root / "done" / "run.json").write_text("{}")
    (root / "done" / "out.tif").write_bytes(b"generated")
    (root / "notes.txt").write_text("not a slide\n")

    items = expand_inputs([str(root)])
    rel = [p.relative_to(root).as_posix() for p in items]
    assert rel == ["a.svs", "b.svs", sorted(rel)[2], "sub/c.svs", "x.mrxs"]
    assert rel[2].startswith("dicom-case/") and rel[2].endswith(".dcm")  # one item per folder
    assert item_stems(items) == ["a", "b", "dicom-case", "c", "x"]
    assert expand_inputs([str(root)]) == items  # deterministic


def test_expand_lists_globs_duplicates_and_errors(tmp_path: Path) -> None:
    root = make_slide_folder(tmp_path / "in", ["s1.svs", "s2.svs", "s3.svs"])
    (tmp_path / "list.txt").write_text("# my slides\nin/s3.svs\n\n%s\n" % (root / "s1.svs"))
    assert expand_inputs([str(tmp_path / "list.txt")]) == [root / "s3.svs", root / "s1.svs"]
    (tmp_path / "list.csv").write_text("Slide,label\nin/s2.svs,1\nin/missing.svs,0\n")
    listed = read_list_file(tmp_path / "list.csv")
    assert listed == [tmp_path / "in/s2.svs", tmp_path / "in/missing.svs"]  # missing kept
    (tmp_path / "bad.csv").write_text("name,label\nx,1\n")
    with pytest.raises(InvalidArgumentError, match="column"):
        expand_inputs([str(tmp_path / "bad.csv")])
    globbed = expand_inputs([str(root / "s[23].svs"), str(root / "s2.svs"), str(root)])
    assert [p.name for p in globbed] == ["s2.svs", "s3.svs", "s1.svs"]  # first occurrence wins
    with pytest.raises(InputNotFoundError):
        expand_inputs([str(tmp_path / "nope.svs")])
    with pytest.raises(InputNotFoundError):
        expand_inputs([str(tmp_path / "*.ndpi")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match="no slide found"):
        expand_inputs([str(tmp_path / "empty")])


def test_equal_stems_are_disambiguated_deterministically(tmp_path: Path) -> None:
    a = make_slide_folder(tmp_path / "a", ["case.svs"]) / "case.svs"
    b = make_slide_folder(tmp_path / "b", ["case.svs", "other.svs"]) / "case.svs"
    stems = item_stems([a, b, b.parent / "other.svs"])
    assert stems[2] == "other"
    assert stems[0] != stems[1] and all(s.startswith("case-") for s in stems[:2])
    assert item_stems([b, a]) == [stems[1], stems[0]]  # names depend on the path, not order


# --------------------------------------------------------------------------- shards

def test_shards_partition_items() -> None:
    items = list(range(11))
    parts = [shard_items(items, i, 3) for i in range(3)]
    assert sorted(x for p in parts for x in p) == items
    assert parts[0] == [0, 3, 6, 9]
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "1", "-1/3", "a/b", "0/0"):
        with pytest.raises(InvalidArgumentError):
            parse_shard(bad)


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"},
     (0, 4)),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"},
     (3, 4)),
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "3",
      "SLURM_ARRAY_TASK_STEP": "2"}, (2, 3)),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}, (2, 3)),
])
def test_resolve_shard_from_slurm_env(env: dict, expected: tuple | None) -> None:
    assert resolve_shard(None, env) == expected
    assert resolve_shard("1/2", env) == (1, 2)  # the flag wins


def test_resolve_shard_rejects_inconsistent_env() -> None:
    with pytest.raises(InvalidArgumentError, match="array task"):
        resolve_shard(None, {"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3",
                             "SLURM_ARRAY_TASK_MIN": "0"})


# --------------------------------------------------------------------------- run_batch

def test_failures_are_isolated_and_manifest_written(tmp_path: Path) -> None:
    folder = make_slide_folder(tmp_path / "in", ["a.svs", "b.svs"], corrupt="broken.svs")
    items = expand_inputs([str(folder)]) + [folder / "gone.svs"]
    out = tmp_path / "out"
    proc = Counting()
    summary = run_batch(items, out, proc, {"model": "m", "mpp": 0.5}, progress=False)
    assert [r.status for r in summary.results] == ["done", "done", "failed", "failed"]
    assert summary.exit_code == 1 and len(summary.failed) == 2
    rows = read_manifest(out / "manifest.csv")
    assert [r["status"] for r in rows] == ["done", "done", "failed", "failed"]
    assert rows[2]["slide"].endswith("broken.svs") and rows[2]["error"]
    assert "\n" not in rows[2]["error"] and rows[2]["output"] == ""
    assert "no such file" in rows[3]["error"]
    run = json.loads((out / "a" / "run.json").read_text())
    assert run["fingerprint"] == {"model": "m", "mpp": 0.5} and run["status"] == "done"
    assert rows[0]["patches"] == str(run["patches"]) and run["patches"] > 0
    assert (out / "a" / "thumb.png").stat().st_size > 0
    assert not (out / "broken").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_resume_skips_finished_overwrite_and_fingerprint_recompute(tmp_path: Path) -> None:
    folder = make_slide_folder(tmp_path / "in", ["a.svs", "b.svs"])
    items, out, fp = expand_inputs([str(folder)]), tmp_path / "out", {"model": "m"}
    first = Counting()
    run_batch(items, out, first, fp, progress=False)
    again = Counting()
    summary = run_batch(items, out, again, fp, progress=False)
    assert again.calls == [] and [r.status for r in summary.results] == ["skipped", "skipped"]
    assert summary.results[0].patches is not None and summary.exit_code == 0
    forced = Counting()
    run_batch(items, out, forced, fp, overwrite=True, progress=False)
    assert forced.calls == ["a.svs", "b.svs"]
    (out / "a" / "stale-extra-file").write_text("from an old run")  # must vanish on replace
    changed = Counting()
    run_batch(items, out, changed, {"model": "other"}, progress=False)
    assert changed.calls == ["a.svs", "b.svs"]
    assert not (out / "a" / "stale-extra-file").exists()
    assert json.loads((out / "a" / "run.json").read_text())["fingerprint"] == {"model": "other"}


def test_sharded_runs_write_shard_manifests(tmp_path: Path) -> None:
    folder = make_slide_folder(tmp_path / "in", [f"s{i}.svs" for i in range(5)])
    items, out = expand_inputs([str(folder)]), tmp_path / "out"
    done = []
    for i in range(2):
        s = run_batch(items, out, thumb_process, {}, shard=(i, 2), progress=False)
        done += [Path(r.slide).name for r in s.results]
        assert s.manifest == out / f"manifest-{i}-of-2.csv"
    assert sorted(done) == [f"s{i}.svs" for i in range(5)]
    assert not (out / "manifest.csv").exists()


def test_leftovers_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    folder = make_slide_folder(tmp_path / "in", ["a.svs", "a-b.svs"])
    out = tmp_path / "out"
    out.mkdir()
    for name in (".tmp-a-0123abcd", ".old-a-0123abcd", ".tmp-a-b-89abcdef"):  # generated
        (out / name).mkdir()
        (out / name / "partial").write_text("x")
    run_batch(expand_inputs([str(folder / "a.svs")]), out, thumb_process, {}, progress=False)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [
        ".locks", ".tmp-a-b-89abcdef"]  # another item's leftover is not touched
    assert list((out / ".locks").iterdir()) == []


def test_error_policy_raise(tmp_path: Path) -> None:
    folder = make_slide_folder(tmp_path / "in", [], corrupt="broken.svs")
    with pytest.raises(Exception, match="broken.svs"):
        run_batch([folder / "broken.svs"], tmp_path / "out", thumb_process, {}, progress=False,
                  on_error="raise")
    assert list((tmp_path / "out" / ".locks").iterdir()) == []


# --------------------------------------------------------------------------- locks

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(out: Path, stem: str, host: str, pid: int, age_s: float = 0.0) -> Path:
    path = out / ".locks" / f"{stem}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "time": time.time() - age_s}))
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_locks_live_dead_and_foreign(tmp_path: Path) -> None:
    item = make_slide_folder(tmp_path / "in", ["a.svs"]) / "a.svs"
    out = tmp_path / "out"
    host = socket.gethostname()
    lock = _write_lock(out, "a", host, os.getpid())  # a live holder on this host
    r = process_item(item, "a", out, thumb_process, {})
    assert r.status == "skipped" and "in progress elsewhere" in r.error
    assert lock.exists() and not (out / "a").exists()

    _write_lock(out, "a", "other-node", 12345)  # another host, recently refreshed: respected
    assert process_item(item, "a", out, thumb_process, {}).status == "skipped"
    _write_lock(out, "a", "other-node", 12345, age_s=3600)  # another host, not refreshed: stale
    assert process_item(item, "a", out, thumb_process, {}, lock_timeout=600).status == "done"
    assert not lock.exists()

    _write_lock(out, "a", host, _dead_pid())  # dead holder on this host: taken over at once
    assert process_item(item, "a", out, thumb_process, {}, overwrite=True).status == "done"
    _write_lock(out, "a", host, _dead_pid())  # killed after the rename: lock cleared on skip
    (out / ".tmp-a-0badc0de").mkdir()
    assert process_item(item, "a", out, thumb_process, {}).status == "skipped"
    assert not lock.exists() and not (out / ".tmp-a-0badc0de").exists()
    lock.write_text("")  # killed between create and write: judged by age only
    assert process_item(item, "a", out, thumb_process, {}, overwrite=True).status == "skipped"


def test_item_lock_is_exclusive_and_heartbeats(tmp_path: Path) -> None:
    first = ItemLock(tmp_path, "x", heartbeat=0.05)
    assert first.acquire()
    old = time.time() - 100
    os.utime(first.path, (old, old))
    assert not ItemLock(tmp_path, "x").acquire()  # a live holder, refreshed within the timeout
    time.sleep(0.3)
    assert first.path.stat().st_mtime > old + 50  # refreshed by the heartbeat
    first.release()
    assert not first.path.exists()
    second = ItemLock(tmp_path, "x")
    assert second.acquire()
    second.release()


# --------------------------------------------------------------------------- real processes

WORKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from histotile.batch import expand_inputs, run_batch

    def process(item, tmp):
        from PIL import Image
        from histotile.slide import open_slide
        with open(os.environ["COUNTER"], "a") as fh:   # one line per start, O_APPEND
            fh.write(f"start {item.name} {os.getpid()}\\n")
        with open_slide(item) as slide:
            pixels = slide.read_region((900, 1300), 0, (96, 96))
        for i in range(4):                              # several files, written slowly
            Image.fromarray(pixels[:, i:]).save(tmp / f"part{i}.png")
            time.sleep(float(os.environ.get("DELAY", "0.05")))
        return {"patches": int(pixels.shape[0])}

    summary = run_batch(expand_inputs([sys.argv[1]]), sys.argv[2], process, {"w": 1},
                        progress=False, print_summary=False)
    sys.exit(summary.exit_code)
""")


def _worker(tmp_path: Path, folder: Path, out: Path, counter: Path, delay: float
            ) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "COUNTER": str(counter), "DELAY": str(delay),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, str(script), str(folder), str(out)], env=env)


def _finished(out: Path) -> set[str]:
    return {p.parent.name for p in out.glob("*/run.json")} if out.exists() else set()


def _starts(counter: Path) -> list[str]:
    return [ln.split()[1] for ln in counter.read_text().splitlines()] if counter.exists() else []


def _snapshot(out: Path) -> dict[str, bytes]:
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "run.json" and "manifest" not in p.name:
            files[p.relative_to(out).as_posix()] = p.read_bytes()
    for run in out.glob("*/run.json"):
        data = json.loads(run.read_text())
        keep = {k: data[k] for k in ("fingerprint", "status", "patches", "slide")}
        files[run.relative_to(out).as_posix()] = json.dumps(keep, sort_keys=True).encode()
    return files


def test_sigkill_at_any_moment_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    names = [f"slide{i}.svs" for i in range(6)]
    folder = make_slide_folder(tmp_path / "in", names)
    ref_out, ref_counter = tmp_path / "ref", tmp_path / "ref-counter.txt"
    assert _worker(tmp_path, folder, ref_out, ref_counter, 0.05).wait(timeout=120) == 0
    assert sorted(_starts(ref_counter)) == sorted(names)

    out, counter = tmp_path / "out", tmp_path / "counter.txt"
    kills: list[tuple[set[str], int]] = []  # (finished at the kill, starts so far)
    for extra in (0.0, 0.04, 0.09, 0.15, 0.22, 0.3):
        before = len(_starts(counter))
        proc = _worker(tmp_path, folder, out, counter, 0.05)
        deadline = time.monotonic() + 60
        while len(_starts(counter)) == before and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(extra)  # lands in process(), run.json writing, the rename or the next item
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append((_finished(out), len(_starts(counter))))
    assert len(kills) >= 3
    final = _worker(tmp_path, folder, out, counter, 0.05)
    assert final.wait(timeout=120) == 0
    assert _finished(out) == {n.removesuffix(".svs") for n in names}
    starts = [s.removesuffix(".svs") for s in _starts(counter)]
    for done_at_kill, n_starts in kills:  # nothing finished before a kill started again
        assert not done_at_kill & set(starts[n_starts:])
    assert _snapshot(out) == _snapshot(ref_out)  # identical to the uninterrupted run
    leftovers = [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert leftovers == [] and list((out / ".locks").iterdir()) == []
    rows = read_manifest(out / "manifest.csv")
    assert {r["status"] for r in rows} <= {"done", "skipped"} and len(rows) == len(names)


def test_two_concurrent_runs_never_process_the_same_item(tmp_path: Path) -> None:
    names = [f"c{i}.svs" for i in range(8)]
    folder = make_slide_folder(tmp_path / "in", names)
    out, counter = tmp_path / "out", tmp_path / "counter.txt"
    procs = [_worker(tmp_path, folder, out, counter, 0.08) for _ in range(2)]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    lines = counter.read_text().splitlines()
    started = [ln.split()[1] for ln in lines]
    assert sorted(started) == sorted(names)  # each item processed exactly once
    assert len({ln.split()[2] for ln in lines}) == 2  # and both processes did work
    assert _finished(out) == {n.removesuffix(".svs") for n in names}


def test_probe_entry_point_on_real_slides(tmp_path: Path) -> None:
    folder = make_slide_folder(tmp_path / "in", ["p.svs"], corrupt="bad.svs")
    out = tmp_path / "out"
    rc = batch._main(["probe", str(folder), "-o", str(out), "--shard", "0/1"])
    assert rc == 1  # one corrupt slide
    info = json.loads((out / "p" / "info.json").read_text())
    assert (info["width"], info["height"]) == (2220, 2967)
    assert [r["status"] for r in read_manifest(out / "manifest-0-of-1.csv")] == ["failed", "done"]

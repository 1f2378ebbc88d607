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
from helpers import real_data

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
    assert stems == ["case", "case-2", "other"]  # numbered in sorted path order
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
        ".locks", ".state", ".tmp-a-b-89abcdef"]  # another item's leftover is not touched
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
    assert r.status == "busy" and "in progress elsewhere" in r.error
    assert lock.exists() and not (out / "a").exists()

    _write_lock(out, "a", "other-node", 12345)  # another host, recently refreshed: respected
    assert process_item(item, "a", out, thumb_process, {}).status == "busy"
    _write_lock(out, "a", "other-node", 12345, age_s=3600)  # another host, not refreshed: stale
    assert process_item(item, "a", out, thumb_process, {}, lock_timeout=600).status == "done"
    assert not lock.exists()

    _write_lock(out, "a", host, _dead_pid())  # dead holder on this host: taken over at once
    assert process_item(item, "a", out, thumb_process, {}, overwrite=True).status == "done"
    _write_lock(out, "a", host, _dead_pid())  # killed after the rename: lock cleared on skip
    (out / ".tmp-a-0badc0de").mkdir()
    assert process_item(item, "a", out, thumb_process, {}).status == "skipped"
    assert not lock.exists() and not (out / ".tmp-a-0badc0de").exists()
    lock.write_text("")  # an empty lock this young may be mid-write: respected for a moment
    assert process_item(item, "a", out, thumb_process, {}, overwrite=True).status == "busy"


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
        rel = p.relative_to(out).as_posix()
        if rel.startswith(".state/"):  # the state record holds pids and times
            continue
        if p.is_file() and p.name != "run.json" and "manifest" not in p.name:
            files[p.relative_to(out).as_posix()] = p.read_bytes()
    for run in out.glob("*/run.json"):
        data = json.loads(run.read_text())
        keep = {k: data[k] for k in ("fingerprint", "status", "patches", "slide")}
        files[run.relative_to(out).as_posix()] = json.dumps(keep, sort_keys=True).encode()
    return files


@pytest.mark.slow  # many killed runs: ~6 s quiet, ~17 s busy
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
    states = [json.loads(p.read_text()) for p in (out / ".state").glob("*.json")]
    assert len(states) == len(names) and {s["status"] for s in states} == {"done"}
    assert sum(s["attempts"] for s in states) == len(starts)  # one attempt per start
    rows = read_manifest(out / "manifest.csv")
    assert {r["status"] for r in rows} <= {"done", "skipped"} and len(rows) == len(names)


@pytest.mark.slow  # three runs of real subprocesses
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_sigterm_stop_then_resume_matches_uninterrupted(tmp_path: Path, sig) -> None:
    """Ctrl-C or a scheduler's SIGTERM in the middle of a run: the process stops, leaves no
    finished-looking partial output, and the same command afterwards gives the outputs of an
    uninterrupted run."""
    names = [f"s{i}.svs" for i in range(4)]
    folder = make_slide_folder(tmp_path / "in", names)
    ref_out = tmp_path / "ref"
    assert _worker(tmp_path, folder, ref_out, tmp_path / "ref-counter.txt", 0.05
                   ).wait(timeout=120) == 0
    out, counter = tmp_path / "out", tmp_path / "counter.txt"
    proc = _worker(tmp_path, folder, out, counter, 0.3)
    deadline = time.monotonic() + 60
    while len(_starts(counter)) < 2 and proc.poll() is None:  # inside the second item
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) != 0  # stopped, not finished
    assert len(_finished(out)) < len(names)
    assert _worker(tmp_path, folder, out, counter, 0.05).wait(timeout=120) == 0
    assert _finished(out) == {n.removesuffix(".svs") for n in names}
    assert _snapshot(out) == _snapshot(ref_out)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert leftovers == [] and list((out / ".locks").iterdir()) == []


def test_two_concurrent_runs_never_process_the_same_item(tmp_path: Path) -> None:
    names = [f"c{i}.svs" for i in range(8)]
    folder = make_slide_folder(tmp_path / "in", names)
    out, counter = tmp_path / "out", tmp_path / "counter.txt"
    procs = [_worker(tmp_path, folder, out, counter, 0.08) for _ in range(2)]
    codes = [p.wait(timeout=180) for p in procs]
    # an item still held by the other run at the end is "busy" (exit 75), not success; the run
    # that finishes last sees everything done
    assert set(codes) <= {0, 75} and 0 in codes
    lines = counter.read_text().splitlines()
    started = [ln.split()[1] for ln in lines]
    assert sorted(started) == sorted(names)  # each item processed exactly once
    assert len({ln.split()[2] for ln in lines}) == 2  # and both processes did work
    assert _finished(out) == {n.removesuffix(".svs") for n in names}


# --------------------------------------------------------------------------- issue 17.5: locks

def test_issue17_5_zero_byte_lock_left_by_a_full_disk_is_stale(tmp_path: Path) -> None:
    """A 0-byte lock (a run whose disk filled between create and write) was read as 'in progress
    elsewhere (host ?, pid ?)' and the slide skipped with exit 0, never computed."""
    folder = make_slide_folder(tmp_path / "in", ["a.svs", "b.svs"])
    out = tmp_path / "out"
    lock = out / ".locks" / "a.lock"
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"")  # GENERATED: what the full disk left
    past = time.time() - 30
    os.utime(lock, (past, past))
    summary = run_batch(expand_inputs([str(folder)]), out, thumb_process, {}, progress=False)
    assert [r.status for r in summary.results] == ["done", "done"] and summary.exit_code == 0
    assert (out / "a" / "run.json").exists() and not lock.exists()
    lock.write_text("{not json")  # GENERATED: a torn lock is stale as well
    os.utime(lock, (past, past))
    again = run_batch(expand_inputs([str(folder)]), out, thumb_process, {}, overwrite=True,
                      progress=False)
    assert [r.status for r in again.results] == ["done", "done"]


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    from histotile.batch import expand_inputs, run_batch
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # writes fail with EFBIG instead
    items = expand_inputs([sys.argv[1]])
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))  # a full disk
    def process(item, tmp):
        (tmp / "x.txt").write_text("data")
        return {}
    try:
        run_batch(items, sys.argv[2], process, {}, progress=False)
    except OSError as exc:
        print("raised", exc)
""")


def test_issue17_5_full_disk_leaves_no_lock_and_no_part_file(tmp_path: Path) -> None:
    """Writes failing (file size limit 0, as on a full disk) must leave no lock and no .part
    file; the next run computes the slide."""
    folder = make_slide_folder(tmp_path / "in", ["a.svs"])
    out = tmp_path / "out"
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, str(script), str(folder), str(out)], env=env, check=True,
                   timeout=120)
    left = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    assert left == []  # no 0-byte lock, no .part, no half state record or manifest
    summary = run_batch(expand_inputs([str(folder)]), out, thumb_process, {}, progress=False)
    assert [r.status for r in summary.results] == ["done"] and summary.exit_code == 0


def test_issue17_5_busy_item_is_not_success(tmp_path: Path) -> None:
    """A slide skipped because another run holds it was 'skipped' with exit 0."""
    folder = make_slide_folder(tmp_path / "in", ["a.svs", "b.svs"])
    out = tmp_path / "out"
    _write_lock(out, "b", "other-node", 4242)  # a live holder on another node
    summary = run_batch(expand_inputs([str(folder)]), out, thumb_process, {}, progress=False)
    assert [r.status for r in summary.results] == ["done", "busy"]
    assert summary.exit_code == 75 and "other-node" in summary.busy[0].error
    assert [r["status"] for r in read_manifest(out / "manifest.csv")] == ["done", "busy"]
    assert "1 of 2 items are being computed by another run" in summary.busy_line()
    assert "busy: b.svs" in summary.table()
    (out / ".locks" / "b.lock").unlink()  # that run ended without finishing b
    rerun = run_batch(expand_inputs([str(folder)]), out, thumb_process, {}, progress=False)
    assert [r.status for r in rerun.results] == ["skipped", "done"] and rerun.exit_code == 0


# --------------------------------------------------------------------------- issue 17.6, 17.10

def test_issue17_6_dot_inside_a_dicom_series_folder_names_it_and_touches_nothing_else(
        tmp_path: Path, monkeypatch) -> None:
    """`predict .` in a DICOM folder gave an empty stem; the commit then renamed the whole
    output folder (with other slides' results) away and crashed."""
    series = tmp_path / "case-7"
    shutil.copytree(real_data("slides/CMU-1-Small-Region-dicom"), series)
    out = tmp_path / "out"
    (out / "other").mkdir(parents=True)  # another slide's finished result
    (out / "other" / "run.json").write_text('{"status": "done"}')
    monkeypatch.chdir(series)
    items = expand_inputs(["."])
    assert item_stems(items) == ["case-7"]
    summary = run_batch(items, out, thumb_process, {}, progress=False)
    assert [r.status for r in summary.results] == ["done"]
    assert (out / "case-7" / "thumb.png").exists() and (out / "other" / "run.json").exists()
    bare = sorted(p.name for p in series.glob("*.dcm"))[0]  # a bare relative .dcm
    assert item_stems(expand_inputs([bare])) == ["case-7"]
    levels = sorted(p.name for p in series.glob("*.dcm"))[:2]  # two files of one series
    assert len(expand_inputs([*levels, "."])) == 1
    monkeypatch.chdir("/")
    with pytest.raises(InvalidArgumentError, match="output name"):
        item_stems([Path("/")])


def test_issue17_10_missing_path_among_valid_inputs_is_recorded_and_the_rest_run(
        tmp_path: Path) -> None:
    """One missing path among several inputs aborted the call before any slide ran."""
    folder = make_slide_folder(tmp_path / "in", ["a.svs", "b.svs"])
    inputs = [str(folder / "a.svs"), str(tmp_path / "missing.svs"), str(folder / "b.svs"),
              str(tmp_path / "nothing-*.svs")]
    items = expand_inputs(inputs)
    assert [p.name for p in items] == ["a.svs", "missing.svs", "b.svs", "nothing-*.svs"]
    summary = run_batch(items, tmp_path / "out", thumb_process, {}, progress=False)
    assert [r.status for r in summary.results] == ["done", "failed", "done", "failed"]
    assert "no such file" in summary.results[1].error
    assert "matches no slide" in summary.results[3].error
    with pytest.raises(InputNotFoundError, match="no such file"):  # nothing exists at all
        expand_inputs([str(tmp_path / "missing.svs"), str(tmp_path / "gone.svs")])


# --------------------------------------------------------------------------- issue 16: items

def test_issue16_folder_scan_finds_every_extension_the_readers_open(tmp_path: Path) -> None:
    """.qptiff, .btf and .he5 were opened one by one but skipped by a folder scan."""
    from histotile.items import ITEM_TABLE, item_kind

    root = tmp_path / "in"
    root.mkdir()
    names = ["a.qptiff", "b.btf", "c.he5", "d.ome.tiff", "e.OME.TIF", "f.SVS", "g.npz",
             "h.hdf5", "list.txt", "notes.md"]
    for name in names:
        (root / name).write_bytes(b"generated")
    found = [p.name for p in expand_inputs([str(root)])]
    assert found == names[:8]  # lists and unknown files are not items of a scan
    slides = ["a.qptiff", "b.btf", "d.ome.tiff", "e.OME.TIF", "f.SVS"]
    assert [p.name for p in expand_inputs([str(root)], kinds=("slide",))] == slides
    assert item_stems([root / n for n in names[:6]]) == ["a", "b", "c", "d", "e", "f"]
    assert {item_kind(f"x{ext}") for ext in ITEM_TABLE} == {"slide", "archive", "list"}


def test_stem_taken_by_another_slide_is_refused_not_replaced(tmp_path: Path) -> None:
    """Names depend on the set of items (s, s-2): a run over b/s.svs alone must not skip on,
    or replace, a/s.svs's results that sit under the same name."""
    a = make_slide_folder(tmp_path / "a", ["s.svs"]) / "s.svs"
    b = make_slide_folder(tmp_path / "b", ["s.svs"]) / "s.svs"
    out = tmp_path / "out"
    assert run_batch([a], out, thumb_process, {}, progress=False).exit_code == 0
    proc = Counting()
    summary = run_batch([b], out, proc, {}, progress=False)
    assert summary.results[0].status == "failed" and proc.calls == []
    assert "already holds the results of" in summary.results[0].error
    assert json.loads((out / "s" / "run.json").read_text())["slide"] == str(a)
    (out / "logs").mkdir()  # not a histotile result: never replaced, and 'logs' is reserved
    assert item_stems([tmp_path / "logs.svs"]) == ["logs-item"]
    (out / "foreign").mkdir()
    res = process_item(b, "foreign", out, thumb_process, {})
    assert res.status == "failed" and "not a histotile result" in res.error
    assert run_batch([b], out, thumb_process, {}, overwrite=True, progress=False).exit_code == 0


def test_state_record_on_every_outcome(tmp_path: Path) -> None:
    folder = make_slide_folder(tmp_path / "in", ["a.svs"], corrupt="broken.svs")
    out = tmp_path / "out"
    run_batch(expand_inputs([str(folder)]), out, thumb_process, {}, progress=False)
    state = {p.stem: json.loads(p.read_text()) for p in (out / ".state").glob("*.json")}
    assert state["a"]["status"] == "done" and state["a"]["attempts"] == 1
    assert state["broken"]["status"] == "failed" and state["broken"]["reason"]
    run_batch(expand_inputs([str(folder)]), out, thumb_process, {}, progress=False)
    again = json.loads((out / ".state" / "broken.json").read_text())
    assert again["attempts"] == 2 and again["status"] == "failed"
    assert json.loads((out / ".state" / "a.json").read_text())["attempts"] == 1  # skipped


def test_python_api_shard_does_not_read_slurm_env(monkeypatch) -> None:
    """The library took the shard from SLURM_ARRAY_TASK_* silently; only the CLI reads it."""
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert resolve_shard(None) is None
    assert resolve_shard(None, os.environ) == (1, 3)
    assert resolve_shard((2, 3)) == (2, 3)

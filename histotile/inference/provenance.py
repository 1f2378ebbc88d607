"""What a predict run records about itself: stage timings, the environment, the command line,
and the accuracy lines printed for archives with labels."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histotile import __version__

if TYPE_CHECKING:
    import torch

    from histotile.batch import BatchSummary


def process_age() -> float | None:
    """Seconds since this process started (the interpreter's own start, before any import), or
    ``None`` where that cannot be read.

    On Linux from ``/proc``: the process's start in clock ticks since boot
    (``/proc/self/stat`` field 22) against the time since boot (``/proc/uptime``), both on the
    same clock, to 10 ms. Elsewhere ``psutil.Process().create_time()`` when psutil is installed.
    """
    try:
        with open("/proc/self/stat") as fh:
            stat = fh.read()
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        # the command name (field 2) may hold spaces and parentheses: split after its last ")"
        start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil  # type: ignore[import-untyped,unused-ignore]  # not a dependency
    except ImportError:
        return None
    try:
        return max(0.0, time.time() - psutil.Process().create_time())
    except psutil.Error:
        return None


_FIRST_BATCH_SEEN: list[bool] = []  # per process: set by the first StageTimer.first_batch()


class StageTimer:
    """Seconds per named stage (``with timer("tissue"): ...``).

    :meth:`first_batch` records ``first_batch_s``: seconds from the start of the process to the
    first batch of probabilities, and ``first_batch_cpu_s``: the CPU seconds the process spent
    until then (all its threads; on a shared machine the steadier figure), on the process's
    first item only (later items of the same process do not pay the start-up again, so they
    carry neither field).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.first_batch_s: float | None = None
        self.first_batch_cpu_s: float | None = None

    def first_batch(self) -> None:
        """Call each time a batch's probabilities are ready; only the process's first counts."""
        if _FIRST_BATCH_SEEN:
            return
        _FIRST_BATCH_SEEN.append(True)
        self.first_batch_s = process_age()
        if self.first_batch_s is not None:
            self.first_batch_cpu_s = time.process_time()

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def rounded(self) -> dict[str, float]:
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        if self.first_batch_s is not None:
            out["first_batch_s"] = round(self.first_batch_s, 3)
        if self.first_batch_cpu_s is not None:
            out["first_batch_cpu_s"] = round(self.first_batch_cpu_s, 3)
        return out


def progress_bar(total: int, enabled: bool, name: str) -> Any:
    """One tqdm bar per item (``None`` when quiet)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name[-30:], unit="patch", leave=False, file=sys.stderr)


def git_commit() -> str | None:
    """The commit of the histotile checkout, when it is one."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(dev: torch.device, command: str | None) -> dict[str, Any]:
    """Versions, device ``dev``, this thread's torch threads and the command line, for
    run.json."""
    import torch

    info: dict[str, Any] = {"histotile_version": __version__, "git_commit": git_commit(),
                            "command": command, "torch_version": torch.__version__,
                            "device": str(dev), "torch_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(dev)
    return info


def library_command(inputs: Sequence[str | Path], out_dir: str | Path,
                    model: str | Path | None) -> str:
    """The command recorded for a call from Python."""
    argv = " ".join(shlex.quote(a) for a in sys.argv)
    return f"{argv} :: histotile.predict({list(map(str, inputs))!r}, out_dir={str(out_dir)!r}, " \
           f"model={model!r}) [pid {os.getpid()}]"


def finished_runs(summary: BatchSummary) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Each finished (done or skipped) item of ``summary`` with its run.json, in order."""
    for r in summary.results:
        if r.status not in ("done", "skipped") or not r.output:
            continue
        try:
            run = json.loads((Path(r.output) / "run.json").read_text())
        except (OSError, ValueError):
            continue
        yield r, run


def accuracy_lines(summary: BatchSummary) -> list[str]:
    """``<name>: accuracy 0.912 (912/1000)`` for each finished archive with labels."""
    return [f"{Path(r.slide).name}: accuracy {run['accuracy']:.4f} "
            f"({run['correct']}/{run['patches']}), balanced accuracy "
            f"{run['balanced_accuracy']:.4f}"
            for r, run in finished_runs(summary) if run.get("accuracy") is not None]


def closing_lines(summary: BatchSummary, out_dir: str | os.PathLike[str], max_warnings: int = 5
                  ) -> tuple[list[str], str | None]:
    """The run's last words, from each finished item's run.json: one line per item that looks
    outside the model's domain (at most ``max_warnings``, then a count), and where the results
    are with what to open first."""
    warnings, folders = [], []
    for r, run in finished_runs(summary):
        folders.append((Path(r.output), run.get("kind") == "slide"))
        warning = (run.get("confidence") or {}).get("warning")
        if warning:
            warnings.append(f"{Path(r.slide).name}: {warning}")
    if len(warnings) > max_warnings:
        more = len(warnings) - max_warnings
        warnings = warnings[:max_warnings] + [
            f"... and {more} more slides look outside the model's domain (run.json: confidence)"]
    if not folders:
        return warnings, None
    folder, is_slide = folders[0]
    first = "overlay.png" if is_slide else "predictions.csv"
    if len(folders) == 1:
        return warnings, f"results: {folder}{os.sep} (open {first} first)"
    return warnings, (f"results: {Path(out_dir)}{os.sep} ({len(folders)} folders and "
                      f"manifest.csv; open {folder.name}{os.sep}{first} first)")

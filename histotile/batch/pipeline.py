"""Items overlapped in one process: while item k runs (the model), item k+1 is prepared and
item k-1 finished, each in a background thread.

A command's process offers this by having, besides ``process(item, tmp_dir) -> info``, the
stages of :class:`StagedProcess`: ``prepare(item)`` (read-only work before the lock: open a
slide, detect tissue, plan the grid, fit the stain), ``run(prepared, tmp_dir)`` (the main
work, in the caller's thread) and ``finish(running) -> info`` (close the writers, write the
pictures), plus ``discard(prepared)`` for a prepared item that is not run. ``process`` must
equal ``finish(run(prepare(item), tmp_dir))``: the outputs are the same as a one-at-a-time run.

What :func:`histotile.batch.process_item` guarantees holds item by item: a finished item is
skipped (and never prepared), the item's lock is taken before ``run`` and held until its run
record is written and its folder committed by the finishing thread; a prepared item whose
lock is busy, or that another process finished meanwhile, is discarded; a failure in any
stage fails that item only, with the same one-line error; results are reported in item order.
Bounded: at most one item prepared ahead and one finishing. On Ctrl-C the item that was
running is abandoned (its temporary folder removed, its lock released), the one finishing is
completed, the one prepared is discarded.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeGuard, runtime_checkable

from histotile.batch.item import FOLDER, ItemClaim, Layout, check_stem, is_finished
from histotile.batch.locks import LOCK_TIMEOUT_S, ItemLock, lock_is_stale
from histotile.batch.state import ItemResult

log = logging.getLogger(__name__)

STAGES = ("prepare", "run", "finish", "discard")


@runtime_checkable
class StagedProcess(Protocol):
    """A process whose work can be overlapped across items (see the module docstring)."""

    def __call__(self, item: Path, tmp_dir: Path) -> dict[str, Any] | None: ...
    def prepare(self, item: Path) -> Any: ...
    def run(self, prepared: Any, tmp_dir: Path) -> Any: ...
    def finish(self, running: Any) -> dict[str, Any] | None: ...
    def discard(self, prepared: Any) -> None: ...


def is_staged(process: Any) -> TypeGuard[StagedProcess]:
    """Whether ``process`` offers the stages (and says so: ``process.staged`` is not False)."""
    return (getattr(process, "staged", True) is not False
            and all(callable(getattr(process, name, None)) for name in STAGES))


def _finish(process: StagedProcess, running: Any, claim: ItemClaim) -> ItemResult:
    """The finishing thread's task: finish, run record, commit, release. Never raises."""
    try:
        return claim.complete(process.finish(running))
    except Exception as exc:  # noqa: BLE001 - any failure fails this item only
        return claim.fail(exc)
    finally:
        claim.release()


class _Pipeline:
    def __init__(self, pairs: Sequence[tuple[Path, str]], out: Path, process: StagedProcess,
                 fingerprint: dict[str, Any], emit: Callable[[Path, ItemResult], None],
                 started: Callable[[Path], None] | None, overwrite: bool, lock_timeout: float,
                 layout: Layout, preparing: ThreadPoolExecutor,
                 finishing: ThreadPoolExecutor) -> None:
        self.pairs, self.out, self.process, self.fingerprint = pairs, out, process, fingerprint
        self.emit, self.started = emit, started
        self.overwrite, self.lock_timeout, self.layout = overwrite, lock_timeout, layout
        self.preparing, self.finishing = preparing, finishing
        self.pending: collections.deque[tuple[Path, ItemResult | Future[ItemResult]]] = \
            collections.deque()
        self.ahead: tuple[int, Future[Any]] | None = None  # the item prepared ahead
        self.last_finish: Future[ItemResult] | None = None

    # ------------------------------------------------------------------ results in order
    def flush(self, block: bool = False) -> None:
        while self.pending:
            item, r = self.pending[0]
            if isinstance(r, Future):
                if not (block or r.done()):
                    return
                r = r.result()
            self.pending.popleft()
            self.emit(item, r)

    def add(self, item: Path, result: ItemResult | Future[ItemResult]) -> None:
        self.pending.append((item, result))
        self.flush()

    # ------------------------------------------------------------------ preparing ahead
    def _worth_preparing(self, item: Path, stem: str) -> bool:
        """Not finished, and not visibly being worked on by another process."""
        if not self.overwrite and is_finished(item, stem, self.out, self.fingerprint,
                                              self.layout):
            return False
        lock = ItemLock(self.out, stem, timeout=self.lock_timeout).path
        return not (lock.exists() and not lock_is_stale(lock, self.lock_timeout))

    def prepare_ahead(self, after: int) -> None:
        if self.ahead is not None:
            return
        for j in range(after + 1, len(self.pairs)):
            item, stem = self.pairs[j]
            if self._worth_preparing(item, stem):
                self.ahead = (j, self.preparing.submit(self.process.prepare, item))
                return

    def take_ahead(self, i: int) -> Future[Any] | None:
        if self.ahead is not None and self.ahead[0] == i:
            fut, self.ahead = self.ahead[1], None
            return fut
        return None

    def discard(self, fut: Future[Any] | None) -> None:
        """Drop a prepared item that will not run (waits for its preparation to end)."""
        if fut is None:
            return
        try:
            prepared = fut.result()
        except Exception:  # noqa: BLE001 - its error does not matter: the item is not run
            return
        try:
            self.process.discard(prepared)
        except Exception as exc:  # noqa: BLE001 - closing a reader must not fail the batch
            log.debug("discarding a prepared item failed: %s", exc)

    # ------------------------------------------------------------------ one item
    def step(self, i: int) -> None:
        item, stem = self.pairs[i]
        check_stem(item, stem)
        if self.started is not None:
            self.started(item)
        claim = ItemClaim(item, stem, self.out, self.fingerprint, overwrite=self.overwrite,
                          lock_timeout=self.lock_timeout, layout=self.layout)
        fut = self.take_ahead(i)
        if (result := claim.skipped()) is not None:
            self.discard(fut)
            self.add(item, result)
            return
        handed_off = False
        try:
            try:
                result = claim.begin()
                if result is not None:  # busy, or finished by another process meanwhile
                    self.discard(fut)
                    self.add(item, result)
                    return
                prepared = fut.result() if fut is not None else self.process.prepare(item)
            except Exception as exc:  # noqa: BLE001 - any failure fails this item only
                self.discard(fut)
                self.add(item, claim.fail(exc))
                return
            self.prepare_ahead(i)
            assert claim.tmp is not None
            try:
                running = self.process.run(prepared, claim.tmp)  # owns ``prepared`` now
            except Exception as exc:  # noqa: BLE001 - any failure fails this item only
                self.add(item, claim.fail(exc))
                return
            if self.last_finish is not None:  # at most one item finishing at a time
                self.last_finish.exception()
            self.last_finish = self.finishing.submit(_finish, self.process, running, claim)
            handed_off = True
            self.add(item, self.last_finish)
        finally:
            if not handed_off:
                claim.release()

    def run(self) -> None:
        try:
            for i in range(len(self.pairs)):
                self.step(i)
        finally:
            with contextlib.suppress(Exception):
                self.discard(self.take_ahead(self.ahead[0]) if self.ahead else None)
            self.flush(block=True)  # the item finishing is completed, also on Ctrl-C


def run_staged(pairs: Sequence[tuple[Path, str]], out: Path, process: StagedProcess,
               fingerprint: dict[str, Any], emit: Callable[[Path, ItemResult], None], *,
               started: Callable[[Path], None] | None = None, overwrite: bool = False,
               lock_timeout: float = LOCK_TIMEOUT_S, layout: Layout = FOLDER) -> None:
    """Run ``pairs`` through ``process``'s stages, overlapped; ``emit(item, result)`` is called
    in item order, in this thread (see the module docstring)."""
    with ThreadPoolExecutor(1, thread_name_prefix="histotile-prepare") as preparing, \
            ThreadPoolExecutor(1, thread_name_prefix="histotile-finish") as finishing:
        _Pipeline(pairs, Path(out), process, fingerprint, emit, started, overwrite,
                  lock_timeout, layout, preparing, finishing).run()

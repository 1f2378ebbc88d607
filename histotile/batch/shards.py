"""Shards: which part of a fixed item list one process runs (``--shard I/N``, SLURM arrays).

The Python API takes a shard explicitly; only the command line reads a SLURM array task's
environment (:func:`shard_from_env`), so library calls never change behaviour silently.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

from histotile.errors import InvalidArgumentError

T = TypeVar("T")


def shard_items(items: Sequence[T], index: int, count: int) -> list[T]:
    """The ``index``-th (0-based) of ``count`` round-robin shards: ``items[index::count]``."""
    if count < 1 or not 0 <= index < count:
        raise InvalidArgumentError(f"shard {index}/{count} is out of range",
                                   hint="use I/N with 0 <= I < N", subject="--shard")
    return list(items[index::count])


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``, 0-based, validated."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise InvalidArgumentError(f"{text!r} is not I/N", hint="e.g. --shard 0/4 (0-based)",
                                   subject="--shard")
    index, count = int(m.group(1)), int(m.group(2))
    shard_items([], index, count)  # validates
    return index, count


def shard_from_env(env: Mapping[str, str]) -> tuple[int, int] | None:
    """The shard of a SLURM array task, or None outside one.

    index = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP,
    count = SLURM_ARRAY_TASK_COUNT, so arrays starting at 0 or 1 (or stepped) both work.
    """
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return None
    try:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
    except ValueError as exc:
        raise InvalidArgumentError(f"unreadable SLURM array variables: {exc}",
                                   hint="pass --shard I/N explicitly",
                                   subject="SLURM_ARRAY_TASK_ID") from None
    index, rem = divmod(task - first, step)
    if rem or not 0 <= index < count:
        raise InvalidArgumentError(
            f"array task {task} (min {first}, step {step}) is not one of {count} tasks",
            hint="use a contiguous --array=0-(N-1) or pass --shard I/N",
            subject="SLURM_ARRAY_TASK_ID")
    return index, count


def resolve_shard(opt: str | Sequence[int] | None,
                  env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The shard to run: ``opt`` (``"I/N"`` or ``(I, N)``) if given, else the SLURM array task
    of ``env`` when one is passed (the CLI passes ``os.environ``), else None (all items)."""
    if isinstance(opt, str) and opt.strip():
        return parse_shard(opt)
    if isinstance(opt, (tuple, list)):
        index, count = (int(v) for v in opt)
        shard_items([], index, count)
        return index, count
    return shard_from_env(env) if env is not None else None

"""Batch runs over many items: inputs, shards, per-item locks, the runner, the manifest.

* :mod:`~histotile.batch.inputs` — files, folders, globs and lists -> a fixed item list.
* :mod:`~histotile.batch.shards` — ``--shard I/N`` and SLURM array tasks.
* :mod:`~histotile.batch.locks` — per-item lock files.
* :mod:`~histotile.batch.state` — results, manifest, per-item state record.
* :mod:`~histotile.batch.runner` — :func:`run_batch` / :func:`process_item` (one process).

Executors that spread the same per-item work over dask workers, and the single entry
:func:`histotile.hpc.run_items`, live in :mod:`histotile.hpc` (imports point hpc -> batch).
"""

from __future__ import annotations

from histotile.batch.inputs import expand_inputs, read_list_file, scan_folder
from histotile.batch.locks import LOCK_DIR, LOCK_TIMEOUT_S, ItemLock, lock_is_stale
from histotile.batch.runner import (
    FOLDER,
    ITEM_PREFIX,
    RUN_JSON,
    ErrorPolicy,
    Layout,
    OutputConflictError,
    ProcessFn,
    finished_run,
    make_probe_process,
    plan_items,
    probe_slide,
    process_item,
    run_batch,
)
from histotile.batch.shards import parse_shard, resolve_shard, shard_from_env, shard_items
from histotile.batch.state import (
    EXIT_BUSY,
    MANIFEST_FIELDS,
    STATUSES,
    BatchSummary,
    ItemResult,
    error_line,
    manifest_name,
    summary_table,
    write_manifest,
)
from histotile.items import item_stem, item_stems

__all__ = [
    "EXIT_BUSY", "FOLDER", "ITEM_PREFIX", "ErrorPolicy", "LOCK_DIR", "LOCK_TIMEOUT_S",
    "MANIFEST_FIELDS", "RUN_JSON", "STATUSES", "BatchSummary", "ItemLock", "ItemResult", "Layout",
    "OutputConflictError", "ProcessFn", "error_line", "expand_inputs", "finished_run", "item_stem",
    "item_stems", "lock_is_stale", "make_probe_process", "manifest_name", "parse_shard",
    "plan_items", "probe_slide", "process_item", "read_list_file", "resolve_shard", "run_batch",
    "scan_folder", "shard_from_env", "shard_items", "summary_table", "write_manifest",
]

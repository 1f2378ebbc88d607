"""``histotile.predict(inputs, out_dir, options, **overrides)``: the entry point.

Everything is checked before any slide is opened: the options (their own validation), the
model card, the device, Grad-CAM/attention against the card. Then the items run through
:func:`histotile.batch.run_items` with a resume fingerprint derived from the options
(:mod:`histotile.inference.fingerprint`). Each worker process builds one
:class:`~histotile.inference.context.PredictContext` and reuses it (and the model, loaded once
on the first batch) for every item.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from histotile.archives import is_archive
from histotile.batch import BatchSummary, ErrorPolicy, expand_inputs, resolve_shard
from histotile.errors import InvalidArgumentError, ModelError, os_error
from histotile.gradcam import cam_target
from histotile.hpc import run_items
from histotile.inference.archives import predict_archive
from histotile.inference.context import PredictContext
from histotile.inference.fingerprint import derive_fingerprint
from histotile.inference.model import LazyModel
from histotile.inference.provenance import library_command
from histotile.inference.slides import (
    PreparedSlide,
    RunningSlide,
    finish_slide,
    prepare_slide,
    run_slide,
)
from histotile.models.card import ModelCard
from histotile.models.loading import resolve_device
from histotile.options import PredictOptions
from histotile.vendor import refuse_patches_as_slides


class PredictProcess:
    """``process(item, tmp_dir) -> info`` for :func:`histotile.batch.run_items`, with the stages
    the batch runner overlaps across items (:class:`histotile.batch.pipeline.StagedProcess`):
    ``prepare`` (open, tissue, grid, stain fit: a slide; nothing: an archive), ``run`` (the
    model, writers streamed) and ``finish`` (writers closed, pictures). One per process: the
    context (and the model, loaded once on the first batch) is reused for every item."""

    def __init__(self, options: PredictOptions) -> None:
        self.options = options
        self.ctx = PredictContext.from_options(options)
        self._configure_lock = threading.Lock()
        self._setup_s: float | None = None

    def _configure(self) -> float:
        """Torch's threads, once per process (torch is imported only once there is work);
        returns the seconds it took, 0 after the first time."""
        with self._configure_lock:
            if self._setup_s is not None:
                return 0.0
            t0 = time.perf_counter()
            from histotile.engine import configure_threads

            self.ctx.compute = configure_threads(
                self.ctx.model.device, self.ctx.effective_workers(),
                explain=self.options.gradcam or self.options.attention)
            self._setup_s = time.perf_counter() - t0
            return self._setup_s

    def __call__(self, item: Path, tmp_dir: Path) -> dict[str, Any]:
        return self.finish(self.run(self.prepare(item), tmp_dir))

    def prepare(self, item: Path) -> tuple[Path, float, PreparedSlide | None]:
        self.ctx.model.raise_if_failed()  # a model that failed to load fails the rest fast
        setup = self._configure()
        if is_archive(item):
            return Path(item), setup, None
        with _one_line(item):
            return Path(item), setup, prepare_slide(Path(item), self.ctx)

    def run(self, prepared: tuple[Path, float, PreparedSlide | None], tmp_dir: Path
            ) -> tuple[float, RunningSlide | dict[str, Any]]:
        item, setup, slide = prepared
        self.ctx.model.raise_if_failed()
        setup += self._configure()
        with _one_line(item):
            if slide is None:
                return setup, predict_archive(item, Path(tmp_dir), self.ctx)
            return setup, run_slide(slide, Path(tmp_dir), self.ctx)

    def finish(self, running: tuple[float, RunningSlide | dict[str, Any]]) -> dict[str, Any]:
        setup, state = running
        if isinstance(state, dict):
            info = state
        else:
            with _one_line(state.prepared.item):
                info = finish_slide(state, self.ctx)
        info["timings"]["setup"] = round(setup, 3)  # torch import (first item), threads
        return info

    def discard(self, prepared: tuple[Path, float, PreparedSlide | None]) -> None:
        if prepared[2] is not None:
            prepared[2].close()


@contextlib.contextmanager
def _one_line(item: Path) -> Iterator[None]:
    """A full disk, a vanished output folder: one line with a hint."""
    try:
        yield
    except OSError as exc:
        raise os_error(exc, subject=str(item)) from exc


def make_predict_process(options: PredictOptions) -> PredictProcess:
    """The :class:`PredictProcess` of ``options``. ``functools.partial(make_predict_process,
    options)`` pickles to dask workers; each process builds its own once."""
    return PredictProcess(options)


def check_against_card(options: PredictOptions, card: ModelCard) -> None:
    """Grad-CAM and attention need the right kind of model: refused up front, from the card."""
    if options.attention and card.architecture.name != "vit":
        raise ModelError(
            f"--attention needs a Vision Transformer, not architecture {card.architecture.name!r}",
            "use a model trained with --arch vit, or --gradcam", subject=card.name)
    if options.gradcam:
        try:
            cam_target(options.cam_class, card.class_names)
        except InvalidArgumentError as exc:
            exc.subject = exc.subject or "--cam-class"
            raise
        if card.weights.resolved_format == "torchscript":
            raise ModelError("Grad-CAM needs an eager PyTorch model, not TorchScript",
                             "use a model folder with safetensors weights, or drop --gradcam",
                             subject=card.name)


def check_output_dir(out_dir: str | Path) -> None:
    """Create ``out_dir`` and write a probe file in it, so an output that cannot be written (a
    path under a file, a read-only place, a full disk) is one line up front."""
    import tempfile

    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".histotile-probe-"):
            pass
    except OSError as exc:
        raise os_error(exc, subject=str(path)) from exc


def resolve_options(options: PredictOptions | None, overrides: dict[str, Any]) -> PredictOptions:
    """``options`` (default :class:`PredictOptions`) with keyword ``overrides``; validated."""
    if options is None:
        options = PredictOptions()
    elif not isinstance(options, PredictOptions):
        raise InvalidArgumentError(f"options must be a PredictOptions, not "
                                   f"{type(options).__name__}",
                                   "use histotile.options.PredictOptions(...) or keywords")
    return options.replace(**overrides) if overrides else options


def fingerprint_for(options: PredictOptions) -> dict[str, Any]:
    """The resume fingerprint ``options`` give (reads the model card; ``auto`` device imports
    torch)."""
    return derive_fingerprint(options, LazyModel(options.model, options.device).card)


def predict(inputs: str | Path | Sequence[str | Path], out_dir: str | Path = "histotile-out",
            options: PredictOptions | None = None, *, on_error: ErrorPolicy = "report",
            **overrides: Any) -> BatchSummary:
    """Predict every slide/archive in ``inputs`` into ``out_dir/<stem>/``.

    ``inputs``: files, folders (sorted, recursive), globs or list files. ``options``: a
    :class:`histotile.options.PredictOptions` (default: all defaults); keyword ``overrides``
    replace its fields (``model=``, ``stain_norm=``, ``gradcam=``, ...) and its batch fields
    (``executor=``, ``jobs=``, ``shard=``, ``overwrite=``, ...). Finished items whose recorded
    fingerprint equals this run's are skipped unless ``overwrite``. One failing item does not
    stop the others: see the returned summary (``.failed``, ``.exit_code``, ``.manifest``).
    ``on_error``: ``"report"``, ``"raise"`` or a callable ``(item, result)``.
    """
    options = resolve_options(options, dict(overrides))
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if options.command is None:
        options = options.replace(command=library_command(inputs, out_dir, options.model))
    model = LazyModel(options.model, options.device)  # the card: one error, up front
    check_against_card(options, model.card)
    if options.device not in ("auto", "cpu"):  # an unavailable device: one error, up front
        resolve_device(options.device)
    items = expand_inputs(inputs)
    refuse_patches_as_slides([Path(i) for i in items])
    check_output_dir(out_dir)
    fingerprint = derive_fingerprint(options, model.card)
    batch = options.batch.run_items_kwargs()
    if isinstance(batch["shard"], str) or batch["shard"] is None:
        batch["shard"] = resolve_shard(batch["shard"])
    return run_items(items, out_dir, functools.partial(make_predict_process, options),
                     fingerprint, progress=options.progress, on_error=on_error, **batch)

"""``histotile render``: redraw a finished slide's pictures and exports without the model.

Everything comes from the result folder (``predictions.csv``, ``heatmap.ome.zarr``,
``tissue.png``, ``run.json``) plus a thumbnail read from the slide (its path is in run.json;
``slide=`` when it moved); no model is loaded and torch is not imported, so it takes seconds.
The drawing is done by the functions predict uses (:func:`histotile.export.overlay.write_overlay`,
:func:`histotile.explain.write_gradcam_overlay` and ``..._from_store``); render only chooses
what to draw:

- ``overlay.png``: the argmax of every patch (``threshold``: only patches whose top probability
  reaches it), or with ``class_name`` the patches whose probability of that class reaches
  ``threshold``, blended with ``opacity``, longest side ``size`` px;
- with ``class_name``: ``prob_<class>.png``, that class's probability over the thumbnail with the
  colour map ``cmap`` (patches under ``threshold`` left clear) and a colour bar;
- ``gradcam_overlay.png`` / ``attention_overlay.png`` again from the stored maps, at ``size``;
- ``qupath``: ``tiles.geojson.gz`` again (``threshold`` as its minimum top probability, every
  measurement of predictions.csv kept); ``ome_tiff``: ``heatmap.ome.tif``.

``render.json`` records the settings and the files written.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histotile.errors import InputNotFoundError, InvalidArgumentError
from histotile.export.csv import read_predictions_csv
from histotile.export.qupath import export_qupath, result_classes
from histotile.options import jsonable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RenderOptions:
    """What ``histotile render`` draws (see the module docstring)."""

    class_name: str | None = None
    threshold: float = 0.0
    opacity: float = 0.45
    cmap: str = "viridis"
    size: int = 1024
    slide: str | None = None
    qupath: bool = False
    ome_tiff: bool = False

    def __post_init__(self) -> None:
        for name, value, low, high in (("threshold", self.threshold, 0.0, 1.0),
                                       ("opacity", self.opacity, 0.0, 1.0)):
            if not (isinstance(value, (int, float)) and low <= value <= high):
                raise InvalidArgumentError(f"--{name} {value} is outside [0, 1]",
                                           f"use e.g. --{name} 0.5", subject=f"--{name}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 64:
            raise InvalidArgumentError(f"--size {self.size} is not an integer >= 64",
                                       "use e.g. --size 1024", subject="--size")
        import matplotlib

        if self.cmap not in matplotlib.colormaps:
            raise InvalidArgumentError(f"unknown colour map {self.cmap!r}",
                                       "use a matplotlib name, e.g. viridis, magma, jet",
                                       subject="--cmap")


def _thumbnail(result_dir: Path, run: dict[str, Any], options: RenderOptions
               ) -> tuple[np.ndarray, float]:
    from histotile.slide import open_slide

    path = options.slide or run.get("slide")
    if not path or not Path(path).exists():
        raise InputNotFoundError(f"the slide of {result_dir.name} is not at {path}",
                                 "pass --slide PATH (render reads a thumbnail of it)",
                                 subject=str(result_dir))
    slide_mpp = (run.get("mpp") or {}).get("slide_mpp")
    with open_slide(path, slide_mpp=slide_mpp) as slide:
        w, h = slide.dimensions
        return slide.read_downsampled(max(w, h) / options.size)


def _tissue(result_dir: Path) -> np.ndarray | None:
    """The tissue mask picture (``tissue_mask.png``; older runs: a grey ``tissue.png``)."""
    from PIL import Image

    for name in ("tissue_mask.png", "tissue.png"):
        png = result_dir / name
        if png.exists():
            with Image.open(png) as im:
                if im.mode in ("1", "L"):
                    return np.asarray(im) > 0
    return None


def render(result_dir: str | Path, options: RenderOptions | None = None,
           out_dir: str | Path | None = None) -> list[Path]:
    """Redraw the pictures (and, if asked, the exports) of one predict result folder into
    ``out_dir`` (default: the folder itself). Returns the written paths."""
    from histotile.export.figures import write_gradcam_overlay, write_gradcam_overlay_from_store
    from histotile.export.overlay import write_overlay
    from histotile.stitch import open_heatmap, read_coverage, read_heatmap

    options = options or RenderOptions()
    result_dir = Path(result_dir)
    run_path = result_dir / "run.json"
    if not run_path.exists():
        raise InputNotFoundError(f"no run.json in {result_dir}",
                                 "point to a finished histotile predict slide folder",
                                 subject=str(result_dir))
    run = json.loads(run_path.read_text())
    out = Path(out_dir) if out_dir is not None else result_dir
    out.mkdir(parents=True, exist_ok=True)
    names, colors = result_classes(result_dir)
    if options.class_name is not None and options.class_name not in names:
        raise InvalidArgumentError(f"no class {options.class_name!r} in {result_dir.name}",
                                   f"use one of {', '.join(names)}", subject="--class")
    preds = read_predictions_csv(result_dir / "predictions.csv")
    thumb, ds = _thumbnail(result_dir, run, options)
    tissue = _tissue(result_dir)
    size = tuple(float(v) for v in preds.sizes[0]) if len(preds) else 1.0  # one per slide
    written: list[Path] = []
    if options.class_name is None:
        keep = preds.probs.max(axis=1, initial=0) >= options.threshold
        labels, shown, shown_colors = preds.probs.argmax(axis=1), names, colors
    else:
        k = names.index(options.class_name)
        keep = preds.probs[:, k] >= options.threshold
        labels = np.zeros(len(preds), np.int64)
        shown = [f"{options.class_name} >= {options.threshold:g}"]
        shown_colors = [colors[k]]
    top = preds.probs.max(axis=1, initial=0) if options.class_name is None else None
    card = (run.get("model") or {}).get("card") or {}
    written.append(write_overlay(out / "overlay.png", thumb, ds, preds.coords[keep],
                                 size, labels[keep], shown, shown_colors,
                                 tissue_mask=tissue, alpha=options.opacity,
                                 min_side=options.size,
                                 top_probability=None if top is None else top[keep],
                                 slide_mpp=(run.get("mpp") or {}).get("slide_mpp"),
                                 title=result_dir.name,
                                 model=f"model {card.get('name', '?')} {card.get('version', '')}"
                                 .rstrip() + " (re-rendered)"))
    store = result_dir / "heatmap.ome.zarr"
    if options.class_name is not None:
        heat, attrs = read_heatmap(store)
        k = names.index(options.class_name)
        cover = read_coverage(store) & (heat[k] >= options.threshold)
        stride = attrs["stride_level0"]
        written.append(write_gradcam_overlay(
            out / f"prob_{options.class_name}.png", thumb, heat[k], thumb_downsample=ds,
            cam_pixel_level0=float(stride[0] if isinstance(stride, list) else stride),
            origin_level0=_pair(attrs.get("origin_level0", (0, 0))), coverage=cover,
            cam_scale=1.0, alpha=options.opacity, cmap=options.cmap,
            title=f"P({options.class_name})", label=f"probability of {options.class_name}"))
    if store.exists():
        root = open_heatmap(store)
        for name, title in (("gradcam", "Grad-CAM"), ("attention", "Attention")):
            if name in root:
                written.append(write_gradcam_overlay_from_store(
                    out / f"{name}_overlay.png", store, thumb, ds, name=name, title=title))
    if options.qupath:
        written += export_qupath(result_dir, min_prob=options.threshold or None)
    if options.ome_tiff:
        from histotile.export.ome_tiff import export_ome_tiff

        written.append(export_ome_tiff(result_dir))
    record = out / "render.json"
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps({"options": jsonable(asdict(options)), "result_dir": str(result_dir),
                               "files": sorted(p.name for p in written)}, indent=1))
    os.replace(tmp, record)
    return written


def _pair(value: Any) -> tuple[float, float]:
    if isinstance(value, (list, tuple)):
        return float(value[0]), float(value[1])
    return float(value), float(value)

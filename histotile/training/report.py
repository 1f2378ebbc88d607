"""Training / evaluation reports: metrics.json, history.csv and pictures (curves, confusion, ROC).

Every file is written under a temporary name in the output folder and renamed when complete.
matplotlib is imported inside the functions and used through its object API with the Agg canvas
(no pyplot, no global backend switch).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histotile import fileio
from histotile.export.figures import new_figure, save_figure
from histotile.training.metrics import compute_metrics

HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_auc", "lr", "seconds")


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (nan is refused: use None)."""
    return fileio.write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def history_columns(history: Sequence[dict[str, Any]]) -> list[str]:
    """Column order: the known ones first (as in HISTORY_COLUMNS), then others as first seen."""
    seen: list[str] = []
    for row in history:
        seen.extend(k for k in row if k not in seen)
    return [c for c in HISTORY_COLUMNS if c in seen] + [c for c in seen if c not in HISTORY_COLUMNS]


def write_history_csv(path: str | Path, history: Sequence[dict[str, Any]]) -> Path:
    """Atomically write per-epoch dicts as CSV with a stable column order (missing cells empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=history_columns(history), lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return fileio.write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------- pictures
def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(history):
        value = row.get(key)
        if value is None or value == "":
            continue
        try:
            ys.append(float(value))
        except (TypeError, ValueError):
            continue
        xs.append(float(row.get("epoch", i + 1)))
    return xs, ys


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Loss (every ``*loss`` column) and validation metrics per epoch; learning rate if logged."""
    from matplotlib.ticker import MaxNLocator

    cols = history_columns(history)
    losses = [c for c in cols if c.endswith("loss")]
    scores = [c for c in cols if c not in losses and c not in ("epoch", "lr", "seconds")
              and c.startswith(("val_", "train_")) and _series(history, c)[1]]
    panels = [("loss", losses), ("metric", scores)] + ([("learning rate", ["lr"])]
                                                       if "lr" in cols else [])
    fig = new_figure(4.6 * len(panels), 3.8)
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for key in keys:
            xs, ys = _series(history, key)
            if ys:
                ax.plot(xs, ys, marker="o", markersize=3, label=key)
        if title == "learning rate" and any(v > 0 for v in _series(history, "lr")[1]):
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def plot_confusion_matrix(cm: Sequence[Sequence[int]], class_names: Sequence[str],
                          path: str | Path) -> Path:
    """Counts and row-normalised (recall per true class) confusion matrices side by side."""
    counts = np.asarray(cm, dtype=np.int64)
    rows = counts.sum(1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    n = len(class_names)
    side = max(4.0, 0.55 * n + 2.5)
    fig = new_figure(2 * side, side)
    font = 9 if n <= 10 else 7
    for i, (data, title, fmt) in enumerate(
            [(counts, "counts", "d"), (norm, "row-normalised (recall)", ".2f")]):
        ax = fig.add_subplot(1, 2, i + 1)
        image = ax.imshow(data, cmap="Blues", vmin=0, vmax=max(data.max(), 1e-9))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(n), labels=list(class_names), rotation=45, ha="right", fontsize=font)
        ax.set_yticks(range(n), labels=list(class_names) if i == 0 else [], fontsize=font)
        ax.set_xlabel("predicted")
        if i == 0:
            ax.set_ylabel("true")
        ax.set_title(title)
        threshold = data.max() / 2
        for r in range(n):
            for c in range(n):
                ax.text(c, r, format(data[r, c], fmt), ha="center", va="center", fontsize=font - 1,
                        color="white" if data[r, c] > threshold else "black")
    fig.tight_layout()
    return save_figure(fig, Path(path))


def plot_roc_curves(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                    path: str | Path) -> Path:
    """One-vs-rest ROC curve per class with its AUC in the legend (binary: the positive class)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    fig = new_figure(6.8, 5.6)
    ax = fig.add_subplot(1, 1, 1)
    classes = [1] if p.shape[1] == 2 else range(p.shape[1])
    colours = _colours(len(class_names))
    for k in classes:
        pos = y == k
        if not 0 < pos.sum() < len(y):
            ax.plot([], [], color=colours[k], label=f"{class_names[k]} (absent: no curve)")
            continue
        fpr, tpr, _ = roc_curve(pos, p[:, k])
        auc = roc_auc_score(pos, p[:, k])
        ax.plot(fpr, tpr, color=colours[k], lw=1.6, label=f"{class_names[k]} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC curves" + (" (one-vs-rest)" if p.shape[1] > 2 else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# ----------------------------------------------------------------------------- public API
def write_report(
    out_dir: str | Path,
    metrics: dict[str, Any],
    history: Sequence[dict[str, Any]] | None = None,
    y_true: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
) -> list[Path]:
    """Write metrics.json, and what the inputs allow of history.csv, training_curves.png,
    confusion_matrix.png (needs a ``confusion_matrix`` in ``metrics``) and roc_curves.png
    (needs ``y_true`` and ``probs``). Class names default to ``metrics["class_names"]``.
    Returns the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    section = _main_section(metrics)
    names = list(class_names) if class_names is not None else section.get("class_names")
    written = [write_json(out / "metrics.json", metrics)]
    if history:
        written.append(write_history_csv(out / "history.csv", history))
        written.append(plot_training_curves(history, out / "training_curves.png"))
    cm = section.get("confusion_matrix")
    if y_true is not None and probs is not None:  # the pictures show the same samples
        from sklearn.metrics import confusion_matrix

        p = np.asarray(probs)
        cm = confusion_matrix(np.asarray(y_true).reshape(-1), p.argmax(1),
                              labels=list(range(p.shape[1]))).tolist()
    if cm is not None:
        names_cm = names or [str(i) for i in range(len(cm))]
        written.append(plot_confusion_matrix(cm, names_cm, out / "confusion_matrix.png"))
    if y_true is not None and probs is not None:
        p = np.asarray(probs)
        names_roc = names or [str(i) for i in range(p.shape[1])]
        written.append(plot_roc_curves(y_true, p, names_roc, out / "roc_curves.png"))
    return written


def _sections(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The metric dicts inside ``metrics``: itself, or nested ones (``validation``, ``test``...)
    as ``train`` writes them."""
    if "accuracy" in metrics:
        return [("", metrics)]
    return [(k, v) for k, v in metrics.items() if isinstance(v, dict) and "accuracy" in v
            and "per_class" in v]


def _main_section(metrics: dict[str, Any]) -> dict[str, Any]:
    sections = _sections(metrics)
    return sections[0][1] if sections else metrics


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_ci(value: Any, ci: Any) -> str:
    text = _fmt(value)
    if ci:
        text += f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"
    return text


def format_metrics_table(metrics: dict[str, Any]) -> str:
    """A short plain-text summary: overall metrics with 95 % CIs, then one row per class.

    ``metrics`` is a :func:`~histotile.training.metrics.compute_metrics` result, or a dict holding
    several (e.g. ``{"validation": ..., "test": ...}``): one titled table each.
    """
    sections = _sections(metrics)
    if len(sections) != 1 or sections[0][0]:
        return "\n\n".join(f"== {name} ==\n{_format_one(m)}" for name, m in sections)
    return _format_one(metrics)


def _format_one(metrics: dict[str, Any]) -> str:
    ci = metrics.get("ci") or {}
    lines = [
        f"samples            {metrics.get('n', '-')}",
        f"accuracy           {_fmt_ci(metrics.get('accuracy'), ci.get('accuracy'))}",
        f"balanced accuracy  {_fmt(metrics.get('balanced_accuracy'))}",
        f"AUC                {_fmt_ci(metrics.get('auc'), ci.get('auc'))}",
    ]
    if ci.get("accuracy") or ci.get("auc"):
        lines.append("                   [95 % CI, "
                     + (metrics.get("bootstrap") or {}).get("method", "bootstrap") + "]")
    per_class = metrics.get("per_class") or {}
    if per_class:
        width = max(12, *(len(n) for n in per_class))
        header = f"{'class':<{width}}  " + " ".join(
            f"{h:>6}" for h in ("sens", "spec", "ppv", "npv", "f1", "n"))
        lines += ["", header, "-" * len(header)]
        for name, m in per_class.items():
            cells = " ".join(f"{_fmt(m.get(k)):>6}"
                             for k in ("sensitivity", "specificity", "ppv", "npv", "f1"))
            lines.append(f"{name:<{width}}  {cells} {m.get('support', '-'):>6}")
    lines += [f"note: {note}" for note in metrics.get("notes") or []]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- printed lines
MIN_VAL_IMAGES = 30  # fewer validation images than this: accuracy and AUC say little
MIN_VAL_PER_CLASS = 5  # nor with a class that has fewer than this


def format_p_value(p: float | None) -> str:
    """``p = 0.031``, ``p < 0.001`` or ``p n/a`` (no test could be made)."""
    if p is None or not np.isfinite(p):
        return "p n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def format_metric(value: float | None, digits: int = 4) -> str:
    """A metric to ``digits`` places, 0 as 0; ``n/a`` when it could not be computed."""
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def small_validation_warning(section: dict[str, Any]) -> str | None:
    """One line when a validation set is too small for its figures to mean much: fewer than
    :data:`MIN_VAL_IMAGES` images, or a class with fewer than :data:`MIN_VAL_PER_CLASS`."""
    n = section.get("n")
    small = {name: int(m.get("support", 0))
             for name, m in (section.get("per_class") or {}).items()
             if int(m.get("support", 0)) < MIN_VAL_PER_CLASS}
    reasons = []
    if n is not None and int(n) < MIN_VAL_IMAGES:
        reasons.append(f"{int(n)} images (fewer than {MIN_VAL_IMAGES})")
    if small:
        listed = ", ".join(f"{name} {k}" for name, k in list(small.items())[:4])
        more = f" and {len(small) - 4} more" if len(small) > 4 else ""
        reasons.append(f"classes with fewer than {MIN_VAL_PER_CLASS} images ({listed}{more})")
    if not reasons:
        return None
    return (f"the validation set is too small to mean much: {'; '.join(reasons)}; use more "
            f"data, a larger --val-fraction, or a dataset with a validation split")


# ----------------------------------------------------------------------------- train / evaluate
def headline(m: dict[str, Any], split: str) -> dict[str, Any]:
    """The card's summary of a metrics dict: accuracy, balanced accuracy, AUC, n, 95 % CIs."""
    keys = ("accuracy", "balanced_accuracy", "auc", "n")
    out = {k: m[k] for k in keys if k in m}
    if "ci" in m:
        out["ci95"] = {k: m["ci"][k] for k in ("accuracy", "auc") if k in m["ci"]}
    out["split"] = split
    return out


def full_metrics(y: np.ndarray, probs: np.ndarray, names: list[str],
                 n_boot: int = 1000) -> dict[str, Any]:
    """:func:`histotile.training.metrics.compute_metrics` with ``n`` always present."""
    m = compute_metrics(y, probs, names, n_boot=n_boot)
    m.setdefault("n", int(len(y)))
    return m


def write_reports(out: Path, metrics: dict[str, Any], history: list[dict[str, Any]] | None,
                  y: np.ndarray, probs: np.ndarray, names: list[str],
                  plots: bool = True) -> list[Path]:
    """metrics.json, history.csv and (``plots``) the pictures of :func:`write_report`."""
    if plots:
        return write_report(out, metrics, history, y, probs, names)
    paths = [write_json(out / "metrics.json", metrics)]
    if history:
        paths.append(write_history_csv(out / "history.csv", history))
    return paths

"""``histotile train`` and ``histotile evaluate``: thin wrappers over :mod:`histotile.training`."""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Any

import click

from histotile.cli.common import field_option, quiet_flag
from histotile.fileio import command_line, running_as_cli
from histotile.models.architectures import architecture_names
from histotile.options import EvaluateOptions

E = EvaluateOptions

_ARCH_HELP = "Architecture: " + ", ".join(architecture_names()) + "."


def _command_line(ctx: click.Context) -> str:
    """The command as typed; rebuilt from the parsed options when run in-process.

    An option is written back when it did not come from its default (click's parameter source:
    click 8.5 no longer exposes a plain flag's default as ``param.default``)."""
    from click.core import ParameterSource

    argv = (ctx.find_root().obj or {}).get("argv")
    if argv is not None or running_as_cli():
        return command_line(argv)
    words = ["histotile", ctx.info_name or "train"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            words.append(str(value))
            continue
        source = ctx.get_parameter_source(param.name) if param.name else None
        if value is None or source in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            continue
        flag = max(param.opts, key=len)
        if getattr(param, "is_flag", False):
            off = getattr(param, "secondary_opts", [])
            if value or off:
                words.append(flag if value else max(off, key=len))
        else:
            words += [flag, str(value)]
    return shlex.join(words)


@click.command("train")
@click.argument("dataset")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Model folder to write [default: ./histotile-model-DATASET].")
@click.option("--arch", default="smallcnn", show_default=True, help=_ARCH_HELP)
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Learning rate.")
@click.option("--optimizer", type=click.Choice(["adam", "adamw"]), default="adam",
              show_default=True, help="adam: the MedMNIST v2 recipe; adamw: weight decay 0.05.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where pathmnist*.npz / the PCam .h5 files are (or go with --download).")
@click.option("--download", is_flag=True, help="Fetch PathMNIST / PCam from Zenodo (md5-checked).")
@click.option("--size", type=int, default=None, help="Patch size (PathMNIST: 28, 64, 128, 224).")
@click.option("--stain-norm", type=click.Choice(["none", "macenko"]), default="none",
              show_default=True, help="Macenko-normalise every patch (recorded in the card).")
@click.option("--stain-reference", default="default", show_default=True,
              metavar="fit|default|IMAGE",
              help="Macenko target recorded in the card: fitted on the pooled training patches, "
                   "the standard reference, or fitted on an image.")
@click.option("--stain-train/--no-stain-train", default=True, show_default=True,
              help="Also normalise the training patches (off: they are already normalised to the "
                   "reference, as PathMNIST; predict still normalises slides).")
@click.option("--weight-decay", type=float, default=None,
              help="Weight decay [default: 0 for adam, 0.05 for adamw].")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              show_default=True, help="Cross-entropy label smoothing.")
@click.option("--arch-kwargs", default=None, metavar="JSON",
              help="Architecture arguments, e.g. '{\"width\": 48}' (recorded in the card).")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="Flips, 90° rotations, light HED stain jitter.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from MODEL_DIR/checkpoint.pt.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="DataLoader worker processes.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Stratified hold-out when the data has no validation split (archives of "
                   "'tile --labels': this share of the slides, whole).")
@click.option("--cv", type=click.IntRange(min=0), default=0,
              help="Also report k-fold cross-validated accuracy (k more trainings).")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Labels CSV for a 'histotile tile' archive (column label, optional index).")
@click.option("--mpp", type=float, default=None, help="µm/px of the patches (image folders).")
@click.option("--pretrained", type=click.Choice(["imagenet"]), default=None,
              help="Start from torchvision ImageNet weights (resnet18, resnet50, "
                   "resnet50-attention, efficientnet-b0); downloaded once, sha256-checked.")
@click.option("--name", default=None, help="Model name in the card [default: folder name].")
@click.option("--notes", default="", help="Free text for the card's notes.")
@click.pass_context
def train(ctx: click.Context, dataset: str, out_dir: Path | None, **kw: object) -> None:
    """Train a patch classifier on DATASET: pathmnist, pcam, a PCam-layout .h5, a Kaggle folder
    (train/*.tif + train_labels.csv), an image folder (one sub-folder per class), a tile archive
    with --labels, or the archives of 'histotile tile --labels' (their folder or one .h5;
    validation holds whole slides out). Writes model.json, weights.safetensors, metrics and
    plots to the output folder.
    """
    from histotile.errors import InvalidArgumentError
    from histotile.training.api import train as run_train

    if kw.get("arch_kwargs") is not None:
        try:
            kw["arch_kwargs"] = json.loads(str(kw["arch_kwargs"]))
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"--arch-kwargs is not JSON ({exc.msg})",
                                       "give an object, e.g. '{\"width\": 48}'") from None

    out = out_dir or Path(f"histotile-model-{Path(dataset).name}")
    folder = run_train(dataset, out, command=_command_line(ctx), progress=not quiet_flag(ctx),
                       **kw)  # type: ignore[arg-type]
    from histotile.training.report import format_metric, small_validation_warning

    card = json.loads((folder / "model.json").read_text())
    val = card.get("metrics", {}).get("validation", {})
    click.echo(f"wrote {folder} (validation accuracy {format_metric(val.get('accuracy'))}, "
               f"AUC {format_metric(val.get('auc'))})")
    warning = small_validation_warning(_validation_section(folder) or val)
    if warning:
        logging.getLogger("histotile.train").warning("%s", warning)


def _validation_section(folder: Path) -> dict | None:
    """``metrics.json``'s validation metrics (with per-class counts), when it has them."""
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    section = metrics.get("validation", metrics)
    return section if isinstance(section, dict) and "n" in section else None


@click.command("evaluate")
@click.argument("model")
@click.argument("dataset")
@field_option(E, "split", help="val: the held-out split (the model card's by default).")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False),
              default=None, help="Write metrics.json and plots here.")
@field_option(E, "compare", help="Another model: paired McNemar / DeLong tests.")
@field_option(E, "data_dir", help="Where pathmnist*.npz / the PCam .h5 files are.")
@field_option(E, "download", help="Fetch PathMNIST / PCam from Zenodo.")
@field_option(E, "batch_size", help="Patches per batch.")
@field_option(E, "device", help="auto, cpu, cuda or cuda:N.")
@field_option(E, "workers", help="DataLoader worker processes.")
@field_option(E, "labels", help="Labels file for a folder dataset.")
@field_option(E, "val_fraction",
              help="Held-out fraction of the training images [default: the model card's "
                   "recorded split, so validation never overlaps the model's training images].")
@field_option(E, "seed", help="Seed of the held-out split [default: the model card's].")
@field_option(E, "n_boot", help="Bootstrap resamples for the 95% confidence intervals (0: none).")
@click.pass_context
def evaluate(ctx: click.Context, model: str, dataset: str, **kw: Any) -> None:
    """Evaluate MODEL (zoo name, folder or URL) on a DATASET split with clinical metrics."""
    from histotile.training.evaluation import evaluate as run_evaluate

    options = EvaluateOptions(**kw, progress=not quiet_flag(ctx))  # validated here
    m = run_evaluate(model, dataset, options)
    click.echo("\n".join(evaluation_lines(m)))


def evaluation_lines(m: dict) -> list[str]:
    """What ``evaluate`` prints: the metrics with their 95% CIs and, with ``--compare``, the
    other model's figures and the paired tests' rounded p-values."""
    from histotile.training.report import format_metric, format_p_value

    ci = m.get("ci", {})
    lines = [f"{m['model']} on {m['dataset']} ({m['split_source']}, n={m.get('n', '?')})"]
    for key in ("accuracy", "balanced_accuracy", "auc"):
        if m.get(key) is not None:
            bounds = ci.get(key)
            extra = (f"  95% CI {format_metric(bounds[0])}-{format_metric(bounds[1])}"
                     if bounds else "")
            lines.append(f"  {key:<18} {format_metric(m[key])}{extra}")
    if "comparison" in m:
        c = m["comparison"]
        acc, auc, mc = c.get("accuracy", {}), c.get("auc", {}), c.get("mcnemar", {})
        diff = acc.get("difference")
        lines.append(f"  vs {c.get('other_model')}: accuracy {format_metric(acc.get('b'))} "
                     f"(difference {'n/a' if diff is None else f'{diff:+.4f}'}, "
                     f"{mc.get('test')} {format_p_value(mc.get('p_value'))}); "
                     f"AUC {format_metric(auc.get('b'))} "
                     f"({auc.get('test')} {format_p_value(auc.get('p_value'))})")
    return lines

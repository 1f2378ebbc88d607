"""``histotile models list|show``: the bundled model zoo (and any model folder)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from histotile.models.card import ModelCard


@click.group("models")
def models() -> None:
    """List and show the bundled models."""


@models.command("list")
def list_cmd() -> None:
    """One line per bundled model: name, classes, patch size, mpp (default marked with *)."""
    from histotile.models import zoo
    from histotile.models.card import load_card

    for name in zoo.list_models():
        card = load_card(zoo.model_path(name))
        mark = "*" if name == zoo.DEFAULT_MODEL else " "
        held_out = card.metrics.test or card.metrics.validation or {}
        acc = held_out.get("accuracy")
        acc_text = f"  held-out acc {acc:.3f}" if isinstance(acc, (int, float)) else ""
        click.echo(f"{mark} {name:<24} {card.architecture.name:<10} {card.num_classes} classes  "
                   f"{card.patch_size} px  {card.mpp:g} µm/px{acc_text}")


@models.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the whole model card as JSON.")
def show(name: str, as_json: bool) -> None:
    """Show the model card of NAME (a bundled name, a folder or a URL)."""
    from histotile.models.card import load_card
    from histotile.models.loading import resolve_model

    folder = resolve_model(name)
    card = load_card(folder)
    if as_json:
        click.echo(json.dumps(card.to_dict(), indent=2))
        return
    arch = card.architecture
    lines = [
        f"name:         {card.name} (version {card.version})",
        f"folder:       {folder}",
        f"architecture: {arch.name} {json.dumps(arch.kwargs)}",
        f"input:        {card.patch_size} px at {card.mpp:g} µm/px, mean {card.input.mean}, "
        f"std {card.input.std}",
        f"stain:        {_stain_line(card)}",
        f"weights:      {card.weights.file} sha256 {card.weights.sha256}",
        "classes:      " + ", ".join(f"{c.name} {tuple(c.color)}" for c in card.classes),
    ]
    if card.training.data:
        lines.append(f"training:     {card.training.data}")
    if card.training.command:
        lines.append(f"command:      {card.training.command}")
    if card.metrics:
        lines.append(f"metrics:      {_summary(card.metrics.to_dict())}")
    if card.license:
        lines.append(f"license:      {card.license}")
    if card.notes:
        lines.append(f"notes:        {card.notes}")
    click.echo("\n".join(lines))


def _summary(metrics: dict) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            parts.append(f"{key} {value:.4g}")
        elif isinstance(value, dict):
            inner = {k: v for k, v in value.items() if isinstance(v, (int, float))}
            if inner:
                parts.append(f"{key}: " + ", ".join(f"{k} {v:.4g}" for k, v in inner.items()))
    return "; ".join(parts)


def _stain_line(card: ModelCard) -> str:
    """What ``predict --stain-norm auto`` does with this model (models/preprocess.py)."""
    stain = card.stain
    if stain.method == "none":
        return "none"
    source = "card reference" if stain.reference else "standard reference"
    if stain.in_training:
        return f"{stain.method} ({source}; training saw normalised patches, auto applies it)"
    return (f"{stain.method} ({source}; training saw patches as they are: auto does not "
            f"normalise, --stain-norm {stain.method} does)")

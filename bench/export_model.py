"""Export one ResNet-18 (2 classes, 96 px at 0.972 µm/px) for histotile, WSInfer and TIAToolbox.

The weights are a fixed-seed random init: the three tools do identical work on them (same
architecture, input size and class count), which is what a speed comparison needs; the
predictions themselves mean nothing. Written to ``OUT``:

- ``histotile/``: ``model.json`` card + ``weights.safetensors`` (architecture ``resnet18``, the
  torchvision state dict) — what ``histotile predict --model OUT/histotile`` loads;
- ``histotile-ts/``: the same card pointing at the TorchScript file (``format: torchscript``);
- ``wsinfer/``: ``model.ts`` (TorchScript) + ``config.json`` (WSInfer's model-config schema);
- ``tiatoolbox/``: ``weights.safetensors`` + ``model.json``; ``bench/anchors.py`` wraps them in a
  TIAToolbox ``ModelABC`` (normalisation in ``preproc``, as TIAToolbox feeds 0–255 NHWC).

    python bench/export_model.py OUT [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

PATCH_SIZE = 96
MPP = 0.972
CLASSES = [("benign", [40, 160, 60]), ("tumor", [220, 40, 40])]
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def build_resnet18(seed: int = 0) -> Any:
    """torchvision ResNet-18 with 2 outputs, random init from ``seed``, eval mode."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=len(CLASSES))
    return model.eval()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _card(weights: Path, fmt: str, seed: int) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "name": "bench-resnet18",
        "version": "0.0.0",
        "description": "Benchmark model: ResNet-18, random init (fixed seed). Not for diagnosis.",
        "task": "patch-classification",
        "architecture": {"name": "resnet18", "kwargs": {"small_input": False}},
        "classes": [{"name": n, "color": c} for n, c in CLASSES],
        "patch_size": PATCH_SIZE,
        "mpp": MPP,
        "input": {"mean": MEAN, "std": STD},
        "stain": {"method": "none", "reference": None},
        "weights": {"file": weights.name, "sha256": _sha256(weights), "format": fmt},
        "training": {"data": "none (random init)", "data_md5": None,
                     "command": f"python bench/export_model.py OUT --seed {seed}", "seed": seed},
        "metrics": {},
        "license": "CC0-1.0",
        "notes": "Identical weights are exported for WSInfer (TorchScript) and TIAToolbox.",
    }


def wsinfer_config() -> dict[str, Any]:
    """WSInfer model config (the schema it enforces: ``wsinfer_zoo/schemas/model-config``)."""
    return {
        "spec_version": "1.0",
        "architecture": "resnet18",
        "spacing_um_px": MPP,
        "patch_size_pixels": PATCH_SIZE,
        "num_classes": len(CLASSES),
        "class_names": [n for n, _ in CLASSES],
        "transform": [
            {"name": "Resize", "arguments": {"size": PATCH_SIZE}},
            {"name": "ToTensor"},
            {"name": "Normalize", "arguments": {"mean": MEAN, "std": STD}},
        ],
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def export_all(out: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the four folders under ``out`` (replacing them atomically); return their paths."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dirs = {k: tmp / k for k in ("histotile", "histotile-ts", "wsinfer", "tiatoolbox")}
    for d in dirs.values():
        d.mkdir(parents=True)
    model = build_resnet18(seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(dirs["histotile"] / "weights.safetensors"))
    shutil.copy(dirs["histotile"] / "weights.safetensors", dirs["tiatoolbox"])
    with warnings.catch_warnings():  # torch.jit is deprecated, but TorchScript is WSInfer's format
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
        scripted.save(str(dirs["wsinfer"] / "model.ts"))
    shutil.copy(dirs["wsinfer"] / "model.ts", dirs["histotile-ts"])
    _write_json(dirs["histotile"] / "model.json",
                _card(dirs["histotile"] / "weights.safetensors", "safetensors", seed))
    _write_json(dirs["histotile-ts"] / "model.json",
                _card(dirs["histotile-ts"] / "model.ts", "torchscript", seed))
    _write_json(dirs["tiatoolbox"] / "model.json",
                _card(dirs["tiatoolbox"] / "weights.safetensors", "safetensors", seed))
    _write_json(dirs["wsinfer"] / "config.json", wsinfer_config())
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return {k: out / k for k in dirs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output folder (replaced)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name, path in export_all(args.out, args.seed).items():
        print(f"{name:13s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

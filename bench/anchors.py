"""The anchor tools (WSInfer, TIAToolbox) as benchmark runners.

Imported by ``bench/run.py`` (main environment) to build each tool's command line and read its
outputs; also executed by TIAToolbox's own virtualenv python to run TIAToolbox::

    bench/.venvs/tiatoolbox/bin/python bench/anchors.py tiatoolbox --slide S \
        --model-dir M/tiatoolbox --out O --resolution 0.97396 [--mask MASK.png] [--workers 0]

Top-level imports are standard library only: this file runs in three different environments.
Install the tools with ``bash bench/anchors.sh install``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VENVS = Path(os.environ.get("BENCH_VENVS", HERE / ".venvs"))
MASK_DOWNSAMPLE = 8  # level-0 px per pixel of the TIAToolbox patch-centre mask


@dataclass
class ToolRun:
    """One tool invocation: command, environment, where its outputs go."""

    tool: str
    cmd: list[str]
    out: Path
    env: dict[str, str] = field(default_factory=dict)


def venv_python(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def available(name: str) -> bool:
    """Whether the anchor's virtualenv exists (``bash bench/anchors.sh install``)."""
    return venv_python(name).is_file()


# --------------------------------------------------------------------------- WSInfer
def wsinfer_env() -> dict[str, str]:
    """Private HOME with an empty model-zoo registry + HF offline (no 25 s hub retries)."""
    home = VENVS / "wsinfer-home"
    reg = home / ".wsinfer-zoo" / "wsinfer-zoo-registry.json"
    if not reg.is_file():
        reg.parent.mkdir(parents=True, exist_ok=True)
        reg.write_text('{"models": {}}\n')
    return {"HOME": str(home), "HF_HUB_OFFLINE": "1"}


def wsinfer_run(slide: Path, model_dir: Path, out: Path, batch_size: int,
                workers: int) -> ToolRun:
    """``wsinfer run`` on a folder holding only ``slide`` (WSInfer takes folders), or on
    ``slide`` itself when it is a folder of slides."""
    if slide.is_dir():
        wsi_dir = slide
    else:
        wsi_dir = out.parent / f"{out.name}-wsi"
        wsi_dir.mkdir(parents=True, exist_ok=True)
        link = wsi_dir / slide.name
        if not link.exists():
            link.symlink_to(slide.resolve())
    exe = VENVS / "wsinfer" / "bin" / "wsinfer"
    cmd = [str(exe), "run", "--wsi-dir", str(wsi_dir), "--results-dir", str(out),
           "--model-path", str(model_dir / "wsinfer" / "model.ts"),
           "--config", str(model_dir / "wsinfer" / "config.json"),
           "--batch-size", str(batch_size), "--num-workers", str(max(workers, 1))]
    return ToolRun("wsinfer", cmd, out, wsinfer_env())


def wsinfer_patches(out: Path) -> int:
    """Rows of WSInfer's model-outputs CSVs (one per patch), summed over its slides."""
    files = sorted((out / "model-outputs-csv").glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"no WSInfer output CSV under {out}")
    total = 0
    for path in files:
        with open(path, newline="") as f:
            total += sum(1 for _ in csv.reader(f)) - 1
    return total


def wsinfer_coords(out: Path) -> tuple[Any, int]:
    """WSInfer's patch grid: top-left level-0 coords (N,2) and the level-0 patch size."""
    import h5py

    files = sorted((out / "patches").glob("*.h5"))
    if not files:
        raise FileNotFoundError(f"no WSInfer patch file under {out}/patches")
    with h5py.File(files[0], "r") as f:
        return f["/coords"][()], int(f["/coords"].attrs["patch_size"])


def centre_mask(coords: Any, patch_size: int, dimensions: tuple[int, int], path: Path,
                downsample: int = MASK_DOWNSAMPLE) -> Path:
    """A PNG (level-0 / ``downsample``) with one pixel at each patch centre.

    TIAToolbox keeps every patch of its grid that touches the mask; with the same grid (same
    patch size and resolution) a pixel at each WSInfer patch centre selects exactly WSInfer's
    patches.
    """
    import numpy as np
    from PIL import Image

    w, h = (-(-d // downsample) for d in dimensions)
    mask = np.zeros((h, w), np.uint8)
    centres = (np.asarray(coords, np.float64) + patch_size / 2.0) // downsample
    cx = np.clip(centres[:, 0].astype(int), 0, w - 1)
    cy = np.clip(centres[:, 1].astype(int), 0, h - 1)
    mask[cy, cx] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)
    return path


# --------------------------------------------------------------------------- TIAToolbox
def tiatoolbox_run(slide: Path, model_dir: Path, out: Path, batch_size: int, workers: int,
                   mask: Path | None, resolution: float) -> ToolRun:
    cmd = [str(venv_python("tiatoolbox")), str(Path(__file__).resolve()), "tiatoolbox",
           "--slide", str(slide), "--model-dir", str(model_dir / "tiatoolbox"),
           "--out", str(out), "--batch-size", str(batch_size), "--workers", str(workers),
           "--resolution", repr(resolution)]
    if mask is not None:
        cmd += ["--mask", str(mask)]
    return ToolRun("tiatoolbox", cmd, out, {"MPLBACKEND": "Agg"})


def tiatoolbox_patches(out: Path) -> int:
    return int(json.loads((out / "result.json").read_text())["patches"])


def _tiatoolbox_model(model_dir: Path) -> Any:
    """The benchmark ResNet-18 as a TIAToolbox ``ModelABC`` (normalisation in ``preproc``)."""
    import numpy as np
    import torch
    import torchvision
    from safetensors.torch import load_file
    from tiatoolbox.models.models_abc import ModelABC

    card = json.loads((model_dir / "model.json").read_text())
    mean = np.asarray(card["input"]["mean"], np.float32) * 255.0
    std = np.asarray(card["input"]["std"], np.float32) * 255.0

    class BenchResNet(ModelABC):
        def __init__(self) -> None:
            super().__init__()
            self.net = torchvision.models.resnet18(weights=None,
                                                   num_classes=len(card["classes"]))
            self.net.load_state_dict(load_file(str(model_dir / card["weights"]["file"])))

        def forward(self, imgs: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.net(imgs), -1)

        @staticmethod
        def preproc(image: np.ndarray) -> np.ndarray:
            return (np.asarray(image, np.float32) - mean) / std

        @staticmethod
        def postproc(image: np.ndarray) -> np.ndarray:
            return np.argmax(image, axis=-1)

        @staticmethod
        def infer_batch(model: torch.nn.Module, batch_data: torch.Tensor, *,
                        device: str = "cpu") -> np.ndarray:
            x = batch_data.to(device=device, dtype=torch.float32).permute(0, 3, 1, 2)
            model.eval()
            with torch.inference_mode():
                return model(x.contiguous()).cpu().numpy()

    return BenchResNet().eval(), card


def _tiatoolbox_reader(slide: Path) -> Any:
    """OpenSlide reader for anything openslide opens, else TIAToolbox's own choice.

    TIAToolbox opens ``.svs`` with openslide itself, but sends a generic pyramidal ``.tif`` to
    its TIFF reader, which rejects it and falls back to reading the whole image into memory
    (``VirtualWSIReader``, no mpp). Handing it an ``OpenSlideWSIReader`` is what a user does.
    """
    import openslide
    from tiatoolbox.wsicore.wsireader import OpenSlideWSIReader

    if openslide.OpenSlide.detect_format(str(slide)):
        return OpenSlideWSIReader(slide)
    return slide


def run_tiatoolbox(args: argparse.Namespace) -> int:
    """TIAToolbox PatchPredictor over one WSI (runs inside TIAToolbox's venv)."""
    from tiatoolbox.models.engine.io_config import IOPatchPredictorConfig
    from tiatoolbox.models.engine.patch_predictor import PatchPredictor

    model, card = _tiatoolbox_model(Path(args.model_dir))
    size = int(card["patch_size"])
    ioconfig = IOPatchPredictorConfig(
        input_resolutions=[{"units": "mpp", "resolution": args.resolution}],
        patch_input_shape=(size, size), stride_shape=(size, size))
    out = Path(args.out)
    predictor = PatchPredictor(model=model, batch_size=args.batch_size,
                               num_workers=args.workers, device="cpu", verbose=False)
    kwargs: dict[str, Any] = {}
    if args.mask:
        kwargs["masks"] = [Path(args.mask)]
    else:
        kwargs["auto_get_mask"] = True
    result = predictor.run([_tiatoolbox_reader(Path(args.slide))], patch_mode=False,
                           ioconfig=ioconfig,
                           save_dir=out / "tia", overwrite=True, output_type="zarr",
                           return_probabilities=True, **kwargs)
    n = _count_tia_output(result)
    (out / "result.json").write_text(json.dumps({"patches": n, "outputs": str(result)}) + "\n")
    print(f"tiatoolbox: {n} patches")
    return 0


def _count_tia_output(result: Any) -> int:
    import zarr

    paths = list(result.values()) if isinstance(result, dict) else [result]
    root = zarr.open(str(paths[0]), mode="r")
    for key in ("coordinates", "predictions", "probabilities"):
        if key in root:
            return int(root[key].shape[0])
    raise KeyError(f"no predictions in {paths[0]} (keys: {list(root.keys())})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run an anchor tool (inside its venv)")
    sub = ap.add_subparsers(dest="tool", required=True)
    t = sub.add_parser("tiatoolbox")
    t.add_argument("--slide", required=True)
    t.add_argument("--model-dir", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--mask", default=None)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--workers", type=int, default=0)
    t.add_argument("--resolution", type=float, required=True, help="µm/px of the patch grid")
    args = ap.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return run_tiatoolbox(args)


if __name__ == "__main__":
    sys.exit(main())

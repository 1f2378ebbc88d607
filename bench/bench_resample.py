"""Speed and pixel error of patch resamplers against an exact area average.

``python3 bench/bench_resample.py [SLIDE]``: crops real H&E patches from SLIDE (default the
CMU-1-Small-Region sample) at several source sizes and shrinks them to a model size with
histotile's resampler (OpenCV INTER_AREA) and the two filters it replaces (PIL BOX, used by
``patches``; PIL BILINEAR without reducing gap, used by the training datasets). Error is against
the exact float64 area average (each source pixel weighted by its overlap with the output pixel).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from histotile.resample import resize_patch

CASES = [(96, 28), (240, 224), (300, 224), (448, 224), (512, 224), (187, 96)]
N_PATCHES = 16


def exact(img: np.ndarray, size: int) -> np.ndarray:
    def weights(n: int, m: int) -> np.ndarray:
        s = n / m
        k = np.arange(m)[:, None]
        j = np.arange(n)[None, :]
        return np.clip(np.minimum((k + 1) * s, j + 1) - np.maximum(k * s, j), 0, None) / s

    wy, wx = weights(img.shape[0], size), weights(img.shape[1], size)
    return np.einsum("ih,hwc,jw->ijc", wy, img.astype(np.float64), wx, optimize=True)


def pil(method: Image.Resampling, gap: float | None = 2.0):
    def run(img: np.ndarray, size: int) -> np.ndarray:
        return np.asarray(Image.fromarray(img).resize((size, size), method, reducing_gap=gap))
    return run


def main() -> None:
    default = Path(__file__).resolve().parents[1] / "tests/data/slides/CMU-1-Small-Region.svs"
    slide_path = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    import openslide

    slide = openslide.OpenSlide(str(slide_path))
    w, h = slide.dimensions
    rng = np.random.default_rng(0)
    methods = {"histotile (cv2 INTER_AREA)": resize_patch,
               "PIL BOX (old patches.py)": pil(Image.Resampling.BOX, None),
               "PIL BILINEAR (old datasets.py)": pil(Image.Resampling.BILINEAR, None)}
    print(f"{'source->size':>13} {'method':<32} {'ms/patch':>9} {'max err':>8} {'mean err':>9}")
    for side, size in CASES:
        xs = rng.integers(0, w - side, N_PATCHES)
        ys = rng.integers(h // 4, 3 * h // 4 - side, N_PATCHES)
        crops = [np.asarray(slide.read_region((int(x), int(y)), 0, (side, side)).convert("RGB"))
                 for x, y in zip(xs, ys, strict=True)]
        refs = [exact(c, size) for c in crops]
        for name, fn in methods.items():
            fn(crops[0], size)  # warm up (imports)
            t0 = time.perf_counter()
            for _ in range(5):
                outs = [fn(c, size) for c in crops]
            ms = (time.perf_counter() - t0) / (5 * len(crops)) * 1e3
            err = np.stack([np.abs(o.astype(np.float64) - r) for o, r in zip(outs, refs,
                                                                           strict=True)])
            print(f"{side:>6}->{size:<6} {name:<32} {ms:9.3f} {err.max():8.2f} {err.mean():9.3f}")


if __name__ == "__main__":
    main()

"""Peak memory of ``histotile predict`` does not grow with slide size (slow: ~2 min on 2 cores).

Two GENERATED pyramidal JPEG TIFFs of the same kind, mosaics of real CMU-1-Small-Region pixels
(``bench/make_slide.py``), 8k² and 20k² level-0 px, cached in pytest's cache folder. Each is
predicted in a fresh child process and its peak RSS read with ``getrusage(RUSAGE_CHILDREN)``.
Holding the 20k slide's level 0 would take 1.2 GB; the big run may use only a small fraction of
that more than the small one (what does grow is the tissue mask at 8 µm/px, 1/256 of the
level-0 pixels, and the per-patch coordinate/label arrays).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_untrained_model

ROOT = Path(__file__).resolve().parents[1]
MAKE_SLIDE = ROOT / "bench" / "make_slide.py"
BIG, SMALL = 20_000, 8_000
MAX_EXTRA_FRACTION = 0.15  # of the big slide's level-0 RGB bytes

_MEASURE = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _make_slide_module():
    spec = importlib.util.spec_from_file_location("histotile_bench_make_slide", MAKE_SLIDE)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def slides(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           cmu_small: Path) -> dict[int, Path]:
    """generated-mosaic-<size>.tif for both sizes (real CMU pixels), cached across runs when
    pytest's cache is on (``-p no:cacheprovider``: made in a temporary folder)."""
    make = _make_slide_module()
    if getattr(request.config, "cache", None) is not None:
        cache = Path(request.config.cache.mkdir("histotile-generated-slides"))
    else:
        cache = tmp_path_factory.mktemp("histotile-generated-slides")
    out = {}
    for size in (SMALL, BIG):
        path = cache / f"generated-mosaic-{size}-seed0.tif"
        if not path.exists():
            make.make_benchmark_slide(path, size=size, seed=0)
        out[size] = path
    return out


def _peak_rss_mb(slide: Path, out: Path, model: Path) -> float:
    cmd = [sys.executable, "-c", _MEASURE, sys.executable, "-m", "histotile", "-q", "predict",
           str(slide), "-o", str(out), "--model", str(model)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    code, kb = res.stdout.split()
    assert int(code) == 0, res.stderr
    return int(kb) / 1024


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_slide_size(slides: dict[int, Path],
                                                   tmp_path: Path) -> None:
    model = make_untrained_model(tmp_path / "generated-untrained-28")
    peak = {size: _peak_rss_mb(path, tmp_path / "out", model) for size, path in slides.items()}
    runs = {size: json.loads((tmp_path / "out" / path.stem / "run.json").read_text())
            for size, path in slides.items()}
    assert runs[BIG]["patches"] > 4 * runs[SMALL]["patches"] > 0
    slide_mb = BIG * BIG * 3 / 2**20
    extra = peak[BIG] - peak[SMALL]
    print(f"\npeak RSS: {SMALL}² {peak[SMALL]:.0f} MB ({runs[SMALL]['patches']} patches), "
          f"{BIG}² {peak[BIG]:.0f} MB ({runs[BIG]['patches']} patches); +{extra:.0f} MB "
          f"vs {slide_mb:.0f} MB for the big slide's level 0")
    assert extra < MAX_EXTRA_FRACTION * slide_mb

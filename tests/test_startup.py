"""Start-up: what a predict process imports before its work, and the ``first_batch_s`` timing.

Each predict runs in a fresh interpreter (a subprocess), since ``sys.modules`` of the test
process already holds everything. Speed is never asserted here; ``bench/startup.py`` measures it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT

from histotile.inference.provenance import StageTimer, process_age
from histotile.models.card import ClassInfo, ModelCard

BUNDLED = "pathmnist-smallcnn"


def _resnet18_folder(folder: Path, fmt: str) -> Path:
    """A ResNet-18 model folder (seeded random weights, 32 px at 4 µm/px, small-input stem) made
    with torchvision in this process: safetensors of its state dict, or its TorchScript trace."""
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None, num_classes=2)
    module.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    module.maxpool = torch.nn.Identity()
    module.eval()
    folder.mkdir(parents=True)
    if fmt == "safetensors":
        wfile = folder / "weights.safetensors"
        save_file(module.state_dict(), str(wfile))
    else:
        wfile = folder / "model.pt"
        torch.jit.trace(module, torch.zeros(1, 3, 32, 32)).save(str(wfile))
    ModelCard(
        name=f"test-resnet18-{fmt}", version="0",
        architecture={"name": "resnet18", "kwargs": {"small_input": True}},
        classes=[ClassInfo("a", (200, 40, 40)), ClassInfo("b", (40, 40, 200))],
        patch_size=32, mpp=4.0, input={"mean": [0.7, 0.5, 0.7], "std": [0.2, 0.25, 0.2]},
        weights={"file": wfile.name, "sha256": hashlib.sha256(wfile.read_bytes()).hexdigest(),
                 "format": fmt},
        stain={"method": "none", "reference": None},
    ).save(folder)
    return folder


_PROBE = """
import json, sys
from histotile.cli import main
slide, out = sys.argv[1], sys.argv[2]
found = {}
for i, model in enumerate(sys.argv[3:]):
    try:
        main(["-q", "predict", slide, "--model", model, "-o", f"{out}/{i}"])
    except SystemExit as exc:
        assert not exc.code, (model, exc.code)
    found[model] = sorted(m for m in ("torchvision", "torch._dynamo", "sklearn", "matplotlib",
                                      "dask", "pandas") if m in sys.modules)
print("FOUND", json.dumps(found))
"""


@pytest.mark.filterwarnings("ignore:.*torch.jit.trace:FutureWarning")
def test_predict_does_not_import_torchvision(cmu_small: Path, tmp_path: Path) -> None:
    """Regression (issue 19): a ResNet model built torchvision in every predict process, and
    torchvision's import pulls torch._dynamo (seconds before the first batch). The bundled
    smallcnn, a ResNet-18 from a torchvision state dict (safetensors) and a TorchScript ResNet-18
    now predict without torchvision, dynamo, scikit-learn, matplotlib, dask or pandas."""
    models = [BUNDLED, str(_resnet18_folder(tmp_path / "st", "safetensors")),
              str(_resnet18_folder(tmp_path / "ts", "torchscript"))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(cmu_small), str(tmp_path / "out"),
                           *models], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("FOUND "))
    found = json.loads(line[len("FOUND "):])
    assert found == {m: [] for m in models}, found
    for i in range(len(models)):  # each run finished and wrote its predictions
        assert (tmp_path / "out" / str(i) / cmu_small.stem / "predictions.csv").is_file()
    # only the process's first item paid the start-up: later ones carry no first_batch_s
    firsts = [json.loads((tmp_path / "out" / str(i) / cmu_small.stem / "run.json").read_text())
              ["timings"].get("first_batch_s") for i in range(len(models))]
    assert firsts[0] is not None and firsts[0] > 0 and firsts[1:] == [None, None], firsts


def test_first_batch_s_is_counted_from_the_process_start(cmu_small: Path,
                                                         tmp_path: Path) -> None:
    """run.json ``timings.first_batch_s`` of a CLI predict: positive, and no more than the
    wall time the parent saw around the whole process (so it starts at the process's start, not
    at some later point, and is not the whole run either: the outputs come after it)."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "import time; time.sleep(1.0)\n"
                           "from histotile.cli import main\nmain()", "-q", "predict",
                           str(cmu_small), "-o", str(out)], capture_output=True, text=True,
                          env=env, timeout=600)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads((out / cmu_small.stem / "run.json").read_text())
    timings = run["timings"]
    # the 1 s sleep before histotile was imported is inside it: counted from process start
    assert 1.0 <= timings["first_batch_s"] <= wall, (timings, wall)
    # the CPU seconds up to the same moment (threads included, so not bounded by the wall)
    assert timings["first_batch_cpu_s"] > 0, timings
    # and the outputs were written after it
    assert timings["first_batch_s"] + timings["export"] <= wall + 0.05


def test_process_age_of_a_fresh_process() -> None:
    code = ("import time; time.sleep(0.5)\n"
            "from histotile.inference.provenance import process_age\nprint(process_age())")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    age = float(out.stdout)
    assert 0.5 <= age <= wall + 0.02, (age, wall)  # /proc's clock ticks are 10 ms


def test_process_age_without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where /proc cannot be read, psutil gives the age (or None without psutil)."""
    import builtins

    real_open = builtins.open

    def no_proc(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path) in ("/proc/self/stat", "/proc/uptime"):  # psutil reads /proc/<pid>/
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    psutil = pytest.importorskip("psutil")
    expected = time.time() - psutil.Process().create_time()
    age = process_age()
    assert age is not None and abs(age - expected) < 1.0
    monkeypatch.setitem(sys.modules, "psutil", None)
    assert process_age() is None


def test_stage_timer_records_first_batch_once_per_process(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    import histotile.inference.provenance as provenance

    monkeypatch.setattr(provenance, "_FIRST_BATCH_SEEN", [])
    first, second = StageTimer(), StageTimer()
    first.first_batch()
    first.first_batch()  # later batches of the same item change nothing
    second.first_batch()
    assert first.rounded()["first_batch_s"] > 0 and first.rounded()["first_batch_cpu_s"] > 0
    assert not {"first_batch_s", "first_batch_cpu_s"} & set(second.rounded())


def test_bench_startup_parses_importtime() -> None:
    """bench/startup.py's ``-X importtime`` summary: self times summed per top package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_startup", ROOT / "bench/startup.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    text = ("import time: self [us] | cumulative | imported package\n"
            "import time:       500 |        500 |   torch._C\n"
            "import time:      1500 |       2000 | torch\n"
            "import time:       700 |        700 | zarr\n"
            "garbage line\n")
    assert bench.importtime_top(text, 5) == [("torch", 0.002), ("zarr", 0.0007)]


@pytest.mark.slow
def test_bench_startup_runs_and_reports(tmp_path: Path) -> None:
    """bench/startup.py end to end with one run: the figures it prints come from real runs."""
    out = tmp_path / "startup.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/startup.py"), "-n", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    (model,) = result["models"]
    assert model["model"] == BUNDLED and model["runs"] == 1
    assert 0 < model["first_batch_median_s"] <= model["wall_median_s"]
    assert model["first_batch_cpu_median_s"] > 0 and model["cpu_median_s"] > 0
    assert "torch" in model["heavy_modules"] and "torchvision" not in model["heavy_modules"]
    assert dict(model["importtime_top_s"]).get("torch", 0) > 0
    assert "first batch median" in proc.stdout

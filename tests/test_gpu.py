"""On a CUDA device (``pytest -m gpu``; skipped without one): the engine's CUDA path against the
CPU, and the batch queue's overlap with real streams and events."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_untrained_model, read_csv, run_cli

from histotile import engine
from histotile.inflight import CudaDevice, InFlight

pytestmark = pytest.mark.gpu

#: bf16 autocast keeps ~3 significant digits; softmax outputs of an untrained net differ by less
BF16_ATOL = 2e-2
#: fp32 on CUDA (cuDNN may use TF32 convolutions) against fp32 on the CPU
FP32_ATOL = 5e-3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_untrained_model(tmp_path_factory.mktemp("m") / "generated-untrained-28")


def _batches(n: int = 9, size: int = 64, seed: int = 0, pin: bool = False):
    g = torch.Generator().manual_seed(seed)
    for k in range(n):
        x = torch.randint(0, 256, (size - (k == n - 1) * 7, 28, 28, 3), dtype=torch.uint8,
                          generator=g)
        yield np.arange(k * size, k * size + len(x)), x.pin_memory() if pin else x


@pytest.mark.parametrize(("amp", "atol"), [(True, BF16_ATOL), (False, FP32_ATOL)])
def test_issue19_cuda_probabilities_match_cpu(model_dir: Path, amp: bool, atol: float) -> None:
    from histotile.models.loading import load_model

    cpu = list(engine.classify(_batches(), load_model(model_dir, "cpu"), torch.device("cpu")))
    cuda_model = load_model(model_dir, "cuda")
    stats = engine.EngineStats()
    gpu = list(engine.classify(_batches(pin=True), cuda_model, torch.device("cuda"), amp=amp,
                               stats=stats))
    assert len(gpu) == len(cpu) == stats.batches
    for (gi, gp), (ci, cp) in zip(gpu, cpu, strict=True):
        np.testing.assert_array_equal(gi, ci)
        assert gp.dtype == np.float32 and np.allclose(gp.sum(axis=1), 1, atol=1e-3)
        np.testing.assert_allclose(gp, cp, atol=atol)


def test_issue19_fetch_does_not_wait_for_the_next_batch() -> None:
    """The old path copied batch k back synchronously after queuing forward(k+1), so fetching
    k waited for k+1 too. Now, with a forward pass that keeps the GPU busy for a while, batch
    k+1 is still running when batch k's outputs are in the host's hands."""
    dev = torch.device("cuda")
    weight = torch.randn(4096, 4096, device=dev) / 64.0  # keeps y's scale: no overflow

    def slow(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = weight
        for _ in range(40):  # ~5 TFLOP in fp32: tens of ms on any current GPU
            y = y @ weight
        return (x.float().mean(dim=(1, 2)) + y[0, 0] * 0,)

    queue = InFlight(CudaDevice(dev), depth=2)
    for k in range(2):
        queue.launch(np.array([k]), torch.full((1, 4, 4, 3), k, dtype=torch.uint8).pin_memory(),
                     slow)
    idx, (out,), _ = queue.fetch()
    still_running = not queue.queue[0].event.query()
    assert idx.tolist() == [0] and out.shape == (1, 3) and float(out[0, 0]) == 0.0
    assert still_running, "fetching batch 0 waited for batch 1"
    idx, (out,), _ = queue.fetch()
    assert idx.tolist() == [1] and float(out[0, 0]) == 1.0


@pytest.mark.slow
def test_issue19_cuda_predict_matches_cpu_predict(tmp_path: Path, cmu_small: Path,
                                                  model_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A whole predict on the CMU slide on CUDA (reader processes, pinned ring, queued batches)
    gives the CPU run's patches and, within bf16 tolerance, its probabilities."""
    rows = {}
    for device in ("cpu", "cuda"):
        code, _, err = run_cli(["-q", "predict", str(cmu_small), "-o", str(tmp_path / device),
                                "--model", str(model_dir), "--device", device], capsys)
        assert code == 0, err
        folder = tmp_path / device / cmu_small.stem
        run = json.loads((folder / "run.json").read_text())
        assert run["device"].startswith(device)
        rows[device] = read_csv(folder / "predictions.csv")
    cpu, gpu = rows["cpu"], rows["cuda"]
    assert len(cpu) == len(gpu) > 0
    keys = [k for k in cpu[0] if k.startswith("prob_")]
    assert keys
    assert [(r["minx"], r["miny"]) for r in cpu] == [(r["minx"], r["miny"]) for r in gpu]
    a = np.array([[float(r[k]) for k in keys] for r in cpu])
    b = np.array([[float(r[k]) for k in keys] for r in gpu])
    np.testing.assert_allclose(b, a, atol=BF16_ATOL)

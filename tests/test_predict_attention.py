"""``histotile predict --attention`` on the real CMU slide with a tiny ViT trained here.

The ViT is trained for 2 steps on the real PathMNIST subset (no stain normalisation), so the
stitched ``attention`` image can be checked against the head-mean CLS attention of single patches
read alone (read_region + resize), and validated as NGFF.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import read_csv, real_data, run_cli

from histotile.cli import main


@pytest.fixture(scope="module")
def vit_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``vit`` model folder: 2 training steps on the real PathMNIST subset."""
    from histotile import train

    npz = real_data("patches/pathmnist_train_first1000.npz")
    out = tmp_path_factory.mktemp("vit-model") / "vit"
    return train(npz, out, arch="vit", epochs=1, batch_size=32, max_steps=2, device="cpu",
                 val_fraction=0.2, progress=False, n_boot=0, plots=False)


@pytest.fixture(scope="module")
def attn_out(tmp_path_factory: pytest.TempPathFactory, cmu_small: Path, vit_model: Path
             ) -> Path:
    """One ``predict --attention`` run with the tiny ViT; the slide folder."""
    out = tmp_path_factory.mktemp("predict-attention")
    try:
        main(["-q", "predict", str(cmu_small), "-o", str(out), "--model", str(vit_model),
              "--device", "cpu", "--attention"])
    except SystemExit as exc:
        assert exc.code in (0, None), f"predict exited {exc.code}"
    return out / "CMU-1-Small-Region"


def test_attention_image_validates_and_overlay_exists(attn_out: Path) -> None:
    import zarr
    from ome_zarr_models.v04 import Image
    from PIL import Image as PILImage

    root = zarr.open_group(str(attn_out / "heatmap.ome.zarr"), mode="r", zarr_format=2)
    Image.from_zarr(root)
    image = Image.from_zarr(root["attention"])
    assert [c.label for c in image.attributes.omero.channels] == [
        "CLS attention (last block, head mean)"]
    assert "gradcam" not in root
    run = json.loads((attn_out / "run.json").read_text())
    assert run["attention"]["image"] == "heatmap.ome.zarr/attention"
    assert run["attention"]["cam_scale"] == pytest.approx(
        dict(root["attention"].attrs["histotile"])["cam_scale"])
    assert run["fingerprint"]["attention"] is True
    assert run["fingerprint"]["cam_resolution"] is None
    assert run["fingerprint"]["gradcam"] is False
    assert "attention_overlay.png" in run["files"]
    png = PILImage.open(attn_out / "attention_overlay.png")
    assert png.size[0] > 300 and png.size[1] > 300
    assert "gradcam_mean" not in read_csv(attn_out / "predictions.csv")[0]


def _attention_alone(run: dict, row: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """(head-mean CLS attention (g, g), probs) of one patch read alone (no stain method)."""
    import torch

    from histotile.attention import cls_attention
    from histotile.models.loading import load_model, preprocess
    from histotile.patches import resize_patch
    from histotile.slide import open_slide

    assert run["model"]["card"]["stain"] is None or run["model"]["card"]["stain"].get(
        "method") in (None, "none")
    x, y, w, h = (int(row[k]) for k in ("minx", "miny", "width", "height"))
    with open_slide(run["slide"]) as slide:
        pixels = slide.read_region((x, y), 0, (w, h))
    patch = np.array(resize_patch(pixels, run["grid"]["patch_size"])[None])
    loaded = load_model(run["model"]["folder"], "cpu")
    per_head, probs = cls_attention(loaded.module,
                                    preprocess(torch.from_numpy(patch), loaded.card, "cpu"))
    return per_head.mean(dim=1)[0].numpy(), probs[0].numpy()


def test_stitched_map_at_a_patch_equals_single_patch_attention(attn_out: Path) -> None:
    from histotile.resample import upsample_maps as upsample_cams
    from histotile.stitch import level0_to_heatmap_pixel, read_gradcam, read_heatmap

    run = json.loads((attn_out / "run.json").read_text())
    rows = read_csv(attn_out / "predictions.csv")
    values, cover, attrs = read_gradcam(attn_out / "heatmap.ome.zarr", name="attention")
    _, heat_attrs = read_heatmap(attn_out / "heatmap.ome.zarr")
    block = run["attention"]["pixels_per_cell"]
    assert attrs["patch_footprint_px"] == block  # no overlap: a patch is exactly its block
    scale = attrs["cam_scale"]
    assert scale > 0 and values[cover].std() > 0  # a real, varying map
    names = [c["name"] for c in run["model"]["card"]["classes"]]
    for row in (rows[0], rows[-1]):
        raw, probs = _attention_alone(run, row)
        assert raw.ndim == 2 and raw.shape[0] == raw.shape[1] and raw.sum() <= 1 + 1e-5
        np.testing.assert_allclose([float(row[f"prob_{n}"]) for n in names], probs, atol=2e-5)
        col, r = level0_to_heatmap_pixel(int(row["minx"]), int(row["miny"]), heat_attrs)
        got = values[r * block:(r + 1) * block, col * block:(col + 1) * block]
        assert cover[r * block:(r + 1) * block, col * block:(col + 1) * block].all()
        want = np.minimum(upsample_cams(raw[None], block)[0], scale)
        np.testing.assert_allclose(got, want, atol=scale / 255 / 2 + 1e-4 * scale)


def test_attention_is_in_the_fingerprint(vit_model: Path) -> None:
    from histotile.inference import fingerprint_for
    from histotile.options import PredictOptions

    base = PredictOptions(model=str(vit_model), device="cpu")
    prints = [fingerprint_for(base.replace(**kw)) for kw in
              ({}, {"attention": True}, {"attention": True, "cam_resolution": 16})]
    assert len({json.dumps(f, sort_keys=True) for f in prints}) == 3


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_attention_with_a_cnn_is_one_line(tmp_path: Path, cmu_small: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from histotile.models import zoo

    assert zoo.DEFAULT_MODEL in zoo.list_models(), "the bundled model is missing"
    code, _, err = run_cli(["-q", "predict", str(cmu_small), "-o", str(tmp_path),
                            "--attention"], capsys)
    assert code != 0 and "smallcnn" in _one_error_line(err)
    assert not (tmp_path / "CMU-1-Small-Region").exists()


def test_attention_with_gradcam_is_one_line(tmp_path: Path, cmu_small: Path, vit_model: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["-q", "predict", str(cmu_small), "-o", str(tmp_path), "--model",
                            str(vit_model), "--attention", "--gradcam"], capsys)
    assert code != 0 and "--gradcam" in _one_error_line(err)

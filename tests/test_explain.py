"""Grad-CAM (histotile.explain) against the grad-cam package on real patches, stitching, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import real_data


# --------------------------------------------------------------------------- real data
def kaggle_folder() -> Path:
    return real_data("patches/pcam-kaggle")


def kaggle_patches() -> tuple[np.ndarray, np.ndarray]:
    """The 15 real 96 px Kaggle PCam patches (uint8 (15, 96, 96, 3)) and labels."""
    from PIL import Image

    folder = kaggle_folder()
    with open(folder / "train_labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    x = np.stack([np.asarray(Image.open(folder / "train" / f"{r['id']}.tif").convert("RGB"))
                  for r in rows])
    return x, np.array([int(r["label"]) for r in rows])


def pathmnist_patches(n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    with np.load(real_data("patches/pathmnist_train_first1000.npz")) as z:
        return z["train_images"][:n], z["train_labels"][:n, 0]


def as_input(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    return (t - 0.5) / 0.25


def pcam_h5(folder: Path) -> Path:
    """PCam-layout train x/y HDF5 built from the 15 real Kaggle patches (DERIVED data)."""
    import h5py

    x, y = kaggle_patches()
    xp = folder / "camelyonpatch_level_2_split_train_x.h5"
    with h5py.File(xp, "w") as f:
        f["x"] = x
    with h5py.File(folder / "camelyonpatch_level_2_split_train_y.h5", "w") as f:
        f["y"] = y.astype(np.uint8).reshape(-1, 1, 1, 1)
    return xp


@pytest.fixture(scope="module")
def pcam_model(tmp_path_factory) -> Path:
    """A smallcnn trained by histotile (2 epochs) on the PCam-layout HDF5 derived from the real
    Kaggle patches: a PCam-style model folder (barely trained: 10 patches)."""
    from histotile import train

    folder = tmp_path_factory.mktemp("pcam")
    h5 = pcam_h5(folder)
    return train(h5, folder / "model", arch="smallcnn", epochs=2, batch_size=16,
                 val_fraction=0.34, device="cpu", progress=False, seed=0)


def seeded_model(arch: str, classes: int, patch: int) -> torch.nn.Module:
    torch.manual_seed(0)
    from histotile.models.architectures import build_model

    return build_model(arch, classes, patch).eval()


# --------------------------------------------------------------------------- vs grad-cam
@pytest.mark.parametrize("arch,data,target", [("resnet18", "pcam", "predicted"),
                                               ("smallcnn", "pathmnist", 1)])
def test_maps_equal_the_grad_cam_package(arch, data, target):
    from pytorch_grad_cam import GradCAM as LibraryCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from histotile.gradcam import GradCAM
    from histotile.models.architectures import default_cam_layer

    x, _ = kaggle_patches() if data == "pcam" else pathmnist_patches(16)
    x = x[:4] if data == "pcam" else x
    classes = 2 if data == "pcam" else 9
    model = seeded_model(arch, classes, x.shape[1])
    xt = as_input(x)
    layer = default_cam_layer(arch)
    ours, probs = GradCAM(model, layer)(xt, target=target)
    lib = LibraryCAM(model, [model.get_submodule(layer)])
    targets = None if target == "predicted" else [ClassifierOutputTarget(target)] * len(x)
    ref = lib(xt, targets=targets)
    assert ours.shape == ref.shape == (len(x), x.shape[1], x.shape[2])
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4)
    np.testing.assert_allclose(probs.numpy(), torch.softmax(lib.outputs, 1).detach().numpy(),
                               atol=1e-5)


def test_batch_equals_per_patch_and_model_is_left_as_found():
    from histotile.gradcam import GradCAM

    x, _ = kaggle_patches()
    model = seeded_model("resnet18", 2, 96)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cam = GradCAM(model, "layer4")
    with torch.inference_mode():  # as inside the predict engine: an inference tensor
        xt = as_input(x[:6])
        batch, probs = cam(xt, normalise="none", size=0)
    singles = torch.cat([cam(xt[i:i + 1], normalise="none", size=0)[0] for i in range(6)])
    np.testing.assert_allclose(batch.numpy(), singles.numpy(), rtol=1e-4, atol=1e-7)
    assert batch.shape == (6, 3, 3) and (batch >= 0).all()
    assert model.training and torch.is_grad_enabled()
    assert all(p.grad is None for p in model.parameters())
    assert not model.layer4._forward_hooks  # noqa: SLF001 - checks the hook was removed
    for k, v in model.state_dict().items():  # eval() during the call: BN stats untouched
        assert torch.equal(v, before[k]), k


def test_low_precision_autocast_gives_float32_maps_close_to_fp32():
    """CPU bf16 autocast stands in for CUDA autocast (no GPU here): maps come back float32."""
    from histotile.gradcam import GradCAM

    x = as_input(pathmnist_patches(8)[0])
    model = seeded_model("smallcnn", 9, 28)
    cam = GradCAM(model, "features.2")
    ref, _ = cam(x, target=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, probs = cam(x, target=3)
    assert low.dtype == probs.dtype == torch.float32
    assert float((low - ref).abs().mean()) < 0.01


def test_raw_map_mean_is_the_logit_for_a_pooled_head():
    """For a GAP + linear head, the pre-ReLU Grad-CAM mean is (logit - bias) / (h*w): checks the
    gradient weights; a ReLU'd map is at least that mean."""
    from histotile.gradcam import GradCAM

    x, _ = kaggle_patches()
    model = seeded_model("resnet18", 2, 96)
    xt = as_input(x[:4])
    cams, _ = GradCAM(model, "layer4")(xt, target=1, normalise="none", size=0)
    logits = model(xt).detach()
    expected = (logits[:, 1] - model.fc.bias[1].detach()) / 9
    assert (cams.mean(dim=(1, 2)) >= expected - 1e-6).all()
    assert cams.mean(dim=(1, 2)).sum() > 0


def test_bad_layer_and_target_raise_clear_errors():
    from histotile.errors import InvalidArgumentError
    from histotile.gradcam import GradCAM

    model = seeded_model("smallcnn", 9, 28)
    with pytest.raises(InvalidArgumentError, match="no layer"):
        GradCAM(model, "layer4")
    x = as_input(pathmnist_patches(2)[0])
    with pytest.raises(InvalidArgumentError, match="does not fit"):
        GradCAM(model, "features.2")(x, target=9)


# --------------------------------------------------------------------------- statistics
def test_centre_mass_on_hand_made_maps():
    from histotile.gradcam import centre_mass

    maps = np.zeros((3, 96, 96), np.float32)  # generated edge cases
    maps[0, 32:64, 32:64] = 1  # all inside
    maps[1, :, :] = 1  # uniform: the area share
    maps[2, 0:10, 0:10] = 5  # all outside
    share = centre_mass(maps)
    np.testing.assert_allclose(share, [1.0, (32 / 96) ** 2, 0.0])
    # the same map at the layer's 3 x 3 grid: the middle cell is the centre region
    coarse = np.zeros((1, 3, 3), np.float32)
    coarse[0, 1, 1], coarse[0, 0, 0] = 3, 1
    assert centre_mass(coarse)[0] == pytest.approx(0.75)
    assert np.isnan(centre_mass(np.zeros((1, 96, 96))))[0]


# --------------------------------------------------------------------------- stitching
def _stitch(tmp_path: Path, indices: np.ndarray, grid_shape: tuple[int, int], raw: np.ndarray,
            stride: int, patch: int, res: int, scale: float | None = None, order=None):
    from histotile.stitch import CamStitcher, HeatmapWriter, read_gradcam

    attrs = {"origin_level0": [0, 0], "stride_level0": stride, "patch_size_level0": patch,
             "slide_mpp": 0.972}
    path = tmp_path / "heatmap.ome.zarr"
    writer = HeatmapWriter(path, grid_shape, indices, ["normal", "tumor"],
                           [(0, 255, 0), (255, 0, 0)], attrs)
    st = CamStitcher(writer, indices, stride_level0=stride, patch_size_level0=patch,
                     cam_resolution=res, class_name="tumor", cam_scale=scale)
    order = np.arange(len(indices)) if order is None else order
    for part in np.array_split(order, 3):
        writer.write(indices[part], np.full((len(part), 2), 0.5, np.float32))
        st.add(indices[part], raw[part])
    st.close()
    writer.close()
    return path, read_gradcam(path), st


def _real_raw_cams() -> np.ndarray:
    from histotile.gradcam import GradCAM

    x, _ = kaggle_patches()
    model = seeded_model("resnet18", 2, 96)
    cams, _ = GradCAM(model, "layer4")(as_input(x[:6]), target=1, normalise="none", size=0)
    return cams.numpy()


def test_stitched_map_at_a_patch_equals_its_cam(tmp_path):
    """No overlap: each grid cell of the stitched map is the patch's CAM resampled to
    --cam-resolution (8 level-0 px per pixel → 12 x 12), and the store validates as NGFF 0.4."""
    import zarr
    from ome_zarr_models.v04 import Image

    from histotile.resample import upsample_maps as upsample_cams

    raw = _real_raw_cams()
    indices = np.array([(c, r) for r in range(2) for c in range(3)], np.int64)
    path, (cam, cover, attrs), _ = _stitch(tmp_path, indices, (4, 2), raw, 96, 96, 8)
    expected = upsample_cams(raw, 12)
    scale = attrs["cam_scale"]
    assert scale == pytest.approx(expected.max(), rel=1e-5)
    for k, (c, r) in enumerate(indices.tolist()):
        got = cam[r * 12:(r + 1) * 12, c * 12:(c + 1) * 12]
        np.testing.assert_allclose(got, expected[k], atol=scale / 255 / 2 + 1e-6)
    assert cover[:, :36].all() and not cover[:, 36:].any()  # column 3 was never predicted
    root = zarr.open_group(str(path), mode="r", zarr_format=2)
    Image.from_zarr(root["gradcam"])
    tf = root["gradcam"].attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert tf[0]["scale"] == pytest.approx([1.0, 8 * 0.972, 8 * 0.972])


def test_overlapping_patches_are_averaged_with_a_given_scale(tmp_path):
    from histotile.resample import upsample_maps as upsample_cams

    raw = _real_raw_cams()
    indices = np.array([(c, r) for r in range(2) for c in range(3)], np.int64)
    # stride 48, patch 96: each footprint (12 px) spans 2 x 2 blocks of 6 px
    scale = float(raw.max()) * 0.8  # given: brighter pixels saturate
    _, (cam, cover, attrs), st = _stitch(tmp_path, indices, (3, 2), raw, 48, 96, 8, scale,
                                         order=np.array([3, 4, 5, 0, 1, 2]))
    total, count = np.zeros((18, 24)), np.zeros((18, 24))  # footprints run past the grid
    for m, (c, r) in zip(upsample_cams(raw, 12), indices.tolist(), strict=True):
        total[r * 6:r * 6 + 12, c * 6:c * 6 + 12] += m
        count[r * 6:r * 6 + 12, c * 6:c * 6 + 12] += 1
    reference = np.minimum(total / count, scale)[:12, :18]
    np.testing.assert_allclose(cam, reference, atol=scale / 255 / 2 + 1e-6)
    assert cover.all() and attrs["cam_scale_source"] == "given"
    assert st.peak_open_blocks <= len(st.expected)


# --------------------------------------------------------------------------- CLI
def run_cli(args: list[str]) -> int:
    """Exit status of ``histotile ARGS`` run in-process through the console entry point."""
    from histotile.cli import main

    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_explain_cli_on_real_pcam_patches(pcam_model, tmp_path):
    h5 = next(pcam_model.parent.glob("*_train_x.h5"))
    out = tmp_path / "out"
    assert run_cli(["explain", str(pcam_model), str(h5), "-n", "15", "-o", str(out),
                    "--device", "cpu"]) == 0
    png = out / "gradcam_grid.png"
    assert png.stat().st_size > 10_000
    from PIL import Image

    assert Image.open(png).size[0] > 800
    report = json.loads((out / "centre_region.json").read_text())
    _, labels = kaggle_patches()
    assert report["n"] == 15 and report["layer"] == "features.2"
    assert [p["true"] for p in report["patches"]] == [["normal", "tumor"][v] for v in labels]
    # None where the class has no positive evidence anywhere (an all-zero map)
    shares = [p["centre_mass"] for p in report["patches"] if p["centre_mass"] is not None]
    assert len(shares) >= 10 and all(0 <= s <= 1 for s in shares)
    assert report["centre_region"]["mean_centre_mass"] == pytest.approx(np.mean(shares), abs=1e-5)


def test_explain_on_kaggle_folder_by_class_name(pcam_model, tmp_path):
    from histotile.explain import explain

    report = explain(pcam_model, kaggle_folder(), tmp_path, n=4, cam_class="tumor",
                     device="cpu")
    assert report["cam_class"] == "tumor" and report["n"] == 4
    assert (tmp_path / "gradcam_grid.png").is_file()


def test_explain_cli_errors_are_one_line(pcam_model, tmp_path, capsys):
    npz = real_data("patches/pathmnist_train_first1000.npz")
    assert run_cli(["explain", str(pcam_model), str(npz), "--split", "train",
                    "-o", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "28 px" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------- slide level
def test_slide_level_gradcam_on_the_sample_slide(cmu_small, tmp_path):
    """The predict-side recipe on the real CMU slide: grid with 50 % overlap, batches in region
    order, raw CAMs of a PathMNIST-shaped smallcnn (seeded, untrained: the recipe, not the
    model, is under test), stitched into a validated NGFF store and drawn as an overlay."""
    import zarr
    from ome_zarr_models.v04 import Image

    from histotile.export.figures import write_gradcam_overlay_from_store
    from histotile.gradcam import GradCAM
    from histotile.grid import make_grid
    from histotile.patches import iter_patch_batches
    from histotile.slide import open_slide
    from histotile.stitch import CamStitcher, HeatmapWriter, read_gradcam
    from histotile.tissue import detect_tissue

    model = seeded_model("smallcnn", 9, 28)
    cam = GradCAM(model, "features.2")
    with open_slide(cmu_small) as slide:
        tissue = detect_tissue(slide)
        grid = make_grid(slide, 28, target_mpp=4.0, overlap=0.5, tissue=tissue)
        store = tmp_path / "heatmap.ome.zarr"
        with HeatmapWriter(store, grid.grid_shape, grid.indices, [f"c{i}" for i in range(9)],
                           [(i * 25, 0, 0) for i in range(9)], grid.to_attrs()) as writer:
            stitcher = CamStitcher.from_grid(writer, grid, cam_resolution=2, class_name="pred")
            for idx, patches in iter_patch_batches(slide, grid, 64):
                with torch.inference_mode():
                    maps, probs = cam(as_input(patches), normalise="none", size=0)
                writer.write(grid.indices[idx], probs.numpy())
                stitcher.add(grid.indices[idx], maps)
            assert stitcher.peak_open_blocks < len(stitcher.expected)
            stitcher.close()
        png = write_gradcam_overlay_from_store(tmp_path / "gradcam_overlay.png", store,
                                               tissue.thumbnail, tissue.downsample)
    root = zarr.open_group(str(store), mode="r", zarr_format=2)
    Image.from_zarr(root["gradcam"])
    values, cover, attrs = read_gradcam(store)
    assert attrs["cam_resolution_level0"] == pytest.approx(grid.stride_level0 / stitcher.block)
    assert cover.sum() >= len(grid) * stitcher.block ** 2 and values.max() > 0
    assert png.stat().st_size > 5_000


def test_issue16_explain_methods_are_one_table_the_cli_offers() -> None:
    """Methods were registered by importing vit.py (a side effect); now explain.METHODS is the
    one table, and the CLI's --method choices (kept torch-free) are exactly its names."""
    import histotile.attention
    import histotile.gradcam
    from histotile.cli.explain import METHOD_CHOICES
    from histotile.explain import METHODS, get_method

    assert set(METHOD_CHOICES) == set(METHODS)
    assert get_method("gradcam") is histotile.gradcam.gradcam
    assert get_method("attention") is histotile.attention.attention

"""histotile's own ResNet (histotile.models.resnet) against torchvision's: the same state-dict
keys and shapes, the same seeded initialisation and the same outputs for the same weights, so
weights trained or exported with torchvision load unchanged while predict never imports
torchvision. torchvision is imported here, in the test, only."""

from __future__ import annotations

import pytest
import torch

from histotile.models.architectures import build_model
from histotile.models.resnet import resnet

torchvision = pytest.importorskip("torchvision")


def _shapes(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_matches_torchvision_keys_init_and_outputs(depth: int) -> None:
    torch.manual_seed(0)
    ours = resnet(depth, num_classes=5)
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=5)
    assert _shapes(ours) == _shapes(theirs)  # same keys, same order, same shapes
    # same modules built in the same order with the same init: the seeded tensors are equal,
    # so training from scratch starts where it did with torchvision
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # random (non-initial) weights, including the batch-norm statistics, from torchvision
    with torch.no_grad():
        for t in theirs.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) * 0.5 + 0.1)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize(("name", "patch_size"), [("resnet18", 28), ("resnet18", 96),
                                                  ("resnet50", 28), ("resnet50", 96)])
def test_built_resnets_take_torchvision_state_dicts(name: str, patch_size: int) -> None:
    """The registered builders (small-input stem at <= 64 px) load a torchvision model's state
    dict with the same stem change, strictly, and give its outputs."""
    theirs = getattr(torchvision.models, name)(weights=None, num_classes=3)
    if patch_size <= 64:
        theirs.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        theirs.maxpool = torch.nn.Identity()
    ours = build_model(name, 3, patch_size)
    assert _shapes(ours) == _shapes(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, patch_size, patch_size)
    with torch.inference_mode():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


def test_resnet50_attention_holds_torchvision_resnet50_keys() -> None:
    """ImageNet ResNet-50 weights still fit the CBAM model: every torchvision key is there with
    its shape; the extra keys are the CBAM modules only."""
    theirs = dict(_shapes(torchvision.models.resnet50(weights=None, num_classes=4)))
    ours = dict(_shapes(build_model("resnet50-attention", 4, 96)))
    assert {k: ours.get(k) for k in theirs} == theirs
    assert {k.split(".")[0] for k in set(ours) - set(theirs)} == {"cbam1", "cbam2", "cbam3",
                                                                  "cbam4"}


def test_unknown_resnet_depth_is_refused() -> None:
    with pytest.raises(ValueError, match="ResNet-34"):
        resnet(34, 2)

"""EfficientNet-Lite0: architecture, TensorFlow padding, strict weight loading, and a real-photo sanity check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models import effnet
from copyscan.jobs.demo import sample_images

SKIMAGE_DATA = "usr/lib/python3/dist-packages/skimage/data"
# ImageNet class indices: 281 tabby, 282 tiger cat, 283 Persian, 284 Siamese, 285 Egyptian cat;
# 967 espresso, 968 cup, 504 coffee mug.
CATS = {281, 282, 283, 284, 285}
COFFEE = {967, 968, 504}


@pytest.fixture(scope="module")
def model() -> effnet.EfficientNetLite0:
    return effnet.load_efficientnet_lite0()


def test_shapes_and_stage_taps():
    net = effnet.EfficientNetLite0().eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        (b10, b15), head = net.forward_stages(x, taps=(10, 15))
        assert net.forward_features(x).shape == (2, 1280, 3, 4)
        assert net(x).shape == (2, 1000)
    assert b10.shape == (2, 112, 6, 8)
    assert b15.shape == (2, 320, 3, 4)
    assert head.shape == (2, 1280, 3, 4)
    assert len(net._blocks) == 16 and net.stage_ends == [0, 2, 4, 7, 10, 14, 15]
    with pytest.raises(CopyscanError):
        net.forward_stages(x, taps=(16,))


def test_same_padding_is_tensorflow_style():
    """Stride 2 on an even input pads one pixel at the bottom/right only (TF 'SAME'), never at the top/left."""
    conv = effnet.SameConv2d(1, 1, 3, stride=2, bias=False)
    torch.nn.init.normal_(conv.weight, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = F.conv2d(F.pad(x, [0, 1, 0, 1]), conv.weight, stride=2)
    assert torch.allclose(conv(x), expected)
    conv5 = effnet.SameConv2d(1, 1, 5, stride=1, bias=False)
    expected5 = F.conv2d(x, conv5.weight, padding=2)
    assert torch.allclose(conv5(x), expected5, atol=1e-6)


def test_loader_checks_every_key_and_shape(tmp_path):
    state = torch.load(effnet.package_weights_path(), map_location="cpu", weights_only=True)
    assert len(state) == len(effnet.EfficientNetLite0().state_dict()) == 296

    bad = dict(state)
    bad["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)  # the real one is 5×5
    path = tmp_path / "bad_shape.pth"
    torch.save(bad, path)
    with pytest.raises(CopyscanError, match=r"_blocks\.3\._depthwise_conv\.weight \(144, 1, 3, 3\)"):
        effnet.load_efficientnet_lite0(str(path))

    missing = {k: v for k, v in state.items() if not k.startswith("_conv_head")}
    missing["_se_reduce.weight"] = torch.zeros(1)
    path = tmp_path / "missing.pth"
    torch.save(missing, path)
    with pytest.raises(CopyscanError, match=r"missing keys \(first: _conv_head\.weight\).*unexpected keys"):
        effnet.load_efficientnet_lite0(str(path))

    with pytest.raises(CopyscanError, match="does not exist"):
        effnet.load_efficientnet_lite0(str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CopyscanError, match="cannot read"):
        effnet.load_efficientnet_lite0(str(tmp_path / "junk.pth"))


def test_loaded_model_is_in_eval_mode(model):
    assert not model.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def _photo(name: str) -> torch.Tensor:
    try:
        path = sample_images.package_file("python3-skimage", f"{SKIMAGE_DATA}/{name}")
    except CopyscanError as error:
        pytest.skip(
            f"scikit-image's sample photo {name} (Debian package python3-skimage) not available: {error}"
        )
    img = Image.open(path).convert("RGB")
    # the usual ImageNet evaluation: short side 256, centre crop 224, ImageNet mean/std
    scale = 256 / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize(("name", "classes"), [("chelsea.png", CATS), ("coffee.png", COFFEE)])
def test_real_photo_is_classified(model, name, classes):
    """Weights loaded right: scikit-image's photo of Chelsea the cat → a cat class first (tabby/tiger/Egyptian
    all score ≥ 15 %); the coffee photo → espresso first. A wrong padding, BN epsilon or key mapping
    scrambles these."""
    with torch.no_grad():
        probs = F.softmax(model(_photo(name)), dim=1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] in classes, top5
    assert len(classes & set(top5)) >= 2, top5
    assert probs[top5[0]] > 0.3

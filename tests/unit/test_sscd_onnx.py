"""The sscd embedder from an ONNX file (onnxruntime): the same descriptors as the TorchScript file of the same
weights, both resize modes, a uint8 HWC model that does its own normalisation, and the refusals.

The ONNX files are written by the test: ``TinySSCD`` (test_sscd.py) exported with torch's TorchScript-based
exporter, and a graph built with the ``onnx`` package's helpers for the uint8 input; no real SSCD file is needed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_sscd import TinySSCD

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.embedders import load_embedder
from copyscan.indexing.models.sscd_onnx import input_layout
from copyscan.indexing.read.images import open_rgb

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SIZE = 32

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.(script|save|trace)` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings(
        "ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"
    ),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]


def _pair(tmp_path, seed: int = 0) -> tuple[str, str]:
    """The same TinySSCD weights as TorchScript and as ONNX (batch, height and width dynamic)."""
    torch.manual_seed(seed)
    net = TinySSCD(6).eval()
    scripted = tmp_path / "tiny.torchscript.pt"
    torch.jit.save(torch.jit.script(net), str(scripted))
    exported = tmp_path / "tiny.onnx"
    torch.onnx.export(
        net,
        (torch.zeros(2, 3, SIZE, SIZE),),
        str(exported),
        dynamo=False,
        input_names=["images"],
        output_names=["embeddings"],
        dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}},
        opset_version=17,
    )
    return str(scripted), str(exported)


def test_onnx_and_torchscript_of_the_same_weights_give_the_same_descriptors(tmp_path, real_images):
    scripted, exported = _pair(tmp_path)
    for options in ({"size": SIZE}, {"size": SIZE, "resize": "short_edge"}):
        torchscript = load_embedder("sscd", weights=scripted, device="cpu", options=options)
        from_onnx = load_embedder("sscd", weights=exported, device="cpu", options=options)
        assert from_onnx.spec["runtime"] == "onnx" and from_onnx.spec["input"] == "float-nchw"
        assert "runtime" not in torchscript.spec
        assert from_onnx.spec["preprocess"] == torchscript.spec["preprocess"]
        assert from_onnx.spec["normalise"] == torchscript.spec["normalise"]
        assert from_onnx.dim == torchscript.dim == 6
        pixels = [from_onnx.preprocess(open_rgb(path)) for path in real_images[:6]]
        if options.get("resize") != "short_edge":
            pixels = np.stack(pixels)
        else:
            assert len({p.shape for p in pixels}) > 1  # images of their own shapes
        xb_onnx, xb_ts = from_onnx.embed(pixels), torchscript.embed(pixels)
        assert xb_onnx.shape == (6, 6) and xb_onnx.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(xb_onnx, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(xb_onnx, xb_ts, atol=1e-5)
        # crops go through the same module: a region search with an ONNX model works as with TorchScript
        boxes = [(0.1, 0.1, 0.6, 0.7)]
        square = np.stack([p[:, :SIZE, :SIZE] for p in pixels]) if isinstance(pixels, list) else pixels
        np.testing.assert_allclose(
            from_onnx.embed_crops(square, boxes), torchscript.embed_crops(square, boxes), atol=1e-5
        )
    # other weights, other descriptors: the comparison above is not vacuous
    (tmp_path / "other").mkdir()
    _, other = _pair(tmp_path / "other", seed=1)
    other_onnx = load_embedder("sscd", weights=other, device="cpu", options=options)
    assert np.abs(other_onnx.embed(pixels) - xb_ts).max() > 0.05


def _uint8_hwc_model(path, dim: int = 5, batched: bool = False) -> np.ndarray:
    """An ONNX graph taking uint8 (H, W, 3) (or (N, H, W, 3)) RGB of any size: x/255, mean over the pixels,
    times a (3, dim) matrix (plus a constant) → (1, dim) (or (N, dim)). Returns the matrix."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(3).normal(size=(3, dim)).astype(np.float32)
    shape = ["n", "h", "w", 3] if batched else ["h", "w", 3]
    axes = [1, 2] if batched else [0, 1]
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["x", "scale"], ["x01"]),
        helper.make_node("ReduceMean", ["x01", "axes"], ["rgb"], keepdims=0),
        *([] if batched else [helper.make_node("Unsqueeze", ["rgb", "zero"], ["rgb1"])]),
        helper.make_node("MatMul", ["rgb" if batched else "rgb1", "weight"], ["y"]),
        helper.make_node("Add", ["y", "bias"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "uint8_hwc",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, shape)],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n" if batched else 1, dim])],
        initializer=[
            numpy_helper.from_array(np.array(255.0, np.float32), "scale"),
            numpy_helper.from_array(np.array(axes, np.int64), "axes"),
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(np.full(dim, 0.1, np.float32), "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return weight


@pytest.mark.parametrize("batched", [False, True])
def test_uint8_hwc_model_gets_the_pixels_as_they_are(tmp_path, real_images, batched):
    path = tmp_path / "hwc.onnx"
    weight = _uint8_hwc_model(path, batched=batched)
    embedder = load_embedder("sscd", weights=str(path), device="cpu", options={"size": SIZE})
    assert embedder.spec["input"] == ("uint8-nhwc" if batched else "uint8-hwc") and embedder.dim == 5
    assert embedder.spec["normalise"] == "in-model"
    pixels = np.stack([embedder.preprocess(open_rgb(path)) for path in real_images[:3]])
    expected = (pixels.astype(np.float64) / 255.0).mean(axis=(2, 3)) @ weight + 0.1
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(embedder.embed(pixels), expected, atol=1e-5)


def test_input_layouts_and_refusals(tmp_path):
    assert input_layout("tensor(float)", ["n", 3, "h", "w"]) == "float-nchw"
    assert input_layout("tensor(float)", [1, 3, 288, 288]) == "float-nchw"
    assert input_layout("tensor(uint8)", ["h", "w", 3]) == "uint8-hwc"
    assert input_layout("tensor(uint8)", [None, None, None, 3]) == "uint8-nhwc"
    assert input_layout("tensor(float)", ["n", "h", "w", 3]) is None  # float channels-last: not SSCD's
    assert input_layout("tensor(int64)", ["n", 3, "h", "w"]) is None
    assert input_layout("tensor(uint8)", ["h", "w"]) is None

    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["tokens"], ["out"])],
        "tokens",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["n", 77])],
        [helper.make_tensor_value_info("out", TensorProto.INT64, ["n", 77])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "text.onnx"))
    with pytest.raises(CopyscanError, match=r"input 'tokens' is tensor\(int64\)"):
        load_embedder("sscd", weights=str(tmp_path / "text.onnx"), device="cpu")
    (tmp_path / "broken.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(CopyscanError, match="broken.onnx is not an ONNX model onnxruntime can run"):
        load_embedder("sscd", weights=str(tmp_path / "broken.onnx"), device="cpu")

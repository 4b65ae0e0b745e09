"""The batched engine's stacked forward: one step's :class:`~pft.core.objective.PairOutputs` for
every live subject of a chunk, computed through the interface T provides
(:meth:`~pft.core.models.Translator.stacked_forward`, :meth:`~pft.core.models.Translator.frozen_prefix`).

Two roads to the same outputs:

- :class:`AutogradForward` (any trainable set): T's forward on the stacked tensors (every
  trainable tensor has a leading subject axis, frozen ones are shared), autograd through all of it.
- :class:`BiasOnlyForward` (bias-only stage 3, the default: only ``out.bias`` adapts).
  Everything before the output bias is frozen and shared, so T runs without autograd, in place, on
  buffers reused from step to step, both passes (T(f_a), T(f_b)) in the same matrix products. The
  first block's output on a cached frame does not change between steps (only its dropout mask
  does), so it is computed once per frame and chunk (capped at :data:`FIRST_BLOCK_BYTES`).
  Dropout's ``1/(1-p)`` is folded into the next layer's weights. ``C(T(f)) = C(T(f) - b) +
  C.weight b`` and the batch's spread of ``T(f)`` is that of ``T(f) - b``, so autograd only
  handles (subjects x classes) tensors. It provides ``logits_a``, ``logits_b`` and the batch
  statistics, not ``T(f_a)`` per frame: an objective that needs more takes the autograd road
  (:func:`choose_forward` says so with a :class:`FastPathUnavailable` warning).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F_nn
from torch import Tensor

from pft.core.losses import batch_statistics
from pft.core.models import Classifier, FrozenPrefix, Translator
from pft.core.objective import Output, PairOutputs, PFTObjective
from pft.simulations.batched.chunk import Chunk
from pft.simulations.batched.streams import Draws

FIRST_BLOCK_BYTES = 512 << 20
"""Bias-only: the largest per-chunk cache of the first block's output (else computed per step)."""


class FastPathUnavailable(UserWarning):
    """The batched engine's bias-only fast path cannot give what the objective needs; the general
    (autograd) path runs instead - same numbers, slower."""


class StackedForward(Protocol):
    """One step's outputs for a chunk, from that step's draws."""

    name: ClassVar[str]
    provides: ClassVar[frozenset[Output]]

    def start(self, chunk: Chunk) -> None:
        """Per-chunk preparation (caches), once before its first step."""
        ...

    def outputs(self, chunk: Chunk, draws: Draws) -> PairOutputs:
        """The objective's inputs, with autograd to ``chunk.params``."""
        ...


def _dropout_scale(p: float) -> float:
    """Dropout's ``mask.float().div_(1 - p)`` scale, rounded to float32 as torch rounds it."""
    return float(torch.ones(()).div_(1 - p))


def _partner_frames(chunk: Chunk, draws: Draws, noise_std: float) -> Tensor:
    """The partner frames f_b with their noise: (S, B, D)."""
    s, d = len(chunk), chunk.features.shape[1]
    fb = chunk.features[draws.b_rows.to(chunk.features.device)].view(s, -1, d)
    if draws.noise is not None:
        fb = fb + noise_std * draws.noise.to(fb.device)
    return fb


class AutogradForward:
    """Any trainable set: T's :meth:`~pft.core.models.Translator.stacked_forward` on the shared
    frozen tensors and the chunk's stacked trainable ones, autograd through all of it."""

    name: ClassVar[str] = "autograd"
    provides: ClassVar[frozenset[Output]] = frozenset({"logits_a", "logits_b", "translated_a", "batch_stats"})

    def __init__(
        self, translator: Translator, classifier: Classifier, objective: PFTObjective, device: torch.device
    ) -> None:
        self.translator = translator
        self.base = {n: t.to(device) for n, t in translator.tensors().items()}
        self.cls_w, self.cls_b = (t.to(device) for t in classifier.linear_map())
        self.objective = objective
        self.scale = [_dropout_scale(p) for p in translator.layout().dropout]

    def start(self, chunk: Chunk) -> None:
        """Nothing to prepare."""

    def outputs(self, chunk: Chunk, draws: Draws) -> PairOutputs:
        """``T(f_a)`` with autograd, its logits, and the consistency target's logits."""
        device = chunk.features.device
        s, d = len(chunk), chunk.features.shape[1]

        def masks(pass_: int) -> list[Tensor | None] | None:
            if all(m is None for m in draws.kept):
                return None
            # dropout's ``mask.float().div_(1 - p)``, as a multiply by 1/(1-p) rounded to float32:
            # the same values (1 * s = s, 0 * s = 0), and a multiply is cheaper than a divide
            return [
                None
                if m is None
                else m[pass_].view(torch.uint8).to(device, torch.float32).mul_(self.scale[i])
                for i, m in enumerate(draws.kept)
            ]

        t = self.translator
        p = {**self.base, **chunk.params}
        e_from, e_to = t.stacked_embed(p, chunk.style_target), t.stacked_embed(p, chunk.style_reference)
        fa = chunk.features[draws.a_rows.to(device)].view(s, -1, d)
        fb = _partner_frames(chunk, draws, self.objective.noise_std)
        f_hat = t.stacked_forward(p, fa, e_from, e_to, masks(0))
        with torch.no_grad():
            if self.objective.consistency_target == "translated":
                fb = t.stacked_forward(p, fb, e_from, e_to, masks(1))
            logits_b = F_nn.linear(fb, self.cls_w, self.cls_b)
        return PairOutputs(F_nn.linear(f_hat, self.cls_w, self.cls_b), logits_b, translated_a=f_hat)


@dataclass(frozen=True)
class _FoldedPrefix:
    """T's frozen prefix with each dropout's ``1 / (1 - p)`` folded into the weights of the layer
    after it (the same products, rounded once differently)."""

    prefix: FrozenPrefix
    weights: list[Tensor]  # blocks 1.. : (H, H), pre-scaled by the previous block's dropout
    biases: list[Tensor]
    out: Tensor  # (D, H) out.weight, pre-scaled by the last block's dropout

    @classmethod
    def of(cls, prefix: FrozenPrefix) -> _FoldedPrefix:
        drop = prefix.dropout

        def scaled(w: Tensor, p: float) -> Tensor:
            return w * _dropout_scale(p) if p > 0 else w

        return cls(
            prefix=prefix,
            weights=[scaled(w, drop[i]) for i, (w, _) in enumerate(prefix.hidden)],
            biases=[b for _, b in prefix.hidden],
            out=scaled(prefix.out_weight, drop[-1]),
        )


@dataclass
class _BiasOnlyState:
    """Per chunk: each subject's first-layer style rows, and the first block's output per frame."""

    style: Tensor  # (S, H)
    first_block: Tensor | None  # (all frames, H), None when over the cap

    def keep(self, idx: Tensor) -> None:
        self.style = self.style[idx]  # first_block is indexed by frame rows, which stay


class BiasOnlyForward:
    """Bias-only stage 3 (see the module docstring): no autograd through T, reused buffers."""

    name: ClassVar[str] = "bias_only"
    provides: ClassVar[frozenset[Output]] = frozenset({"logits_a", "logits_b", "batch_stats"})

    def __init__(
        self, translator: Translator, classifier: Classifier, objective: PFTObjective, device: torch.device
    ) -> None:
        self.fold = _FoldedPrefix.of(translator.frozen_prefix().to(device))
        self.cls_w, self.cls_b = (t.to(device) for t in classifier.linear_map())
        self.objective = objective

    def start(self, chunk: Chunk) -> None:
        """Each subject's style rows, and the first block's output (before dropout) for every frame
        - what T(f_a) starts from (f_a is a cached frame, unlike the noisy f_b), so the first layer
        runs once per frame instead of once per sampled frame and step. The cache is skipped (T(f_a)
        starts from the frames each step) when it would exceed :data:`FIRST_BLOCK_BYTES`."""
        prefix = self.fold.prefix
        with torch.no_grad():
            style = prefix.style_rows(chunk.style_target, chunk.style_reference)
            first: Tensor | None = None
            if len(chunk.features) * prefix.first_frame.shape[0] * 4 <= FIRST_BLOCK_BYTES:
                owner = torch.repeat_interleave(torch.arange(len(chunk)), chunk.sizes).to(style.device)
                first = self._first_block(chunk.features, style[owner])
        chunk.forward_state = _BiasOnlyState(style, first)

    def _first_block(self, f: Tensor, style: Tensor, out: Tensor | None = None) -> Tensor:
        """The first block before its dropout, ``GELU(first layer)``, on frames ``f`` (..., D) whose
        subjects' style rows ``style`` broadcast to (..., H); written into ``out`` if given."""
        prefix = self.fold.prefix
        d, width = f.shape[-1], prefix.first_frame.shape[0]
        normed = F_nn.layer_norm(f, (d,), prefix.norm_weight, prefix.norm_bias, prefix.norm_eps)
        h = out if out is not None else f.new_empty(*f.shape[:-1], width)
        torch.mm(normed.view(-1, d), prefix.first_frame.t(), out=h.view(-1, width))
        return torch.ops.aten.gelu_(h.add_(style))

    def _prefix_outputs(self, chunk: Chunk, draws: Draws, passes: int) -> Tensor:
        """``T(f) - out.bias`` for pass 0 (f_a) and, with ``passes = 2``, pass 1 (f_b): (P, S, B, D).

        No autograd, and every large tensor is one of the chunk's reused buffers (the result too:
        it is valid until the next step)."""
        state = chunk.forward_state
        assert isinstance(state, _BiasOnlyState)
        buffers = chunk.buffers
        s = len(chunk)
        bsz = len(draws.a_rows) // s
        rows, d = passes * s * bsz, chunk.features.shape[1]
        width = self.fold.prefix.first_frame.shape[0]
        device = chunk.features.device
        # z starts as the frames themselves (f_a, then f_b with its noise): the last layer adds onto it
        z = buffers.get("z", (passes, s, bsz, d))
        h = buffers.get("h0", (passes, s, bsz, width))
        torch.index_select(chunk.features, 0, draws.a_rows.to(device), out=z[0].view(s * bsz, d))
        if state.first_block is not None:
            torch.index_select(state.first_block, 0, draws.a_rows.to(device), out=h[0].view(s * bsz, width))
        if passes == 2:
            torch.index_select(chunk.features, 0, draws.b_rows.to(device), out=z[1].view(s * bsz, d))
            if draws.noise is not None:
                z[1].add_(draws.noise.to(device).mul_(self.objective.noise_std))  # f_b + std * noise
        for pass_ in range(passes):
            if pass_ == 1 or state.first_block is None:
                self._first_block(z[pass_], state.style.unsqueeze(1), out=h[pass_])
        for i, kept in enumerate(draws.kept):
            if i > 0:
                w, b = self.fold.weights[i - 1], self.fold.biases[i - 1]
                out = buffers.get(f"h{i}", (passes, s, bsz, w.shape[0]))
                torch.addmm(b, h.view(rows, h.shape[-1]), w.t(), out=out.view(rows, w.shape[0]))
                h = torch.ops.aten.gelu_(out)
            if kept is not None:
                # bool -> float is slow in torch; the same bytes as uint8 convert vectorised
                mask = buffers.get("mask", h.shape)
                mask.copy_(kept[:passes].view(torch.uint8))
                h.mul_(mask)  # the 1/(1-p) scale is in the next layer's weights
        flat = z.view(rows, d)
        torch.addmm(flat, h.view(rows, h.shape[-1]), self.fold.out.t(), out=flat)  # f + out.weight @ h
        return z

    def outputs(self, chunk: Chunk, draws: Draws) -> PairOutputs:
        """``C(T(f_a)) = C(z_a) + C.weight @ out.bias`` with ``z = T(f) - out.bias``, the consistency
        target, and the batch statistics of ``T(f_a)`` (its spread is z_a's: a bias moves every
        frame alike). Autograd only sees (S, classes) and (S, D) tensors."""
        objective = self.objective
        translated = objective.consistency_target == "translated"
        with torch.no_grad():
            z = self._prefix_outputs(chunk, draws, objective.passes)
            plain_a = F_nn.linear(z[0], self.cls_w, self.cls_b)
            mu_z, sigma = batch_statistics(z[0])
        bias = chunk.params[Translator.OUTPUT_BIAS]
        shift = F_nn.linear(bias, self.cls_w).unsqueeze(1)
        with torch.no_grad():
            if translated:
                logits_b = F_nn.linear(z[1], self.cls_w, self.cls_b) + shift
            else:
                fb = _partner_frames(chunk, draws, objective.noise_std)
                logits_b = F_nn.linear(fb, self.cls_w, self.cls_b)
        return PairOutputs(plain_a + shift, logits_b, batch_mean=mu_z + bias, batch_std=sigma)


def choose_forward(
    translator: Translator,
    classifier: Classifier,
    trainable: list[str],
    objective: PFTObjective,
    device: torch.device,
) -> StackedForward:
    """The bias-only fast path when only T's output bias trains and it gives every output the
    objective needs; else the autograd path (warning :class:`FastPathUnavailable` when only the
    objective stands in the fast path's way)."""
    if trainable == [Translator.OUTPUT_BIAS]:
        missing = objective.requires - BiasOnlyForward.provides
        if not missing:
            return BiasOnlyForward(translator, classifier, objective, device)
        warnings.warn(
            f"the batched engine's bias-only fast path does not give {sorted(missing)}, which this "
            "objective needs; running the general autograd path (same numbers, slower)",
            FastPathUnavailable,
            stacklevel=3,
        )
    return AutogradForward(translator, classifier, objective, device)

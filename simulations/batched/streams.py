"""The batched engine's random streams: each subject's frame indices, partners, noise and masks.

Two ways to draw (``BatchedConfig.rng``):

- ``exact`` replays the per-client trainer's draws. The trainer seeds the global generator and a
  ``torch.Generator`` with the run's seed, draws frame indices (``randint``), partners (one
  ``randint`` per frame with another frame in its video,
  :meth:`pft.core.adaptation.AdaptationData.partners`), the partner noise (``randn``) from the
  generator, and T's dropout masks (``bernoulli(1 - p)``, two draws of the 64-bit stream per
  element) from the global one. Here every subject has two generators seeded the same way, the
  scalar partner draws are read from the 64-bit stream in pairs, and the dropout masks are the
  ``uniform < 1 - p`` test on that stream - bit-identical to what the trainer draws.
- ``fast`` gives every subject its own generator too, but draws a step's frame indices, partners
  and dropout masks as ONE block of 64-bit words per subject and converts them for the whole chunk
  at once; a dropout decision is a 16-bit uniform. Same distributions, not the same draws.

Each subject's draws come from its own generators, so they are spread over threads
(:class:`Workers`): the result does not depend on the split.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pft.simulations.batched.buffers import Buffers

RandomStreams = Literal["exact", "fast"]

_MASK53 = (1 << 53) - 1
_MASK32 = 0xFFFFFFFF
_MASK62 = (1 << 62) - 1


# --- exact replication of torch's draws -----------------------------------------------------------
def raw32(generator: torch.Generator, count: int) -> Tensor:
    """``count`` (even) consecutive 32-bit outputs of ``generator``'s mt19937 stream, as int64."""
    v = torch.empty(count // 2, dtype=torch.int64).random_(-(2**63), None, generator=generator)
    return torch.stack([(v >> 32) & _MASK32, v & _MASK32], 1).flatten()


def keep_threshold(keep: float) -> int:
    """``u53 * 2**-53 < keep`` as an integer test ``u53 < threshold`` (exact: scaling by 2**53 is)."""
    return math.ceil(keep * 2.0**53)


def bernoulli_into(generator: torch.Generator, scratch: Tensor, threshold: int, out: Tensor) -> None:
    """``out = torch.empty(shape).bernoulli_(keep, generator) > 0`` (CPU), with ``scratch`` an int64
    buffer of the same shape and ``threshold = keep_threshold(keep)``: the trainer's rule, in
    place (the 128 KB scratch stays in cache)."""
    scratch.random_(-(2**63), None, generator=generator)
    scratch.bitwise_and_(_MASK53)
    torch.lt(scratch, threshold, out=out)


def bernoulli_mask(generator: torch.Generator, shape: tuple[int, ...], keep: float) -> Tensor:
    """``torch.empty(shape).bernoulli_(keep, generator)`` (CPU), from the 64-bit stream, as bool."""
    out = torch.empty(shape, dtype=torch.bool)
    bernoulli_into(generator, torch.empty(shape, dtype=torch.int64), keep_threshold(keep), out)
    return out


class Partners:
    """``AdaptationData.partners`` as a table: for each frame, the frames it may be paired with."""

    def __init__(self, n: int, video_ids: Tensor | None, time_index: Tensor | None) -> None:
        vids = video_ids if video_ids is not None else torch.zeros(n, dtype=torch.long)
        _, group_of = torch.unique(vids, return_inverse=True)
        same_group = group_of[:, None] == group_of[None, :]
        if time_index is not None:
            allowed = same_group & (time_index[:, None] != time_index[None, :])
        else:
            allowed = same_group & ~torch.eye(n, dtype=torch.bool)
        self.count = allowed.sum(1)
        self.all_paired = bool((self.count > 0).all())
        width = max(1, int(self.count.max()))
        # stable sort puts allowed frames first, in increasing index: the trainer's order
        order = torch.sort((~allowed).to(torch.int8), dim=1, stable=True).indices
        self.table = order[:, :width].contiguous()

    def draw(self, index: Tensor, generator: torch.Generator) -> Tensor:
        """The partners of ``index`` drawn exactly as the trainer draws them from ``generator``."""
        counts = self.count[index]
        need = torch.nonzero(counts > 0).flatten()
        out = index.clone()
        k = len(need)
        if k == 0:
            return out
        sizes = counts[need]
        raw = raw32(generator, k - (k % 2)) if k > 1 else torch.empty(0, dtype=torch.long)
        if k % 2:
            last = torch.randint(int(sizes[-1]), (1,), generator=generator)
            choice = torch.cat([raw % sizes[:-1], last])
        else:
            choice = raw % sizes
        out[need] = self.table[index[need], choice]
        return out


# --- threads -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workers:
    """Threads for the per-subject random draws."""

    pool: ThreadPoolExecutor
    size: int


def each_subject(s: int, work: Callable[[range], None], workers: Workers | None) -> None:
    """``work(rows)`` over the subjects ``0..s-1``, split in contiguous parts over ``workers``.

    Every subject's draws come from its own generators and land in its own rows, so the result
    does not depend on the split; each generator runs serially inside torch, so this is what puts
    the other cores to work on them (torch releases the GIL inside its kernels)."""
    parts = 1 if workers is None else min(workers.size, s)
    if workers is None or parts <= 1:
        work(range(s))
        return
    bounds = [round(s * k / parts) for k in range(parts + 1)]
    list(workers.pool.map(work, [range(a, b) for a, b in itertools.pairwise(bounds)]))


# --- one step's draws ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepShape:
    """What one step draws per subject: ``batch_size`` frames and their partners, partner noise of
    width ``noise_dim`` (None: no noise), and dropout masks for ``passes`` passes of T through
    hidden blocks of widths ``hidden`` with dropout ``dropout``."""

    batch_size: int
    noise_dim: int | None
    passes: int
    hidden: tuple[int, ...]
    dropout: tuple[float, ...]


@dataclass
class Draws:
    """One step's random draws for every live subject of a chunk."""

    a_rows: Tensor  # (S*B,) rows of the chunk's frames: the sampled frames f_a
    b_rows: Tensor  # (S*B,) their partners f_b
    noise: Tensor | None  # (S, B, D) partner noise (unscaled)
    # per block: (P, S, B, H) bool keep-masks (None if p = 0); pass 0 is T(f_a), pass 1 (P = 2,
    # consistency target "translated") is T(f_b)
    kept: list[Tensor | None]


def _new_kept(buffers: Buffers, s: int, shape: StepShape) -> tuple[Tensor | None, list[Tensor | None]]:
    """Keep-mask storage for one step: ``(all, per_block)`` where ``all`` is (S, P, L, B, H) - a
    subject's masks contiguous, in the order they are drawn - and ``per_block[i]`` the (P, S, B,
    H) view of block i; ``(None, [None, ...])`` without dropout."""
    if all(p == 0 for p in shape.dropout):
        return None, [None] * len(shape.hidden)
    if len(set(shape.hidden)) > 1 or len(set(shape.dropout)) > 1:
        raise ValueError("the batched engine needs the same width and dropout in every block of T")
    dims = (s, shape.passes, len(shape.hidden), shape.batch_size, shape.hidden[0])
    kept = buffers.get("kept", dims, torch.bool, host=True)
    return kept, [kept[:, :, i].transpose(0, 1) for i in range(len(shape.hidden))]


class ChunkStreams:
    """The random streams of a chunk's live subjects: two generators per subject seeded with its
    seed (sampling, dropout) and its partner table, plus the chunk-wide tables the conversions use.

    Frame rows are the chunk's: subject r's frames are rows ``offsets[r] .. offsets[r] + sizes[r]``.
    """

    def __init__(self, mode: RandomStreams, seeds: Sequence[int], partners: Sequence[Partners]) -> None:
        self.mode: RandomStreams = mode
        self.partners = list(partners)
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.drop_gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.sizes = torch.tensor([len(p.count) for p in partners])
        self.offsets = torch.cumsum(self.sizes, 0) - self.sizes
        width = max(int(p.table.shape[1]) for p in self.partners)
        tables = []
        for p, off in zip(self.partners, self.offsets.tolist(), strict=True):
            t = p.table + off
            tables.append(torch.cat([t, t[:, :1].expand(-1, width - t.shape[1])], 1))
        self.partner_table = torch.cat(tables)  # (all frames, width) chunk rows
        self.partner_count = torch.cat([p.count for p in self.partners])  # (all frames,)

    def keep(self, rows: list[int]) -> None:
        """Keep only the subjects at ``rows`` (the frame tables stay: they index chunk rows)."""
        idx = torch.tensor(rows, dtype=torch.long)
        self.partners = [self.partners[r] for r in rows]
        self.gens = [self.gens[r] for r in rows]
        self.drop_gens = [self.drop_gens[r] for r in rows]
        self.sizes = self.sizes[idx]
        self.offsets = self.offsets[idx]

    def draw(self, shape: StepShape, buffers: Buffers, workers: Workers | None = None) -> Draws:
        """One step's draws for every live subject, in the configured mode."""
        if self.mode == "exact":
            return self._draw_exact(shape, buffers, workers)
        return self._draw_fast(shape, buffers, workers)

    def _draw_exact(self, shape: StepShape, buffers: Buffers, workers: Workers | None) -> Draws:
        """Each subject's draws replayed from its two generators in the trainer's order.

        Per subject and step: the frame indices and the partner draws as ONE read of its sampling
        generator, the noise (the same generator), and ALL its dropout masks at once (the dropout
        generator, whose stream holds nothing else: T(f_a)'s masks then T(f_b)'s); the conversions
        then run on the whole chunk."""
        s, bsz, d = len(self.gens), shape.batch_size, shape.noise_dim
        idx = buffers.get("idx", (s, bsz), torch.long, host=True)
        raw = buffers.get("raw", (s, bsz), torch.long, host=True)
        part = buffers.get("part", (s, bsz), torch.long, host=True)
        noise = buffers.get("noise", (s, bsz, d), host=True) if d is not None else None
        kept_all, kept = _new_kept(buffers, s, shape)
        threshold = keep_threshold(1 - shape.dropout[0])
        # ``randint(n, (bsz,))`` (n < 2**32) takes one 32-bit output per index; a subject all of
        # whose frames have partners then takes one per partner: with an even batch, both are bsz
        # 64-bit words (two outputs each, the first in the high half), converted chunk-wide below
        paired = [p.all_paired and bsz % 2 == 0 for p in self.partners]

        def draw(rows: range) -> None:
            scratch = torch.empty(kept_all[0].numel() if kept_all is not None else 0, dtype=torch.int64)
            for r in rows:
                gen = self.gens[r]
                if paired[r]:
                    raw[r].random_(-(2**63), None, generator=gen)
                else:
                    torch.randint(int(self.sizes[r]), (bsz,), generator=gen, out=idx[r])
                    part[r] = self.partners[r].draw(idx[r], gen)
                if noise is not None:
                    torch.randn(noise.shape[1:], generator=gen, out=noise[r])
                if kept_all is not None:
                    bernoulli_into(self.drop_gens[r], scratch, threshold, kept_all[r].view(-1))

        each_subject(s, draw, workers)
        rows = [r for r in range(s) if paired[r]]
        if rows:
            sel = torch.tensor(rows) if len(rows) < s else slice(None)
            v = raw[sel]
            out32 = torch.stack([(v >> 32) & _MASK32, v & _MASK32], 2).flatten(1)
            a = out32[:, :bsz] % self.sizes[sel, None] + self.offsets[sel, None]
            idx[sel] = a - self.offsets[sel, None]
            choice = out32[:, bsz:] % self.partner_count[a]
            part[sel] = self.partner_table[a, choice] - self.offsets[sel, None]
        offsets = self.offsets[:, None]
        return Draws((idx + offsets).flatten(), (part + offsets).flatten(), noise, kept)

    def _draw_fast(self, shape: StepShape, buffers: Buffers, workers: Workers | None) -> Draws:
        """One block of 64-bit words per subject (its own generator), converted for the whole chunk."""
        s, bsz, d = len(self.gens), shape.batch_size, shape.noise_dim
        kept_all, kept = _new_kept(buffers, s, shape)
        decisions = kept_all[0].numel() if kept_all is not None else 0
        width = 2 * bsz + (decisions + 3) // 4
        words = buffers.get("words", (s, width), torch.int64, host=True)
        noise = buffers.get("noise", (s, bsz, d), host=True) if d is not None else None

        def draw(rows: range) -> None:
            for r in rows:
                words[r].random_(-(2**63), None, generator=self.gens[r])
                if noise is not None:
                    torch.randn(noise.shape[1:], generator=self.gens[r], out=noise[r])

        each_subject(s, draw, workers)
        a_rows = (words[:, :bsz] & _MASK62) % self.sizes[:, None] + self.offsets[:, None]
        count = self.partner_count[a_rows]
        choice = (words[:, bsz : 2 * bsz] & _MASK62) % count.clamp(min=1)
        b_rows = torch.where(count > 0, self.partner_table[a_rows, choice], a_rows)
        if kept_all is not None:
            # a dropout decision is a 16-bit uniform: kept when below round(keep * 2**16) (as
            # int16); the words after the indices hold the subject's masks in kept_all's order
            u16 = words[:, 2 * bsz :].view(torch.int16)[:, :decisions]
            keep16 = round((1 - shape.dropout[0]) * 2**16) - 2**15
            torch.lt(u16, keep16, out=kept_all.view(s, decisions))
        return Draws(a_rows.flatten(), b_rows.flatten(), noise, kept)

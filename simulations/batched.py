"""The batched engine (``pft simulate --engine batched``): many subjects' translators adapted at once.

The per-client engine adapts one subject after another with
:class:`~pft_core.adaptation.AdaptationTrainer` and :class:`~pft_core.adaptation.PFTAdaptation`.
This engine runs the SAME math over the SAME sampled batches for a chunk of subjects at a time:

- every trainable tensor of T gets a leading subject axis (stacked per-subject parameters); the
  frozen ones stay shared. Linear layers with stacked weights are one ``baddbmm`` per layer; with
  shared weights (``bias_only``, the default) one ``addmm`` over all subjects' rows;
- the per-subject losses are summed and ONE autograd backward gives every subject's gradient (a
  subject's parameters reach only its own loss); Adam/SGD are applied elementwise on the stacks,
  with the exact update sequence of ``torch.optim.Adam``/``SGD`` (single-tensor path);
- each subject's random streams are replicated exactly: the trainer seeds the global generator and
  a ``torch.Generator`` with the run's seed, draws frame indices (``randint``), partners (one
  ``randint`` per frame with another frame in its video), the partner noise (``randn``) from the
  generator, and T's dropout masks (``bernoulli(1 - p)``, two draws of the 64-bit stream per element)
  from the global one. Here every subject has two generators seeded the same way, the scalar
  partner draws are read from the 64-bit stream in pairs, and the dropout masks are the
  ``uniform < 1 - p`` test on that stream - bit-identical to what the trainer draws;
- early stopping is per subject: the trainer's EMA rule runs on each subject's loss; a subject
  that stops leaves the chunk (its parameters are taken at its own stop step) and the chunk is
  compacted, so finished subjects cost nothing.

Agreement with the per-client engine: the sampled batches, masks and noise are identical; the
arithmetic differs only by float re-association (``bmm`` vs ``mm``, a fused vs an unfused
LayerNorm), ~1e-6 relative on the loss. Per-subject iterations, parameters (``atol 1e-4``) and
predictions agree; a subject whose EMA criterion sits within ~1e-6 of the threshold could stop one
step apart (tests check a few subjects). Memory is bounded by ``chunk_size`` subjects, not by their
number: chunks are produced one at a time and the caller consumes each before the next.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F_nn
from pydantic import Field
from torch import Tensor

from pft_core.adaptation import AdaptConfig, ModelParts, PFTAdaptation
from pft_core.config import FrozenConfig
from pft_core.errors import TooFewFacesError
from pft_core.losses import STATS_EPS
from pft_core.models import Classifier, Translator
from pft_core.personalize import PersonalizeConfig, SourceModel, translation_goal
from pft_core.training import torch_threads
from simulations.methods import MethodOutcome, MethodSettings, TargetData

_MASK53 = (1 << 53) - 1
_MASK32 = 0xFFFFFFFF
_MASK62 = (1 << 62) - 1
RandomStreams = Literal["exact", "fast"]
_FUSED_MIN = 1 << 16  # stacks at least this large use the fused Adam kernel


class BatchedConfig(FrozenConfig):
    """How the batched engine runs: subjects per chunk (bounds memory), device, intra-op threads.

    ``num_threads``: intra-op threads while adapting (None leaves torch's setting). One is the
    default: on a shared, loaded 2-core box two spinning threads made a chunk 10x slower; on a
    quiet machine set it to the core count. ``fused_adam`` runs torch's fused Adam kernel (one
    pass instead of six, ~6x faster on full-T stacks) instead of the trainer's single-tensor
    update; it rounds differently by ~1 ulp per step, which full-T adaptation at lr 0.01 (loss
    spikes in the first steps) can amplify, so the default keeps the trainer's exact sequence.

    ``rng``: ``exact`` replays each subject's random streams as the per-client trainer draws them
    (bit-identical batches, masks and noise; the default). ``fast`` gives every subject its own
    generator too, but draws a step's frame indices, partners and dropout masks as ONE block of
    64-bit words per subject and converts them for the whole chunk at once; a dropout mask costs
    16 random bits instead of 64 (keep probability ``round((1-p) * 2**16) / 2**16``, 0.899994 for
    p = 0.1). Same work and the same distributions, not the same draws: per-subject numbers then
    differ from the per-client engine's as two seeds do. Either mode is deterministic for a seed
    and does not depend on ``chunk_size``.
    """

    chunk_size: int = Field(256, ge=1)
    device: str = "cpu"
    num_threads: int | None = Field(1, ge=1)
    fused_adam: bool = False
    rng: RandomStreams = "exact"


@dataclass
class SubjectTask:
    """One subject's adaptation input: its neutral features, style codes, reference and seed."""

    subject: str
    features: Tensor
    style_target: Tensor
    style_reference: Tensor
    reference_stats: tuple[Tensor, Tensor]
    seed: int
    video_ids: Tensor | None = None
    time_index: Tensor | None = None
    reference_subject: str = ""


def subject_task(
    model: SourceModel,
    features: Tensor,
    frame_stats: Tensor,
    config: PersonalizeConfig,
    seed: int,
    *,
    subject: str = "",
    descriptor: np.ndarray | None = None,
    video_ids: Tensor | None = None,
    time_index: Tensor | None = None,
) -> SubjectTask:
    """What :func:`pft_core.personalize.personalize` computes before adapting (style code, the
    ``reference_k`` matched source subjects and their statistics), for seed ``seed``.

    Raises
    ------
    TooFewFacesError
        Fewer than ``config.min_frames`` frames.
    """
    goal = translation_goal(
        model, features, frame_stats, config.model_copy(update={"seed": seed}), descriptor
    )
    return SubjectTask(
        subject=subject,
        features=features,
        style_target=goal.style_target,
        style_reference=goal.style_reference,
        reference_stats=goal.reference_stats,
        seed=seed,
        video_ids=video_ids,
        time_index=time_index,
        reference_subject=goal.references[0],
    )


@dataclass
class SubjectAdaptation:
    """A subject's adapted trainable tensors of T (name -> tensor), steps, convergence, last loss."""

    subject: str
    position: int
    state: dict[str, Tensor]
    iterations: int
    converged: bool
    final_loss: float

    def translator(self, base: Translator) -> Translator:
        """A copy of ``base`` with this subject's adapted tensors, in eval mode."""
        personal = copy.deepcopy(base)
        own = dict(personal.named_parameters())
        with torch.no_grad():
            for name, value in self.state.items():
                own[name].copy_(value)
        return personal.eval()


# --- exact replication of the trainer's random streams ------------------------------------------
def _raw32(generator: torch.Generator, count: int) -> Tensor:
    """``count`` (even) consecutive 32-bit outputs of ``generator``'s mt19937 stream, as int64."""
    v = torch.empty(count // 2, dtype=torch.int64).random_(-(2**63), None, generator=generator)
    return torch.stack([(v >> 32) & _MASK32, v & _MASK32], 1).flatten()


def _keep_threshold(keep: float) -> int:
    """``u53 * 2**-53 < keep`` as an integer test ``u53 < threshold`` (exact: scaling by 2**53 is)."""
    return math.ceil(keep * 2.0**53)


def _bernoulli_into(generator: torch.Generator, scratch: Tensor, threshold: int, out: Tensor) -> None:
    """``out = torch.empty(shape).bernoulli_(keep, generator) > 0`` (CPU), with ``scratch`` an int64
    buffer of the same shape and ``threshold = _keep_threshold(keep)``: the trainer's rule, in
    place (the 128 KB scratch stays in cache)."""
    scratch.random_(-(2**63), None, generator=generator)
    scratch.bitwise_and_(_MASK53)
    torch.lt(scratch, threshold, out=out)


def _bernoulli_mask(generator: torch.Generator, shape: tuple[int, ...], keep: float) -> Tensor:
    """``torch.empty(shape).bernoulli_(keep, generator)`` (CPU), from the 64-bit stream, as bool."""
    out = torch.empty(shape, dtype=torch.bool)
    _bernoulli_into(generator, torch.empty(shape, dtype=torch.int64), _keep_threshold(keep), out)
    return out


class _Partners:
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
        raw = _raw32(generator, k - (k % 2)) if k > 1 else torch.empty(0, dtype=torch.long)
        if k % 2:
            last = torch.randint(int(sizes[-1]), (1,), generator=generator)
            choice = torch.cat([raw % sizes[:-1], last])
        else:
            choice = raw % sizes
        out[need] = self.table[index[need], choice]
        return out


# --- stacked translator ----------------------------------------------------------------------------
def _linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``x @ W^T + b`` for x (S, B, in); W (S, out, in) or shared (out, in); b (S, out) or (out,)."""
    if weight.ndim == 3:
        b = bias.unsqueeze(1) if bias.ndim == 2 else bias
        return torch.baddbmm(b, x, weight.transpose(1, 2))
    if bias.ndim == 2:
        return F_nn.linear(x, weight) + bias.unsqueeze(1)
    return F_nn.linear(x, weight, bias)


def _translate(
    p: dict[str, Tensor],
    f: Tensor,
    e_from: Tensor,
    e_to: Tensor,
    blocks: int,
    masks: Sequence[Tensor | None] | None,
    eps: float,
) -> Tensor:
    """T's forward on (S, B, D) with per-subject (stacked) or shared tensors ``p``."""
    d = f.shape[-1]
    w, b = p["norm.weight"], p["norm.bias"]
    if w.ndim == 1 and b.ndim == 1:
        normed = F_nn.layer_norm(f, (d,), w, b, eps)
    else:
        normed = F_nn.layer_norm(f, (d,), None, None, eps) * _rows(w) + _rows(b)
    w0, b0 = p["blocks.0.0.weight"], p["blocks.0.0.bias"]
    if w0.ndim == 2:
        # Shared first layer (bias-only): it sees [normed, e_from, e_to], and the style part is
        # one row per subject, so it is computed once per subject, not per frame (a third fewer
        # FLOPs, no concatenation; float re-association only).
        e = e_from.shape[-1]
        style = F_nn.linear(e_from, w0[:, d : d + e], b0) + F_nn.linear(e_to, w0[:, d + e :])
        h = F_nn.linear(normed, w0[:, :d]) + style  # + (S, 1, H)
    else:
        # Stacked first layer (full T): the trainer's concatenation. Full-T adaptation amplifies
        # 1-ulp differences (see the tests' tolerances), so the arithmetic stays as close as it can.
        s, n = f.shape[0], f.shape[1]
        x = torch.cat([normed, e_from.expand(s, n, -1), e_to.expand(s, n, -1)], dim=2)
        h = _linear(x, w0, b0)
    for i in range(blocks):
        if i > 0:
            h = _linear(h, p[f"blocks.{i}.0.weight"], p[f"blocks.{i}.0.bias"])
        h = F_nn.gelu(h)
        mask = masks[i] if masks is not None else None
        if mask is not None:
            h = h.mul_(mask)  # in place is safe: GELU's backward keeps its input, not its output
    return f + _linear(h, p["out.weight"], p["out.bias"])


def _rows(t: Tensor) -> Tensor:
    return t.unsqueeze(1) if t.ndim == 2 else t


def _embed(p: dict[str, Tensor], code: Tensor) -> Tensor:
    """``E(s)`` per subject: codes (S, style_dim) -> (S, 1, E)."""
    return _linear(code.unsqueeze(1), p["style_embed.weight"], p["style_embed.bias"])


@dataclass
class _Chunk:
    """The live state of the subjects of one chunk still adapting."""

    positions: list[int]
    tasks: list[SubjectTask]
    partners: list[_Partners]
    gens: list[torch.Generator]
    drop_gens: list[torch.Generator]
    offsets: Tensor
    features: Tensor
    s_t: Tensor
    s_r: Tensor
    ref_mu: Tensor
    ref_sigma: Tensor
    params: dict[str, Tensor]
    state: dict[str, list[Tensor]]
    ema: list[list[float]]
    history: list[list[float]]
    sizes: Tensor  # (S,) frames per subject
    partner_table: Tensor | None = None  # ``rng="fast"``: (all frames, width) chunk rows
    partner_count: Tensor | None = None  # ``rng="fast"``: (all frames,) partners per frame

    def index_partners(self) -> None:
        """The subjects' partner tables as one table of chunk rows (for ``rng="fast"``)."""
        width = max(int(p.table.shape[1]) for p in self.partners)
        tables = []
        for p, off in zip(self.partners, self.offsets.tolist(), strict=True):
            t = p.table + off
            tables.append(torch.cat([t, t[:, :1].expand(-1, width - t.shape[1])], 1))
        self.partner_table = torch.cat(tables)
        self.partner_count = torch.cat([p.count for p in self.partners])

    def keep(self, rows: list[int]) -> None:
        """Keep only the subjects at ``rows`` (compaction after some stopped)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.s_t.device)
        for name in ("positions", "tasks", "partners", "gens", "drop_gens", "ema", "history"):
            values = getattr(self, name)
            setattr(self, name, [values[r] for r in rows])
        self.offsets = self.offsets[idx.cpu()]
        self.sizes = self.sizes[idx.cpu()]
        for name in ("s_t", "s_r", "ref_mu", "ref_sigma"):
            setattr(self, name, getattr(self, name)[idx])
        self.params = {k: v.detach()[idx].clone().requires_grad_(True) for k, v in self.params.items()}
        self.state = {k: [s[idx].clone() for s in v] for k, v in self.state.items()}


def trainable_names(translator: Translator, classifier: Classifier, method: PFTAdaptation) -> list[str]:
    """Names of the tensors of T that ``method`` adapts (``bias_only``: ``out.bias``)."""
    dummy = torch.zeros(translator.style_dim)
    parts = ModelParts(classifier, translator, None, dummy, dummy)
    wanted = {id(p) for p in method.trainable_parameters(parts)}
    return [n for n, p in translator.named_parameters() if id(p) in wanted]


def adapt_subjects(
    translator: Translator,
    classifier: Classifier,
    tasks: Iterable[SubjectTask],
    config: PersonalizeConfig,
    engine: BatchedConfig | None = None,
) -> Iterator[list[SubjectAdaptation]]:
    """Adapt a copy of ``translator`` for every task, ``engine.chunk_size`` subjects at a time.

    ``tasks`` may be any iterable (e.g. a generator that loads or builds each subject on demand):
    it is read ``chunk_size`` tasks at a time, so with a lazy source the memory held is one
    chunk's, whatever the number of subjects. Yields, per chunk, that chunk's
    :class:`SubjectAdaptation` (in task order); consume each before asking for the next.

    Raises
    ------
    TooFewFacesError
        A task with fewer than ``config.adapt.min_frames`` frames (the trainer's rule), raised
        before its chunk is adapted.
    """
    engine = engine or BatchedConfig()
    if config.dp is not None:
        raise ValueError("the batched engine does not run DP-SGD; use the per-client engine for config.dp")
    method = config.method()
    adapt = config.adapt
    device = torch.device(engine.device)
    names = trainable_names(translator, classifier, method)
    base = {n: p.detach().to(device) for n, p in translator.named_parameters()}
    cls_w = classifier.fc.weight.detach().to(device)
    cls_b = classifier.fc.bias.detach().to(device)
    source = iter(tasks)
    start = 0
    while chunk_tasks := list(itertools.islice(source, engine.chunk_size)):
        for task in chunk_tasks:
            if len(task.features) < adapt.min_frames:
                raise TooFewFacesError(len(task.features), adapt.min_frames)
        with torch_threads(engine.num_threads):
            yield _run_chunk(
                translator,
                base,
                names,
                cls_w,
                cls_b,
                chunk_tasks,
                start,
                method,
                adapt,
                device,
                engine.fused_adam,
                engine.rng,
            )
        start += len(chunk_tasks)


def _new_chunk(
    tasks: list[SubjectTask],
    start: int,
    base: dict[str, Tensor],
    names: list[str],
    device: torch.device,
    rng: RandomStreams,
) -> _Chunk:
    """Stack ``tasks`` (positions ``start``...): features, style codes, generators, parameters."""
    s = len(tasks)
    sizes = torch.tensor([len(t.features) for t in tasks])
    offsets = torch.cumsum(sizes, 0) - sizes
    stacked = {n: base[n].unsqueeze(0).repeat(s, *([1] * base[n].ndim)).requires_grad_(True) for n in names}
    chunk = _Chunk(
        positions=list(range(start, start + s)),
        tasks=tasks,
        partners=[_Partners(len(t.features), t.video_ids, t.time_index) for t in tasks],
        gens=[torch.Generator().manual_seed(t.seed) for t in tasks],
        drop_gens=[torch.Generator().manual_seed(t.seed) for t in tasks],
        offsets=offsets,
        features=torch.cat([t.features for t in tasks]).float().to(device),
        s_t=torch.stack([t.style_target for t in tasks]).float().to(device),
        s_r=torch.stack([t.style_reference for t in tasks]).float().to(device),
        ref_mu=torch.stack([t.reference_stats[0] for t in tasks]).float().to(device),
        ref_sigma=torch.stack([t.reference_stats[1] for t in tasks]).float().to(device),
        params=stacked,
        state={n: [] for n in names},
        ema=[[] for _ in tasks],
        history=[[] for _ in tasks],
        sizes=sizes,
    )
    if rng == "fast":
        chunk.index_partners()
    return chunk


def _run_chunk(
    translator: Translator,
    base: dict[str, Tensor],
    names: list[str],
    cls_w: Tensor,
    cls_b: Tensor,
    tasks: list[SubjectTask],
    start: int,
    method: PFTAdaptation,
    cfg: AdaptConfig,
    device: torch.device,
    fused_adam: bool = False,
    rng: RandomStreams = "exact",
) -> list[SubjectAdaptation]:
    chunk = _new_chunk(tasks, start, base, names, device, rng)
    blocks = len(translator.blocks)
    drop_p = [float(translator.blocks[i][2].p) for i in range(blocks)]  # type: ignore[index]
    ln_eps = translator.norm.eps
    results: list[SubjectAdaptation] = []
    for step in range(1, cfg.max_iterations + 1):
        losses = _step(
            chunk, base, cls_w, cls_b, method, cfg, step, blocks, drop_p, ln_eps, device, fused_adam, rng
        )
        done: list[int] = []
        for r, value in enumerate(losses):
            ema, hist = chunk.ema[r], chunk.history[r]
            hist.append(value)
            ema.append(value if not ema else cfg.ema_beta * ema[-1] + (1 - cfg.ema_beta) * value)
            converged = False
            if step >= cfg.min_iterations and step > cfg.window:
                before = ema[-1 - cfg.window]
                converged = abs(ema[-1] - before) <= cfg.tol * max(abs(before), 1e-8)
            if converged or step == cfg.max_iterations:
                done.append(r)
                results.append(
                    SubjectAdaptation(
                        chunk.tasks[r].subject,
                        chunk.positions[r],
                        {n: chunk.params[n][r].detach().cpu().clone() for n in names},
                        step,
                        converged,
                        value,
                    )
                )
        if len(done) == len(chunk.positions):
            break
        if done:
            chunk.keep([r for r in range(len(chunk.positions)) if r not in set(done)])
    results.sort(key=lambda a: a.position)
    return results


@dataclass
class _Draws:
    """One step's random draws for every live subject of a chunk."""

    a_rows: Tensor  # (S*B,) rows of chunk.features: the sampled frames f_a
    b_rows: Tensor  # (S*B,) their partners f_b
    noise: Tensor | None  # (S, B, D) partner noise (unscaled)
    masks_a: list[Tensor | None]  # per block: (S, B, H) bool keep-masks of T(f_a), None if p = 0
    masks_b: list[Tensor | None]  # the same for T(f_b) (consistency target "translated")


def _draw_exact(
    chunk: _Chunk, bsz: int, hidden: list[int], drop_p: list[float], method: PFTAdaptation, d: int
) -> _Draws:
    """Each subject's draws replayed from its two generators in the trainer's order."""
    s = len(chunk.tasks)
    idx = torch.empty(s, bsz, dtype=torch.long)
    part = torch.empty(s, bsz, dtype=torch.long)
    noise = torch.empty(s, bsz, d) if method.noise_std > 0 else None
    translated = method.consistency_target == "translated"

    def masks() -> list[Tensor | None]:
        return [
            torch.empty(s, bsz, h, dtype=torch.bool) if p > 0 else None
            for h, p in zip(hidden, drop_p, strict=True)
        ]

    masks_a = masks()
    masks_b: list[Tensor | None] = masks() if translated else [None] * len(hidden)
    scratch = {h: torch.empty(bsz, h, dtype=torch.int64) for h in set(hidden)}
    thresholds = [_keep_threshold(1 - p) for p in drop_p]
    for r, task in enumerate(chunk.tasks):
        gen, drop = chunk.gens[r], chunk.drop_gens[r]
        torch.randint(len(task.features), (bsz,), generator=gen, out=idx[r])
        part[r] = chunk.partners[r].draw(idx[r], gen)
        # the trainer's order: T(f_a) dropout masks (global stream), noise, T(f_b) masks
        for i, m in enumerate(masks_a):
            if m is not None:
                _bernoulli_into(drop, scratch[hidden[i]], thresholds[i], m[r])
        if noise is not None:
            torch.randn((bsz, d), generator=gen, out=noise[r])
        for i, m in enumerate(masks_b):
            if m is not None:
                _bernoulli_into(drop, scratch[hidden[i]], thresholds[i], m[r])
    offsets = chunk.offsets[:, None]
    return _Draws((idx + offsets).flatten(), (part + offsets).flatten(), noise, masks_a, masks_b)


def _draw_fast(
    chunk: _Chunk, bsz: int, hidden: list[int], drop_p: list[float], method: PFTAdaptation, d: int
) -> _Draws:
    """One block of 64-bit words per subject (its own generator), converted for the whole chunk."""
    s = len(chunk.tasks)
    translated = method.consistency_target == "translated"
    mask_words = [(bsz * h + 3) // 4 if p > 0 else 0 for h, p in zip(hidden, drop_p, strict=True)]
    per_pass = sum(mask_words)
    width = 2 * bsz + per_pass * (2 if translated else 1)
    words = torch.empty(s, width, dtype=torch.int64)
    noise = torch.empty(s, bsz, d) if method.noise_std > 0 else None
    for r in range(s):
        words[r].random_(-(2**63), None, generator=chunk.gens[r])
        if noise is not None:
            torch.randn((bsz, d), generator=chunk.gens[r], out=noise[r])
    sizes = chunk.sizes[:, None]
    a_rows = (words[:, :bsz] & _MASK62) % sizes + chunk.offsets[:, None]
    assert chunk.partner_table is not None and chunk.partner_count is not None
    count = chunk.partner_count[a_rows]
    choice = (words[:, bsz : 2 * bsz] & _MASK62) % count.clamp(min=1)
    b_rows = torch.where(count > 0, chunk.partner_table[a_rows, choice], a_rows)
    # a dropout mask is a 16-bit uniform: keep when below round(keep * 2**16) (as signed int16)
    cursor = 2 * bsz

    def masks() -> list[Tensor | None]:
        nonlocal cursor
        out: list[Tensor | None] = []
        for i, (h, p) in enumerate(zip(hidden, drop_p, strict=True)):
            if p == 0:
                out.append(None)
                continue
            u16 = words[:, cursor : cursor + mask_words[i]].view(torch.int16)[:, : bsz * h]
            out.append((u16 < round((1 - p) * 2**16) - 2**15).view(s, bsz, h))
            cursor += mask_words[i]
        return out

    masks_a = masks()
    masks_b: list[Tensor | None] = masks() if translated else [None] * len(hidden)
    return _Draws(a_rows.flatten(), b_rows.flatten(), noise, masks_a, masks_b)


def _step(
    chunk: _Chunk,
    base: dict[str, Tensor],
    cls_w: Tensor,
    cls_b: Tensor,
    method: PFTAdaptation,
    cfg: AdaptConfig,
    step: int,
    blocks: int,
    drop_p: list[float],
    ln_eps: float,
    device: torch.device,
    fused: bool = False,
    rng: RandomStreams = "exact",
) -> list[float]:
    """One optimiser step for every live subject of ``chunk``; returns each subject's loss."""
    bsz = cfg.batch_size
    hidden = [int(base[f"blocks.{i}.0.weight"].shape[0]) for i in range(blocks)]
    d = chunk.features.shape[1]
    draw = _draw_exact if rng == "exact" else _draw_fast
    draws = draw(chunk, bsz, hidden, drop_p, method, d)
    s = len(chunk.tasks)
    fa = chunk.features[draws.a_rows.to(device)].view(s, bsz, d)
    fb = chunk.features[draws.b_rows.to(device)].view(s, bsz, d)
    if draws.noise is not None:
        fb = fb + method.noise_std * draws.noise.to(device)

    def scaled(masks: list[Tensor | None]) -> list[Tensor | None] | None:
        if all(m is None for m in masks):
            return None
        # dropout's ``mask.float().div_(1 - p)``, as a multiply by 1/(1-p) rounded to float32:
        # the same values (1 * s = s, 0 * s = 0), and a multiply is cheaper than a divide
        scale = [float(torch.ones(()).div_(1 - q)) for q in drop_p]
        return [
            None if m is None else m.to(device=device, dtype=torch.float32).mul_(scale[i])
            for i, m in enumerate(masks)
        ]

    p = {**base, **chunk.params}
    e_from, e_to = _embed(p, chunk.s_t), _embed(p, chunk.s_r)
    f_hat = _translate(p, fa, e_from, e_to, blocks, scaled(draws.masks_a), ln_eps)
    logits_a = F_nn.linear(f_hat, cls_w, cls_b)
    with torch.no_grad():
        if method.consistency_target == "translated":
            logits_b = F_nn.linear(
                _translate(p, fb, e_from, e_to, blocks, scaled(draws.masks_b), ln_eps), cls_w, cls_b
            )
        else:
            logits_b = F_nn.linear(fb, cls_w, cls_b)
    log_pa = F_nn.log_softmax(logits_a, dim=2)
    log_pb = F_nn.log_softmax(logits_b, dim=2)
    cons = (log_pb.exp() * (log_pb - log_pa)).sum(dim=(1, 2)) / bsz
    total = method.lambda_consistency * cons
    if method.lambda_style > 0:
        mu = f_hat.mean(1)
        sigma = torch.sqrt(f_hat.var(1, unbiased=False) + STATS_EPS)
        sty = (mu - chunk.ref_mu).pow(2).sum(1) + (sigma - chunk.ref_sigma).pow(2).sum(1)
        total = total + method.lambda_style * sty
    if method.lambda_neutral > 0:
        eps = method.neutral_smoothing
        k = log_pa.shape[2]
        nll = -log_pa[:, :, method.neutral_class].mean(1)
        smooth = -log_pa.sum(2).mean(1)
        neu = (1 - eps) * nll + (eps / k) * smooth if eps > 0 else nll
        total = total + method.lambda_neutral * neu
    leaves = list(chunk.params.values())
    grads = torch.autograd.grad(total.sum(), leaves)
    with torch.no_grad():
        for (name, param), grad in zip(chunk.params.items(), grads, strict=True):
            _optimizer_update(param, grad, chunk.state[name], cfg, step, fused)
    return total.detach().double().cpu().tolist()


def _optimizer_update(
    param: Tensor, grad: Tensor, state: list[Tensor], cfg: AdaptConfig, step: int, fused: bool = False
) -> None:
    """``torch.optim.Adam``/``SGD`` (default options) on a stacked tensor: the single-tensor path
    (bit-identical to the trainer's optimiser) for small stacks, the fused Adam kernel for large."""
    if cfg.optimizer == "sgd":
        if cfg.weight_decay != 0:
            grad = grad.add(param, alpha=cfg.weight_decay)
        if cfg.momentum != 0:
            if not state:
                state.append(grad.clone())
            else:
                state[0].mul_(cfg.momentum).add_(grad)
            grad = state[0]
        param.add_(grad, alpha=-cfg.lr)
        return
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    if not state:
        state.extend([torch.zeros_like(param), torch.zeros_like(param)])
    exp_avg, exp_avg_sq = state
    if fused and param.numel() >= _FUSED_MIN and hasattr(torch, "_fused_adam_"):
        # torch's fused Adam kernel (what ``Adam(fused=True)`` runs): one pass instead of six,
        # ~6x faster on the large stacks of full-T adaptation; it rounds differently by ~1 ulp
        step_t = torch.tensor(float(step), device=param.device)
        torch._fused_adam_(
            [param], [grad], [exp_avg], [exp_avg_sq], [], [step_t],
            lr=cfg.lr, beta1=beta1, beta2=beta2, weight_decay=cfg.weight_decay, eps=eps,
            amsgrad=False, maximize=False,
        )  # fmt: skip
        return
    if cfg.weight_decay != 0:
        grad = grad.add(param, alpha=cfg.weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = cfg.lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def run_pft_batched(
    model: SourceModel,
    targets: Sequence[tuple[int, TargetData]],
    settings: MethodSettings,
    seed: int,
    engine: BatchedConfig | None = None,
) -> dict[str, MethodOutcome]:
    """``simulations.methods.run_pft`` for many targets at once: target ``(k, data)`` adapts with
    seed ``seed * 1000 + k`` (as the per-client engine), then predicts on its ``eval`` frames.

    Returns the outcome per subject name (the reported seconds are the chunk's wall time shared
    equally by its subjects).
    """
    import time

    pft = settings.pft
    tasks = [
        subject_task(
            model,
            t.adapt.features,
            t.adapt.frame_stats,
            pft,
            seed * 1000 + k,
            subject=t.subject,
            descriptor=t.adapt.mean_descriptor(),
            video_ids=t.adapt.video_ids,
            time_index=t.adapt.time_index,
        )
        for k, t in targets
    ]
    by_name = {t.subject: t for _, t in targets}
    n_params = sum(p.numel() for p in model.translator.last_layers_parameters(pft.last_layers))
    outcomes: dict[str, MethodOutcome] = {}
    t0 = time.perf_counter()
    for chunk in adapt_subjects(model.translator, model.classifier, tasks, pft, engine):
        seconds = (time.perf_counter() - t0) / max(1, len(chunk))
        for a in chunk:
            task = tasks[a.position]
            translator = a.translator(model.translator)
            with torch.no_grad():
                translated = translator(
                    by_name[a.subject].eval.features, task.style_target, task.style_reference
                )
                logits = model.classifier.eval()(translated)
            outcomes[a.subject] = MethodOutcome(
                logits, a.iterations, seconds, translated, a.converged, n_params
            )
        t0 = time.perf_counter()
    return outcomes

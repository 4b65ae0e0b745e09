"""The batched engine (``pft simulate --engine batched``): many subjects' translators adapted at once.

The per-client engine adapts one subject after another with
:class:`~pft.core.adaptation.AdaptationTrainer` and :class:`~pft.core.adaptation.PFTAdaptation`.
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

Bias-only stage 3 (the default: only ``out.bias`` adapts) takes a shorter road to the same numbers.
Everything before the output bias is frozen and shared, so T runs without autograd, in place, on
reused buffers, both passes (T(f_a), T(f_b)) in the same matrix products. The first block's output
on a cached frame does not change between steps (only its dropout mask does), so it is computed
once per frame and chunk. Dropout's ``1/(1-p)`` is folded into the next layer's weights, and the
loss is written in terms of ``C(T(f) - b) + C.weight @ b`` and the batch's mean and spread of
``T(f) - b``, so autograd only handles (subjects x classes) tensors. Each subject's draws come
from its own generators, so they are spread over ``num_threads`` threads (torch's generators are
serial): the result does not depend on the split.

Agreement with the per-client engine: the sampled batches, masks and noise are identical; the
arithmetic differs only by float re-association and rounding (``bmm`` vs ``mm``, a fused vs an
unfused LayerNorm, the folded dropout scale, the bias added after C), ~1e-6 relative on the
loss. Per-subject iterations, parameters (``atol 1e-4``) and predictions agree; a subject whose
EMA criterion sits within ~1e-6 of the threshold could stop one step apart (tests check a few
subjects). Memory is bounded by ``chunk_size`` subjects, not by their number: chunks are produced
one at a time and the caller consumes each before the next.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F_nn
from pydantic import Field
from torch import Tensor

from pft.core.adaptation import AdaptConfig, ModelParts, PFTAdaptation
from pft.core.config import FrozenConfig
from pft.core.errors import TooFewFacesError
from pft.core.losses import STATS_EPS
from pft.core.methods import MethodOutcome, MethodSettings, TargetData
from pft.core.models import Classifier, Translator
from pft.core.personalize import PersonalizeConfig, SourceModel, translation_goal
from pft.core.training import torch_threads

_MASK53 = (1 << 53) - 1
_MASK32 = 0xFFFFFFFF
_MASK62 = (1 << 62) - 1
RandomStreams = Literal["exact", "fast"]
_FUSED_MIN = 1 << 16  # stacks at least this large use the fused Adam kernel
_FIRST_BLOCK_BYTES = 512 << 20  # bias-only: largest per-chunk cache of the first block's output


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
    """What :func:`pft.core.personalize.personalize` computes before adapting (style code, the
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


class _Buffers:
    """Step-sized tensors reused from step to step, by name. A fresh multi-megabyte tensor is
    fresh memory from the OS, and its page faults cost as much as the arithmetic done in it; a
    smaller request (after compaction) is served by the front of the same buffer."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._store: dict[str, Tensor] = {}

    def get(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, host: bool = False
    ) -> Tensor:
        """A tensor of ``shape`` (contents undefined) on the chunk's device, or the CPU (``host``)."""
        n = math.prod(shape)
        buf = self._store.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            device = torch.device("cpu") if host else self.device
            buf = self._store[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


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
    partner_table: Tensor | None = None  # (all frames, width) chunk rows
    partner_count: Tensor | None = None  # (all frames,) partners per frame
    buffers: _Buffers = field(default_factory=lambda: _Buffers(torch.device("cpu")))
    style: Tensor | None = None  # frozen hidden layers: (S, H) first-layer style rows
    first_block: Tensor | None = None  # frozen hidden layers: (all frames, H) block 0's output

    def index_partners(self) -> None:
        """The subjects' partner tables as one table of chunk rows."""
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
        if self.style is not None:
            self.style = self.style[idx]  # first_block is indexed by frame rows, which stay
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
    threads = engine.num_threads or torch.get_num_threads()
    # the per-subject random draws are serial in torch: spread the subjects over the threads
    pool = ThreadPoolExecutor(threads, thread_name_prefix="pft-draws") if threads > 1 else None
    workers = _Workers(pool, threads) if pool is not None else None
    try:
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
                    engine,
                    workers,
                )
            start += len(chunk_tasks)
    finally:
        if pool is not None:
            pool.shutdown()


def _new_chunk(
    tasks: list[SubjectTask],
    start: int,
    base: dict[str, Tensor],
    names: list[str],
    device: torch.device,
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
        buffers=_Buffers(device),
    )
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
    engine: BatchedConfig,
    workers: _Workers | None = None,
) -> list[SubjectAdaptation]:
    chunk = _new_chunk(tasks, start, base, names, device)
    blocks = len(translator.blocks)
    drop_p = [float(translator.blocks[i][2].p) for i in range(blocks)]  # type: ignore[index]
    ln_eps = translator.norm.eps
    frozen = _frozen_hidden(base, blocks, drop_p) if names == ["out.bias"] else None
    if frozen is not None:
        _prepare_frozen(chunk, base, frozen, ln_eps)
    results: list[SubjectAdaptation] = []
    for step in range(1, cfg.max_iterations + 1):
        losses = _step(
            chunk, base, cls_w, cls_b, method, cfg, step, blocks, drop_p, ln_eps,
            engine.fused_adam, engine.rng, frozen, workers,
        )  # fmt: skip
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
    # per block: (P, S, B, H) bool keep-masks (None if p = 0); pass 0 is T(f_a), pass 1 (P = 2,
    # consistency target "translated") is T(f_b)
    kept: list[Tensor | None]


@dataclass(frozen=True)
class _Workers:
    """Threads for the per-subject random draws."""

    pool: ThreadPoolExecutor
    size: int


def _each_subject(s: int, work: Callable[[range], None], workers: _Workers | None) -> None:
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


def _new_kept(
    buffers: _Buffers, passes: int, s: int, bsz: int, hidden: list[int], drop_p: list[float]
) -> tuple[Tensor | None, list[Tensor | None]]:
    """Keep-mask storage for one step: ``(all, per_block)`` where ``all`` is (S, P, L, B, H) - a
    subject's masks contiguous, in the order they are drawn - and ``per_block[i]`` the (P, S, B,
    H) view of block i; ``(None, [None, ...])`` without dropout."""
    if all(p == 0 for p in drop_p):
        return None, [None] * len(hidden)
    if len(set(hidden)) > 1 or len(set(drop_p)) > 1:
        raise ValueError("the batched engine needs the same width and dropout in every block of T")
    kept = buffers.get("kept", (s, passes, len(hidden), bsz, hidden[0]), torch.bool, host=True)
    return kept, [kept[:, :, i].transpose(0, 1) for i in range(len(hidden))]


def _draw_exact(
    chunk: _Chunk,
    bsz: int,
    hidden: list[int],
    drop_p: list[float],
    method: PFTAdaptation,
    d: int,
    workers: _Workers | None = None,
) -> _Draws:
    """Each subject's draws replayed from its two generators in the trainer's order.

    Per subject and step: the frame indices and the partner draws as ONE read of its sampling
    generator, the noise (the same generator), and ALL its dropout masks at once (the dropout
    generator, whose stream holds nothing else: T(f_a)'s masks then T(f_b)'s); the conversions
    then run on the whole chunk."""
    s = len(chunk.tasks)
    buffers = chunk.buffers
    idx = buffers.get("idx", (s, bsz), torch.long, host=True)
    raw = buffers.get("raw", (s, bsz), torch.long, host=True)
    part = buffers.get("part", (s, bsz), torch.long, host=True)
    noise = buffers.get("noise", (s, bsz, d), host=True) if method.noise_std > 0 else None
    passes = 2 if method.consistency_target == "translated" else 1
    kept_all, kept = _new_kept(buffers, passes, s, bsz, hidden, drop_p)
    threshold = _keep_threshold(1 - drop_p[0])
    # ``randint(n, (bsz,))`` (n < 2**32) takes one 32-bit output per index; a subject all of whose
    # frames have partners then takes one per partner: with an even batch, both are bsz 64-bit
    # words (two outputs each, the first in the high half), converted chunk-wide below
    paired = [p.all_paired and bsz % 2 == 0 for p in chunk.partners]

    def draw(rows: range) -> None:
        scratch = torch.empty(kept_all[0].numel() if kept_all is not None else 0, dtype=torch.int64)
        for r in rows:
            gen = chunk.gens[r]
            if paired[r]:
                raw[r].random_(-(2**63), None, generator=gen)
            else:
                torch.randint(len(chunk.tasks[r].features), (bsz,), generator=gen, out=idx[r])
                part[r] = chunk.partners[r].draw(idx[r], gen)
            if noise is not None:
                torch.randn((bsz, d), generator=gen, out=noise[r])
            if kept_all is not None:
                _bernoulli_into(chunk.drop_gens[r], scratch, threshold, kept_all[r].view(-1))

    _each_subject(s, draw, workers)
    rows = [r for r in range(s) if paired[r]]
    if rows:
        assert chunk.partner_table is not None and chunk.partner_count is not None
        sel = torch.tensor(rows) if len(rows) < s else slice(None)
        v = raw[sel]
        out32 = torch.stack([(v >> 32) & _MASK32, v & _MASK32], 2).flatten(1)
        a = out32[:, :bsz] % chunk.sizes[sel, None] + chunk.offsets[sel, None]
        idx[sel] = a - chunk.offsets[sel, None]
        part[sel] = chunk.partner_table[a, out32[:, bsz:] % chunk.partner_count[a]] - chunk.offsets[sel, None]
    offsets = chunk.offsets[:, None]
    return _Draws((idx + offsets).flatten(), (part + offsets).flatten(), noise, kept)


def _draw_fast(
    chunk: _Chunk,
    bsz: int,
    hidden: list[int],
    drop_p: list[float],
    method: PFTAdaptation,
    d: int,
    workers: _Workers | None = None,
) -> _Draws:
    """One block of 64-bit words per subject (its own generator), converted for the whole chunk."""
    s = len(chunk.tasks)
    passes = 2 if method.consistency_target == "translated" else 1
    kept_all, kept = _new_kept(chunk.buffers, passes, s, bsz, hidden, drop_p)
    decisions = kept_all[0].numel() if kept_all is not None else 0
    width = 2 * bsz + (decisions + 3) // 4
    words = chunk.buffers.get("words", (s, width), torch.int64, host=True)
    noise = chunk.buffers.get("noise", (s, bsz, d), host=True) if method.noise_std > 0 else None

    def draw(rows: range) -> None:
        for r in rows:
            words[r].random_(-(2**63), None, generator=chunk.gens[r])
            if noise is not None:
                torch.randn((bsz, d), generator=chunk.gens[r], out=noise[r])

    _each_subject(s, draw, workers)
    sizes = chunk.sizes[:, None]
    a_rows = (words[:, :bsz] & _MASK62) % sizes + chunk.offsets[:, None]
    assert chunk.partner_table is not None and chunk.partner_count is not None
    count = chunk.partner_count[a_rows]
    choice = (words[:, bsz : 2 * bsz] & _MASK62) % count.clamp(min=1)
    b_rows = torch.where(count > 0, chunk.partner_table[a_rows, choice], a_rows)
    if kept_all is not None:
        # a dropout decision is a 16-bit uniform: kept when below round(keep * 2**16) (as int16);
        # the words after the indices hold the subject's masks in kept_all's order
        u16 = words[:, 2 * bsz :].view(torch.int16)[:, :decisions]
        torch.lt(u16, round((1 - drop_p[0]) * 2**16) - 2**15, out=kept_all.view(s, decisions))
    return _Draws(a_rows.flatten(), b_rows.flatten(), noise, kept)


@dataclass(frozen=True)
class _FrozenHidden:
    """T's layers when only ``out.bias`` adapts (bias-only stage 3): everything before the output
    bias is shared and frozen, so the forward runs without autograd, in place, on all passes at
    once. Dropout's ``1 / (1 - p)`` is folded into the weights of the layer after each mask (the
    same products, rounded once differently)."""

    first: Tensor  # (H, D): the per-frame part of the first layer's weight
    weights: list[Tensor]  # blocks 1.. : (H, H) weights, pre-scaled by the previous block's dropout
    biases: list[Tensor]
    out: Tensor  # (D, H) out.weight, pre-scaled by the last block's dropout


def _frozen_hidden(base: dict[str, Tensor], blocks: int, drop_p: list[float]) -> _FrozenHidden:
    d = base["norm.weight"].shape[0]

    def scaled(w: Tensor, p: float) -> Tensor:
        # dropout's ``mask.float().div_(1 - p)`` scale, rounded to float32 as torch rounds it
        return w * float(torch.ones(()).div_(1 - p)) if p > 0 else w

    return _FrozenHidden(
        first=base["blocks.0.0.weight"][:, :d].contiguous(),
        weights=[scaled(base[f"blocks.{i}.0.weight"], drop_p[i - 1]) for i in range(1, blocks)],
        biases=[base[f"blocks.{i}.0.bias"] for i in range(1, blocks)],
        out=scaled(base["out.weight"], drop_p[blocks - 1]),
    )


def _style_rows(p: dict[str, Tensor], e_from: Tensor, e_to: Tensor) -> Tensor:
    """The first layer's per-subject part: its bias and its weights on ``[E(s_from), E(s_to)]``."""
    d, e = p["norm.weight"].shape[0], e_from.shape[-1]
    w0, b0 = p["blocks.0.0.weight"], p["blocks.0.0.bias"]
    return F_nn.linear(e_from, w0[:, d : d + e], b0) + F_nn.linear(e_to, w0[:, d + e :])  # (S, 1, H)


def _prepare_frozen(chunk: _Chunk, base: dict[str, Tensor], fz: _FrozenHidden, ln_eps: float) -> None:
    """Per chunk, once: each subject's style rows, and the first block's output (before dropout)
    for every frame - what T(f_a) starts from (f_a is a cached frame, unlike the noisy f_b), so
    the first layer runs once per frame instead of once per sampled frame and step. The cache is
    skipped (T(f_a) starts from the frames each step) when it would exceed ``_FIRST_BLOCK_BYTES``."""
    with torch.no_grad():
        chunk.style = _style_rows(base, _embed(base, chunk.s_t), _embed(base, chunk.s_r)).squeeze(1)
        if len(chunk.features) * fz.first.shape[0] * 4 > _FIRST_BLOCK_BYTES:
            return
        owner = torch.repeat_interleave(torch.arange(len(chunk.tasks)), chunk.sizes).to(chunk.style.device)
        chunk.first_block = _first_block(chunk.features, chunk.style[owner], base, fz, ln_eps)


def _first_block(
    f: Tensor,
    style: Tensor,
    base: dict[str, Tensor],
    fz: _FrozenHidden,
    ln_eps: float,
    out: Tensor | None = None,
) -> Tensor:
    """The first block before its dropout, ``GELU(first layer)``, on frames ``f`` (..., D) whose
    subjects' style rows ``style`` broadcast to (..., H); written into ``out`` if given."""
    d, width = f.shape[-1], fz.first.shape[0]
    normed = F_nn.layer_norm(f, (d,), base["norm.weight"], base["norm.bias"], ln_eps)
    h = out if out is not None else f.new_empty(*f.shape[:-1], width)
    torch.mm(normed.view(-1, d), fz.first.t(), out=h.view(-1, width))
    return torch.ops.aten.gelu_(h.add_(style))


def _forward_frozen(
    chunk: _Chunk,
    base: dict[str, Tensor],
    fz: _FrozenHidden,
    draws: _Draws,
    noise_std: float,
    ln_eps: float,
    passes: int,
) -> Tensor:
    """``T(f) - out.bias`` for pass 0 (f_a) and, with ``passes = 2``, pass 1 (f_b): (P, S, B, D).

    No autograd, and every large tensor is one of the chunk's reused buffers (the result too: it
    is valid until the next step)."""
    assert chunk.style is not None
    buffers = chunk.buffers
    s = len(chunk.tasks)
    bsz = len(draws.a_rows) // s
    rows, d = passes * s * bsz, chunk.features.shape[1]
    width = fz.first.shape[0]
    device = chunk.features.device
    # z starts as the frames themselves (f_a, then f_b with its noise): the last layer adds onto it
    z = buffers.get("z", (passes, s, bsz, d))
    h = buffers.get("h0", (passes, s, bsz, width))
    torch.index_select(chunk.features, 0, draws.a_rows.to(device), out=z[0].view(s * bsz, d))
    if chunk.first_block is not None:
        torch.index_select(chunk.first_block, 0, draws.a_rows.to(device), out=h[0].view(s * bsz, width))
    if passes == 2:
        torch.index_select(chunk.features, 0, draws.b_rows.to(device), out=z[1].view(s * bsz, d))
        if draws.noise is not None:
            z[1].add_(draws.noise.to(device).mul_(noise_std))  # ``f_b + noise_std * noise``
    for pass_ in range(passes):
        if pass_ == 1 or chunk.first_block is None:
            _first_block(z[pass_], chunk.style.unsqueeze(1), base, fz, ln_eps, out=h[pass_])
    for i, kept in enumerate(draws.kept):
        if i > 0:
            w, b = fz.weights[i - 1], fz.biases[i - 1]
            out = buffers.get(f"h{i}", (passes, s, bsz, w.shape[0]))
            torch.addmm(b, h.view(rows, h.shape[-1]), w.t(), out=out.view(rows, w.shape[0]))
            h = torch.ops.aten.gelu_(out)
        if kept is not None:
            # bool -> float is slow in torch; the same bytes as uint8 convert vectorised
            mask = buffers.get("mask", h.shape)
            mask.copy_(kept[:passes].view(torch.uint8))
            h.mul_(mask)  # the 1/(1-p) scale is in the next layer's weights
    flat = z.view(rows, d)
    torch.addmm(flat, h.view(rows, h.shape[-1]), fz.out.t(), out=flat)  # f + out.weight @ h
    return z


def _frames_b(chunk: _Chunk, draws: _Draws, method: PFTAdaptation) -> Tensor:
    """The partner frames f_b with their noise: (S, B, D)."""
    s, d = len(chunk.tasks), chunk.features.shape[1]
    fb = chunk.features[draws.b_rows.to(chunk.features.device)].view(s, -1, d)
    if draws.noise is not None:
        fb = fb + method.noise_std * draws.noise.to(fb.device)
    return fb


@dataclass
class _Outputs:
    """What the loss needs from one step's forward, per subject: C's logits on T(f_a) (with
    autograd to the trainable tensors), the consistency target's logits, and T(f_a)'s batch
    mean and standard deviation."""

    logits_a: Tensor  # (S, B, classes)
    logits_b: Tensor  # (S, B, classes), no autograd
    mu: Tensor  # (S, D)
    sigma: Tensor  # (S, D)


def _outputs_frozen(
    chunk: _Chunk,
    base: dict[str, Tensor],
    cls_w: Tensor,
    cls_b: Tensor,
    method: PFTAdaptation,
    frozen: _FrozenHidden,
    draws: _Draws,
    ln_eps: float,
) -> _Outputs:
    """Bias-only: C(T(f)) = C(z) + C.weight @ out.bias with z = T(f) - out.bias, and the batch's
    spread of T(f) is z's (the bias moves every frame alike): autograd only sees (S, classes)."""
    translated = method.consistency_target == "translated"
    with torch.no_grad():
        z = _forward_frozen(chunk, base, frozen, draws, method.noise_std, ln_eps, 2 if translated else 1)
        plain_a = F_nn.linear(z[0], cls_w, cls_b)
        mu_z = z[0].mean(1, keepdim=True)
        # the biased variance as the mean squared deviation: torch's var over a middle dim is a
        # scalar Welford loop, 7x slower (the two agree to float rounding)
        sigma = torch.sqrt((z[0] - mu_z).square_().mean(1) + STATS_EPS)
    bias = chunk.params["out.bias"]
    shift = F_nn.linear(bias, cls_w).unsqueeze(1)
    with torch.no_grad():
        if translated:
            logits_b = F_nn.linear(z[1], cls_w, cls_b) + shift
        else:
            logits_b = F_nn.linear(_frames_b(chunk, draws, method), cls_w, cls_b)
    return _Outputs(plain_a + shift, logits_b, mu_z.squeeze(1) + bias, sigma)


def _outputs_autograd(
    chunk: _Chunk,
    base: dict[str, Tensor],
    cls_w: Tensor,
    cls_b: Tensor,
    method: PFTAdaptation,
    draws: _Draws,
    blocks: int,
    drop_p: list[float],
    ln_eps: float,
) -> _Outputs:
    """Any trainable set: T's forward on the stacked tensors, autograd through all of it."""
    device = chunk.features.device
    s, d = len(chunk.tasks), chunk.features.shape[1]

    def keep(pass_: int) -> list[Tensor | None] | None:
        if all(m is None for m in draws.kept):
            return None
        # dropout's ``mask.float().div_(1 - p)``, as a multiply by 1/(1-p) rounded to float32:
        # the same values (1 * s = s, 0 * s = 0), and a multiply is cheaper than a divide
        scale = [float(torch.ones(()).div_(1 - q)) for q in drop_p]
        return [
            None if m is None else m[pass_].view(torch.uint8).to(device, torch.float32).mul_(scale[i])
            for i, m in enumerate(draws.kept)
        ]

    p = {**base, **chunk.params}
    e_from, e_to = _embed(p, chunk.s_t), _embed(p, chunk.s_r)
    fa = chunk.features[draws.a_rows.to(device)].view(s, -1, d)
    fb = _frames_b(chunk, draws, method)
    f_hat = _translate(p, fa, e_from, e_to, blocks, keep(0), ln_eps)
    with torch.no_grad():
        if method.consistency_target == "translated":
            fb = _translate(p, fb, e_from, e_to, blocks, keep(1), ln_eps)
        logits_b = F_nn.linear(fb, cls_w, cls_b)
    sigma = torch.sqrt(f_hat.var(1, unbiased=False) + STATS_EPS)
    return _Outputs(F_nn.linear(f_hat, cls_w, cls_b), logits_b, f_hat.mean(1), sigma)


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
    fused: bool = False,
    rng: RandomStreams = "exact",
    frozen: _FrozenHidden | None = None,
    workers: _Workers | None = None,
) -> list[float]:
    """One optimiser step for every live subject of ``chunk``; returns each subject's loss."""
    bsz = cfg.batch_size
    hidden = [int(base[f"blocks.{i}.0.weight"].shape[0]) for i in range(blocks)]
    draw = _draw_exact if rng == "exact" else _draw_fast
    draws = draw(chunk, bsz, hidden, drop_p, method, chunk.features.shape[1], workers)
    if frozen is not None:
        out = _outputs_frozen(chunk, base, cls_w, cls_b, method, frozen, draws, ln_eps)
    else:
        out = _outputs_autograd(chunk, base, cls_w, cls_b, method, draws, blocks, drop_p, ln_eps)
    log_pa = F_nn.log_softmax(out.logits_a, dim=2)
    log_pb = F_nn.log_softmax(out.logits_b, dim=2)
    cons = (log_pb.exp() * (log_pb - log_pa)).sum(dim=(1, 2)) / bsz
    total = method.lambda_consistency * cons
    if method.lambda_style > 0:
        sty = (out.mu - chunk.ref_mu).pow(2).sum(1) + (out.sigma - chunk.ref_sigma).pow(2).sum(1)
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
    """``pft.simulations.methods.run_pft`` for many targets at once: target ``(k, data)`` adapts with
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

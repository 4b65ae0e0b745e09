"""The batched engine's chunk loop: chunks of subjects read from the tasks, stepped until each
subject stops, and their adapted tensors handed back chunk by chunk.

One step of a chunk = that step's draws (:mod:`~pft.simulations.batched.streams`), the stacked
forward (:mod:`~pft.simulations.batched.forward`), the stage-3 objective
(:meth:`pft.core.objective.PFTObjective.evaluate`, one value per subject), ONE autograd pass for
every subject's gradient, and the optimiser (:mod:`~pft.simulations.batched.optimiser`). Each
subject stops by the trainer's rule (:class:`pft.core.adaptation.Convergence`); a subject that
stops leaves the chunk with its tensors at its own stop step, and the chunk is compacted.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from pydantic import Field

from pft.core.adaptation import AdaptConfig, Convergence, ModelParts, PFTAdaptation
from pft.core.config import FrozenConfig
from pft.core.errors import TooFewFacesError
from pft.core.methods import MethodOutcome, MethodSettings, TargetData
from pft.core.models import Classifier, Translator
from pft.core.objective import ReferenceTargets
from pft.core.personalize import PersonalizeConfig, SourceModel
from pft.core.seeding import subject_seed
from pft.core.training import torch_threads
from pft.simulations.batched.buffers import Buffers
from pft.simulations.batched.chunk import Chunk
from pft.simulations.batched.forward import StackedForward, choose_forward
from pft.simulations.batched.optimiser import StackedOptimizer
from pft.simulations.batched.streams import ChunkStreams, Partners, RandomStreams, StepShape, Workers
from pft.simulations.batched.tasks import SubjectAdaptation, SubjectTask, subject_task
from pft.simulations.cluster import PieceReport, ray_session, run_tasks


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


def trainable_names(translator: Translator, classifier: Classifier, method: PFTAdaptation) -> list[str]:
    """Names of the tensors of T that ``method`` adapts (``bias_only``: ``out.bias``)."""
    dummy = torch.zeros(translator.style_dim)
    parts = ModelParts(classifier, translator, None, dummy, dummy)
    wanted = {id(p) for p in method.trainable_parameters(parts)}
    return [n for n, p in translator.named_parameters() if id(p) in wanted]


@dataclass
class _ChunkRunner:
    """Everything a chunk's steps share: T (its interface), the method, the trainer's settings,
    the forward road, the step's shape and the draw threads."""

    translator: Translator
    method: PFTAdaptation
    adapt: AdaptConfig
    engine: BatchedConfig
    forward: StackedForward
    names: list[str]
    device: torch.device
    workers: Workers | None

    @property
    def shape(self) -> StepShape:
        """What each step draws per subject."""
        layout = self.translator.layout()
        objective = self.method.objective
        return StepShape(
            batch_size=self.adapt.batch_size,
            noise_dim=layout.feature_dim if objective.noise_std > 0 else None,
            passes=objective.passes,
            hidden=layout.hidden,
            dropout=layout.dropout,
        )

    def new_chunk(self, tasks: list[SubjectTask], start: int) -> Chunk:
        """Stack ``tasks`` (positions ``start``...): features, codes, targets, streams, stacks."""
        s = len(tasks)
        base = self.translator.tensors()
        params = {
            n: base[n].to(self.device).unsqueeze(0).repeat(s, *([1] * base[n].ndim)).requires_grad_(True)
            for n in self.names
        }
        streams = ChunkStreams(
            self.engine.rng,
            [t.seed for t in tasks],
            [Partners(len(t.features), t.video_ids, t.time_index) for t in tasks],
        )
        chunk = Chunk(
            positions=list(range(start, start + s)),
            tasks=tasks,
            features=torch.cat([t.features for t in tasks]).float().to(self.device),
            style_target=torch.stack([t.style_target for t in tasks]).float().to(self.device),
            style_reference=torch.stack([t.style_reference for t in tasks]).float().to(self.device),
            targets=ReferenceTargets.stack([t.targets for t in tasks]).to(self.device),
            params=params,
            optimizer=StackedOptimizer(params, self.adapt, self.engine.fused_adam),
            streams=streams,
            convergence=[Convergence(self.adapt) for _ in tasks],
            buffers=Buffers(self.device),
        )
        self.forward.start(chunk)
        return chunk

    def step(self, chunk: Chunk, shape: StepShape) -> list[float]:
        """One optimiser step for every live subject of ``chunk``; returns each subject's loss."""
        draws = chunk.streams.draw(shape, chunk.buffers, self.workers)
        outputs = self.forward.outputs(chunk, draws)
        total, _ = self.method.objective.evaluate(outputs, chunk.targets, reduction="mean")
        grads = torch.autograd.grad(total.sum(), list(chunk.params.values()))
        chunk.optimizer.step(grads)
        return total.detach().double().cpu().tolist()

    def run(self, tasks: list[SubjectTask], start: int) -> list[SubjectAdaptation]:
        """Adapt one chunk until every subject has stopped; results in task order."""
        chunk = self.new_chunk(tasks, start)
        shape = self.shape
        results: list[SubjectAdaptation] = []
        for step in range(1, self.adapt.max_iterations + 1):
            losses = self.step(chunk, shape)
            done: list[int] = []
            for r, value in enumerate(losses):
                converged = chunk.convergence[r].observe(value)
                if converged or step == self.adapt.max_iterations:
                    done.append(r)
                    state = {n: chunk.params[n][r].detach().cpu().clone() for n in self.names}
                    task = chunk.tasks[r]
                    results.append(
                        SubjectAdaptation(task.subject, chunk.positions[r], state, step, converged, value)
                    )
            if len(done) == len(chunk):
                break
            if done:
                stopped = set(done)
                chunk.keep([r for r in range(len(chunk)) if r not in stopped])
        results.sort(key=lambda a: a.position)
        return results


def adapt_subjects(
    translator: Translator,
    classifier: Classifier,
    tasks: Iterable[SubjectTask],
    config: PersonalizeConfig,
    engine: BatchedConfig | None = None,
    *,
    start: int = 0,
) -> Iterator[list[SubjectAdaptation]]:
    """Adapt a copy of ``translator`` for every task, ``engine.chunk_size`` subjects at a time.

    The first task has position ``start`` (a chunk run on its own, e.g. on a Ray worker, keeps
    its positions in the whole run).

    ``tasks`` may be any iterable (e.g. a generator that loads or builds each subject on demand):
    it is read ``chunk_size`` tasks at a time, so with a lazy source the memory held is one
    chunk's, whatever the number of subjects. Yields, per chunk, that chunk's
    :class:`SubjectAdaptation` (in task order); consume each before asking for the next.

    Raises
    ------
    TooFewFacesError
        A task with fewer than ``config.adapt.min_frames`` frames (the trainer's rule), raised
        before its chunk is adapted.
    ValueError
        ``config.dp`` is set: DP-SGD runs on the per-client engine only.
    """
    engine = engine or BatchedConfig()
    if config.dp is not None:
        raise ValueError("the batched engine does not run DP-SGD; use the per-client engine for config.dp")
    method = config.method()
    adapt = config.adapt
    device = torch.device(engine.device)
    names = trainable_names(translator, classifier, method)
    forward = choose_forward(translator, classifier, names, method.objective, device)
    source = iter(tasks)
    threads = engine.num_threads or torch.get_num_threads()
    # the per-subject random draws are serial in torch: spread the subjects over the threads
    pool = ThreadPoolExecutor(threads, thread_name_prefix="pft-draws") if threads > 1 else None
    workers = Workers(pool, threads) if pool is not None else None
    runner = _ChunkRunner(translator, method, adapt, engine, forward, names, device, workers)
    try:
        while chunk_tasks := list(itertools.islice(source, engine.chunk_size)):
            for task in chunk_tasks:
                if len(task.features) < adapt.min_frames:
                    raise TooFewFacesError(len(task.features), adapt.min_frames)
            with torch_threads(engine.num_threads):
                yield runner.run(chunk_tasks, start)
            start += len(chunk_tasks)
    finally:
        if pool is not None:
            pool.shutdown()


def adapt_chunk(
    translator: Translator,
    classifier: Classifier,
    tasks: list[SubjectTask],
    config: PersonalizeConfig,
    engine: BatchedConfig,
    start: int,
) -> list[SubjectAdaptation]:
    """One chunk (at most ``engine.chunk_size`` tasks, positions from ``start``) adapted on its own:
    what :func:`adapt_subjects` yields for that chunk. A Ray task runs this for one chunk."""
    if len(tasks) > engine.chunk_size:
        raise ValueError(f"{len(tasks)} tasks is more than one chunk ({engine.chunk_size})")
    return [
        a
        for chunk in adapt_subjects(translator, classifier, tasks, config, engine, start=start)
        for a in chunk
    ]


def adapt_subjects_on_ray(
    translator: Translator,
    classifier: Classifier,
    tasks: Iterable[SubjectTask],
    config: PersonalizeConfig,
    engine: BatchedConfig | None = None,
    *,
    total: int | None = None,
    progress: Callable[[int, int, PieceReport], None] | None = None,
) -> list[list[SubjectAdaptation]]:
    """:func:`adapt_subjects` with every chunk a Ray task on the connected cluster
    (:func:`pft.simulations.cluster.ray_session`): the same chunks, so the same results, in
    chunk order. T and C go to the object store once; each chunk's tasks travel with its task.
    A chunk whose worker dies is retried (counted once); ``progress`` gets each chunk's report."""
    import ray

    engine = engine or BatchedConfig()
    if config.dp is not None:
        raise ValueError("the batched engine does not run DP-SGD; use the per-client engine for config.dp")
    shared_t, shared_c = ray.put(translator), ray.put(classifier)
    size = engine.chunk_size

    def pieces() -> Iterator[tuple[object, ...]]:
        source, start = iter(tasks), 0
        while chunk := list(itertools.islice(source, size)):
            yield shared_t, shared_c, chunk, config, engine, start
            start += len(chunk)

    chunks = None if total is None else -(-total // size)
    return run_tasks(adapt_chunk, pieces(), total=chunks, progress=progress)


def run_pft_batched(
    model: SourceModel,
    targets: Sequence[tuple[int, TargetData]],
    settings: MethodSettings,
    seed: int,
    engine: BatchedConfig | None = None,
    *,
    ray_address: str | None = None,
    progress: Callable[[int, int, PieceReport], None] | None = None,
) -> dict[str, MethodOutcome]:
    """``pft.core.methods.run_pft`` for many targets at once: target ``(k, data)`` adapts with
    seed ``subject_seed(seed, k)`` (as the per-client engine), then predicts on its ``eval`` frames.

    With ``ray_address`` the chunks run as Ray tasks on that cluster
    (:func:`adapt_subjects_on_ray`; same chunks, same numbers) and are evaluated here.

    Returns the outcome per subject name (the reported seconds are the chunk's wall time shared
    equally by its subjects; on Ray, the chunk's seconds on its worker).
    """
    pft = settings.pft
    tasks = [
        subject_task(
            model,
            t.adapt.features,
            t.adapt.frame_stats,
            pft,
            subject_seed(seed, k),
            subject=t.subject,
            descriptor=t.adapt.mean_descriptor(),
            video_ids=t.adapt.video_ids,
            time_index=t.adapt.time_index,
        )
        for k, t in targets
    ]
    by_name = {t.subject: t for _, t in targets}
    names = trainable_names(model.translator, model.classifier, pft.method())
    n_params = sum(model.translator.get_parameter(n).numel() for n in names)
    outcomes: dict[str, MethodOutcome] = {}
    chunks: Iterable[tuple[list[SubjectAdaptation], float | None]]
    if ray_address is not None:
        reports: dict[int, PieceReport] = {}

        def note(done: int, total: int, report: PieceReport) -> None:
            reports[report.index] = report
            if progress is not None:
                progress(done, total, report)

        with ray_session(ray_address):
            on_ray = adapt_subjects_on_ray(
                model.translator, model.classifier, tasks, pft, engine, total=len(tasks), progress=note
            )
        chunks = [(c, reports[i].seconds) for i, c in enumerate(on_ray)]
    else:
        chunks = ((c, None) for c in adapt_subjects(model.translator, model.classifier, tasks, pft, engine))
    t0 = time.perf_counter()
    for chunk, worker_seconds in chunks:
        wall = worker_seconds if worker_seconds is not None else time.perf_counter() - t0
        seconds = wall / max(1, len(chunk))
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

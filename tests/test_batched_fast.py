"""The batched engine's ``rng="fast"`` streams: valid, deterministic, chunking-independent draws
with the trainer's distributions, and adaptation that agrees with the exact replay statistically."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pft.core.adaptation import AdaptConfig
from pft.core.personalize import PersonalizeConfig
from pft.simulations.batched import (
    BatchedConfig,
    SubjectAdaptation,
    SubjectTask,
    adapt_subjects,
    subject_task,
)
from pft.simulations.batched.buffers import Buffers
from pft.simulations.batched.streams import ChunkStreams, Partners, StepShape
from pft.simulations.synthetic_world import synthetic_model, synthetic_subject

FIXED = AdaptConfig(lr=0.01, max_iterations=30, min_iterations=30)  # no early stop: same work


def _tasks(config: PersonalizeConfig, n: int) -> list[SubjectTask]:
    model = synthetic_model(0)
    subjects = [synthetic_subject(k, 0, frames=30 + 7 * k) for k in range(n)]
    return [
        subject_task(
            model, s.features, s.frame_stats, config, 100 + k, video_ids=s.video_ids, time_index=s.time_index
        )
        for k, s in enumerate(subjects)
    ]


def _adapt(
    config: PersonalizeConfig, tasks: list[SubjectTask], engine: BatchedConfig
) -> list[SubjectAdaptation]:
    model = synthetic_model(0)
    return [a for c in adapt_subjects(model.translator, model.classifier, tasks, config, engine) for a in c]


def test_fast_streams_do_not_depend_on_chunking() -> None:
    config = PersonalizeConfig(adapt=FIXED)
    tasks = _tasks(config, 5)
    one = _adapt(config, tasks, BatchedConfig(chunk_size=1, rng="fast"))
    three = _adapt(config, tasks, BatchedConfig(chunk_size=3, rng="fast", num_threads=2))  # draws split
    for a, b in zip(one, three, strict=True):
        assert a.subject == b.subject and a.iterations == b.iterations
        assert torch.allclose(a.state["out.bias"], b.state["out.bias"], atol=1e-6)


def test_fast_draws_are_valid_partners_and_have_the_dropout_rate() -> None:
    config = PersonalizeConfig()
    tasks = _tasks(config, 4)
    partners = [Partners(len(t.features), t.video_ids, t.time_index) for t in tasks]
    streams = ChunkStreams("fast", [t.seed for t in tasks], partners)
    buffers = Buffers(torch.device("cpu"))
    bsz = 64
    shape = StepShape(bsz, tasks[0].features.shape[1], passes=2, hidden=(256, 256), dropout=(0.1, 0.1))
    kept, total = 0, 0
    seen = torch.empty(0, dtype=torch.long)
    for _ in range(20):
        d = streams.draw(shape, buffers)
        a, b = d.a_rows.view(4, bsz), d.b_rows.view(4, bsz)
        seen = torch.cat([seen, d.a_rows]).unique()
        for r, task in enumerate(tasks):
            off, n = int(streams.offsets[r]), len(task.features)
            la, lb = a[r] - off, b[r] - off
            assert bool(((la >= 0) & (la < n)).all())
            # a partner is another frame of the same video at another time (the trainer's rule)
            assert task.video_ids is not None and task.time_index is not None
            assert torch.equal(task.video_ids[la], task.video_ids[lb])
            assert bool((task.time_index[la] != task.time_index[lb]).all())
        for m in d.kept:  # (pass, subject, row, unit) keep-masks
            assert m is not None and m.shape == (2, 4, bsz, 256)
            kept += int(m.sum())
            total += m.numel()
    p_keep = 58982 / 65536  # round(0.9 * 2**16) / 2**16
    sd = (p_keep * (1 - p_keep) / total) ** 0.5
    assert abs(kept / total - p_keep) < 5 * sd
    # uniform frame indices: 20 x 64 draws over 30-51 frames reach every frame (expected >= 25 each)
    assert set(seen.tolist()) == set(range(sum(len(t.features) for t in tasks)))


def test_fast_adaptation_agrees_with_the_exact_replay() -> None:
    # Different draws, same distributions: the adapted bias moves the same way by about as much.
    config = PersonalizeConfig(adapt=FIXED)
    tasks = _tasks(config, 4)
    t0 = synthetic_model(0).translator.out.bias.detach()
    exact = _adapt(config, tasks, BatchedConfig(chunk_size=4))
    fast = _adapt(config, tasks, BatchedConfig(chunk_size=4, rng="fast"))
    for e, f in zip(exact, fast, strict=True):
        de, df = e.state["out.bias"] - t0, f.state["out.bias"] - t0
        assert not torch.equal(de, df)  # not the same draws
        assert float((de - df).norm()) < 0.1 * float(de.norm())
        assert abs(e.final_loss - f.final_loss) < 0.02 * e.final_loss


def test_tasks_are_read_one_chunk_at_a_time() -> None:
    # memory bounded by the chunk, not by N: a lazy source is read chunk_size tasks ahead at most
    config = PersonalizeConfig(adapt=AdaptConfig(lr=0.01, max_iterations=3, min_iterations=3))
    tasks = _tasks(config, 5)
    pulled: list[int] = []

    def source() -> Iterator[SubjectTask]:
        for k, task in enumerate(tasks):
            pulled.append(k)
            yield task

    model = synthetic_model(0)
    chunks = adapt_subjects(model.translator, model.classifier, source(), config, BatchedConfig(chunk_size=2))
    sizes = []
    for chunk in chunks:
        assert len(pulled) <= 2 * (len(sizes) + 1)  # this chunk's tasks and nothing beyond
        sizes.append(len(chunk))
    assert sizes == [2, 2, 1] and pulled == [0, 1, 2, 3, 4]
    assert [a.position for a in _adapt(config, tasks, BatchedConfig(chunk_size=2))] == list(range(5))

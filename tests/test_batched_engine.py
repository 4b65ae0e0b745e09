"""The batched engine against the per-client engine (the oracle): same seeds, same numbers."""

from __future__ import annotations

import pytest
import torch

from pft.core.adaptation import AdaptationData, AdaptConfig
from pft.core.errors import TooFewFacesError
from pft.core.frames import FrameSet
from pft.core.methods import MethodSettings, TargetData, run_pft
from pft.core.models import ModelConfig
from pft.core.personalize import PersonalizeConfig, personalize
from pft.simulations import batched
from pft.simulations.batched import (
    BatchedConfig,
    SubjectAdaptation,
    _bernoulli_mask,
    _Partners,
    adapt_subjects,
    run_pft_batched,
    subject_task,
)
from pft.simulations.synthetic_world import synthetic_model, synthetic_subject

# a loose tolerance makes subjects stop at different steps (per-subject early stopping)
FAST = AdaptConfig(lr=0.01, max_iterations=36, min_iterations=8, tol=0.06, window=3)


def _run_both(
    config: PersonalizeConfig,
    n: int,
    chunk: int,
    threads: int = 1,
    lonely: tuple[int, ...] = (),
    model_config: ModelConfig | None = None,
) -> tuple[list, list[SubjectAdaptation]]:
    model = synthetic_model(0, model_config)
    subjects = [synthetic_subject(k, 0, model_config, frames=24 + 5 * k) for k in range(n)]
    for k in lonely:  # frame 0 of subject k alone in its own video: it has no partner
        subjects[k].video_ids[0] = 99
    ref = [
        personalize(
            model,
            s.features,
            s.frame_stats,
            config.model_copy(update={"seed": 100 + k}),
            video_ids=s.video_ids,
            time_index=s.time_index,
        )
        for k, s in enumerate(subjects)
    ]
    tasks = [
        subject_task(
            model, s.features, s.frame_stats, config, 100 + k, video_ids=s.video_ids, time_index=s.time_index
        )
        for k, s in enumerate(subjects)
    ]
    out = [
        a
        for c in adapt_subjects(
            model.translator,
            model.classifier,
            tasks,
            config,
            BatchedConfig(chunk_size=chunk, num_threads=threads),
        )
        for a in c
    ]
    return ref, out


def test_bias_only_matches_per_client_engine() -> None:
    # with the style term on, these synthetic subjects converge at different steps (tested below)
    ref, out = _run_both(PersonalizeConfig(adapt=FAST, lambda_style=0.1, neutral_smoothing=0.4), 4, chunk=3)
    assert [a.position for a in out] == [0, 1, 2, 3]
    assert len({a.iterations for a in out}) > 1  # subjects really stopped at their own steps
    for r, a in zip(ref, out, strict=True):
        assert a.iterations == r.result.iterations and a.converged == r.result.converged
        assert a.final_loss == pytest.approx(r.result.final_loss, rel=1e-5)
        torch.testing.assert_close(a.state["out.bias"], r.translator.out.bias.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("update", "threads", "lonely", "model_config"),
    [
        ({"consistency_target": "frozen"}, 1, (), None),  # one pass: T(f_b) is not run
        ({"noise_std": 0.0}, 1, (), None),  # no partner noise drawn
        # 2 threads split the subjects' draws; subject 1 has a frame without a partner, so its
        # partner draws take the per-subject path while the others' are converted chunk-wide
        ({}, 2, (1,), None),
        ({"adapt": FAST.model_copy(update={"batch_size": 7})}, 1, (), None),  # odd batch: per subject
        ({}, 1, (), ModelConfig(dropout=0.0)),  # no dropout: no masks, unscaled weights
    ],
)
def test_bias_only_variants_match_per_client_engine(
    update: dict, threads: int, lonely: tuple[int, ...], model_config: ModelConfig | None
) -> None:
    config = PersonalizeConfig(adapt=FAST, lambda_style=0.1).model_copy(update=update)
    ref, out = _run_both(config, 3, chunk=3, threads=threads, lonely=lonely, model_config=model_config)
    for r, a in zip(ref, out, strict=True):
        assert a.iterations == r.result.iterations and a.converged == r.result.converged
        assert a.final_loss == pytest.approx(r.result.final_loss, rel=1e-5)
        torch.testing.assert_close(a.state["out.bias"], r.translator.out.bias.detach(), atol=1e-6, rtol=0)


def test_bias_only_without_the_first_block_cache_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    # a chunk whose cache would be too large computes T(f_a)'s first block every step instead
    monkeypatch.setattr(batched, "_FIRST_BLOCK_BYTES", 0)
    ref, out = _run_both(PersonalizeConfig(adapt=FAST, lambda_style=0.1), 2, chunk=2)
    for r, a in zip(ref, out, strict=True):
        assert a.iterations == r.result.iterations
        assert a.final_loss == pytest.approx(r.result.final_loss, rel=1e-5)
        torch.testing.assert_close(a.state["out.bias"], r.translator.out.bias.detach(), atol=1e-6, rtol=0)


def test_last_layer_matches_per_client_engine() -> None:
    # out.weight adapts too: the autograd path, with the hidden layers shared by all subjects
    config = PersonalizeConfig(
        adapt=FAST.model_copy(update={"max_iterations": 15}), bias_only=False, last_layers=1
    )
    ref, out = _run_both(config, 2, chunk=2)
    for r, a in zip(ref, out, strict=True):
        assert set(a.state) == {"out.weight", "out.bias"}
        assert a.iterations == r.result.iterations
        assert a.final_loss == pytest.approx(r.result.final_loss, rel=1e-4)
        own = dict(r.translator.named_parameters())
        for name, value in a.state.items():
            torch.testing.assert_close(value, own[name].detach(), atol=2e-3, rtol=0)


def test_full_translator_matches_per_client_engine() -> None:
    ref, out = _run_both(
        PersonalizeConfig(adapt=FAST.model_copy(update={"max_iterations": 15}), bias_only=False), 2, chunk=2
    )
    for r, a in zip(ref, out, strict=True):
        assert set(a.state) == {n for n, _ in r.translator.named_parameters()}
        assert a.iterations == r.result.iterations
        assert a.final_loss == pytest.approx(r.result.final_loss, rel=1e-4)
        own = dict(r.translator.named_parameters())
        for name, value in a.state.items():
            torch.testing.assert_close(value, own[name].detach(), atol=2e-3, rtol=0)


def test_chunk_size_does_not_change_results() -> None:
    config = PersonalizeConfig(adapt=FAST)
    model = synthetic_model(1)
    subjects = [synthetic_subject(k, 1, frames=20) for k in range(3)]
    tasks = [subject_task(model, s.features, s.frame_stats, config, k) for k, s in enumerate(subjects)]
    runs = [
        [
            a
            for c in adapt_subjects(
                model.translator, model.classifier, tasks, config, BatchedConfig(chunk_size=size)
            )
            for a in c
        ]
        for size in (1, 3)
    ]
    for a, b in zip(*runs, strict=True):
        assert a.iterations == b.iterations
        torch.testing.assert_close(a.state["out.bias"], b.state["out.bias"], atol=1e-6, rtol=0)


def test_partner_draws_equal_the_trainers() -> None:
    # videos of 1 (no partner: no draw), 2 and 5 frames, repeated frame indices in one video
    vids = torch.tensor([0, 1, 1, 2, 2, 2, 2, 2])
    times = torch.tensor([0, 0, 3, 0, 0, 2, 4, 6])
    data = AdaptationData(torch.zeros(8, 2), video_ids=vids, time_index=times)
    table = _Partners(8, vids, times)
    for seed in range(5):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for size in (7, 8):
            index = torch.randint(8, (size,), generator=g1)
            assert torch.equal(torch.randint(8, (size,), generator=g2), index)
            assert torch.equal(table.draw(index, g2), data.partners(index, g1))
        assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # streams in step


def test_dropout_masks_equal_torch_bernoulli() -> None:
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for shape in ((4, 5), (64, 256)):
        expected = torch.empty(shape).bernoulli_(0.9, generator=g1)
        assert torch.equal(_bernoulli_mask(g2, shape, 0.9).float(), expected)


def test_run_pft_batched_equals_run_pft_predictions() -> None:
    model = synthetic_model(2)
    settings = MethodSettings(pft=PersonalizeConfig(adapt=FAST))
    targets = []
    for k in range(3):
        s, e = synthetic_subject(k, 2, frames=20), synthetic_subject(k + 50, 2, frames=12)
        labels = torch.zeros(len(s.features), dtype=torch.long)
        adapt = FrameSet(s.features, s.frame_stats, labels, s.video_ids, s.time_index, None)
        held = FrameSet(e.features, e.frame_stats, labels[:12], e.video_ids, e.time_index, None)
        targets.append((k, TargetData(f"t{k}", adapt, None, held)))
    batched = run_pft_batched(model, targets, settings, seed=4, engine=BatchedConfig(chunk_size=2))
    for k, target in targets:
        ref = run_pft(model, target, settings, 4 * 1000 + k)
        got = batched[target.subject]
        assert got.iterations == ref.iterations
        torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=0)


def test_refuses_too_few_frames() -> None:
    model = synthetic_model(0)
    s = synthetic_subject(0, 0, frames=10)
    config = PersonalizeConfig()
    task = subject_task(model, s.features, s.frame_stats, config, 0)
    task.features = task.features[:1]
    with pytest.raises(TooFewFacesError):
        next(adapt_subjects(model.translator, model.classifier, [task], config))

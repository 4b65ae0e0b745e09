"""The batched engine against the per-client engine (the oracle): same seeds, same numbers."""

from __future__ import annotations

import warnings

import pytest
import torch

from pft.core.adaptation import AdaptationData, AdaptConfig
from pft.core.errors import TooFewFacesError
from pft.core.frames import FrameSet
from pft.core.methods import MethodSettings, TargetData, run_pft
from pft.core.models import ModelConfig
from pft.core.objective import PFTObjective
from pft.core.personalize import PersonalizeConfig, personalize
from pft.core.seeding import subject_seed
from pft.simulations.batched import (
    BatchedConfig,
    FastPathUnavailable,
    SubjectAdaptation,
    adapt_subjects,
    forward,
    run_pft_batched,
    subject_task,
    trainable_names,
)
from pft.simulations.batched.optimiser import StackedOptimizer
from pft.simulations.batched.streams import Partners, bernoulli_mask
from pft.simulations.synthetic_world import synthetic_model, synthetic_subject

# a loose tolerance makes subjects stop at different steps (per-subject early stopping)
FAST = AdaptConfig(lr=0.01, max_iterations=36, min_iterations=8, tol=0.06, window=3)


def _config(adapt: AdaptConfig = FAST, **objective: object) -> PersonalizeConfig:
    """The shipped stage 3 with ``adapt`` and some objective settings changed."""
    return PersonalizeConfig(adapt=adapt, objective=PFTObjective.model_validate(objective))


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
    ref, out = _run_both(_config(lambda_style=0.1, neutral_smoothing=0.4), 4, chunk=3)
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
        ({"batch_size": 7}, 1, (), None),  # odd batch: partners drawn per subject
        ({}, 1, (), ModelConfig(dropout=0.0)),  # no dropout: no masks, unscaled weights
    ],
)
def test_bias_only_variants_match_per_client_engine(
    update: dict, threads: int, lonely: tuple[int, ...], model_config: ModelConfig | None
) -> None:
    adapt = FAST.model_copy(update={k: v for k, v in update.items() if k == "batch_size"})
    objective = {k: v for k, v in update.items() if k != "batch_size"}
    config = _config(adapt, lambda_style=0.1, **objective)
    ref, out = _run_both(config, 3, chunk=3, threads=threads, lonely=lonely, model_config=model_config)
    for r, a in zip(ref, out, strict=True):
        assert a.iterations == r.result.iterations and a.converged == r.result.converged
        assert a.final_loss == pytest.approx(r.result.final_loss, rel=1e-5)
        torch.testing.assert_close(a.state["out.bias"], r.translator.out.bias.detach(), atol=1e-6, rtol=0)


def test_bias_only_without_the_first_block_cache_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    # a chunk whose cache would be too large computes T(f_a)'s first block every step instead
    monkeypatch.setattr(forward, "FIRST_BLOCK_BYTES", 0)
    ref, out = _run_both(_config(lambda_style=0.1), 2, chunk=2)
    for r, a in zip(ref, out, strict=True):
        assert a.iterations == r.result.iterations
        assert a.final_loss == pytest.approx(r.result.final_loss, rel=1e-5)
        torch.testing.assert_close(a.state["out.bias"], r.translator.out.bias.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("config", "road"),
    [
        (PersonalizeConfig(), "bias_only"),  # the shipped stage 3 takes the fast road
        (_config(lambda_style=0.1), "bias_only"),  # batch statistics: the fast road gives them
        (PersonalizeConfig(bias_only=False, last_layers=1), "autograd"),
        (PersonalizeConfig(bias_only=False), "autograd"),
    ],
)
def test_the_fast_road_is_taken_where_it_gives_what_the_objective_needs(
    config: PersonalizeConfig, road: str
) -> None:
    model = synthetic_model(0)
    names = trainable_names(model.translator, model.classifier, config.method())
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathUnavailable)
        chosen = forward.choose_forward(
            model.translator, model.classifier, names, config.objective, torch.device("cpu")
        )
    assert chosen.name == road


def test_bias_only_falls_back_to_the_general_road_when_the_objective_needs_more() -> None:
    # the per-frame style term needs T(f_a) per frame, which the bias-only fast road never forms:
    # the engine says so and runs the autograd road, with the per-client engine's numbers
    config = _config(lambda_style=0.1, style_form="reference_mean")
    with pytest.warns(FastPathUnavailable, match="translated_a"):
        ref, out = _run_both(config, 2, chunk=2)
    for r, a in zip(ref, out, strict=True):
        assert a.iterations == r.result.iterations and a.converged == r.result.converged
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


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_full_translator_matches_per_client_engine(optimizer: str) -> None:
    """All of T adapts. With SGD the two engines agree to float rounding: the stacked forward and
    backward are the per-client ones. With Adam, an entry whose gradient is near zero gets a step
    of about ``lr`` whatever the sign of its rounding noise (Adam divides by the gradient's own
    scale), and the two engines sum in different orders: such entries may differ by up to
    ``lr`` per step (measured: 4.8e-3 after 15 steps at lr 0.01 on one subject, 1e-7 with SGD)."""
    lr = 0.05 if optimizer == "sgd" else 0.01
    adapt = FAST.model_copy(update={"max_iterations": 15, "optimizer": optimizer, "lr": lr})
    ref, out = _run_both(PersonalizeConfig(adapt=adapt, bias_only=False), 2, chunk=2)
    loss_rel, atol = (1e-6, 1e-5) if optimizer == "sgd" else (2e-3, 1e-2)  # Adam: twice the measured
    for r, a in zip(ref, out, strict=True):
        assert set(a.state) == {n for n, _ in r.translator.named_parameters()}
        assert a.iterations == r.result.iterations
        assert a.final_loss == pytest.approx(r.result.final_loss, rel=loss_rel)
        own = dict(r.translator.named_parameters())
        for name, value in a.state.items():
            torch.testing.assert_close(value, own[name].detach(), atol=atol, rtol=0)


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
    table = Partners(8, vids, times)
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
        assert torch.equal(bernoulli_mask(g2, shape, 0.9).float(), expected)


@pytest.mark.parametrize(
    "update",
    [
        {},
        {"weight_decay": 0.01},
        {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.01},
        {"optimizer": "sgd", "momentum": 0.0},
    ],
)
def test_stacked_optimizer_is_torch_optim_bit_for_bit(update: dict) -> None:
    # the oracle: each subject's own torch optimiser (what the trainer runs), also after compaction
    cfg = AdaptConfig(lr=0.01).model_copy(update=update)
    g = torch.Generator().manual_seed(0)
    start = torch.randn(4, 3, 5, generator=g)
    grads = [torch.randn(4, 3, 5, generator=g) for _ in range(6)]
    stack = start.clone().requires_grad_(True)
    stacked = StackedOptimizer({"w": stack}, cfg)
    own = [start[r].clone().requires_grad_(True) for r in range(4)]
    opts = [
        torch.optim.Adam([p], lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adam"
        else torch.optim.SGD([p], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        for p in own
    ]
    live = [0, 1, 2, 3]
    for k, grad in enumerate(grads):
        if k == 3:  # subjects 1 and 3 stop: the others' state carries over
            live = [0, 2]
            stack = stacked.keep(torch.tensor(live))["w"]
        stacked.step([grad[live]])
        for r in live:
            own[r].grad = grad[r].clone()
            opts[r].step()
        for row, r in enumerate(live):
            assert torch.equal(stack[row].detach(), own[r].detach()), (k, r)


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
        ref = run_pft(model, target, settings, subject_seed(4, k))
        got = batched[target.subject]
        assert got.iterations == ref.iterations
        torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=0)
        # the adapted parameters are counted as the per-client engine counts them (bias-only: D)
        assert got.trainable_parameters == ref.trainable_parameters == model.translator.out.bias.numel()


def test_refuses_too_few_frames() -> None:
    model = synthetic_model(0)
    s = synthetic_subject(0, 0, frames=10)
    config = PersonalizeConfig()
    task = subject_task(model, s.features, s.frame_stats, config, 0)
    task.features = task.features[:1]
    with pytest.raises(TooFewFacesError):
        next(adapt_subjects(model.translator, model.classifier, [task], config))

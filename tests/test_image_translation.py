"""The image-space SFDA rows (SFDA-IT, SFIT, DSFDA): every loss term on a hand-computed example,
every term's gradient reaches exactly G (or T) and nothing else, F and C bit-identical after a
run, what each generator is trained for actually happens, and the runners run on a tiny real
F/T/C world with face crops, reproducibly."""

from __future__ import annotations

import math

import pytest
import torch
from test_baselines_methods import CFG, FAST, _same, _snapshot, world  # noqa: F401  (fixture)
from torch import nn

from pft.core.adaptation import (
    AdaptationData,
    AdaptationTrainer,
    AdaptConfig,
    ModelParts,
    TranslatorSupervision,
)
from pft.core.image_translation import (
    ExpressionGeneration,
    GeneratorConfig,
    ImageGenerator,
    SourceStyleTranslation,
    TargetToSourceTranslation,
    TranslatorDistillation,
    batchnorm_statistics_loss,
    bn_statistics_distance,
    crops_to_images,
    distillation_loss,
    expression_projection,
    identity_loss,
    reconstruction_loss,
    relationship_loss,
    seeded_generator,
)
from pft.core.methods import METHODS, MethodSettings, TargetData
from pft.core.models import Classifier, FeatureExtractor, Translator
from pft.core.personalize import SourceModel

G_FAST = AdaptConfig(max_iterations=6, min_iterations=6, batch_size=8, lr=1e-2, seed=0)
IMAGE_ROWS = ("sfda_it", "sfit", "dsfda")


# --- hand-computed values ------------------------------------------------------------------------
def test_bn_statistics_distance_by_hand() -> None:
    # layer 1: ||(1,2)-(1,0)|| + ||(1,1)-(4,5)|| = 2 + 5; layer 2: |3-0| + |2-2| = 3
    value = bn_statistics_distance(
        [torch.tensor([1.0, 2.0]), torch.tensor([3.0])],
        [torch.tensor([1.0, 1.0]), torch.tensor([2.0])],
        [torch.tensor([1.0, 0.0]), torch.tensor([0.0])],
        [torch.tensor([4.0, 5.0]), torch.tensor([2.0])],
    )
    assert float(value) == pytest.approx(10.0)


def test_batchnorm_statistics_loss_reads_each_layers_input_against_its_running_statistics() -> None:
    net = nn.Sequential(nn.BatchNorm2d(1), nn.Flatten(), nn.BatchNorm1d(1)).eval()
    bn2, bn1 = net[0], net[2]
    assert isinstance(bn2, nn.BatchNorm2d) and isinstance(bn1, nn.BatchNorm1d)
    bn2.running_mean.fill_(0.5)  # type: ignore[union-attr]
    bn2.running_var.fill_(1.0)  # type: ignore[union-attr]
    bn1.running_mean.fill_(0.0)  # type: ignore[union-attr]
    bn1.running_var.fill_(4.0)  # type: ignore[union-attr]
    x = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    with torch.no_grad():
        out, loss = batchnorm_statistics_loss(net, x)
    # BN2d input: mean 2, biased var 1 -> |2 - 0.5| + |1 - 1| = 1.5.
    # Its output (eval mode, weight 1, bias 0): (x - 0.5) / sqrt(1 + 1e-5) ~ (0.5, 2.5): mean 1.5,
    # var 1 -> BN1d: |1.5 - 0| + |1 - 4| = 4.5. Total 6.
    assert out.shape == (2, 1)
    assert float(loss) == pytest.approx(6.0, abs=1e-4)
    assert not net[0]._forward_hooks and not net[2]._forward_hooks  # hooks removed


def test_distillation_loss_by_hand() -> None:
    teacher = torch.tensor([[0.0, 0.0]])  # p_t = (1/2, 1/2)
    student = torch.tensor([[0.0, math.log(3.0)]])  # p_s = (1/4, 3/4)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(distillation_loss(student, teacher)) == pytest.approx(expected, rel=1e-6)
    # temperature 2 on twice the logits: the same distributions, times T^2 = 4
    assert float(distillation_loss(2 * student, teacher, 2.0)) == pytest.approx(4 * expected, rel=1e-6)
    assert float(distillation_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)


def test_relationship_loss_by_hand() -> None:
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # G = I
    teacher = torch.tensor([[1.0], [1.0]])  # G = all ones -> rows (1/sqrt2, 1/sqrt2)
    # ||I - G_t||^2 = 2 * ((1 - 1/sqrt2)^2 + 1/2) = 4 - 2 sqrt2; / B^2 = 4
    assert float(relationship_loss(student, teacher)) == pytest.approx(1 - math.sqrt(2) / 2, rel=1e-6)
    assert float(relationship_loss(3 * student, student)) == pytest.approx(0.0, abs=1e-7)


def test_identity_loss_by_hand() -> None:
    c = Classifier(CFG)
    with torch.no_grad():
        c.fc.weight.zero_()
        c.fc.weight[0, 0], c.fc.weight[1, 1] = 1.0, 2.0  # C reads dimensions 0 and 1 only
    p = expression_projection(c)
    expected_p = torch.eye(CFG.pooled_dim)
    expected_p[0, 0] = expected_p[1, 1] = 0.0
    assert torch.allclose(p, expected_p, atol=1e-6)
    gen, src = torch.zeros(1, CFG.pooled_dim), torch.zeros(1, CFG.pooled_dim)
    gen[0, :3] = torch.tensor([1.0, 2.0, 3.0])  # the expression dims (0, 1) are free to change
    src[0, 2] = 1.0
    assert float(identity_loss(gen, src, p)) == pytest.approx(4.0 / CFG.pooled_dim, rel=1e-6)


def test_reconstruction_loss_by_hand() -> None:
    assert float(reconstruction_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]]))) == 1.5


def test_generator_starts_near_the_identity_and_conditions_on_the_class() -> None:
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    g = seeded_generator(GeneratorConfig(), 0, num_classes=3)
    with torch.no_grad():
        y0, y1 = g(x, torch.tensor([0, 0])), g(x, torch.tensor([1, 1]))
    assert y0.shape == x.shape  # the half-resolution residual is upsampled back
    assert float((y0 - x).abs().max()) < 0.05 and not torch.equal(y0, y1)
    with pytest.raises(ValueError, match="class-conditioned"):
        g(x)
    assert torch.equal(
        seeded_generator(GeneratorConfig(), 5).out.weight, seeded_generator(GeneratorConfig(), 5).out.weight
    )


# --- gradients ------------------------------------------------------------------------------------
def _image_parts(num_classes: int = 0) -> tuple[ModelParts, torch.Tensor, torch.Tensor]:
    """F whose BatchNorm statistics are exactly those of "source" images, and "target" images that
    are those images with less contrast and more brightness (a style G can undo)."""
    torch.manual_seed(0)
    f, c = FeatureExtractor(CFG), Classifier(CFG).eval()
    size = CFG.image_size
    source = torch.rand(64, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1
    f.train()
    for m in f.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # one batch: running statistics = the source batch's
    with torch.no_grad():
        f(source)
    f.eval()
    images = source[:24] * 0.4 + 0.3
    g = seeded_generator(GeneratorConfig(channels=4, blocks=1, stride=1, init_std=0.05), 1, num_classes)
    with torch.no_grad():
        features = f(images)
    return ModelParts(classifier=c, extractor=f, generator=g), images, features


def _generator_methods(parts: ModelParts, features: torch.Tensor) -> dict[str, tuple[object, list[str]]]:
    logits = parts.classifier(features).detach()
    target_logits = logits.flip(1)
    return {
        "sfda_it": (SourceStyleTranslation(logits), ["lambda_bn", "lambda_kd"]),
        "sfit": (
            TargetToSourceTranslation(target_logits, features.flip(0)),
            ["lambda_kd", "lambda_rp", "lambda_bn"],
        ),
    }


def _dsfda(features: torch.Tensor, parts: ModelParts) -> ExpressionGeneration:
    return ExpressionGeneration(features, expression_projection(parts.classifier), 3)


TERMS = [
    ("sfda_it", "lambda_bn"),
    ("sfda_it", "lambda_kd"),
    ("sfit", "lambda_kd"),
    ("sfit", "lambda_rp"),
    ("sfit", "lambda_bn"),
    ("dsfda", "lambda_expr"),
    ("dsfda", "lambda_id"),
    ("dsfda", "lambda_rec"),
]


def _method_with_only(name: str, term: str, parts: ModelParts, features: torch.Tensor) -> object:
    if name == "dsfda":
        method: object = _dsfda(features, parts)
        weights = ["lambda_expr", "lambda_id", "lambda_rec"]
    else:
        method, weights = _generator_methods(parts, features)[name]
    for w in weights:
        setattr(method, w, 1.0 if w == term else 0.0)
    return method


@pytest.mark.parametrize(("name", "term"), TERMS)
def test_each_term_reaches_every_generator_parameter_and_nothing_else(name: str, term: str) -> None:
    parts, images, features = _image_parts(3 if name == "dsfda" else 0)
    if name == "dsfda":
        parts.classifier = Classifier(CFG.model_copy(update={"num_classes": 3})).eval()
    assert parts.generator is not None and parts.extractor is not None
    method = _method_with_only(name, term, parts, features)
    frozen = list(parts.extractor.parameters()) + list(parts.classifier.parameters())
    for p in frozen:  # the trainer's contract: only the trained parameters require gradients
        p.requires_grad_(False)
    data = AdaptationData(images)
    batch = data.sample(8, torch.Generator().manual_seed(0), torch.device("cpu"))
    loss, _ = method.loss(parts, batch)  # type: ignore[attr-defined]
    assert float(loss) > 0
    loss.backward()
    for pname, p in parts.generator.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, (term, pname)
    assert all(p.grad is None for p in frozen)


def test_generator_runs_change_only_g_and_do_their_job() -> None:
    """On the trainer: F and C bit-identical, gradients only on G every step; SFDA-IT's BN loss
    and DSFDA's expression term goes down (source style reached, requested expression shown; the
    expression term alone, from a G that starts further from the identity: on this random F the
    identity term holds it back)."""
    for name in ("sfda_it", "dsfda"):
        parts, images, features = _image_parts(3 if name == "dsfda" else 0)
        method: object
        if name == "dsfda":
            parts.classifier = Classifier(CFG.model_copy(update={"num_classes": 3})).eval()
            parts.generator = seeded_generator(
                GeneratorConfig(channels=4, blocks=1, stride=1, init_std=0.3), 1, 3
            )
            method = _method_with_only("dsfda", "lambda_expr", parts, features)
        else:
            method = _generator_methods(parts, features)[name][0]
        assert parts.generator is not None and parts.extractor is not None
        f0, c0, g0 = _snapshot(parts.extractor), _snapshot(parts.classifier), _snapshot(parts.generator)
        seen: list[set[int]] = []

        def hook(ps: list[nn.Parameter], seen: list[set[int]] = seen) -> None:
            seen.append({id(p) for p in ps if p.grad is not None})

        cfg = AdaptConfig(max_iterations=30, min_iterations=30, batch_size=8, lr=1e-2, seed=0)
        trainer = AdaptationTrainer(cfg, grad_hook=hook)
        result = trainer.fit(method, parts, AdaptationData(images))  # type: ignore[arg-type]
        assert _same(_snapshot(parts.extractor), f0) and _same(_snapshot(parts.classifier), c0)
        assert not _same(_snapshot(parts.generator), g0)
        g_ids = {id(p) for p in parts.generator.parameters()}
        assert len(seen) == 30 and all(s == g_ids for s in seen)
        key = "bn" if name == "sfda_it" else "expression"
        first, last = result.history[key][:5], result.history[key][-5:]
        assert sum(last) < 0.8 * sum(first), (name, first, last)


@pytest.mark.parametrize("supervised", [False, True])
def test_translator_stages_reach_every_t_parameter_and_leave_c_alone(supervised: bool) -> None:
    torch.manual_seed(0)
    t, c = Translator(CFG), Classifier(CFG).eval()
    nn.init.normal_(t.out.weight, std=0.05)
    parts = ModelParts(
        c, t, style_target=torch.randn(CFG.style_dim), style_reference=torch.randn(CFG.style_dim)
    )
    f = torch.randn(32, CFG.pooled_dim, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(32) % 2
    method = TranslatorSupervision() if supervised else TranslatorDistillation(torch.randn(32, 2) * 3)
    c0 = _snapshot(c)
    seen: list[set[int]] = []
    trainer = AdaptationTrainer(
        FAST, grad_hook=lambda ps: seen.append({id(p) for p in ps if p.grad is not None})
    )
    trainer.fit(method, parts, AdaptationData(f, labels=labels if supervised else None))
    assert _same(_snapshot(c), c0) and seen and all(s == {id(p) for p in t.parameters()} for s in seen)
    for p in t.parameters():  # every T parameter moved... and got a non-zero gradient on a fresh batch
        p.grad = None
    batch = AdaptationData(f, labels=labels if supervised else None).sample(
        16, torch.Generator().manual_seed(0), torch.device("cpu")
    )
    method.loss(parts, batch)[0].backward()
    for pname, p in t.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, pname


# --- runners on the tiny real world --------------------------------------------------------------
def _fast_settings() -> MethodSettings:
    s = MethodSettings()
    small = GeneratorConfig(channels=4, blocks=1)
    return s.model_copy(
        update={
            "sfda_it": s.sfda_it.model_copy(
                update={"generator": small, "generator_adapt": G_FAST, "adapt": FAST}
            ),
            "sfit": s.sfit.model_copy(
                update={
                    "generator": small,
                    "generator_adapt": G_FAST,
                    "shot": s.sfit.shot.model_copy(update={"adapt": FAST}),
                }
            ),
            "dsfda": s.dsfda.model_copy(
                update={"generator": small, "generator_adapt": G_FAST, "adapt": FAST}
            ),
        }
    )


@pytest.mark.parametrize("name", IMAGE_ROWS)
def test_image_runner_runs_reproducibly_and_leaves_the_source_model_alone(
    world: tuple[SourceModel, TargetData],  # noqa: F811
    name: str,
) -> None:
    model, target = world
    assert target.images is not None
    f0 = _snapshot(target.images.extractor)
    c0, t0 = _snapshot(model.classifier), _snapshot(model.translator)
    settings = _fast_settings()
    out = METHODS[name](model, target, settings, 3)
    assert out.logits.shape == (len(target.eval), CFG.num_classes) and torch.isfinite(out.logits).all()
    assert out.iterations == G_FAST.max_iterations + FAST.max_iterations
    g_params = ImageGenerator(
        GeneratorConfig(channels=4, blocks=1), CFG.num_classes if name == "dsfda" else 0
    )
    assert out.trainable_parameters == g_params.param_count() + model.translator.param_count()
    assert _same(_snapshot(target.images.extractor), f0)
    assert _same(_snapshot(model.classifier), c0) and _same(_snapshot(model.translator), t0)
    again = METHODS[name](model, target, settings, 3)
    assert torch.equal(out.logits, again.logits)  # same seed, same numbers
    other = METHODS[name](model, target, settings, 4)
    assert not torch.equal(out.logits, other.logits)  # the seed is used


@pytest.mark.parametrize("name", IMAGE_ROWS)
def test_image_runner_needs_the_crops(world: tuple[SourceModel, TargetData], name: str) -> None:  # noqa: F811
    model, target = world
    bare = TargetData(target.subject, target.adapt, target.oracle, target.eval)
    with pytest.raises(ValueError, match=f"{name} needs the face crops"):
        METHODS[name](model, bare, MethodSettings(), 0)
    assert target.images is not None
    short = TargetData(
        target.subject,
        target.adapt,
        target.oracle,
        target.eval,
        type(target.images)(target.images.extractor, target.images.adapt[:-1], target.images.eval),
    )
    with pytest.raises(ValueError, match="adapt crops for"):
        METHODS[name](model, short, MethodSettings(), 0)


def test_the_adapt_crops_are_what_the_generators_see(world: tuple[SourceModel, TargetData]) -> None:  # noqa: F811
    _, target = world
    assert target.images is not None
    x = crops_to_images(target.images.extractor, target.images.adapt)
    with torch.no_grad():
        assert torch.allclose(target.images.extractor.eval()(x), target.adapt.features, atol=1e-5)

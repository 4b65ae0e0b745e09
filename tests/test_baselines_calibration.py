"""neutral_calibration: C's neutral logit shifted per person to the source subjects' neutral confidence."""

from __future__ import annotations

import math

import pytest
import torch

from pft.core.adaptation import ModelParts
from pft.core.baselines import NeutralCalibration, calibration_shift
from pft.core.models import Classifier, ModelConfig
from pft.core.training import SourceStyles, SubjectFeatures, neutral_confidence


def test_shift_hand_computed_two_classes() -> None:
    # all logits 0: p(neutral) = sigmoid(delta); target sigmoid(1) needs delta = 1
    target = 1 / (1 + math.exp(-1.0))
    assert calibration_shift(torch.zeros(5, 2), target) == pytest.approx(1.0, abs=1e-5)


def test_shift_hand_computed_three_classes() -> None:
    # p(neutral) = e^d / (e^d + 2) = 1/2  =>  d = ln 2
    assert calibration_shift(torch.zeros(3, 3), 0.5) == pytest.approx(math.log(2), abs=1e-5)


def test_shift_hand_computed_two_frames_mean() -> None:
    # frames [0, 0] and [0, ln 3]; with d = ln 3: p = 3/4 and 3/6, mean 0.625
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3)]])
    assert calibration_shift(logits, 0.625) == pytest.approx(math.log(3), abs=1e-5)


def test_shift_can_be_negative_and_refuses_bad_targets() -> None:
    logits = torch.tensor([[3.0, 0.0], [2.0, 0.0]])  # already very neutral
    assert calibration_shift(logits, 0.5) < 0
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="target"):
            calibration_shift(logits, bad)


def test_prediction_moves_only_the_neutral_logit() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(width=8, num_classes=3)
    classifier = Classifier(cfg).eval()
    features = torch.randn(4, cfg.pooled_dim)
    method = NeutralCalibration(delta=0.7)
    with torch.no_grad():
        shifted = method.predict(ModelParts(classifier=classifier), features)
        plain = classifier(features)
    torch.testing.assert_close(shifted[:, 0], plain[:, 0] + 0.7)
    torch.testing.assert_close(shifted[:, 1:], plain[:, 1:])
    assert method.trainable_parameters(ModelParts(classifier=classifier)) == []


def test_fit_reaches_the_target_on_the_persons_neutral_frames() -> None:
    torch.manual_seed(1)
    cfg = ModelConfig(width=8)
    classifier = Classifier(cfg).eval()
    neutral = torch.randn(20, cfg.pooled_dim)
    method = NeutralCalibration.fit(classifier, neutral, 0.8)
    with torch.no_grad():
        p = torch.softmax(method.predict(ModelParts(classifier=classifier), neutral), 1)[:, 0]
    assert float(p.mean()) == pytest.approx(0.8, abs=1e-4)


def test_neutral_confidence_hand_computed_on_neutral_frames_only() -> None:
    cfg = ModelConfig(width=8)
    classifier = Classifier(cfg)
    with torch.no_grad():
        classifier.fc.weight.zero_()
        classifier.fc.bias.copy_(torch.tensor([math.log(3), 0.0]))  # p(neutral) = 3/4 everywhere
    subject = SubjectFeatures(
        features=torch.randn(4, cfg.pooled_dim),
        frame_stats=torch.zeros(4, cfg.stats_dim),
        labels=torch.tensor([0, 1, 0, 1]),
    )
    conf = neutral_confidence(classifier, {"S1": subject})
    assert float(conf["S1"]) == pytest.approx(0.75)


def test_source_styles_round_trip_the_neutral_confidence() -> None:
    styles = SourceStyles(
        codes={"A": torch.zeros(3), "B": torch.ones(3)},
        neutral_mean={"A": torch.zeros(2), "B": torch.zeros(2)},
        neutral_std={"A": torch.ones(2), "B": torch.ones(2)},
        neutral_confidence={"A": torch.tensor(0.9), "B": torch.tensor(0.7)},
    )
    back = SourceStyles.from_tensors(styles.as_tensors())
    assert back.mean_neutral_confidence() == pytest.approx(0.8)
    assert back.mean_neutral_confidence(["A"]) == pytest.approx(0.9)
    without = SourceStyles(styles.codes, styles.neutral_mean, styles.neutral_std)
    with pytest.raises(ValueError, match="neutral confidence"):
        SourceStyles.from_tensors(without.as_tensors()).mean_neutral_confidence()

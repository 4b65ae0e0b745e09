"""Pairing of source subjects (stage 2) and choice of a target's reference subject (stage 3).

Strategies (paper, "Source subject pairing"): ``random`` (a seeded random other subject),
``cosine`` (highest cosine similarity of the descriptors - the mean NEUTRAL pooled feature) and
``landmark`` (nearest, in Euclidean distance, by the facial-landmark geometry and head-pose
descriptor; each dimension is z-scored over the source subjects first so that pose angles and
landmark distances weigh alike). Ties go to the first subject in sorted-name order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

Strategy = Literal["random", "cosine", "landmark"]


def _matrix(descriptors: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    names = sorted(descriptors)
    if not names:
        raise ValueError("no source subjects to pair with")
    mat = np.stack([np.asarray(descriptors[n], dtype=np.float64).ravel() for n in names])
    if not np.isfinite(mat).all():
        raise ValueError("descriptors must be finite")
    return names, mat


def _scores(query: np.ndarray, mat: np.ndarray, strategy: Strategy) -> np.ndarray:
    """Higher is closer: cosine similarity, or minus the z-scored Euclidean distance."""
    if strategy == "cosine":
        qn = query / max(float(np.linalg.norm(query)), 1e-12)
        mn = mat / np.maximum(np.linalg.norm(mat, axis=1, keepdims=True), 1e-12)
        return np.asarray(mn @ qn)
    if strategy == "landmark":
        mean = mat.mean(0)
        std = mat.std(0)
        std = np.where(std > 1e-12, std, 1.0)
        return np.asarray(-np.linalg.norm((mat - mean) / std - (query - mean) / std, axis=1))
    raise ValueError(f"unknown pairing strategy {strategy!r}")


def pair_subjects(descriptors: Mapping[str, np.ndarray], strategy: Strategy, seed: int = 0) -> dict[str, str]:
    """Each source subject's partner (never itself).

    Parameters
    ----------
    descriptors : subject -> descriptor (mean neutral feature for ``cosine``, landmark geometry
        and head pose for ``landmark``; ignored but for the names by ``random``).
    strategy : ``"random"``, ``"cosine"`` or ``"landmark"``.
    seed : seeds ``random``.
    """
    names, mat = _matrix(descriptors)
    if len(names) < 2:
        raise ValueError("pairing needs at least two source subjects")
    pairs: dict[str, str] = {}
    if strategy == "random":
        rng = np.random.default_rng(seed)
        for i, name in enumerate(names):
            k = int(rng.integers(len(names) - 1))
            pairs[name] = names[k if k < i else k + 1]
        return pairs
    for i, name in enumerate(names):
        scores = _scores(mat[i], mat, strategy)
        scores[i] = -np.inf
        pairs[name] = names[int(np.argmax(scores))]
    return pairs


def match_reference(
    descriptor: np.ndarray,
    source_descriptors: Mapping[str, np.ndarray],
    strategy: Strategy,
    seed: int = 0,
) -> str:
    """The source subject whose style a target person is translated to (closest by ``strategy``)."""
    return match_references(descriptor, source_descriptors, strategy, 1, seed)[0]


def match_references(
    descriptor: np.ndarray,
    source_descriptors: Mapping[str, np.ndarray],
    strategy: Strategy,
    k: int,
    seed: int = 0,
) -> list[str]:
    """The ``k`` source subjects closest to a target by ``strategy``, closest first.

    ``random`` draws ``k`` distinct subjects with ``seed``; ``k`` larger than the number of source
    subjects returns them all.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    names, mat = _matrix(source_descriptors)
    k = min(k, len(names))
    if strategy == "random":
        picks = np.random.default_rng(seed).permutation(len(names))[:k]
        return [names[int(i)] for i in picks]
    query = np.asarray(descriptor, dtype=np.float64).ravel()
    if query.shape[0] != mat.shape[1]:
        raise ValueError(f"descriptor has {query.shape[0]} dims, source descriptors {mat.shape[1]}")
    order = np.argsort(-_scores(query, mat, strategy), kind="stable")
    return [names[int(i)] for i in order[:k]]

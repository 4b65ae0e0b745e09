"""A chunk of the batched engine: the live subjects adapted together, and their compaction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from pft.core.adaptation import Convergence
from pft.core.objective import ReferenceTargets
from pft.simulations.batched.buffers import Buffers
from pft.simulations.batched.optimiser import StackedOptimizer
from pft.simulations.batched.streams import ChunkStreams
from pft.simulations.batched.tasks import SubjectTask


class SubjectState(Protocol):
    """Per-subject state a chunk carries for a part of the engine (compacted with the chunk)."""

    def keep(self, idx: Tensor) -> None:
        """Keep only the subjects at ``idx``."""
        ...


@dataclass
class Chunk:
    """The live subjects of one chunk: their frames, codes, targets, trainable stacks, optimiser,
    random streams and stop rules. Frame rows (``features``) are never compacted; everything with
    a subject axis is, when some subjects stop (:meth:`keep`)."""

    positions: list[int]
    tasks: list[SubjectTask]
    features: Tensor  # (all frames, D): every subject's frames, subject r at streams.offsets[r]
    style_target: Tensor  # (S, style_dim)
    style_reference: Tensor  # (S, style_dim)
    targets: ReferenceTargets  # (S, D) each
    params: dict[str, Tensor]  # trainable stacks (S, ...)
    optimizer: StackedOptimizer
    streams: ChunkStreams
    convergence: list[Convergence]
    buffers: Buffers
    forward_state: SubjectState | None = None

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def sizes(self) -> Tensor:
        """(S,) frames per live subject."""
        return self.streams.sizes

    def keep(self, rows: list[int]) -> None:
        """Keep only the subjects at ``rows`` (compaction after some stopped)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.style_target.device)
        self.positions = [self.positions[r] for r in rows]
        self.tasks = [self.tasks[r] for r in rows]
        self.convergence = [self.convergence[r] for r in rows]
        self.style_target = self.style_target[idx]
        self.style_reference = self.style_reference[idx]
        self.targets = self.targets.select(idx)
        self.streams.keep(rows)
        self.params = self.optimizer.keep(idx)
        if self.forward_state is not None:
            self.forward_state.keep(idx)

"""Step-sized tensors of the batched engine, reused from step to step."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Buffers:
    """Step-sized tensors reused from step to step, by name.

    A fresh multi-megabyte tensor is fresh memory from the OS, and its page faults cost as much as
    the arithmetic done in it; a smaller request (after compaction) is served by the front of the
    same buffer.
    """

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

"""Configuration as data: the frozen pydantic base every config of the project derives from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class FrozenConfig(BaseModel):
    """A frozen, strict configuration model: unknown fields are errors, instances are immutable."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    def config_hash(self) -> str:
        """A stable short hash of the resolved config (keys sorted), used to key caches."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def write_json(self, path: str | Path) -> Path:
        """Write the resolved config as pretty JSON (beside a run's outputs)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
        return path


def dump(config: BaseModel) -> dict[str, Any]:
    """The JSON-ready dict of a config."""
    return config.model_dump(mode="json")

"""Weights that carry a pickle are refused before any code runs (docs/reliability.md case 3)."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from pft.core.errors import UnsafeWeightsError
from pft.core.safe_weights import load_numpy_array, load_safetensors, safetensors_bytes, save_safetensors


class _Payload:
    """Unpickling this would create ``marker`` - the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.system, (f"touch {self.marker}",))


def test_round_trip_and_metadata(tmp_path: Path) -> None:
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1, 2], dtype=torch.int64),
    }
    path = save_safetensors(tensors, tmp_path / "w.safetensors", metadata={"stage": "1"})
    loaded = load_safetensors(path)
    assert set(loaded) == {"a", "b"}
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])


def test_views_sharing_storage_can_be_saved(tmp_path: Path) -> None:
    base = torch.arange(8.0)
    loaded = load_safetensors(save_safetensors({"x": base, "y": base[2:5]}, tmp_path / "w.safetensors"))
    assert torch.equal(loaded["y"], torch.tensor([2.0, 3.0, 4.0]))


def test_raw_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    with pytest.raises(UnsafeWeightsError, match="raw pickle"):
        load_safetensors(path)
    assert not marker.exists()
    # the oracle: the same bytes really do run code when unpickled
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_torch_save_archive_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    torch.save({"weight": torch.ones(2), "payload": _Payload(marker)}, path)
    with pytest.raises(UnsafeWeightsError, match=r"torch\.save"):
        load_safetensors(path)
    legacy = tmp_path / "legacy.safetensors"
    torch.save({"payload": _Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeWeightsError):
        load_safetensors(legacy)
    assert not marker.exists()


def _header_file(tmp_path: Path, header: bytes, body: bytes) -> Path:
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)
    return path


@pytest.mark.parametrize(
    ("header", "body", "match"),
    [
        (b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 4, "declared header|outside"),
        (b'{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', b"\0" * 8, "does not match"),
        (b'{"x":{"dtype":"PY","shape":[1],"data_offsets":[0,8]}}', b"\0" * 8, "malformed"),
        (b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 12, "trailing"),
        (b'{"x":1,"x":2}', b"", "not valid JSON"),
        (b"[1, 2]", b"", "not a safetensors"),
    ],
)
def test_malformed_headers_are_refused(tmp_path: Path, header: bytes, body: bytes, match: str) -> None:
    with pytest.raises(UnsafeWeightsError, match=match):
        load_safetensors(_header_file(tmp_path, header, body))


def test_absurd_header_length_is_refused_before_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(UnsafeWeightsError, match="declared header"):
        load_safetensors(path)
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(UnsafeWeightsError, match="too short"):
        load_safetensors(tmp_path / "short.safetensors")


def test_truncated_real_file_is_refused(tmp_path: Path) -> None:
    data = st_save({"w": torch.ones(16)})
    path = tmp_path / "t.safetensors"
    path.write_bytes(data[:-5])
    with pytest.raises(UnsafeWeightsError):
        load_safetensors(path)
    assert safetensors_bytes({"w": torch.ones(16)}) == data  # our writer is plain safetensors


def test_numpy_without_pickle(tmp_path: Path) -> None:
    good = tmp_path / "a.npy"
    np.save(good, np.arange(5, dtype=np.int32))
    np.testing.assert_array_equal(load_numpy_array(good), np.arange(5))
    marker = tmp_path / "pwned"
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(UnsafeWeightsError, match="pickle"):
        load_numpy_array(objects)
    raw = tmp_path / "raw.npy"
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeWeightsError, match=r"not a \.npy"):
        load_numpy_array(raw)
    assert not marker.exists()


def test_deeply_nested_header_is_a_typed_refusal(tmp_path: Path) -> None:
    """Issue 19: a nested header used to escape as an untyped RecursionError."""
    for header in (b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}", b'{"a":' + b"[" * 8 + b"]" * 8 + b"}"):
        path = tmp_path / "nested.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header)
        with pytest.raises(UnsafeWeightsError, match="nested deeper"):
            load_safetensors(path)

"""The content-addressed feature cache and its digests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from pft.core.data.cache import FeatureCache, file_sha256, state_dict_sha256


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # > 1 MiB chunk
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_state_dict_digest_is_order_independent_and_sensitive() -> None:
    gen = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(3, 4, generator=gen), "b": torch.zeros(4), "n": torch.tensor(7)}
    digest = state_dict_sha256(a)
    assert state_dict_sha256(dict(reversed(list(a.items())))) == digest
    changed = dict(a, w=a["w"].clone())
    changed["w"][1, 2] += 1e-6
    assert state_dict_sha256(changed) != digest
    assert state_dict_sha256(dict(a, b=a["b"].double())) != digest  # dtype
    assert state_dict_sha256(dict(a, w=a["w"].reshape(4, 3))) != digest  # shape, same bytes
    assert state_dict_sha256({"x" if k == "b" else k: v for k, v in a.items()}) != digest  # name
    assert state_dict_sha256(dict(a, w=a["w"].t().contiguous().t())) == digest  # layout is not content
    assert state_dict_sha256({"h": torch.ones(2, dtype=torch.bfloat16)})  # dtypes numpy lacks


def test_cache_round_trip(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    key = cache.key("video-sha", "weights-sha")
    assert key == cache.key("video-sha", "weights-sha") != cache.key("video-shaw", "eights-sha")
    assert key not in cache and cache.get(key) is None
    tensors = {"features": torch.randn(5, 8), "indices": torch.arange(5)}
    path = cache.put(key, tensors)
    assert path == tmp_path / key[:2] / f"{key}.safetensors"
    assert key in cache
    got = cache.get(key)
    assert got is not None and set(got) == {"features", "indices"}
    assert torch.equal(got["features"], tensors["features"]) and torch.equal(
        got["indices"], tensors["indices"]
    )
    assert not list(tmp_path.rglob("*.tmp"))


def test_corrupted_entry_is_a_miss(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    key = cache.key("v", "w")
    cache.put(key, {"x": torch.ones(3)})
    cache.path(key).write_bytes(b"\x00garbage")
    assert cache.get(key) is None
    cache.put(key, {"x": torch.ones(3)})  # recomputed features overwrite it
    assert cache.get(key) is not None


def test_bad_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cache key"):
        FeatureCache(tmp_path).path("../../etc/passwd")

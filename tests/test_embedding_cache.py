"""models.cache: LRU of embeddings keyed by (model id, crop content hash)."""

from __future__ import annotations

import numpy as np
import pytest

from stm_agent.models.cache import EmbeddingCache, crop_digest, default_cache


def test_digest_depends_on_content_shape_dtype():
    a = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert crop_digest(a) == crop_digest(a.copy())
    assert crop_digest(a) == crop_digest(np.asfortranarray(a))  # same values, other memory order
    b = a.copy()
    b[0, 0] = 1
    assert crop_digest(b) != crop_digest(a)
    assert crop_digest(a.reshape(4, 16)) != crop_digest(a)
    assert crop_digest(a.astype(np.int8)) != crop_digest(a)


def test_lookup_store_and_model_isolation():
    c = EmbeddingCache()
    keys = [bytes([i]) * 16 for i in range(3)]
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert c.lookup("m1", keys) == [None, None, None] and c.misses == 3
    c.store("m1", keys, rows)
    got = c.lookup("m1", keys[::-1])
    assert np.array_equal(np.stack(got), rows[::-1]) and c.hits == 3
    assert c.lookup("m2", keys[:1]) == [None]  # another model id never sees m1's rows
    with pytest.raises(ValueError):
        got[0][0] = 1.0  # stored rows are read-only
    assert len(c) == 3 and c.nbytes == 48
    c.clear()
    assert len(c) == 0 and c.hits == c.misses == 0


def test_lru_eviction_by_bytes():
    c = EmbeddingCache(max_bytes=3 * 16)  # three rows of 4 float32
    rows = np.ones((4, 4), np.float32)
    keys = [bytes([i]) * 16 for i in range(4)]
    c.store("m", keys[:3], rows[:3])
    c.lookup("m", keys[:1])  # key 0 becomes the most recent
    c.store("m", keys[3:], rows[3:])
    assert len(c) == 3 and c.nbytes == 48
    assert c.lookup("m", [keys[1]]) == [None]  # the least recently used went
    assert c.lookup("m", [keys[0]])[0] is not None
    off = EmbeddingCache(max_bytes=0)
    off.store("m", keys, rows)
    assert len(off) == 0
    with pytest.raises(ValueError):
        EmbeddingCache(max_bytes=-1)
    assert default_cache() is default_cache()

"""On-disk embedding/tag cache: keyed by fingerprint + texts, atomic under concurrent writers."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from tagrouter_fast.tagging import cache


class CountingEncoder:
    def __init__(self, fingerprint="enc-test"):
        self.fingerprint = fingerprint
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        out = np.array([[len(t), sum(map(ord, t)) % 97, 1.0] for t in texts], dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


class CountingTagger:
    def __init__(self):
        self.fingerprint = "tagger-test"
        self.seen = []

    def tag_batch(self, queries):
        self.seen.extend(queries)
        return [[q.split()[0].title(), f"Len {len(q)}"] for q in queries]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAGROUTER_CACHE", str(tmp_path / "cache"))


def test_cache_dir_env_and_default(tmp_path, monkeypatch):
    assert cache.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("TAGROUTER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "tagrouter_fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    d = cache.cache_dir()
    assert d == tmp_path / "home" / ".cache" / "tagrouter_fast"
    repo = Path(__file__).resolve().parents[1]
    assert repo not in d.parents


def test_embed_cached_reuses_disk_result():
    enc = CountingEncoder()
    a = cache.embed_cached(enc, ["alpha", "beta"])
    b = cache.embed_cached(enc, ["alpha", "beta"])
    assert enc.calls == 1
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and a.shape == (2, 3)
    # Another order, another text, or another model is another key.
    cache.embed_cached(enc, ["beta", "alpha"])
    cache.embed_cached(enc, ["alpha", "gamma"])
    cache.embed_cached(CountingEncoder("other-model"), ["alpha", "beta"])
    assert enc.calls == 3


def test_texts_key_is_unambiguous():
    assert cache.texts_key("f", ["ab", "c"]) != cache.texts_key("f", ["a", "bc"])
    assert cache.texts_key("f", ["x"]) != cache.texts_key("g", ["x"])
    assert cache.texts_key("f", ["x"]) == cache.texts_key("f", ["x"])


def test_corrupt_entry_is_a_miss():
    enc = CountingEncoder()
    cache.embed_cached(enc, ["alpha"])
    (entry,) = (cache.cache_dir() / "embeddings" / enc.fingerprint).glob("*.npy")
    entry.write_bytes(b"garbage")
    out = cache.embed_cached(enc, ["alpha"])
    assert enc.calls == 2 and out.shape == (1, 3)


def test_tag_cached_chunks_resume():
    tagger = CountingTagger()
    texts = [f"query number {i}" for i in range(10)]
    first = cache.tag_cached(tagger, texts[:8], chunk=4)
    assert len(tagger.seen) == 8
    # The first two chunks are stored; only the new tail is tagged.
    tagger.seen.clear()
    got = cache.tag_cached(tagger, texts[:8] + texts[8:], chunk=4)
    assert tagger.seen == texts[8:]
    assert got[:8] == first
    assert got[9] == ["Query", f"Len {len(texts[9])}"]


def test_tag_cached_progress_callback():
    seen = []
    cache.tag_cached(
        CountingTagger(), ["a b"] * 5, chunk=2, progress=lambda d, t: seen.append((d, t))
    )
    assert seen == [(2, 5), (4, 5), (5, 5)]


def test_concurrent_writers_leave_a_valid_file():
    path = cache.cache_dir() / "race" / "entry.npy"
    arrays = [np.full((200, 64), i, dtype=np.float32) for i in range(8)]
    barrier = threading.Barrier(len(arrays))

    def writer(a):
        barrier.wait()
        for _ in range(10):
            cache.save_array(path, a)

    threads = [threading.Thread(target=writer, args=(a,)) for a in arrays]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = cache.load_array(path)
    assert got is not None and got.shape == (200, 64)
    assert len(np.unique(got)) == 1  # one writer's complete content, never a mix
    assert not list(path.parent.glob(".*.tmp"))


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01  # still parseable: a digit of a float or a letter of a tag changes
    path.write_bytes(bytes(data))


def test_corrupted_but_readable_embedding_is_recomputed():
    enc = CountingEncoder()
    want = cache.embed_cached(enc, ["alpha", "beta"])
    (entry,) = (cache.cache_dir() / "embeddings" / enc.fingerprint).glob("*.npy")
    _flip_last_byte(entry)
    with pytest.warns(UserWarning, match="checksum"):
        got = cache.embed_cached(enc, ["alpha", "beta"])
    assert enc.calls == 2
    np.testing.assert_array_equal(got, want)
    assert cache.embed_cached(enc, ["alpha", "beta"]) is not None and enc.calls == 2  # rewritten


def test_corrupted_but_readable_tags_are_recomputed():
    tagger = CountingTagger()
    texts = ["query one", "query two"]
    want = cache.tag_cached(tagger, texts)
    (entry,) = (cache.cache_dir() / "tags" / tagger.fingerprint).glob("*.json")
    data = bytearray(entry.read_bytes())
    i = data.rindex(b"Len ") + 4
    data[i] = ord("9") if data[i] != ord("9") else ord("8")  # valid JSON, other tags
    entry.write_bytes(bytes(data))
    tagger.seen.clear()
    with pytest.warns(UserWarning, match="checksum"):
        assert cache.tag_cached(tagger, texts) == want
    assert tagger.seen == texts

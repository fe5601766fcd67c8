"""Tag alignment: HNSW vs exact, floor, short-circuits, cache behaviour (encoder-free)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from tagrouter_fast.tagging.align import AlignResult, TagAligner


class HashEncoder:
    """Deterministic bag-of-words embedding: shared words -> high cosine. Counts calls."""

    fingerprint = "hash-encoder-v1"

    def __init__(self, dim: int = 64):
        self.dim = dim
        self.calls: list[list[str]] = []

    def _word(self, w: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(w.lower().encode()).digest()[:8], "little")
        return np.random.default_rng(seed).normal(size=self.dim)

    def encode(self, texts):
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.replace("-", " ").split():
                out[i] += self._word(w)
            if not t.split():
                out[i] = self._word("<empty>")
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


CANON = [
    "Text Rewriting",
    "Question Answering",
    "Geometry Problem",
    "Python Programming",
    "Creative Writing",
    "Personal Finance",
    "JSON Output",
    "C++ Programming",
]


@pytest.fixture
def aligner(tmp_path, monkeypatch):
    monkeypatch.setenv("TAGROUTER_CACHE", str(tmp_path))
    return TagAligner(CANON, HashEncoder(), floor=0.5)


def test_exact_and_rule_matches_skip_the_encoder(aligner):
    enc = aligner.encoder
    enc.calls.clear()
    r = aligner.align(["Text Rewriting", "question-answering", "json  output", "c++ programming"])
    assert r.tags == ["Text Rewriting", "Question Answering", "JSON Output", "C++ Programming"]
    assert r.similarities == [1.0] * 4 and r.dropped == []
    assert enc.calls == []


def test_nearest_match_floor_and_drop_report(aligner):
    r = aligner.align(["Advanced Python Programming", "Underwater Basket Weaving"])
    assert r.tags == ["Python Programming"]
    assert r.dropped == ["Underwater Basket Weaving"]
    assert 0.5 <= r.similarities[0] < 1.0
    canon, sim = aligner.lookup("Underwater Basket Weaving")
    assert canon is None and sim == -1.0


def test_no_floor_keeps_every_nearest(tmp_path, monkeypatch):
    monkeypatch.setenv("TAGROUTER_CACHE", str(tmp_path))
    al = TagAligner(CANON, HashEncoder(), floor=None)
    r = al.align(["Underwater Basket Weaving"])
    assert len(r.tags) == 1 and r.tags[0] in CANON and r.dropped == []


def test_duplicates_collapse_keeping_best_similarity(aligner):
    r = aligner.align(["Python Programming Tips", "Python Programming", "python-programming"])
    assert r.tags == ["Python Programming"] and r.similarities == [1.0]


def test_cache_hit_does_not_encode_again(aligner):
    enc = aligner.encoder
    aligner.align(["Personal Finance Advice"])
    n = len(enc.calls)
    again = aligner.align(["Personal Finance Advice"])
    assert len(enc.calls) == n and again.tags == ["Personal Finance"]
    assert isinstance(again, AlignResult)


def test_batch_encodes_all_misses_once(aligner):
    enc = aligner.encoder
    enc.calls.clear()
    out = aligner.align_batch(
        [
            ["Creative Writing Prompt", "Geometry Problem Solving"],
            ["Geometry Problem Solving", "Text Rewriting", "Personal Finance Tips"],
        ]
    )
    assert len(enc.calls) == 1
    assert sorted(enc.calls[0]) == sorted(
        ["Creative Writing Prompt", "Geometry Problem Solving", "Personal Finance Tips"]
    )
    assert out[0].tags == ["Creative Writing", "Geometry Problem"]
    assert out[1].tags == ["Geometry Problem", "Text Rewriting", "Personal Finance"]
    # batch and single forms agree
    assert aligner.align(["Geometry Problem Solving", "Text Rewriting"]).tags == [
        "Geometry Problem",
        "Text Rewriting",
    ]


def test_empty_and_symbol_tags_are_dropped(aligner):
    r = aligner.align(["", "!!!", "Geometry Problem"])
    assert r.tags == ["Geometry Problem"] and r.dropped == ["", "!!!"]


def test_cache_eviction_bounds_size(tmp_path, monkeypatch):
    monkeypatch.setenv("TAGROUTER_CACHE", str(tmp_path))
    al = TagAligner(CANON, HashEncoder(), floor=0.0, cache_size=20)
    for i in range(60):
        al.align([f"Python Programming {i}"])
    assert al.cache_info()["size"] <= 20
    assert al.align(["Python Programming 59"]).tags == ["Python Programming"]


def test_constructor_validation():
    with pytest.raises(ValueError, match="empty"):
        TagAligner([], HashEncoder())
    with pytest.raises(ValueError, match="encoder or precomputed"):
        TagAligner(["a"])
    with pytest.raises(ValueError, match="does not match"):
        TagAligner(["a", "b"], embeddings=np.ones((3, 4), np.float32))


def _synthetic(n: int, dim: int, seed: int, centers: np.ndarray | None = None):
    """Clustered unit vectors: tag families around shared topics, like real tag sets."""
    rng = np.random.default_rng(seed)
    if centers is None:
        centers = rng.normal(size=(max(n // 20, 1), dim))
    x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), centers


def test_hnsw_recall_at_1_on_10k_tags():
    n, dim = 10_000, 384
    emb, centers = _synthetic(n, dim, seed=0)
    tags = [f"tag {i}" for i in range(n)]
    al = TagAligner(tags, embeddings=emb, floor=None, ef=64)
    rng = np.random.default_rng(1)
    # Queries: generated tags near, but not on, canonical ones.
    pick = rng.integers(0, n, 2000)
    q = emb[pick] + 0.08 * rng.normal(size=(2000, dim)).astype(np.float32)
    recall = al.verify(q)
    assert recall >= 0.99, recall
    # and the count form perturbs canonical vectors itself
    assert al.verify(500) >= 0.99
    # New tags of the same topics, not close to any single canonical tag.
    q2, _ = _synthetic(2000, dim, seed=7, centers=centers)
    assert al.verify(q2) >= 0.99


def test_exact_mode_is_argmax_of_dot_products():
    emb, _ = _synthetic(500, 32, seed=3)
    al = TagAligner([f"t{i}" for i in range(500)], embeddings=emb, exact=True)
    q, _ = _synthetic(50, 32, seed=4)
    idx, sims = al.nearest(q)
    np.testing.assert_array_equal(idx, (q @ emb.T).argmax(axis=1))
    np.testing.assert_allclose(sims, (q @ emb.T).max(axis=1), rtol=1e-5)

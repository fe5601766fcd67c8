"""Paper 3.2 normalization: rules, frequency filter, numpy DBSCAN, Alg. 1, JSON round trip."""

from __future__ import annotations

import numpy as np
import pytest
from skip_policy import import_extra

from tagrouter_fast.tagging.normalize import (
    TagNormalization,
    dbscan,
    frequency_filter,
    iterative_reduction,
    normalize_tags,
    reduce_cluster,
    rule_key,
    rule_normalize,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("question answering", "Question Answering"),
        ("Question-Answering", "Question Answering"),
        ("  text_rewriting!! ", "Text Rewriting"),
        ("JSON output", "JSON Output"),
        ("c++ / C# programming", "C++ C# Programming"),
        ("math:geometry(basic)", "Math Geometry Basic"),
        ("***", ""),
        ("Café   Culture", "Café Culture"),
    ],
)
def test_rule_normalize(raw, expected):
    assert rule_normalize(raw) == expected


def test_rule_key_merges_spelling_variants():
    assert len({rule_key(t) for t in ["Text Rewriting", "text-rewriting", "TEXT rewriting"]}) == 1
    assert rule_key("C++ Programming") != rule_key("C Programming")


def test_frequency_filter():
    assert frequency_filter({"a": 5, "b": 4, "c": 9}) == {"a", "c"}
    assert frequency_filter({"a": 1}, min_count=1) == {"a"}


def test_dbscan_matches_sklearn():
    sklearn_cluster = import_extra("eval", "sklearn.cluster")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 16))
    x = np.concatenate(
        [c + 0.15 * rng.normal(size=(30, 16)) for c in centers] + [rng.normal(size=(20, 16))]
    )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for eps, ms in [(0.05, 2), (0.1, 5), (0.3, 3)]:
        ours = dbscan(x, eps=eps, min_samples=ms, chunk=37)
        ref = sklearn_cluster.DBSCAN(eps=eps, min_samples=ms, metric="cosine").fit(x).labels_
        np.testing.assert_array_equal(ours, ref)


def test_dbscan_edge_cases():
    assert dbscan(np.zeros((0, 3))).shape == (0,)
    assert dbscan(np.eye(3), eps=0.1, min_samples=2).tolist() == [-1, -1, -1]
    assert dbscan(np.eye(3), eps=0.1, min_samples=1).tolist() == [0, 1, 2]


def test_reduce_cluster_removes_least_central_first():
    # 0,1,2 close together; 3 on the edge of the cluster.
    e = np.array([[1, 0, 0], [0.95, 0.3, 0], [0.95, -0.3, 0], [0.6, 0, 0.8]], dtype=np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    assert reduce_cluster([0, 1, 2, 3], sim, keep=3) == [0, 1, 2]
    kept = reduce_cluster([0, 1, 2, 3], sim, keep=2)
    assert len(kept) == 2 and 3 not in kept and 0 in kept
    assert reduce_cluster([1, 3], sim) == [1, 3]


def _embed(groups):
    """Unit vectors: tags in the same group are near-duplicates, groups are orthogonal."""
    rng = np.random.default_rng(0)
    out = {}
    for g, tags in enumerate(groups):
        base = np.zeros(32)
        base[g] = 1.0
        for t in tags:
            v = base + 0.05 * rng.normal(size=32)
            out[t] = (v / np.linalg.norm(v)).astype(np.float32)
    return out


def test_iterative_reduction_keeps_two_per_cluster_and_singletons():
    emb = _embed(
        [
            ["Text Generation", "Content Creation", "Text Writing", "Content Writing"],
            ["Geometry"],
            ["Cooking"],
        ]
    )
    reduced, merges = iterative_reduction(
        [
            [
                "Text Generation",
                "Content Creation",
                "Text Writing",
                "Content Writing",
                "Geometry",
                "Cooking",
            ]
        ],
        emb,
        eps=0.1,
    )
    (row,) = reduced
    assert "Geometry" in row and "Cooking" in row  # DBSCAN noise kept as singletons
    writing = [t for t in row if t not in ("Geometry", "Cooking")]
    assert len(writing) == 2
    removed = {"Text Generation", "Content Creation", "Text Writing", "Content Writing"} - set(
        writing
    )
    assert set(merges) == removed
    for r in removed:
        assert set(merges[r]) <= set(writing)


def test_normalize_tags_end_to_end_and_json(tmp_path):
    groups = [
        ["Text Generation", "Content Creation", "Text Writing"],
        ["Geometry"],
        ["Cooking", "Recipe Writing"],
    ]
    emb = _embed(groups)
    data = (
        [["text-generation", "Content Creation", "Text Writing", "Geometry"]] * 6
        + [["Cooking", "recipe writing", "Geometry"]] * 5
        + [["Rare Tag", "Geometry"]] * 2
    )
    norm, per_query = normalize_tags(data, min_count=5, eps=0.1, embeddings=emb)
    assert "Rare Tag" not in norm.canonical  # frequency filter
    assert norm.map_tag("Rare Tag") is None
    assert norm.canonical[0] == "Geometry"  # most frequent first
    assert norm.map_tag("Geometry") == "Geometry"
    # The three writing tags of the first queries collapse to two canonical ones.
    writing = {norm.map_tag(t) for t in ["Text Generation", "Content Creation", "Text Writing"]}
    assert len(writing) == 2 and writing <= set(norm.canonical)
    assert norm.map_tag("TEXT generation") == norm.map_tag("Text Generation")
    assert all(len(q) <= 3 for q in per_query[:6])
    assert norm.apply(["Cooking", "cooking", "unknown"]) == ["Cooking"]
    p = tmp_path / "norm.json"
    norm.save(p)
    back = TagNormalization.load(p)
    assert back.canonical == norm.canonical and back.mapping == norm.mapping
    assert back.map_tag("recipe-writing") == norm.map_tag("Recipe Writing")
    p.write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a version-1"):
        TagNormalization.load(p)


def test_normalize_without_semantic_and_errors():
    norm, per_query = normalize_tags([["a b", "A-B", "c"]] * 5, semantic=False)
    assert norm.canonical == ["A B", "C"] and per_query[0] == ["A B", "C"]
    with pytest.raises(ValueError, match="encoder or embeddings"):
        normalize_tags([["x"]] * 5)

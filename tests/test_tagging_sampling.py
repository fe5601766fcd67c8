"""Alg. 2 hybrid weight sampling."""

from __future__ import annotations

import math
from collections import Counter
from itertools import permutations

import numpy as np
import pytest

from tagrouter_fast.eval.sampling import hybrid_sample, hybrid_tag_weights, point_weights


def test_tag_weights_formula():
    data = [["a"]] * 8 + [["b"]] * 2 + [["c"]]
    w = hybrid_tag_weights(data)
    for t, f in {"a": 8, "b": 2, "c": 1}.items():
        assert w[t] == pytest.approx(1 / f + math.log(8) - math.log(f))
    assert w["c"] > w["b"] > w["a"]


def test_point_weight_reductions():
    data = [["a", "b"], ["a"], []]
    w_t = hybrid_tag_weights(data)
    for reduce, fn in (("mean", np.mean), ("sum", np.sum), ("max", np.max)):
        p = point_weights(data, reduce)
        assert p.sum() == pytest.approx(1.0)
        raw = np.array([fn([w_t["a"], w_t["b"]]), w_t["a"], min(w_t.values())])
        np.testing.assert_allclose(p, raw / raw.sum())
    with pytest.raises(ValueError):
        point_weights(data, "median")


def test_sample_size_uniqueness_and_seed():
    data = [[f"t{i % 7}", f"u{i % 3}"] for i in range(101)]
    s = hybrid_sample(data, alpha=0.3, seed=5)
    assert len(s) == math.ceil(0.3 * 101) and len(set(s)) == len(s)
    assert s == hybrid_sample(data, alpha=0.3, seed=5)
    assert s != hybrid_sample(data, alpha=0.3, seed=6)
    assert sorted(hybrid_sample(data, alpha=1.0)) == list(range(101))
    with pytest.raises(ValueError):
        hybrid_sample(data, alpha=0.0)
    assert hybrid_sample([], alpha=0.5) == []


def test_rare_tags_are_oversampled():
    data = [["common"]] * 900 + [["rare"]] * 100
    picks = Counter()
    for seed in range(20):
        picks.update("rare" if i >= 900 else "common" for i in hybrid_sample(data, 0.1, seed=seed))
    # Uniform sampling would give 10% rare; hybrid weights favour the rare tag strongly.
    assert picks["rare"] / sum(picks.values()) > 0.5


def _sequential_inclusion(p, n):
    """Exact inclusion probabilities of draw-remove-renormalise sampling (the pseudo-code)."""
    k = len(p)
    incl = np.zeros(k)
    for order in permutations(range(k), n):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= p[i] / left
            left -= p[i]
        incl[list(order)] += prob
    return incl


def test_matches_sequential_draws_in_distribution():
    data = [["a"]] * 3 + [["b"], ["c"], ["b", "c"]]
    p = point_weights(data)
    exact = _sequential_inclusion(p, 2)
    trials = 20000
    counts = np.zeros(len(data))
    for seed in range(trials):
        counts[hybrid_sample(data, alpha=2 / 6, seed=seed)] += 1
    np.testing.assert_allclose(counts / trials, exact, atol=0.015)

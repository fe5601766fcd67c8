"""The retrained neural baselines (RouterBench-MLP, FORC-style) on imbalanced accept labels.

With accept rates of 10-20% (AlpacaEval), scikit-learn's early stopping on held-out accuracy
stopped both networks after two or three epochs, at the all-reject predictor: their outputs sat
near 0.4 for every model and the small model they preferred was set by the initial weights, so
the MLP's AUC fell below the no-information line. Stopped on held-out log-loss, their outputs
are calibrated to the models' accept rates.
"""

from __future__ import annotations

import numpy as np
import pytest

from tagrouter_fast.eval.methods import TrainSet, fit_forc, fit_mlp

MODELS = ["big", "good-small", "poor-small"]
RATES = (0.25, 0.20, 0.08)


def _train(n: int, seed: int, dim: int = 32) -> TrainSet:
    """Queries whose embeddings carry no signal: the best a router can do is the rates."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    acc = np.stack([rng.random(n) < r for r in RATES], axis=1)
    return TrainSet(
        query_ids=[f"q{i}" for i in range(n)],
        emb=emb,
        tag_emb=emb,
        tags=[[] for _ in range(n)],
        models=list(MODELS),
        llm=0,
        acc=acc,
        codes=np.where(acc, 0, 2).astype(np.int8),
        cost=np.tile([10.0, 1.0, 1.0], (n, 1)),
        subsets=["s"] * n,
    )


@pytest.mark.parametrize("fit", [fit_mlp, fit_forc], ids=["MLP", "FORC"])
def test_neural_baselines_are_calibrated_to_the_accept_rates(fit) -> None:  # type: ignore[no-untyped-def]
    train, test = _train(640, 0), _train(400, 1)
    fitted = fit(train, 0)
    u = fitted._predict(test.features())
    rates = train.acc.mean(axis=0)
    # Each model's mean predicted accept probability is its training accept rate (the collapse:
    # all three near 0.4), and the small model preferred is the one accepted more often.
    np.testing.assert_allclose(u.mean(axis=0), rates, atol=0.06)
    _, slm = fitted.route(test.features())
    assert np.mean(slm == 1) > 0.8


def test_mlp_newcomer_column_needs_enough_labels_for_a_network() -> None:
    train = _train(640, 2)
    known = np.ones(train.acc.shape, bool)
    known[:, 2] = False
    rows = np.arange(30)
    known[rows, 2] = True
    train.known = known
    u = fit_mlp(train, 0)._predict(_train(50, 3).features())
    # 30 labels: no held-out set to stop a network on, so the column is their accept rate.
    np.testing.assert_allclose(u[:, 2], train.acc[rows, 2].mean())
    known[:300, 2] = True
    u = fit_mlp(train, 0)._predict(_train(50, 3).features())
    # 300 labels with enough of both classes: a network of its own, which varies by query.
    assert u[:, 2].std() > 0 and abs(u[:, 2].mean() - train.acc[:300, 2].mean()) < 0.06


def test_label_independent_fits_are_reused_not_refitted(monkeypatch: pytest.MonkeyPatch) -> None:
    # The newcomer experiment refits the MLP for every N: the rest of the pool's network does
    # not depend on the newcomer's labels and is fitted once; new inputs fit anew.
    import tagrouter_fast.eval.methods as methods

    calls = []
    real = methods._fit_stopped

    def counting(*args, **kw):  # type: ignore[no-untyped-def]
        calls.append(args[1].shape)
        return real(*args, **kw)

    monkeypatch.setattr(methods, "_fit_stopped", counting)
    methods._MEMO.clear()
    train = _train(300, 4)
    known = np.ones(train.acc.shape, bool)
    known[:, 2] = False
    train.known = known
    test = _train(40, 5).features()
    first = fit_mlp(train, 0)._predict(test)
    known[:30, 2] = True  # the newcomer's labels change, the rest's do not
    second = fit_mlp(train, 0)._predict(test)
    assert len(calls) == 1 and calls[0] == (300, 2)
    np.testing.assert_array_equal(first[:, :2], second[:, :2])
    assert fit_mlp(_train(300, 6), 0) is not None and len(calls) == 2

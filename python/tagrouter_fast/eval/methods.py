"""Routers compared by the evaluation: TagRouter variants and the baselines of paper Appx. B.2.

A method is fitted on a :class:`TrainSet` (training-fold queries with their labels) and returns
a :class:`Fitted` router that sees only label-free :class:`QueryFeatures` of the queries it
routes: test labels cannot reach a method by construction. A fitted router returns, per query,

- ``slm``: the pool column of the small model it would use, and
- ``pref``: its preference for M_LLM over that small model (threshold knob: M_LLM iff
  ``pref > t``; see :mod:`tagrouter_fast.eval.metrics`).

Utility routers (MF, KNN, MLP, FORC-style) predict each model's accept probability ``u``;
``slm = argmax`` of ``u`` over the small models and ``pref = u_LLM - u_slm``.

Every TagRouter variant is the product: a `TagRouter` built from the training fold by
`tagrouter_fast.builder.bundle.build_router` (the builder behind `tagrouter build-store`, which
also does the variant's tuning), routing test queries through `TagRouter.align_tags` and the
Rust `TagDecider.decide_batch`: ``slm`` is the decider's M_SLM and ``pref = -Delta_q``, so the
threshold ``t`` is ``-theta`` (paper 3.4: M_LLM iff ``Delta_q < theta``). The methods marked
``research`` (tag difficulty, the blend) are ours and use tags but are not TagRouters.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    from tagrouter_fast.builder.variants import Variant
    from tagrouter_fast.data.table import RoutingTable
    from tagrouter_fast.protocols import Encoder
    from tagrouter_fast.router import TagRouter

__all__ = [
    "Fitted",
    "Method",
    "QueryFeatures",
    "TrainSet",
    "default_methods",
    "fit_hybrid",
    "fit_knn_difficulty",
    "fit_selected",
    "fit_tag_difficulty",
    "fit_variant",
    "out_of_fold",
    "route_tagrouter",
]


# ==== Data handed to methods ====


@dataclass
class QueryFeatures:
    """Label-free inputs of the queries to route (aligned rows).

    Attributes:
        query_ids: Query ids.
        emb: ``(n, d)`` query embeddings.
        tag_emb: ``(n, d)`` embeddings of the joined tags.
        tags: Tags of each query (raw tagger output).
        texts: Query texts.
    """

    query_ids: list[str]
    emb: np.ndarray
    tag_emb: np.ndarray
    tags: list[list[str]]
    texts: list[str] = field(default_factory=list)


@dataclass
class TrainSet(QueryFeatures):
    """Training-fold queries with their labels.

    Attributes:
        models: Pool models (columns of ``acc``/``cost``/``codes``).
        llm: Column of M_LLM.
        acc: ``(n, m)`` bool accepted (win or tie).
        codes: ``(n, m)`` outcome codes 0 win, 1 tie, 2 loss.
        cost: ``(n, m)`` cost per call.
        subsets: Stratum of each query.
        all_codes: ``(n, n_all)`` outcome codes of every model of the table (-1 missing), for
            methods that learn query difficulty from models outside the pool.
        all_index: Column of each pool model in ``all_codes``.
        tagger: The tagger that produced ``tags`` (``None``: tags given, not generated); the
            routers built from this set carry it.
        known: ``(n, m)`` bool: the labels a method may read (``None``: all). The newcomer
            experiment (`tagrouter_fast.eval.newcomer`) hides most of one model's labels, as a
            model that just joined the pool has only a few judgments.
        all_models: Names of the columns of ``all_codes``.
    """

    models: list[str] = field(default_factory=list)
    llm: int = 0
    acc: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))
    codes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int8))
    cost: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    subsets: list[str] = field(default_factory=list)
    all_codes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int8))
    all_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tagger: Any = None
    known: np.ndarray | None = None
    all_models: list[str] = field(default_factory=list)

    def label_mask(self) -> np.ndarray:
        """``(n, m)`` bool: the labels a method may read."""
        return np.ones(self.acc.shape, bool) if self.known is None else self.known

    @property
    def slms(self) -> list[int]:
        """Columns of the small models."""
        return [j for j in range(len(self.models)) if j != self.llm]

    def subset_rows(self, rows: np.ndarray) -> TrainSet:
        """The training set restricted to ``rows`` (for inner cross-validation)."""
        return TrainSet(
            query_ids=[self.query_ids[i] for i in rows],
            emb=self.emb[rows],
            tag_emb=self.tag_emb[rows],
            tags=[self.tags[i] for i in rows],
            texts=[self.texts[i] for i in rows] if self.texts else [],
            models=self.models,
            llm=self.llm,
            acc=self.acc[rows],
            codes=self.codes[rows],
            cost=self.cost[rows],
            subsets=[self.subsets[i] for i in rows],
            all_codes=self.all_codes[rows],
            all_index=self.all_index,
            tagger=self.tagger,
            known=None if self.known is None else self.known[rows],
            all_models=self.all_models,
        )

    def features(self, rows: np.ndarray | None = None) -> QueryFeatures:
        """The label-free view of (some of) these queries."""
        rows = np.arange(len(self.query_ids)) if rows is None else rows
        return QueryFeatures(
            query_ids=[self.query_ids[i] for i in rows],
            emb=self.emb[rows],
            tag_emb=self.tag_emb[rows],
            tags=[self.tags[i] for i in rows],
            texts=[self.texts[i] for i in rows] if self.texts else [],
        )

    def as_table(self, references: bool = False) -> RoutingTable:
        """These queries' judgments of the pool models as a routing table: what the product's
        builder reads (texts, subsets, outcomes, costs). Hidden labels (``known``) are missing
        cells. ``references``: also every other model of ``all_codes`` (judgments only; their
        costs are NaN, as reference models are never candidates)."""
        from tagrouter_fast.data.table import RoutingTable

        n = len(self.query_ids)
        codes = np.where(self.label_mask(), self.codes, -1).astype(np.int8)
        cost = np.asarray(self.cost, dtype=np.float64)
        models = list(self.models)
        if references and self.all_models:
            pool = set(self.all_index.tolist())
            # A hidden pool model must not come back as a reference.
            other = [j for j in range(len(self.all_models)) if j not in pool]
            other = [j for j in other if self.all_models[j] not in models]
            models += [self.all_models[j] for j in other]
            codes = np.hstack([codes, self.all_codes[:, other].astype(np.int8)])
            cost = np.hstack([cost, np.full((n, len(other)), np.nan)])
        return RoutingTable(
            query_ids=list(self.query_ids),
            texts=list(self.texts) if self.texts else [""] * n,
            subsets=list(self.subsets),
            models=models,
            outcome_codes=codes,
            costs=cost,
            raw_costs=cost,
            scores=np.full(codes.shape, np.nan),
            source="training fold",
        )


class Fitted:
    """A fitted router.

    Attributes:
        fixed_threshold: If set, the method's own operating point (TagRouter: ``-theta``);
            otherwise the harness picks the max-AR threshold on the training folds.
    """

    fixed_threshold: float | None = None
    #: What the fit chose (e.g. the configuration picked by inner cross-validation).
    info: dict[str, Any] = {}

    def route(self, x: QueryFeatures) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(pref, slm)`` for each query."""
        raise NotImplementedError


@dataclass
class Method:
    """A named router family.

    Attributes:
        name: Display/JSON name.
        kind: ``"baseline"``, ``"tagrouter"`` or ``"reference"`` (random; not a learned router).
        fit: ``fit(train, seed) -> Fitted``.
        select_on_train: Pick the max-AR threshold on training folds (inner CV).
        reference: Another method's name: the summary adds a paired comparison with it
            (``delta_auc_vs_reference``), e.g. one router with two taggers.
    """

    name: str
    kind: str
    fit: Callable[[TrainSet, int], Fitted]
    select_on_train: bool = True
    reference: str | None = None


# ==== Helpers ====


def _slm_choice(u: np.ndarray, train: TrainSet) -> tuple[np.ndarray, np.ndarray]:
    """``(pref, slm)`` from per-model utilities; ties between small models go to the cheaper."""
    slms = np.asarray(train.slms)
    mean_cost = train.cost.mean(axis=0)
    # Break exact ties by cost with a perturbation far below any probability difference.
    rank = np.argsort(np.argsort(mean_cost[slms]))
    us = u[:, slms] - 1e-12 * rank[None, :]
    best = np.argmax(us, axis=1)
    slm = slms[best]
    pref = u[:, train.llm] - u[np.arange(len(u)), slm]
    return pref, slm


class _UtilityRouter(Fitted):
    def __init__(self, predict: Callable[[QueryFeatures], np.ndarray], train: TrainSet) -> None:
        self._predict = predict
        self._train = train

    def route(self, x: QueryFeatures) -> tuple[np.ndarray, np.ndarray]:
        return _slm_choice(self._predict(x), self._train)


def _inputs(x: QueryFeatures, use_tags: bool) -> np.ndarray:
    return x.tag_emb if use_tags else x.emb


def _constant_columns(y: np.ndarray) -> np.ndarray:
    return y.min(axis=0) == y.max(axis=0)


def _column_prior(train: TrainSet, j: int) -> float:
    """A model's accept rate from the labels a method may read; with none, the pool's."""
    mask = train.label_mask()
    if mask[:, j].any():
        return float(train.acc[mask[:, j], j].mean())
    return float(train.acc[mask].mean()) if mask.any() else 0.5


_T = TypeVar("_T")
#: Fits already made, by a digest of everything they depend on. The newcomer experiment refits
#: every baseline for each N and draw, but the rest of the pool's network and the embedding SVD
#: do not depend on the newcomer's labels: the same inputs give the same (deterministic, seeded)
#: fit, reused read-only. Bounded: a run needs the few of its current fold.
_MEMO: OrderedDict[bytes, Any] = OrderedDict()
_MEMO_SIZE = 16


def _memoised(parts: Sequence[Any], fit: Callable[[], _T]) -> _T:
    """``fit()``, or its earlier result for the same ``parts`` (arrays by content)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(f"{part.dtype}{part.shape}".encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(repr(part).encode())
        h.update(b"|")
    key = h.digest()
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]  # type: ignore[no-any-return]
    out = fit()
    _MEMO[key] = out
    if len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return out


#: Below this many labels a per-model classifier is not fitted: its model's column is its
#: accept rate (too few to fit, let alone to early-stop on a held-out tenth).
_MIN_FIT = 20


# ==== Baselines (paper Appx. B.2) ====


def fit_mf(train: TrainSet, seed: int, use_tags: bool = False, dim: int = 50) -> Fitted:
    """RouteLLM-MF style: embeddings -> truncated SVD(``dim``) -> logistic regression per model."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.linear_model import LogisticRegression

    X = _inputs(train, use_tags)
    k = int(min(dim, X.shape[1] - 1, X.shape[0] - 1))
    # The embedding side needs no labels: the SVD sees every training query.
    svd = _memoised(
        ("svd", X, k, seed), lambda: TruncatedSVD(n_components=k, random_state=seed).fit(X)
    )
    Z = svd.transform(X)
    y = train.acc.astype(int)
    mask = train.label_mask()
    clfs: list[Any] = []
    for j in range(y.shape[1]):
        rows = mask[:, j]
        yj = y[rows, j]
        if len(yj) < min(_MIN_FIT, len(y)) or len(np.unique(yj)) < 2:
            clfs.append(_column_prior(train, j))
        else:
            clfs.append(LogisticRegression(C=1.0, max_iter=1000).fit(Z[rows], yj))

    def predict(x: QueryFeatures) -> np.ndarray:
        z = svd.transform(_inputs(x, use_tags))
        cols = [
            np.full(len(z), c) if isinstance(c, float) else c.predict_proba(z)[:, 1] for c in clfs
        ]
        return np.stack(cols, axis=1)

    return _UtilityRouter(predict, train)


def fit_knn(train: TrainSet, seed: int, use_tags: bool = False, k: int = 11) -> Fitted:
    """RouterBench KNN: mean accept of the ``k`` nearest training queries (cosine)."""
    X = _inputs(train, use_tags)
    y = train.acc.astype(np.float64)
    mask = train.label_mask()
    full = mask.all(axis=0)
    kk = min(k, len(X))

    def predict(x: QueryFeatures) -> np.ndarray:
        sims = _inputs(x, use_tags) @ X.T
        nn = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        u = y[nn].mean(axis=1)
        # A model with hidden labels: its k nearest among the queries it was judged on.
        for j in np.flatnonzero(~full).tolist():
            rows = np.flatnonzero(mask[:, j])
            if len(rows) == 0:
                u[:, j] = _column_prior(train, j)
                continue
            kj = min(k, len(rows))
            sj = sims[:, rows]
            nj = np.argpartition(-sj, kj - 1, axis=1)[:, :kj]
            u[:, j] = y[rows[nj], j].mean(axis=1)
        return u

    return _UtilityRouter(predict, train)


#: A network is stopped on the log-loss of a held-out tenth of its rows; below this many rows,
#: or this many of either class in a column, there is no held-out set worth stopping on, so
#: the column is its accept rate instead (a constant is calibrated; a network fitted without a
#: stopping rule is not).
_MIN_NET_ROWS = 50
_MIN_NET_CLASS = 5


def _fit_stopped(
    X: np.ndarray,
    Y: np.ndarray,
    hidden: tuple[int, ...],
    seed: int,
    *,
    patience: int,
    max_epochs: int,
    groups: np.ndarray | None = None,
) -> Any:
    """An `MLPClassifier` trained epoch by epoch and stopped where the log-loss of a held-out
    10% of the rows stops falling, with the weights of its best epoch.

    Why not scikit-learn's ``early_stopping``: it stops on held-out *accuracy* (for several
    outputs, the share of rows with every output right). With accept rates of 10-20%, the
    all-reject predictor maximises that after two or three epochs, so the network stopped
    there, barely trained: on AlpacaEval five-api its five outputs all sat near 0.4-0.47
    (accept rates 0.09-0.19, spread 0.015 over queries), and the small model it preferred was
    set by the initial weights, not by the models' accept rates (RouterBench-MLP's AUC fell
    below the no-information line). Log-loss rewards calibrated probabilities, which is what
    the router compares across models.

    Args:
        X: ``(n, d)`` inputs.
        Y: ``(n,)`` binary labels, or ``(n, k)`` binary labels of ``k`` outputs.
        hidden: hidden layer sizes.
        seed: initial weights, shuffling and the held-out split.
        patience: epochs without improvement before stopping.
        max_epochs: at most this many epochs.
        groups: rows of one group are held out together (FORC's pairs of one query).
    """
    from sklearn.neural_network import MLPClassifier

    Y = np.asarray(Y, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n = len(X)
    if groups is None:
        groups = np.arange(n)
    uniq = rng.permutation(np.unique(groups))
    held = np.isin(groups, uniq[: max(1, len(uniq) // 10)])
    if Y.ndim == 1 and len(np.unique(Y[held])) < 2:
        # A single-output split without both classes cannot measure calibration: stratify.
        held = np.zeros(n, bool)
        for c in (0, 1):
            rows = rng.permutation(np.flatnonzero(Y == c))
            held[rows[: max(1, len(rows) // 10)]] = True
    classes = np.arange(Y.shape[1]) if Y.ndim == 2 else np.array([0, 1])
    clf = MLPClassifier(hidden_layer_sizes=hidden, alpha=1e-3, random_state=seed)
    Xt, Yt, Xv, Yv = X[~held], Y[~held], X[held], Y[held]
    best, best_state, waited = np.inf, None, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(max_epochs):
            clf.partial_fit(Xt, Yt, classes=classes)
            p = clf.predict_proba(Xv)
            p = np.clip(p if Y.ndim == 2 else p[:, 1], 1e-7, 1 - 1e-7)
            loss = float(-np.mean(Yv * np.log(p) + (1 - Yv) * np.log1p(-p)))
            if loss < best - 1e-4:  # scikit-learn's default tolerance
                best, waited = loss, 0
                best_state = ([w.copy() for w in clf.coefs_], [b.copy() for b in clf.intercepts_])
            else:
                waited += 1
                if waited >= patience:
                    break
    assert best_state is not None
    clf.coefs_, clf.intercepts_ = best_state
    return clf


def _can_fit_net(y: np.ndarray) -> bool:
    """Enough labels of both classes to hold some out and stop on them."""
    pos = int(y.sum())
    return len(y) >= _MIN_NET_ROWS and min(pos, len(y) - pos) >= _MIN_NET_CLASS


def fit_mlp(train: TrainSet, seed: int, use_tags: bool = False) -> Fitted:
    """RouterBench MLP: two hidden layers (128, 64), one multi-label output per model, stopped
    on held-out log-loss (`_fit_stopped`). A model with hidden labels (a newcomer) gets a
    network of its own on the queries it was judged on; a column without enough labels of
    both classes for that (`_can_fit_net`) is its accept rate."""
    X = _inputs(train, use_tags)
    y = train.acc.astype(int)
    mask = train.label_mask()
    full = mask.all(axis=0)
    cols: list[int] = np.flatnonzero(full).tolist()
    const = {j: _column_prior(train, j) for j in cols if not _can_fit_net(y[:, j])}
    var = [j for j in cols if j not in const]
    partial: dict[int, Any] = {}
    for j in np.flatnonzero(~full).tolist():
        rows = mask[:, j]
        if _can_fit_net(y[rows, j]):
            partial[j] = _fit_stopped(
                X[rows], y[rows, j], (128, 64), seed, patience=10, max_epochs=200
            )
        else:
            const[j] = _column_prior(train, j)
    clf = None
    if var:
        # Multi-label needs at least two output columns; duplicate a lone one.
        yy = y[:, var] if len(var) > 1 else np.repeat(y[:, var], 2, axis=1)
        clf = _memoised(
            ("mlp", X, yy, seed),
            lambda: _fit_stopped(X, yy, (128, 64), seed, patience=10, max_epochs=200),
        )

    def predict(x: QueryFeatures) -> np.ndarray:
        Xq = _inputs(x, use_tags)
        u = np.empty((len(Xq), y.shape[1]))
        if clf is not None:
            u[:, var] = clf.predict_proba(Xq)[:, : len(var)]
        for j, c in partial.items():
            u[:, j] = c.predict_proba(Xq)[:, 1]
        for j, p in const.items():
            u[:, j] = p
        return u

    return _UtilityRouter(predict, train)


def fit_forc(train: TrainSet, seed: int, use_tags: bool = False) -> Fitted:
    """FORC-style: one classifier over (query, model-identifier) pairs.

    FORC feeds DistilBERT the query with a model-identifier token and predicts that model's
    success. Without BERT, the query embedding is concatenated with a one-hot model id and one
    shared MLP (one hidden layer, 128) predicts acceptance for every pair; it is stopped on the
    held-out log-loss of a tenth of the queries (all their pairs; `_fit_stopped`).
    """
    X = _inputs(train, use_tags)
    n, m = train.acc.shape
    eye = np.eye(m, dtype=np.float32)

    def pairs(Xq: np.ndarray) -> np.ndarray:
        rep = np.repeat(Xq, m, axis=0)
        ids = np.tile(eye, (len(Xq), 1))
        # Interaction features let one linear layer express per-model directions.
        return np.hstack([rep, ids])

    # Only the (query, model) pairs with a readable label are training pairs.
    keep = train.label_mask().reshape(-1)
    y = train.acc.astype(int).reshape(-1)[keep]
    if not _can_fit_net(y):
        const = float(y.mean()) if len(y) else 0.5
        return _UtilityRouter(lambda x: np.full((len(x.query_ids), m), const), train)
    query = np.repeat(np.arange(n), m)[keep]
    clf = _fit_stopped(pairs(X)[keep], y, (128,), seed, patience=5, max_epochs=60, groups=query)

    def predict(x: QueryFeatures) -> np.ndarray:
        Xq = _inputs(x, use_tags)
        return clf.predict_proba(pairs(Xq))[:, 1].reshape(len(Xq), m)

    return _UtilityRouter(predict, train)


class _Constant(Fitted):
    def __init__(self, slm: int, n_slm_random: Sequence[int] | None = None, seed: int = 0) -> None:
        self.slm = slm
        self.choices = n_slm_random
        self.rng = np.random.default_rng(seed)

    def route(self, x: QueryFeatures) -> tuple[np.ndarray, np.ndarray]:
        n = len(x.query_ids)
        if self.choices is not None:
            slm = self.rng.choice(np.asarray(self.choices), size=n)
        else:
            slm = np.full(n, self.slm)
        # One tie group: the sweep is the straight line of routing a random share to M_LLM.
        return np.zeros(n), slm


def fit_prior(train: TrainSet, seed: int) -> Fitted:
    """No-information router: the small model with the best training AR (cheaper on ties),
    and a random share of queries to M_LLM."""
    ar = [_column_prior(train, j) for j in range(len(train.models))]
    cost = train.cost.mean(axis=0)
    best = min(train.slms, key=lambda j: (-ar[j], cost[j]))
    return _Constant(best)


def fit_random(train: TrainSet, seed: int) -> Fitted:
    """Random routing: a uniformly random small model and a random share to M_LLM."""
    return _Constant(-1, train.slms, seed)


# ==== TagRouter: the product, built by the product's builder ====


class _RouterFitted(Fitted):
    """A `TagRouter` from `build_router`, routing through its public batch path."""

    def __init__(self, router: TagRouter, train: TrainSet) -> None:
        self.router = router
        self.models = list(train.models)
        self.llm = train.llm
        mean_cost = train.cost.mean(axis=0)
        slms = train.slms
        self.fallback_slm = min(slms, key=lambda j: mean_cost[j]) if slms else train.llm
        self.fixed_threshold = -float(router.decider.theta)
        tuned = (router.build_info or {}).get("tuned")
        self.info = (
            {"chosen": f"prior_strength={tuned['prior_strength']:g}"}
            if tuned and tuned["inner_auc"]
            else {}
        )

    def route(self, x: QueryFeatures) -> tuple[np.ndarray, np.ndarray]:
        pref, slm, _ = route_tagrouter(
            self.router, x.tags, self.models, self.llm, self.fallback_slm
        )
        return pref, slm


def route_tagrouter(
    router: TagRouter,
    raw_tags: Sequence[Sequence[str]],
    models: Sequence[str],
    llm: int,
    fallback_slm: int,
    theta: float | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Route queries by their cached tagger output through the product's one composition,
    `TagRouter.decide_many` (alignment, then the Rust decider at ``theta``, default the
    router's), and give the evaluation's view of the decisions.

    Args:
        router: a product `TagRouter` over (some of) ``models``.
        raw_tags: the tagger's output per query.
        models: the pool's columns; ``llm`` is M_LLM's.
        fallback_slm: the small model of a query that went to M_LLM without a known tag (the
            curve's all-small end still needs one).
        theta: the decider's threshold for this call (default: the router's own).

    Returns:
        ``(pref, slm, threshold)``: ``pref = -Delta_q`` per query (``+-inf`` where no tag is
        known), the small model's column, and ``threshold = -theta`` of the decider that decided
        them (the same store snapshot), so ``pref > threshold`` is the router's own route.
    """
    from tagrouter_fast.builder.tune import decisions_in_pool_order, preferences

    batch = router.decide_many(raw_tags=raw_tags, theta=theta)
    d = decisions_in_pool_order(batch.arrays(), batch.decider.models, models)
    pref, slm = preferences(d, llm, fallback_slm)
    return pref, slm, -float(batch.decider.theta)


_ENCODER: list[Encoder] = []


def _shared_encoder() -> Encoder:
    """One memoising encoder for every fold's aligner: each tag is encoded once per run."""
    if not _ENCODER:
        from tagrouter_fast.tagging.cache import MemoEncoder
        from tagrouter_fast.tagging.encoder import default_encoder

        _ENCODER.append(MemoEncoder(default_encoder()))
    return _ENCODER[0]


def fit_variant(
    train: TrainSet, seed: int, variant: str | Variant = "paper", **options: Any
) -> Fitted:
    """The product's router of ``variant`` (``build-store --variant``; ``options`` override
    single settings, see `tagrouter_fast.builder.variants.Variant`), built from the training fold
    by `build_router` with the fold's cached tags; what it tunes is tuned on the training fold.
    """
    from tagrouter_fast.builder.bundle import build_router
    from tagrouter_fast.builder.variants import resolve_variant

    v = resolve_variant(variant).with_options(**options)
    needs_encoder = v.align or bool(v.normalize)
    router = build_router(
        train.as_table(),
        train.models,
        variant=v,
        llm=train.models[train.llm],
        tagger=train.tagger,
        tags=train.tags,
        encoder=_shared_encoder() if needs_encoder else None,
        seed=seed,
    )
    return _RouterFitted(router, train)


# ==== Tag difficulty (ours, research: uses tags, not a TagRouter) ====


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def _tag_accept_tables(
    train: TrainSet, tags: list[list[str]]
) -> tuple[Any, np.ndarray, np.ndarray]:
    """Per-(tag, model) accept and judgment counts over every model of the table.

    Both come from the product scorer with ``weighting="none"`` (``w_t = 1``): scores
    ``s = (1, 1, 0)`` sum accepts, ``s = (1, 1, 1)`` sum judgments.
    """
    from tagrouter_fast.core import TagScorer
    from tagrouter_fast.data.table import RoutingTable

    codes = np.asarray(train.all_codes, dtype=np.int8)
    n = len(train.query_ids)
    # Every model of the table, named by its column, through the one table -> records path.
    names = [f"m{a}" for a in range(codes.shape[1])]
    table = RoutingTable(
        query_ids=list(train.query_ids),
        texts=[""] * n,
        subsets=list(train.subsets),
        models=names,
        outcome_codes=codes,
        costs=np.full(codes.shape, np.nan),
        raw_costs=np.full(codes.shape, np.nan),
        scores=np.full(codes.shape, np.nan),
        source="training fold, every model",
    )
    recs = table.records([i for i in range(n) if tags[i]], names, tags)
    acc = TagScorer.from_records(recs, s_win=1.0, s_tie=1.0, s_loss=0.0, weighting="none")
    tot = TagScorer.from_records(recs, s_win=1.0, s_tie=1.0, s_loss=1.0, weighting="none")
    return acc, np.asarray(acc.score_matrix()), np.asarray(tot.score_matrix())


class _DifficultyRouter(Fitted):
    def __init__(
        self, featurize: Callable[[QueryFeatures], np.ndarray], heads: list[Any], train: TrainSet
    ) -> None:
        self._featurize = featurize
        self._heads = heads
        self._train = train

    def route(self, x: QueryFeatures) -> tuple[np.ndarray, np.ndarray]:
        F = self._featurize(x)
        u = np.stack([h(F[:, j]) for j, h in enumerate(self._heads)], axis=1)
        return _slm_choice(u, self._train)


def _fit_heads(train: TrainSet, F: np.ndarray) -> list[Any]:
    """One logistic regression per pool model on its two features (easiness, own rate)."""
    from sklearn.linear_model import LogisticRegression

    heads = []
    for j in range(len(train.models)):
        y = train.acc[:, j].astype(int)
        if y.min() == y.max():
            heads.append(lambda f, c=float(y[0]): np.full(len(f), c))
            continue
        clf = LogisticRegression(C=1.0, max_iter=1000).fit(F[:, j], y)
        heads.append(lambda f, c=clf: c.predict_proba(f)[:, 1])
    return heads


def fit_tag_difficulty(train: TrainSet, seed: int, k: float = 20.0) -> Fitted:
    """TagRouter+D (ours): tag scores plus a per-tag difficulty prior from every model.

    The pool's own judgments are scarce (one binary outcome per query and model), but the table
    judges every training query by all of its models. Per tag, the accept rate over *all* models
    (``easiness``) and the pool model's own accept rate are each shrunk towards their global rate
    with pseudo-count ``k`` (queries), averaged (in logits) over the query's tags, and one
    logistic regression per pool model maps these two numbers to an accept probability. Training
    features are leave-one-out (a query's own judgments are removed from its tags' counts), so
    the regression sees the same noise as on unseen queries. Routing: ``slm`` = best small model,
    ``pref = P(M_LLM) - P(slm)``; the operating point is chosen on the training folds.
    """
    tags = [list(dict.fromkeys(t)) for t in train.tags]
    acc_sc, A, N = _tag_accept_tables(train, tags)
    tix = {t: r for r, t in enumerate(acc_sc.tags)}
    col = {m: c for c, m in enumerate(acc_sc.models)}
    codes = train.all_codes
    valid = codes >= 0
    accq = ((codes == 0) | (codes == 1)) & valid
    all_cols = [col[f"m{a}"] for a in range(codes.shape[1]) if f"m{a}" in col]
    all_ids = [a for a in range(codes.shape[1]) if f"m{a}" in col]
    pool_all = [int(a) for a in train.all_index]
    e_acc, e_tot = A[:, all_cols].sum(axis=1), N[:, all_cols].sum(axis=1)
    mu_e = accq.sum() / max(valid.sum(), 1)
    per_q = valid.sum() / max(len(codes), 1)
    mu_m = train.acc.mean(axis=0)
    pool_cols = [col.get(f"m{a}", -1) for a in pool_all]

    def feats(tag_lists: list[list[str]], loo: bool) -> np.ndarray:
        n, m = len(tag_lists), len(train.models)
        F = np.zeros((n, m, 2))
        for i, tl in enumerate(tag_lists):
            rows = [tix[t] for t in tl if t in tix]
            if not rows:
                F[i, :, 0] = _logit(np.asarray(mu_e))
                F[i, :, 1] = _logit(mu_m)
                continue
            ea, et = e_acc[rows], e_tot[rows]
            if loo:
                ea = ea - accq[i, all_ids].sum()
                et = et - valid[i, all_ids].sum()
            ez = _logit((ea + k * per_q * mu_e) / (et + k * per_q)).mean()
            F[i, :, 0] = ez
            for j, c in enumerate(pool_cols):
                if c < 0:
                    F[i, j, 1] = _logit(mu_m[j])
                    continue
                pa, pn = A[rows, c], N[rows, c]
                if loo:
                    pa = pa - float(train.acc[i, j])
                    pn = pn - 1.0
                F[i, j, 1] = _logit((pa + k * mu_m[j]) / (pn + k)).mean()
        return F

    heads = _fit_heads(train, feats(tags, loo=True))
    return _DifficultyRouter(
        lambda x: feats([list(dict.fromkeys(t)) for t in x.tags], loo=False), heads, train
    )


def fit_knn_difficulty(train: TrainSet, seed: int, k: int = 25) -> Fitted:
    """Control for TagRouter+D: the same two features and heads, from the ``k`` nearest training
    queries by embedding instead of shared tags (same extra labels, no tags)."""
    codes = train.all_codes
    valid = codes >= 0
    accq = (((codes == 0) | (codes == 1)) & valid).sum(axis=1)
    nval = valid.sum(axis=1)
    X = train.emb
    y = train.acc.astype(np.float64)

    def feats(emb: np.ndarray, loo: bool) -> np.ndarray:
        sims = emb @ X.T
        if loo:
            np.fill_diagonal(sims, -np.inf)
        nn = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        ez = _logit((accq[nn].sum(axis=1) + 1.0) / (nval[nn].sum(axis=1) + 2.0))
        pm = _logit((y[nn].sum(axis=1) + 1.0) / (k + 2.0))
        return np.stack([np.repeat(ez[:, None], y.shape[1], axis=1), pm], axis=2)

    heads = _fit_heads(train, feats(X, loo=True))
    return _DifficultyRouter(lambda x: feats(x.emb, loo=False), heads, train)


# ==== Selection on the training folds ====


def out_of_fold(
    fit: Callable[[TrainSet, int], Fitted], train: TrainSet, seed: int, folds: int, salt: int
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Route every query of ``train`` with a router fitted on the other inner folds.

    The inner split is stratified by subset with seed ``seed + salt`` (each caller its own salt,
    so different selections do not reuse one split).

    Returns:
        ``(splits, pref, slm)``: the inner test folds and the out-of-fold routes of all rows.
    """
    from tagrouter_fast.builder.folds import stratified_folds

    n = len(train.query_ids)
    pref = np.zeros(n)
    slm = np.zeros(n, dtype=np.int64)
    splits = stratified_folds(train.subsets, folds, seed + salt)
    for test in splits:
        tr = np.setdiff1d(np.arange(n), test)
        p, s = fit(train.subset_rows(tr), seed).route(train.features(test))
        pref[test], slm[test] = p, s
    return splits, pref, slm


def fit_selected(
    train: TrainSet,
    seed: int,
    candidates: Sequence[tuple[str, Callable[[TrainSet, int], Fitted]]],
    inner_folds: int = 3,
) -> Fitted:
    """Fit the candidate whose inner-cross-validated AUC on ``train`` is highest.

    Hyper-parameters chosen by looking at the evaluation's own test folds flatter a method;
    chosen this way, only training-fold labels decide. Each candidate routes the out-of-fold
    queries of an inner stratified split; the AUC of its AR-vs-ratio curve, averaged over the
    inner folds, ranks it (ties: the earlier candidate). The winner is refitted on all of
    ``train`` and reports its name in ``info["chosen"]``.
    """
    from tagrouter_fast.eval import metrics as M

    if not candidates:
        raise ValueError("no candidates to select from")
    llm = train.llm
    best_name, best_fit, best_auc = candidates[0][0], candidates[0][1], -np.inf
    scores = {}
    for name, fit in candidates:
        splits, pref, slm = out_of_fold(fit, train, seed, inner_folds, 15485863)
        aucs = []
        for test in splits:
            a_slm = train.acc[test, slm[test]].astype(np.float64)
            aucs.append(M.areas(pref[test], train.acc[test, llm], a_slm)[0])
        scores[name] = float(np.mean(aucs))
        if scores[name] > best_auc:
            best_name, best_fit, best_auc = name, fit, scores[name]
    fitted = best_fit(train, seed)
    fitted.info = {"chosen": best_name, "inner_auc": scores}
    return fitted


# ==== Hybrid of tag scores and an embedding router (ours) ====


class _QuantileBlend(Fitted):
    """Averages the preferences of several fitted routers after mapping each through its
    empirical CDF on the training queries (a fixed monotone map per component, so a query's
    route does not depend on the other queries routed with it). Small model: the first's."""

    def __init__(self, parts: list[Fitted], train: TrainSet, weights: Sequence[float]) -> None:
        self.parts = parts
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        x = train.features()
        self.cdfs = [np.sort(self._finite(p.route(x)[0])) for p in parts]

    @staticmethod
    def _finite(pref: np.ndarray) -> np.ndarray:
        # +inf marks "no known tag: M_LLM first"; keep it above every finite preference.
        return np.clip(np.asarray(pref, dtype=np.float64), -1e300, 1e300)

    def route(self, x: QueryFeatures) -> tuple[np.ndarray, np.ndarray]:
        outs = [p.route(x) for p in self.parts]
        q = np.zeros(len(x.query_ids))
        for w, cdf, (pref, _) in zip(self.weights, self.cdfs, outs, strict=True):
            v = self._finite(pref)
            lo = np.searchsorted(cdf, v, side="left")
            hi = np.searchsorted(cdf, v, side="right")
            q += w * (lo + hi) / (2.0 * len(cdf))
        return q, np.asarray(outs[0][1])


def fit_hybrid(train: TrainSet, seed: int) -> Fitted:
    """``TagRouter+MF`` (ours): TagRouter+ and RouteLLM-MF preferences, each mapped to its
    training quantile, averaged with equal weights; the small model is TagRouter+'s. Tests
    whether the tag scores and the embedding router carry different pieces of the signal."""
    return _QuantileBlend(
        [fit_variant(train, seed, "plus"), fit_mf(train, seed)], train, [0.5, 0.5]
    )


# ==== Registry ====


def default_methods() -> list[Method]:
    """Every method of the Table-2 comparison, in display order. The three TagRouters are the
    product's variants (``build-store --variant paper | paper-theta | plus``)."""
    out = [
        Method("random", "reference", fit_random),
        Method("prior", "baseline", fit_prior),
        Method("RouteLLM-MF", "baseline", lambda t, s: fit_mf(t, s)),
        Method("RouterBench-KNN", "baseline", lambda t, s: fit_knn(t, s)),
        Method("RouterBench-MLP", "baseline", lambda t, s: fit_mlp(t, s)),
        Method("FORC-style", "baseline", lambda t, s: fit_forc(t, s)),
        Method("RouteLLM-MF w/ tags", "baseline", lambda t, s: fit_mf(t, s, use_tags=True)),
        Method("RouterBench-KNN w/ tags", "baseline", lambda t, s: fit_knn(t, s, use_tags=True)),
        Method("RouterBench-MLP w/ tags", "baseline", lambda t, s: fit_mlp(t, s, use_tags=True)),
        Method("FORC-style w/ tags", "baseline", lambda t, s: fit_forc(t, s, use_tags=True)),
        Method("TagRouter", "tagrouter", lambda t, s: fit_variant(t, s, "paper")),
        Method("TagRouter-theta*", "tagrouter", lambda t, s: fit_variant(t, s, "paper-theta")),
        Method("TagRouter+", "tagrouter", lambda t, s: fit_variant(t, s, "plus")),
        Method("TagDifficulty", "research", lambda t, s: fit_tag_difficulty(t, s, k=50.0)),
        Method("Blend(TagRouter+, MF)", "research", fit_hybrid),
        # Same extra labels (every model's judgments) without tags: tells whether +D's gain, if
        # any, comes from the tags or only from the extra labels.
        Method("KNN+D (control)", "baseline", fit_knn_difficulty),
    ]
    return out

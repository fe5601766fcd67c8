"""Routing tables: queries and per-(query, model) judged outcomes, read and validated.

A routing table is two CSV files in one directory (the format of ``../shared/data/alpacaeval2``):

- ``queries.csv``: ``query_id, query_text, subset``. ``subset`` is optional (empty or absent
  means one stratum ``""``); it is used to stratify cross-validation folds.
- ``outcomes.csv``: ``query_id, model, outcome`` are required; ``score, in_chars, out_chars,
  cost_usd`` are optional. ``outcome`` is ``win``, ``tie`` or ``loss`` against the table's
  reference answer. ``score``, ``in_chars`` and ``out_chars`` are kept but treated as opaque.

Missing data is explicit: a (query, model) pair with no row is *missing*, never a loss.
Dense views use outcome code ``-1`` for it and :meth:`RoutingTable.complete_rows` tells which
queries have an outcome for every model of a pool.

Costs: ``cost_usd`` is the cost of that model answering that query: a finite number >= 0, else
a :class:`DataError` naming file and line. An empty cell gets the model's mean cost over its
own other rows. A model with no cost on any row is never given the other models' mean (a guess
that could make it M_LLM or the cheap choice): asking for its costs
(:meth:`RoutingTable.cost_matrix`, :meth:`RoutingTable.mean_cost`, so building a router over
it) is a :class:`DataError` naming the model and the file, unless ``model_costs`` prices it
(it is then listed in :attr:`RoutingTable.cost_imputed_models`). A table without a ``cost_usd``
column gets cost 1.0 per call (cost = number of calls), unless ``model_costs`` gives a per-call
cost per model.

Encoding: UTF-8; a leading byte-order mark is accepted, any other non-UTF-8 byte is a
:class:`DataError` naming file and line. ``score`` is opaque: a non-numeric value is kept as
NaN in the numeric :attr:`RoutingTable.scores` view, never rejected.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "OUTCOMES",
    "DataError",
    "RoutingTable",
    "load_table",
]

#: Outcome labels and their integer codes in dense arrays (``-1`` = missing).
OUTCOMES: tuple[str, ...] = ("win", "tie", "loss")
WIN, TIE, LOSS, MISSING = 0, 1, 2, -1

QUERY_COLUMNS = ("query_id", "query_text")
OUTCOME_COLUMNS = ("query_id", "model", "outcome")


class DataError(ValueError):
    """A routing table is malformed; the message names the file and line."""


@dataclass
class RoutingTable:
    """A validated routing table held as dense arrays over all of its models.

    Attributes:
        query_ids: Query ids in file order.
        texts: Query texts, aligned with ``query_ids``.
        subsets: Stratum of each query (``""`` when the table has none).
        models: Every model with at least one outcome, in first-seen order.
        outcome_codes: ``(n_queries, n_models)`` int8: 0 win, 1 tie, 2 loss, -1 missing.
        costs: ``(n_queries, n_models)`` float64 cost per call, imputed (never NaN).
        raw_costs: Like ``costs`` but NaN where the file had no cost.
        scores: ``(n_queries, n_models)`` float64 opaque ``score`` column, NaN when absent.
        source: Where the table was read from.
        cost_imputed_models: Models with no cost_usd on any row, priced by ``model_costs``.
        unpriced_models: Models with no cost at all; asking for their costs is an error.
    """

    query_ids: list[str]
    texts: list[str]
    subsets: list[str]
    models: list[str]
    outcome_codes: np.ndarray
    costs: np.ndarray
    raw_costs: np.ndarray
    scores: np.ndarray
    source: str = ""
    cost_imputed_models: list[str] = field(default_factory=list)
    unpriced_models: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._qindex = {q: i for i, q in enumerate(self.query_ids)}
        self._mindex = {m: j for j, m in enumerate(self.models)}

    @property
    def n_queries(self) -> int:
        """Number of queries."""
        return len(self.query_ids)

    def model_index(self, models: Sequence[str]) -> np.ndarray:
        """Column indices of ``models``.

        Raises:
            KeyError: A model is not in the table (the message lists close names).
        """
        out = []
        for m in models:
            if m not in self._mindex:
                close = [x for x in self.models if m.lower()[:5] in x.lower()][:5]
                raise KeyError(
                    f"model {m!r} is not in {self.source or 'the table'}; close: {close}"
                )
            out.append(self._mindex[m])
        return np.asarray(out, dtype=np.int64)

    def query_index(self, query_ids: Sequence[str]) -> np.ndarray:
        """Row indices of ``query_ids``."""
        return np.asarray([self._qindex[q] for q in query_ids], dtype=np.int64)

    def outcomes(self, models: Sequence[str]) -> np.ndarray:
        """``(n_queries, len(models))`` outcome codes, -1 where missing."""
        return self.outcome_codes[:, self.model_index(models)]

    def accept(self, models: Sequence[str]) -> np.ndarray:
        """``(n_queries, len(models))`` bool: outcome is win or tie (missing is False).

        Use :meth:`complete_rows` to drop queries with missing pairs before scoring a router:
        a missing pair is unknown, so counting it as not accepted would be a silent loss.
        """
        o = self.outcomes(models)
        return (o == WIN) | (o == TIE)

    def cost_matrix(self, models: Sequence[str]) -> np.ndarray:
        """``(n_queries, len(models))`` cost per call, missing cells mean-imputed per model.

        Raises:
            DataError: a model has no cost on any row (a guessed cost could make it M_LLM).
        """
        unpriced = [m for m in models if m in self.unpriced_models]
        if unpriced:
            raise DataError(
                f"{self.source}/outcomes.csv: model(s) {unpriced} have no cost_usd on any row; "
                "give them costs (or load_table(..., model_costs={model: cost_per_call}))"
            )
        return self.costs[:, self.model_index(models)]

    def complete_rows(self, models: Sequence[str]) -> np.ndarray:
        """Bool mask of queries that have an outcome for every model in ``models``."""
        return np.asarray((self.outcomes(models) >= 0).all(axis=1))

    def mean_cost(self, models: Sequence[str]) -> dict[str, float]:
        """Mean cost per call of each model (over its imputed cost column)."""
        c = self.cost_matrix(models)
        return {m: float(c[:, j].mean()) for j, m in enumerate(models)}

    def records(
        self, rows: np.ndarray | Sequence[int], models: Sequence[str], tags: Sequence[Sequence[str]]
    ) -> list[tuple[str, list[str], str, str]]:
        """``(query_id, tags, model, outcome)`` records for :meth:`TagScorer.from_records`.

        Missing pairs yield no record (they are not losses).

        Args:
            rows: Row indices of the queries to include.
            models: Models to include.
            tags: Tags of every query of the table (indexed by row).
        """
        o = self.outcomes(models)
        out = []
        for i in rows:
            t = list(tags[i])
            for j, m in enumerate(models):
                c = int(o[i, j])
                if c >= 0:
                    out.append((self.query_ids[i], t, m, OUTCOMES[c]))
        return out


def _read_csv(path: Path, required: Sequence[str]) -> tuple[list[str], list[tuple[int, dict]]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # utf-8-sig: a leading byte-order mark (spreadsheet exports) is not part of the header.
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = []
        try:
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(f"{path}:1: missing column(s) {missing}; header is {header}")
            reader.fieldnames = header
            for row in reader:
                # line_num is the physical line after the record; quoted texts span lines.
                rows.append((reader.line_num, row))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{_line_of_bad_byte(path)}: not UTF-8 ({e.reason})") from None
    return header, rows


def _line_of_bad_byte(path: Path) -> int:
    """1-based line of the first byte sequence that is not UTF-8 (read in chunks: tables may be
    large, and this runs only on the error path)."""
    line, tail = 1, b""
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            data = tail + chunk
            try:
                data.decode("utf-8")
                good = len(data)
            except UnicodeDecodeError as e:
                if e.end < len(data) or len(chunk) < (1 << 20):
                    return line + data.count(b"\n", 0, e.start)
                good = e.start  # a multi-byte sequence cut by the chunk boundary
            line += data.count(b"\n", 0, good)
            tail = data[good:]
    return line


def _parse_float(value: str | None, path: Path, line: int, column: str) -> float:
    if value is None or value.strip() == "":
        return float("nan")
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{path}:{line}: column {column!r} is not a number: {value!r}") from None


def _parse_cost(value: str | None, path: Path, line: int) -> float:
    cost = _parse_float(value, path, line, "cost_usd")
    blank = value is None or not value.strip()
    if not blank and not (math.isfinite(cost) and cost >= 0.0):
        raise DataError(f"{path}:{line}: cost_usd must be a finite number >= 0, got {value!r}")
    return cost


def _opaque_score(value: str | None) -> float:
    """``score`` is opaque: kept as a number where it is one, NaN otherwise (never an error)."""
    try:
        return float(value) if value is not None and value.strip() else float("nan")
    except ValueError:
        return float("nan")


def _check_model_cost(model: str, cost: float) -> float:
    c = float(cost)
    if not (math.isfinite(c) and c >= 0.0):
        raise DataError(f"model_costs[{model!r}] must be a finite number >= 0, got {cost!r}")
    return c


def load_table(
    directory: str | Path, model_costs: Mapping[str, float] | None = None
) -> RoutingTable:
    """Read and validate a routing table from ``directory``.

    Args:
        directory: Folder with ``queries.csv`` and ``outcomes.csv``.
        model_costs: Per-call cost per model, used when ``outcomes.csv`` has no ``cost_usd``.

    Returns:
        The table.

    Raises:
        DataError: Missing file or column, empty or duplicate query id, unknown outcome label,
            duplicate (query, model) row, outcome for an unknown query id, or a non-numeric cell
            in a numeric column. The message names the file and line.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "queries.csv").write_text("query_id,query_text,subset\\nq1,hi,a\\n")
    >>> _ = (d / "outcomes.csv").write_text("query_id,model,outcome\\nq1,m,win\\n")
    >>> load_table(d).outcomes(["m"]).tolist()
    [[0]]
    """
    d = Path(directory)
    qpath, opath = d / "queries.csv", d / "outcomes.csv"
    _, qrows = _read_csv(qpath, QUERY_COLUMNS)
    query_ids: list[str] = []
    texts: list[str] = []
    subsets: list[str] = []
    seen: dict[str, int] = {}
    for line, row in qrows:
        qid = (row.get("query_id") or "").strip()
        if not qid:
            raise DataError(f"{qpath}:{line}: empty query_id")
        if qid in seen:
            raise DataError(
                f"{qpath}:{line}: duplicate query_id {qid!r} (first at line {seen[qid]})"
            )
        seen[qid] = line
        query_ids.append(qid)
        texts.append(row.get("query_text") or "")
        subsets.append((row.get("subset") or "").strip())
    if not query_ids:
        raise DataError(f"{qpath}: no queries")

    oheader, orows = _read_csv(opath, OUTCOME_COLUMNS)
    has_cost = "cost_usd" in oheader
    qindex = {q: i for i, q in enumerate(query_ids)}
    mindex: dict[str, int] = {}
    cells: list[tuple[int, int, int, float, float]] = []
    first_line: dict[tuple[int, int], int] = {}
    labels = {s: k for k, s in enumerate(OUTCOMES)}
    for line, row in orows:
        qid = (row.get("query_id") or "").strip()
        model = (row.get("model") or "").strip()
        label = (row.get("outcome") or "").strip().lower()
        if qid not in qindex:
            raise DataError(f"{opath}:{line}: outcome for unknown query_id {qid!r}")
        if not model:
            raise DataError(f"{opath}:{line}: empty model")
        if label not in labels:
            raise DataError(
                f"{opath}:{line}: unknown outcome label {row.get('outcome')!r}; expected one of "
                f"{list(OUTCOMES)}"
            )
        j = mindex.setdefault(model, len(mindex))
        key = (qindex[qid], j)
        if key in first_line:
            raise DataError(
                f"{opath}:{line}: duplicate row for (query {qid!r}, model {model!r}) "
                f"(first at line {first_line[key]})"
            )
        first_line[key] = line
        cost = _parse_cost(row.get("cost_usd"), opath, line) if has_cost else np.nan
        score = _opaque_score(row.get("score"))
        cells.append((key[0], j, labels[label], cost, score))

    models = list(mindex)
    nq, nm = len(query_ids), len(models)
    codes = np.full((nq, nm), MISSING, dtype=np.int8)
    raw = np.full((nq, nm), np.nan)
    scores = np.full((nq, nm), np.nan)
    if cells:
        arr = np.asarray(cells, dtype=np.float64)
        ii, jj = arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64)
        codes[ii, jj] = arr[:, 2].astype(np.int8)
        raw[ii, jj] = arr[:, 3]
        scores[ii, jj] = arr[:, 4]

    imputed: list[str] = []
    unpriced: list[str] = []
    if not has_cost:
        per_call = np.asarray(
            [_check_model_cost(m, (model_costs or {}).get(m, 1.0)) for m in models]
        )
        costs = np.broadcast_to(per_call, (nq, nm)).copy()
    else:
        present = ~np.isnan(raw)
        counts = present.sum(axis=0)
        sums = np.where(present, raw, 0.0).sum(axis=0)
        means = np.divide(sums, counts, out=np.full(nm, np.nan), where=counts > 0)
        for j in np.flatnonzero(np.isnan(means)).tolist():
            # A guessed cost could make a model M_LLM (or the cheap choice): refuse, unless
            # the caller prices it.
            if model_costs is None or models[j] not in model_costs:
                unpriced.append(models[j])  # an error when a caller asks for its costs
                continue
            imputed.append(models[j])
            means[j] = _check_model_cost(models[j], model_costs[models[j]])
        costs = np.where(present, raw, means[None, :])
    return RoutingTable(
        query_ids=query_ids,
        texts=texts,
        subsets=subsets,
        models=models,
        outcome_codes=codes,
        costs=costs,
        raw_costs=raw,
        scores=scores,
        source=str(d),
        cost_imputed_models=imputed,
        unpriced_models=unpriced,
    )

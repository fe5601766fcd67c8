"""Batch routing of a query log: `tagrouter batch-route` (docs/scaling.md, "Offline at scale").

A log of ``query_id, query`` rows (Parquet or JSON lines) is tagged and routed chunk by chunk;
each row gets its decision (model, reason, Delta_q, theta, M_SLM), the store tags it was routed
on and a compact explanation (per-model scores ``S(M)`` as a JSON object).

Two paths, one piece of code: `ChunkRouter.route_columns` tags one chunk of ``batch_size``
queries (one tagger call: the encoder sorts the chunk by length and pads per encoder batch) and
decides each query with the Rust decider. Single-process mode calls it on the chunks in order;
the Ray path (``ray=ADDRESS``) hands the same chunks, one per Ray Data block, to an actor pool
(`map_batches` with a callable class, so each worker loads the router and its encoder once).
Chunks are cut by the driver, in input order, with the same reader in both paths, so every
tagger call sees the same queries whichever path runs and the two outputs are equal row for
row (the DefaultTagger is batch-invariant anyway: its embeddings are bitwise equal for any batch
composition; fixed chunks make that not matter for taggers that are not).

The driver reads the input and writes the output (one file); only tagging and routing, the cost
(milliseconds per query against microseconds of I/O), runs on the workers. See docs/scaling.md
for when that stops being true.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tagrouter_fast import journal
from tagrouter_fast.core import finite_for_json

if TYPE_CHECKING:
    from tagrouter_fast.protocols import Tagger
    from tagrouter_fast.router import TagRouter

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "INPUT_COLUMNS",
    "OUTPUT_COLUMNS",
    "BatchError",
    "BatchSummary",
    "ChunkRouter",
    "connect_ray",
    "iter_chunks",
    "pack_bundle",
    "read_output",
    "route_file",
]

#: Queries per tagger call (and per Ray Data block). Large enough that per-call overhead (one
#: Python call, one Ray task hop) is nothing next to tagging 256 queries (~2 s on one core);
#: small enough that 2 workers get work from a few hundred queries.
DEFAULT_BATCH_SIZE = 256

INPUT_COLUMNS = ("query_id", "query")
#: Per row: the decision, the tags it was made on, and ``scores``: ``{model: S(M)}`` as JSON text
#: (a JSON object in .jsonl output).
OUTPUT_COLUMNS = ("query_id", "model", "reason", "delta", "theta", "slm", "known_tags", "scores")

Columns = dict[str, list[Any]]
TaggerFactory = Callable[[], "Tagger"]

# Rows per Parquet row group written: chunks are small, row groups should not be.
_ROW_GROUP = 65_536
_CHUNK_COLUMN = "_chunk"


class BatchError(ValueError):
    """Bad batch input (missing file or column, unknown format, malformed row) or a missing
    optional dependency; the message names the file and, where known, the line or row."""


@dataclass
class BatchSummary:
    """What `route_file` did."""

    rows: int
    seconds: float
    workers: int  # 0: single process
    models: dict[str, int] = field(default_factory=dict)

    @property
    def queries_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")

    def line(self) -> str:
        share = ", ".join(f"{m} {n}" for m, n in sorted(self.models.items()))
        where = f"{self.workers} Ray workers" if self.workers else "1 process"
        return (
            f"{self.rows} queries routed in {self.seconds:.1f} s ({self.queries_per_s:.1f} "
            f"queries/s, {where}); {share}"
        )


# ==== Input ====


def _format_of(path: Path, what: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise BatchError(
        f"{what} {path}: unknown format {suffix or '(no suffix)'!r}; use .parquet or .jsonl"
    )


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise BatchError(
            "Parquet and Ray batch routing need pyarrow: pip install 'tagrouter-fast[ray]'"
        ) from None
    return pyarrow


def _query_id(value: Any, where: str) -> str:
    # Ids are written back as strings whatever the input type, so both formats round-trip the
    # same; bool is an int subclass but never an id.
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise BatchError(f"{where}: 'query_id' must be a non-empty string or an integer, got {value!r}")


def _query(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value  # an empty query is routed to the fallback model, as TagRouter does
    raise BatchError(f"{where}: 'query' must be a string, got {type(value).__name__}")


def _iter_jsonl(path: Path) -> Iterator[tuple[str, str]]:
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BatchError(f"{where}: not UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BatchError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise BatchError(f"{where}: expected a JSON object, got {type(row).__name__}")
            missing = [c for c in INPUT_COLUMNS if c not in row]
            if missing:
                raise BatchError(
                    f"{where}: missing column(s) {missing}; the row has {sorted(row)}"
                )
            yield _query_id(row["query_id"], where), _query(row["query"], where)


def _iter_parquet(path: Path) -> Iterator[tuple[str, str]]:
    pa = _pyarrow()
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise BatchError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    missing = [c for c in INPUT_COLUMNS if c not in names]
    if missing:
        raise BatchError(f"{path}: missing column(s) {missing}; the file has {names}")
    row = 0
    for rb in pf.iter_batches(columns=list(INPUT_COLUMNS), batch_size=_ROW_GROUP):
        for qid, q in zip(
            rb.column(0).to_pylist(), rb.column(1).to_pylist(), strict=True
        ):
            where = f"{path}: row {row}"
            yield _query_id(qid, where), _query(q, where)
            row += 1


def iter_chunks(
    path: str | os.PathLike[str], batch_size: int
) -> Iterator[tuple[list[str], list[str]]]:
    """``(query_ids, queries)`` chunks of exactly ``batch_size`` rows (the last may be shorter),
    in file order. The chunking is the same for both paths and both formats (Parquet row groups
    do not cut chunks), so each tagger call sees the same queries.

    Raises:
        BatchError: missing file, unknown suffix, missing column, malformed row. The file,
            suffix and batch size are checked at once, rows as they are read.
    """
    p = Path(path)
    fmt = _format_of(p, "--input")
    if not p.is_file():
        raise BatchError(f"--input {p}: file not found")
    if batch_size < 1:
        raise BatchError(f"batch size must be >= 1, got {batch_size}")
    return _chunked(_iter_parquet(p) if fmt == "parquet" else _iter_jsonl(p), batch_size)


def _chunked(
    rows: Iterator[tuple[str, str]], batch_size: int
) -> Iterator[tuple[list[str], list[str]]]:
    ids: list[str] = []
    queries: list[str] = []
    for qid, q in rows:
        ids.append(qid)
        queries.append(q)
        if len(ids) == batch_size:
            yield ids, queries
            ids, queries = [], []
    if ids:
        yield ids, queries


def _count_rows(path: Path) -> int | None:
    """Rows of a Parquet file from its footer (for the progress bar); None for JSON lines."""
    if _format_of(path, "--input") != "parquet":
        return None
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except Exception:  # noqa: BLE001 - only a progress-bar total; the reader reports errors
        return None


# ==== Output ====


def _output_schema() -> Any:
    pa = _pyarrow()
    return pa.schema(
        [
            ("query_id", pa.string()),
            ("model", pa.string()),
            ("reason", pa.string()),
            ("delta", pa.float64()),
            ("theta", pa.float64()),
            ("slm", pa.string()),
            ("known_tags", pa.list_(pa.string())),
            ("scores", pa.string()),
        ]
    )


def _to_arrow(cols: Columns) -> Any:
    pa = _pyarrow()
    return pa.Table.from_pydict({c: cols[c] for c in OUTPUT_COLUMNS}, schema=_output_schema())


class _Writer:
    """One output file, written to a temporary name and committed when complete
    (`journal.temp_beside` / `journal.commit`: fsync, rename, fsync the directory), so an
    interrupted run, or a power loss after it, never leaves a plausible-looking partial file
    behind."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.format = _format_of(path, "--output")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise BatchError(f"--output {path}: directory {parent} does not exist")
        self.tmp = journal.temp_beside(path)
        self._jsonl: Any = None
        self._parquet: Any = None
        self._pending: list[Any] = []
        self._pending_rows = 0
        if self.format == "jsonl":
            self._jsonl = self.tmp.open("w", encoding="utf-8")
        else:
            import pyarrow.parquet as pq

            self._parquet = pq.ParquetWriter(self.tmp, _output_schema())

    def write(self, cols: Columns) -> None:
        if self._jsonl is not None:
            f = self._jsonl
            for i in range(len(cols["query_id"])):
                row = {c: cols[c][i] for c in OUTPUT_COLUMNS}
                row["scores"] = json.loads(row["scores"])
                f.write(json.dumps(row, ensure_ascii=False, allow_nan=False))
                f.write("\n")
            return
        self._pending.append(_to_arrow(cols))
        self._pending_rows += len(cols["query_id"])
        if self._pending_rows >= _ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            pa = _pyarrow()
            self._parquet.write_table(pa.concat_tables(self._pending))
            self._pending, self._pending_rows = [], 0

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        else:
            self._flush()
            self._parquet.close()
        journal.commit(self.tmp, self.path)

    def abort(self) -> None:
        try:
            if self._jsonl is not None:
                self._jsonl.close()
            elif self._parquet is not None:
                self._parquet.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def read_output(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a `route_file` output (either format) as dicts, ``scores`` as a dict."""
    p = Path(path)
    if _format_of(p, "output") == "jsonl":
        with p.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    import pyarrow.parquet as pq

    rows = pq.read_table(p).to_pylist()
    for r in rows:
        r["scores"] = json.loads(r["scores"])
    return rows


# ==== Routing one chunk (both paths) ====


def pack_bundle(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """The files of a router bundle that loading reads (router.json and the files it names),
    as bytes: shipped to Ray workers, which need not see the driver's file system."""
    root = Path(path)
    meta_path = root / "router.json"
    if not meta_path.is_file():
        from tagrouter_fast.router import BundleError

        raise BundleError(f"{root} is not a router bundle (no router.json)")
    meta = json.loads(meta_path.read_bytes())
    files = {"router.json": meta_path.read_bytes()}
    for key in ("store", "normalization"):
        name = meta.get(key) if isinstance(meta, dict) else None
        # Names are checked again by TagRouter.load on the worker; only plain names are read.
        if isinstance(name, str) and name and Path(name).name == name:
            files[name] = (root / name).read_bytes()
    return files


class ChunkRouter:
    """Tags and routes chunks of queries: the work of one process or one Ray worker.

    Args:
        bundle: the router bundle, as `pack_bundle` files (unpacked to a private temporary
            directory and loaded once).
        tagger_factory: builds the tagger (default: the one the bundle names); called once.
        theta: theta override, as `TagRouter.load`'s.
        env: environment variables set before anything loads (``TAGROUTER_THREADS`` for the
            encoder's threads on a worker, ``TAGROUTER_ENCODER``, ...).
    """

    def __init__(
        self,
        bundle: Mapping[str, bytes],
        tagger_factory: TaggerFactory | None = None,
        theta: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        from tagrouter_fast.router import TagRouter

        # Before the tagger loads: onnxruntime reads its thread count once, at session start.
        os.environ.update(env or {})
        self._dir = tempfile.TemporaryDirectory(prefix="tagrouter-bundle-")
        for name, data in bundle.items():
            (Path(self._dir.name) / name).write_bytes(data)
        tagger = tagger_factory() if tagger_factory is not None else None
        self.router: TagRouter = TagRouter.load(self._dir.name, tagger=tagger, theta=theta)

    def route_columns(self, ids: Sequence[str], queries: Sequence[str]) -> Columns:
        """The chunk through `TagRouter.decide_many` (one tagger call), then an explained
        decision per query (Rust, microseconds each: the explanation is what the output
        columns need, so `DecisionBatch.decisions` rather than its arrays)."""
        if len(ids) != len(queries):
            raise BatchError(f"{len(ids)} query ids for {len(queries)} queries")
        cols: Columns = {c: [] for c in OUTPUT_COLUMNS}
        cols["query_id"] = list(ids)
        for d in self.router.decide_many(list(queries)).decisions():
            cols["model"].append(d.model)
            cols["reason"].append(d.reason)
            cols["delta"].append(finite_for_json(d.delta))
            cols["theta"].append(d.theta)
            cols["slm"].append(d.slm)
            cols["known_tags"].append(list(d.known_tags))
            cols["scores"].append(json.dumps(finite_for_json(d.scores), allow_nan=False))
        return cols

    def __call__(self, batch: Any) -> Any:
        """Ray Data entry point: a pyarrow block of whole chunks -> the output rows as a
        pyarrow table. Each chunk (``_chunk`` column) gets its own tagger call, so the calls
        are the single-process path's even if Ray hands over several blocks at once."""
        pa = _pyarrow()
        chunk = batch.column(_CHUNK_COLUMN).to_pylist()
        ids = batch.column("query_id").to_pylist()
        queries = batch.column("query").to_pylist()
        out = []
        start = 0
        for end in range(1, len(chunk) + 1):
            if end == len(chunk) or chunk[end] != chunk[start]:
                out.append(_to_arrow(self.route_columns(ids[start:end], queries[start:end])))
                start = end
        return pa.concat_tables(out) if out else _to_arrow({c: [] for c in OUTPUT_COLUMNS})


# ==== Ray ====


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise BatchError(
            "--ray needs Ray Data: pip install 'tagrouter-fast[ray]' (ray[data], pyarrow)"
        ) from None
    return ray


def connect_ray(address: str, num_cpus: int | None = None) -> bool:
    """Joins the Ray cluster at ``address`` (``"local"``: start a local instance with
    ``num_cpus`` CPUs); an already initialised Ray is used as it is. Returns whether this call
    started Ray (and so should shut it down)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return True


def _worker_env(cpus_per_worker: int) -> dict[str, str]:
    # One encoder thread per reserved CPU: onnxruntime would otherwise size its pool to the
    # node, and N workers on N cores would each run N threads.
    env = {"TAGROUTER_THREADS": str(cpus_per_worker)}
    # The tagger a worker builds must be the driver's (TagRouter.load checks its fingerprint).
    for var in ("TAGROUTER_ENCODER", "TAGROUTER_CACHE"):
        if os.environ.get(var):
            env[var] = os.environ[var]
    return env


def _route_ray(
    chunks: Iterator[tuple[list[str], list[str]]],
    writer: _Writer,
    bundle: Mapping[str, bytes],
    tagger_factory: TaggerFactory | None,
    theta: float | None,
    workers: int,
    cpus_per_worker: int,
    counts: Counter[str],
) -> tuple[int, int]:
    """Rows written and workers used."""
    ray = _ray()
    pa = _pyarrow()
    from ray.data import ActorPoolStrategy, DataContext

    # One block per chunk, put in the object store as read: the driver holds one chunk at a
    # time, and blocks are never cut (map_batches(batch_size=None) takes whole blocks).
    refs = []
    for k, (ids, queries) in enumerate(chunks):
        block = pa.table(
            {
                "query_id": pa.array(ids, pa.string()),
                "query": pa.array(queries, pa.string()),
                _CHUNK_COLUMN: pa.array([k] * len(ids), pa.int64()),
            }
        )
        refs.append(ray.put(block))
    if not refs:
        return 0, 0
    # An actor per block at most: more would start, load the router and idle.
    workers = min(workers, len(refs))
    ctx = DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    # Output in input order: the written file is then the single-process one byte for byte.
    ctx.execution_options.preserve_order = True
    try:
        ds = ray.data.from_arrow_refs(refs).map_batches(
            ChunkRouter,
            fn_constructor_kwargs={
                "bundle": dict(bundle),
                "tagger_factory": tagger_factory,
                "theta": theta,
                "env": _worker_env(cpus_per_worker),
            },
            batch_size=None,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=workers),
            num_cpus=cpus_per_worker,
        )
        rows = 0
        for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            cols = out.to_pydict()
            writer.write(cols)
            counts.update(cols["model"])
            rows += out.num_rows
    finally:
        ctx.execution_options.preserve_order = saved
    return rows, workers


def _cluster_cpus() -> int:
    ray = _ray()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def route_file(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    router: str | os.PathLike[str],
    ray: str | None = None,
    workers: int | None = None,
    cpus_per_worker: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    tagger_factory: TaggerFactory | None = None,
    theta: float | None = None,
    show_progress: bool = True,
) -> BatchSummary:
    """Tags and routes every ``query_id, query`` row of ``input`` into ``output``.

    Args:
        input, output: ``.parquet`` or ``.jsonl`` files (output columns: `OUTPUT_COLUMNS`).
        router: a bundle directory (`tagrouter_fast.builder.default.default_bundle()` is the one
            `tagrouter route` uses, built on first use).
        ray: a Ray address, ``"local"`` to start a local instance, or None for one process.
        workers: Ray workers (actors, each loading the router once); default one per CPU of the
            cluster divided by ``cpus_per_worker``.
        cpus_per_worker: CPUs reserved per worker (and its encoder's threads).
        batch_size: queries per tagger call and per Ray block.
        tagger_factory: builds the tagger in each process (default: the bundle's).
        theta: theta override.
        show_progress: progress bar (single process) and a summary line on stderr.

    Raises:
        BatchError: bad input, unknown format, pyarrow or Ray missing.
        BundleError: a bad bundle.
    """
    t0 = time.perf_counter()
    src, dest = Path(input), Path(output)
    chunks = iter_chunks(src, batch_size)
    _format_of(dest, "--output")
    # The first chunk is read before the router loads: a missing column or a malformed first
    # row fails in milliseconds, not after loading the encoder (or starting Ray).
    first = next(chunks, None)
    chunks = itertools.chain([first] if first is not None else [], chunks)
    if ray is not None:
        _pyarrow()
        _ray()
    bundle_dir = Path(router)
    bundle = pack_bundle(bundle_dir)
    spec = json.loads(bundle["router.json"]).get("tagger")
    if tagger_factory is None and isinstance(spec, dict) and spec.get("kind") == "custom":
        from tagrouter_fast.router import BundleError

        # Said here, not by every Ray worker after the cluster has started.
        raise BundleError(
            f"{bundle_dir}: built with a custom tagger ({spec.get('fingerprint')!r}); route it "
            "from Python with route_file(..., tagger_factory=...)"
        )
    counts: Counter[str] = Counter()
    writer = _Writer(dest)
    n_workers = 0
    try:
        if ray is None:
            rows = _route_local(
                chunks, writer, bundle, tagger_factory, theta, counts, src, show_progress
            )
        else:
            started = connect_ray(ray, None)
            try:
                n_workers = workers or max(1, _cluster_cpus() // max(1, cpus_per_worker))
                rows, n_workers = _route_ray(
                    chunks, writer, bundle, tagger_factory, theta, n_workers,
                    cpus_per_worker, counts,
                )
            finally:
                if started:
                    _ray().shutdown()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    summary = BatchSummary(rows, time.perf_counter() - t0, n_workers, dict(counts))
    if show_progress:
        print(f"tagrouter: {summary.line()} -> {dest}", file=sys.stderr)
    return summary


def _route_local(
    chunks: Iterator[tuple[list[str], list[str]]],
    writer: _Writer,
    bundle: Mapping[str, bytes],
    tagger_factory: TaggerFactory | None,
    theta: float | None,
    counts: Counter[str],
    src: Path,
    show_progress: bool,
) -> int:
    worker = ChunkRouter(bundle, tagger_factory, theta)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=_count_rows(src), desc="routing", unit="query", file=sys.stderr)
    rows = 0
    try:
        for ids, queries in chunks:
            cols = worker.route_columns(ids, queries)
            writer.write(cols)
            counts.update(cols["model"])
            rows += len(ids)
            if bar is not None:
                bar.update(len(ids))
    finally:
        if bar is not None:
            bar.close()
    return rows


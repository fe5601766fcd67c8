"""Batch routing throughput (`tagrouter batch-route`): queries/s per core with the default
tagger on the AlpacaEval queries, one process against Ray with 1 and 2 workers, side by side in
one run; and the Rust decider's decisions/s, for the projection in docs/scaling.md.

Run with ``make bench`` or
``.venv/bin/python -m pytest benches/test_bench_batch.py --benchmark-enable -s`` (``-s`` shows
the table). Needs the ``ray`` extra, the default encoder and ../shared/data/alpacaeval2.

Rows:
- ``steady``: `ChunkRouter.route_columns` over the log after the router is loaded, one
  encoder thread, queries per CPU-second: the per-core figure the projection scales from.
- ``1 process`` (1 and 2 encoder threads) and ``ray, N workers`` (1 CPU each): `route_file`
  end to end, reading and writing the files, loading the router (and for Ray starting the actor
  pool) included; queries per wall second and per CPU-second of every process involved (Ray's
  own daemons included); speed-up = Ray 2 workers over Ray 1 worker, wall.
- ``decider``: `TagDecider.route_tags_batch` (routing only) and `decide` (what batch-route
  calls: decision plus explanation), on the log's aligned tags, one thread, per CPU-second.

On a machine shared with other work the wall figures (and the speed-up) measure the neighbours
too; the per-CPU-second figures much less so. The load average is printed with the table.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest
from skip_policy import data_absent, import_extra

from tagrouter_fast.tagging import encoder as encmod

pytestmark = pytest.mark.needs_release

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpacaeval2"

if not (DATA / "queries.csv").is_file():
    pytest.skip(data_absent(DATA), allow_module_level=True)
ray = import_extra("ray", "ray")
import_extra("ray", "pyarrow")


def _log(path: Path) -> tuple[Path, list[str]]:
    with (DATA / "queries.csv").open(newline="", encoding="utf-8") as f:
        rows = [{"query_id": r["query_id"], "query": r["query_text"]} for r in csv.DictReader(f)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path, [r["query"] for r in rows]


class _Clock:
    """Wall time and CPU time of this process and every process below it (Ray's raylet, GCS
    and workers are children of the driver that started them), sampled by a thread so that
    workers that exit before the end still count. CPU-seconds are what a busy machine does
    not distort much: on a shared machine the wall time measures the neighbours too."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()

    def _sample(self, seen: dict[int, float]) -> None:
        procs = [self._me, *self._me.children(recursive=True)]
        for p in procs:
            try:
                t = p.cpu_times()
                seen[p.pid] = max(seen.get(p.pid, 0.0), t.user + t.system)
            except self._psutil.Error:
                pass  # exited between listing and reading: its last sample stands

    def run(self, fn, *args, **kwargs) -> tuple[float, float]:
        import threading

        before: dict[int, float] = {}
        self._sample(before)
        seen = dict(before)
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(0.1):
                self._sample(seen)

        th = threading.Thread(target=loop, daemon=True)
        t0 = time.perf_counter()
        th.start()
        try:
            fn(*args, **kwargs)
        finally:
            wall = time.perf_counter() - t0
            stop.set()
            th.join()
        self._sample(seen)
        cpu = sum(v - before.get(pid, 0.0) for pid, v in seen.items())
        return wall, cpu


def _time(fn, *args, **kwargs) -> float:
    t0 = time.process_time()
    fn(*args, **kwargs)
    return time.process_time() - t0


def test_batch_route_throughput(benchmark, tmp_path, monkeypatch):
    from tagrouter_fast.batch import ChunkRouter, iter_chunks, pack_bundle, route_file
    from tagrouter_fast.builder.bundle import build_router
    from tagrouter_fast.data.pools import resolve_pool
    from tagrouter_fast.data.table import load_table

    table = load_table(DATA)
    models, llm = resolve_pool(table, pool="five-api")
    bundle = build_router(table, models, variant="paper", llm=llm).save(tmp_path / "bundle")
    log, queries = _log(tmp_path / "log.jsonl")
    n = len(queries)
    results: dict[str, float] = {}

    clock = _Clock()
    load_start = os.getloadavg()[0]

    def run() -> None:
        # Per core, steady state: one encoder thread, router already loaded; CPU-seconds.
        monkeypatch.setenv("TAGROUTER_THREADS", "1")
        encmod._DEFAULT = None  # the process-wide encoder reads its thread count once
        worker = ChunkRouter(pack_bundle(bundle))
        chunks = list(iter_chunks(log, 256))
        worker.route_columns(*chunks[0])  # warm-up (aligner index, first onnxruntime runs)
        t = _time(lambda: [worker.route_columns(*c) for c in chunks])
        results["steady, per CPU-second"] = n / t
        tags = [t for c in chunks for t in worker.router.tags_batch(c[1])]
        d = worker.router.decider
        many = tags * max(1, 100_000 // len(tags))
        results["decider route_tags_batch, per CPU-s"] = len(many) / _time(d.route_tags_batch, many)
        results["decider decide + explanation, per CPU-s"] = len(tags) / _time(
            lambda: [d.decide(t) for t in tags]
        )
        for threads in (1, 2):
            monkeypatch.setenv("TAGROUTER_THREADS", str(threads))
            encmod._DEFAULT = None
            out = tmp_path / f"one-{threads}.parquet"
            wall, cpu = clock.run(route_file, log, out, router=bundle, show_progress=False)
            results[f"1 process, {threads} thread(s), wall"] = n / wall
            results[f"1 process, {threads} thread(s), per CPU-s"] = n / cpu
        monkeypatch.delenv("TAGROUTER_THREADS")
        encmod._DEFAULT = None
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            for w in (1, 2):
                out = tmp_path / f"ray-{w}.parquet"
                wall, cpu = clock.run(route_file, log, out, router=bundle, ray="local",
                                      workers=w, show_progress=False)
                results[f"ray, {w} worker(s), wall"] = n / wall
                results[f"ray, {w} worker(s), per CPU-s"] = n / cpu
        finally:
            ray.shutdown()

    benchmark.pedantic(run, rounds=1, iterations=1)
    speed_up = results["ray, 2 worker(s), wall"] / results["ray, 1 worker(s), wall"]
    results["speed-up ray 1 -> 2 workers"] = speed_up
    benchmark.extra_info.update(results)
    load = os.getloadavg()[0]
    print(f"\nbatch routing, {n} AlpacaEval queries, default tagger ({os.cpu_count()} cores, "
          f"load average {load_start:.1f} at the start, {load:.1f} at the end):")
    for k, v in results.items():
        unit = "x" if k.startswith("speed-up") else "queries/s"
        print(f"  {k:42s} {v:12,.2f} {unit}")

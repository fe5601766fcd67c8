"""Gateway replicas sharing their counts through a real redis-server (started and stopped by the
tests on a free loopback port): propagation latency, exact counts under concurrency, outages,
restarts, idempotency across replicas, and a new replica starting from the shared state.

Replicas are real gateways under uvicorn on loopback (serve_helpers.running_gateway), each with
its own state directory; the backends are never called (``/v1/route`` + ``/v1/feedback``)."""

from __future__ import annotations

import json
import statistics
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("redis")
httpx = pytest.importorskip("httpx")

from redis_server import RedisServer, redis_server_binary  # noqa: E402
from serve_helpers import (  # noqa: E402
    MATH,
    OPEN_AUTH,
    POEM,
    RunningGateway,
    dead_url,
    gateway_config,
    running_gateway,
    wait_for,
)

from tagrouter_fast import journal  # noqa: E402
from tagrouter_fast.core import TagScorer  # noqa: E402
from tagrouter_fast.demo.router import demo_router  # noqa: E402
from tagrouter_fast.serve.config import Config, ConfigError  # noqa: E402
from tagrouter_fast.serve.learn.outcomes import OutcomeStore, OutcomeStoreError  # noqa: E402
from tagrouter_fast.serve.learn.shared import SharedLearner, SharedStateError  # noqa: E402

TAG = "Poetry Writing"  # the keyword tagger's tag for POEM


SECRET_ENV = "TEST_SHARED_DECISION_SECRET"


@pytest.fixture(scope="module", autouse=True)
def _needs_redis() -> None:
    redis_server_binary()  # skips the module with the reason when absent


@pytest.fixture(scope="module", autouse=True)
def _decision_secret() -> Iterator[None]:
    # Replicas share the secret that signs decision tokens, so each verifies the others'.
    mp = pytest.MonkeyPatch()
    mp.setenv(SECRET_ENV, "replicas-share-this-decision-secret-0123456789")
    yield
    mp.undo()


def replica_config(redis_url: str, state_dir: Path, *, prefix: str = "t", **shared: Any
                   ) -> Config:
    urls = {"small": dead_url(), "big": dead_url()}
    return gateway_config(
        urls, feedback={"state_dir": str(state_dir), "fsync": True},
        shared={"redis_url": redis_url, "key_prefix": prefix, **shared},
        server={"access_log": False},
        auth={**OPEN_AUTH, "decision_secret_env": SECRET_ENV},
    )


def post(g: RunningGateway, path: str, body: Any) -> Any:  # an httpx.Response
    return httpx.post(g.url + path, json=body, timeout=10.0)


def route(g: RunningGateway, query: str = POEM) -> tuple[str, str]:
    r = post(g, "/v1/route", {"query": query})
    assert r.status_code == 200, r.text
    return r.json()["decision_id"], r.json()["model"]


def counts(g: RunningGateway, model: str, tag: str = TAG) -> tuple[int, int, int]:
    return g.gw.router.scorer.counts(model, tag)


def redis_counts(url: str, prefix: str = "t") -> dict[str, int]:
    import redis

    r: Any = redis.Redis.from_url(url)
    try:
        return {k.decode(): int(v) for k, v in r.hgetall(f"{prefix}:counts").items()}
    finally:
        r.close()


def field(model: str, tag: str, outcome: str) -> str:
    return json.dumps(["c", model, tag, outcome], separators=(",", ":"))


def link(g: RunningGateway) -> SharedLearner:
    """The replica's learner: the Redis-shared one, owning its local journal."""
    learner = g.gw.learner
    assert isinstance(learner, SharedLearner)
    return learner


def converged(*gs: RunningGateway, n: int) -> bool:
    """Every replica routes on the same store, holding ``n`` shared outcomes."""
    if any(link(g).log_version != n or link(g).pending() for g in gs):
        return False
    first = gs[0].gw.router.scorer.to_bytes()
    return all(g.gw.router.scorer.to_bytes() == first for g in gs)


@pytest.fixture
def replicas(redis_srv: RedisServer, tmp_path: Path) -> Iterator[list[RunningGateway]]:
    with ExitStack() as stack:
        yield [
            stack.enter_context(running_gateway(replica_config(redis_srv.url, tmp_path / n)))
            for n in ("a", "b")
        ]


# ==== Propagation ====


def test_outcome_on_a_is_used_by_b_within_100_ms(replicas: list[RunningGateway]) -> None:
    a, b = replicas
    latencies = []
    for i in range(20):
        did, model = route(a)
        before = counts(b, model)
        f = post(a, "/v1/feedback", {"decision_id": did, "outcome": "loss"})
        t_ack = time.perf_counter()
        assert f.status_code == 200, f.text
        # Bounded wait: B's routed store (what its next decision reads) holds the loss.
        assert wait_for(lambda m=model, c=before: counts(b, m)[2] == c[2] + 1, timeout_s=2.0,
                        interval_s=0.0005), f"outcome {i} never reached replica B"
        latencies.append(time.perf_counter() - t_ack)
    ms = sorted(x * 1e3 for x in latencies)
    print(f"\nA->B propagation after A's ack: median {statistics.median(ms):.2f} ms, "
          f"max {ms[-1]:.2f} ms over {len(ms)} outcomes")
    assert ms[-1] < 100.0, ms
    # And B decides on it: its explanation scores the tag with the new counts.
    assert wait_for(lambda: converged(a, b, n=20))
    expl = post(b, "/v1/route", {"query": POEM}).json()["explanation"]
    assert expl["scores"] == post(a, "/v1/route", {"query": POEM}).json()["explanation"]["scores"]


# ==== Concurrency: exact counts ====


def test_two_replicas_concurrent_feedback_counts_exactly(
    replicas: list[RunningGateway], redis_srv: RedisServer
) -> None:
    a, b = replicas
    base = demo_router("keyword").scorer
    per_replica = 40
    work: list[tuple[RunningGateway, str, str, str]] = []
    outcomes = ("win", "tie", "loss")
    for g in (a, b):
        for i in range(per_replica):
            did, model = route(g, POEM if i % 2 else MATH)
            work.append((g, did, model, outcomes[i % 3]))
    errors: list[str] = []

    def worker(items: list[tuple[RunningGateway, str, str, str]]) -> None:
        with httpx.Client(timeout=10.0) as c:
            for g, did, _, o in items:
                r = c.post(g.url + "/v1/feedback", json={"decision_id": did, "outcome": o})
                if r.status_code != 200:
                    errors.append(r.text)

    threads = [threading.Thread(target=worker, args=(work[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    total = 2 * per_replica
    assert wait_for(lambda: converged(a, b, n=total), timeout_s=10.0)
    # Expected deltas, from the decisions themselves.
    expected: dict[str, int] = {"queries": total}
    assert len({w[1] for w in work}) == total
    store = a.gw.router.scorer
    for model in store.models:
        for tag in store.tags:
            got = store.counts(model, tag)
            old = base.counts(model, tag) if tag in base and model in base.models else (0, 0, 0)
            for k, o in enumerate(outcomes):
                if got[k] != old[k]:
                    expected[field(model, tag, o)] = got[k] - old[k]
    assert sum(v for k, v in expected.items() if k != "queries") >= total
    red = redis_counts(redis_srv.url)
    assert {k: v for k, v in red.items() if k.startswith('["c"') or k == "queries"} == expected
    # Per-outcome totals match what was posted, in Redis and in every replica's store.
    for o in outcomes:
        want = sum(1 for w in work if w[3] == o)
        assert sum(v for k, v in red.items() if k.startswith('["m"') and o in k) == want
    assert store.n_queries + store.n_learned == base.n_queries + base.n_learned + total
    # count_t: every decision is a new query carrying each of its tags once.
    for tag in store.tags:
        grown = store.tag_count(tag) - (base.tag_count(tag) if tag in base else 0)
        assert red.get(json.dumps(["t", tag], separators=(",", ":")), 0) == grown


# ==== Outages and restarts ====


def test_redis_stopped_then_restarted_replays_pending_exactly_once(
    redis_srv: RedisServer, tmp_path: Path
) -> None:
    cfg_a = replica_config(redis_srv.url, tmp_path / "a")
    cfg_b = replica_config(redis_srv.url, tmp_path / "b")
    with running_gateway(cfg_a) as a, running_gateway(cfg_b) as b:
        did, model = route(a)
        assert post(a, "/v1/feedback", {"decision_id": did, "outcome": "win"}).status_code == 200
        assert wait_for(lambda: converged(a, b, n=1))
        before = counts(a, model)

        redis_srv.stop()
        # Routing goes on on the last snapshot; feedback is acknowledged by the local journal.
        down = [route(a) for _ in range(5)] + [route(b, MATH) for _ in range(3)]
        for (d, _), g in zip(down, [a] * 5 + [b] * 3, strict=True):
            r = post(g, "/v1/feedback", {"decision_id": d, "outcome": "loss"})
            assert r.status_code == 200, r.text
        assert counts(a, model)[2] == before[2] + 5  # A sees its own outcomes at once
        assert link(a).pending() == 5 and link(b).pending() == 3
        assert not link(a).connected

    # Replica A restarts while Redis is still down: its journal (the outbox) survives.
    with running_gateway(cfg_a) as a2:
        assert counts(a2, model)[2] == before[2] + 5
        assert link(a2).pending() == 5
        redis_srv.start()  # same port, same AOF data
        with running_gateway(cfg_b) as b2:
            assert wait_for(lambda: converged(a2, b2, n=9), timeout_s=10.0)
            assert counts(b2, model)[2] == before[2] + 5
    red = redis_counts(redis_srv.url)
    assert red["queries"] == 9  # each pending outcome replayed exactly once
    # Restarted once more, with Redis up: nothing left to replay, nothing counted again.
    with running_gateway(cfg_a) as a3:
        assert wait_for(lambda: link(a3).log_version == 9 and not link(a3).pending())
        assert counts(a3, model)[2] == before[2] + 5
        assert redis_counts(redis_srv.url)["queries"] == 9


def test_lost_confirmation_resend_is_counted_once(redis_srv: RedisServer, tmp_path: Path) -> None:
    cfg = replica_config(redis_srv.url, tmp_path / "a")
    state = tmp_path / "a"
    assert cfg.shared is not None
    learner = SharedLearner(cfg.shared, demo_router("keyword"), state)
    learner.start()
    learner.remember("d1", [TAG], "small")
    learner.feedback("d1", "tie")
    assert wait_for(lambda: learner.pending() == 0 and learner.log_version == 1)
    tie = learner.router.scorer.counts("small", TAG)[1]
    # Killed before the confirmation reached the disk: no final snapshot (the journal keeps the
    # entry), and the published mark as it was before the send.
    learner.close(flush_s=0, snapshot=False)
    (state / "shared-published").write_bytes(journal.encode_line({"seq": 0}))
    with running_gateway(cfg) as a2:
        assert wait_for(lambda: link(a2).pending() == 0 and link(a2).log_version == 1)
        assert link(a2).shared_stats()["duplicates"] == 1
        assert counts(a2, "small")[1] == tie
    assert redis_counts(redis_srv.url)["queries"] == 1


def test_outbox_of_an_earlier_version_is_sent_once_then_removed(
    redis_srv: RedisServer, tmp_path: Path
) -> None:
    # A state directory of an earlier version: the outcome is in the snapshot and in its
    # shared-outbox.log (one line, as that version wrote it), not yet confirmed by Redis.
    state = tmp_path / "a"
    base = demo_router("keyword").scorer.counts("small", TAG)
    with OutcomeStore(demo_router("keyword"), state) as s:
        s.remember("d1", [TAG], "small")
        s.feedback("d1", "loss")
    entry = json.dumps({"q": "fb:d1", "tags": [TAG], "model": "small", "o": "loss"},
                       separators=(",", ":")).encode()
    ack = b'{"ack":"fb:d0"}'
    (state / "shared-outbox.log").write_bytes(
        b"%08x %s\n" % (zlib.crc32(ack), ack) + b"%08x %s\n" % (zlib.crc32(entry), entry)
        + b"0123"  # a torn tail: never acknowledged
    )
    with running_gateway(replica_config(redis_srv.url, state)) as a:
        assert wait_for(lambda: link(a).pending() == 0 and link(a).log_version == 1)
        assert not (state / "shared-outbox.log").exists()
        assert counts(a, "small")[2] == base[2] + 1  # once: the log's entry is its own
    assert redis_counts(redis_srv.url)["queries"] == 1


# ==== Idempotency across replicas ====


def test_same_decision_posted_to_both_replicas_counts_once(
    replicas: list[RunningGateway], redis_srv: RedisServer
) -> None:
    a, b = replicas
    # Sequential: B takes A's decision from its token at once; A then refuses the second
    # outcome (Redis' idempotency mark).
    did, model = route(a)
    before = counts(a, model)
    r = post(b, "/v1/feedback", {"decision_id": did, "outcome": "win"})
    assert r.status_code == 200, r.text
    assert wait_for(lambda: converged(a, b, n=1))
    again = post(a, "/v1/feedback", {"decision_id": did, "outcome": "loss"})
    assert again.status_code == 409, again.text
    # Concurrent: both may acknowledge locally; the Lua script counts the first only.
    ids = [route(a) for _ in range(10)]
    statuses: list[int] = []

    def send(g: RunningGateway, d: str) -> None:
        statuses.append(post(g, "/v1/feedback", {"decision_id": d, "outcome": "win"}).status_code)

    threads = [threading.Thread(target=send, args=(g, d)) for d, _ in ids for g in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(statuses) <= {200, 409} and statuses.count(200) >= 10
    assert wait_for(lambda: converged(a, b, n=11), timeout_s=10.0)
    assert counts(a, model)[0] == before[0] + 11 == counts(b, model)[0]
    assert redis_counts(redis_srv.url)["queries"] == 11


# ==== A new replica ====


def test_new_replica_starts_from_the_shared_state(
    replicas: list[RunningGateway], redis_srv: RedisServer, tmp_path: Path
) -> None:
    a, b = replicas
    for i in range(6):
        d, _ = route(a if i % 2 else b)
        g = a if i % 2 else b
        assert post(g, "/v1/feedback", {"decision_id": d, "outcome": "loss"}).status_code == 200
    assert wait_for(lambda: converged(a, b, n=6))
    bundle_only = demo_router("keyword").scorer.to_bytes()
    with running_gateway(replica_config(redis_srv.url, tmp_path / "c")) as c:
        # From its first request, without waiting: base bundle + shared increments.
        assert c.gw.router.scorer.to_bytes() == a.gw.router.scorer.to_bytes() != bundle_only
        assert link(c).log_version == 6


# ==== Refusals and config ====


def test_another_base_store_refuses_to_share(redis_srv: RedisServer, tmp_path: Path) -> None:
    from tagrouter_fast.core import TagDecider
    from tagrouter_fast.router import TagRouter

    cfg = replica_config(redis_srv.url, tmp_path / "a")
    assert cfg.shared is not None
    first = SharedLearner(cfg.shared, demo_router("keyword"), tmp_path / "a")
    first.start()
    first.close()
    other = TagRouter(TagDecider(TagScorer.from_records([("q", ["X"], "small", "win"),
                                                        ("q", ["X"], "big", "loss")]),
                                 {"small": 1.0, "big": 2.0}), align=False)
    second = SharedLearner(cfg.shared, other, tmp_path / "b")
    with pytest.raises(SharedStateError, match="shared.key_prefix"):
        second.start()
    second.close()


@pytest.mark.parametrize(
    ("shared", "feedback", "message"),
    [({"redis_url": "http://x"}, True, "shared.redis_url: must be a redis://"),
     ({}, True, "shared.redis_url: missing"),
     ({"redis_url": "redis://h", "refresh_ms": 0}, True, "shared.refresh_ms: must be between"),
     ({"redis_url": "redis://h", "refres_ms": 5}, True, "shared.refres_ms: unknown key"),
     ({"redis_url": "redis://h", "timeout_s": -1}, True, "shared.timeout_s"),
     ({"redis_url": "redis://h", "key_prefix": "a b"}, True, "shared.key_prefix"),
     ({"redis_url": "redis://h"}, False, "shared: needs [feedback] state_dir")],
)
def test_bad_shared_config_names_the_key(
    shared: dict[str, Any], feedback: bool, message: str, tmp_path: Path
) -> None:
    raw: dict[str, Any] = {
        "router": {}, "backends": [{"name": "small", "base_url": "http://127.0.0.1:1/v1"}],
        "shared": shared,
    }
    if feedback:
        raw["feedback"] = {"state_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Config.from_dict(raw)


def test_redis_that_lost_its_data_is_noticed_and_the_snapshot_kept(tmp_path: Path) -> None:
    # No AOF: a restart comes back empty. Replicas must not silently drop what they learned.
    srv = RedisServer(tmp_path / "redis", aof=False)
    with srv, running_gateway(replica_config(srv.url, tmp_path / "a")) as a:
        did, model = route(a)
        assert post(a, "/v1/feedback", {"decision_id": did, "outcome": "loss"}).status_code == 200
        assert wait_for(lambda: converged(a, n=1))
        learned = a.gw.router.scorer.to_bytes()
        srv.stop()
        srv.start()
        assert wait_for(lambda: link(a).shared_stats()["diverged"] is not None, timeout_s=10.0)
        assert "shared state was lost" in link(a).shared_stats()["diverged"]
        assert a.gw.router.scorer.to_bytes() == learned
        ready = httpx.get(a.url + "/readyz").json()
        assert ready["shared"]["diverged"]
        # Feedback is still acknowledged locally (kept in the journal, not sent to this Redis).
        d2, _ = route(a)
        assert post(a, "/v1/feedback", {"decision_id": d2, "outcome": "win"}).status_code == 200
        assert link(a).pending() == 1


def test_polling_alone_propagates(redis_srv: RedisServer, tmp_path: Path) -> None:
    # pub/sub off: the versioned polling every refresh_ms carries outcomes on its own.
    cfgs = [replica_config(redis_srv.url, tmp_path / n, pubsub=False, refresh_ms=10)
            for n in ("a", "b")]
    with running_gateway(cfgs[0]) as a, running_gateway(cfgs[1]) as b:
        did, model = route(a)
        before = counts(b, model)
        assert post(a, "/v1/feedback", {"decision_id": did, "outcome": "win"}).status_code == 200
        t0 = time.perf_counter()
        assert wait_for(lambda: counts(b, model)[0] == before[0] + 1, timeout_s=2.0,
                        interval_s=0.001)
        assert time.perf_counter() - t0 < 0.1


def test_second_process_on_a_state_dir_changes_no_file(
    redis_srv: RedisServer, tmp_path: Path
) -> None:
    cfg = replica_config(redis_srv.url, tmp_path / "a")
    state = tmp_path / "a"
    with running_gateway(cfg) as a:
        redis_srv.stop()
        did, _ = route(a)
        assert post(a, "/v1/feedback", {"decision_id": did, "outcome": "win"}).status_code == 200
        segment = sorted(state.glob("journal-*.log"))[-1]
        with open(segment, "ab") as f:
            f.write(b"0000")  # as if the owner were half-way through a line
        before = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
        # What the gateway's start-up does: the shared learner opens its local learner, which
        # refuses before anything in the directory was touched.
        assert cfg.shared is not None and cfg.feedback.state_dir is not None
        with pytest.raises(OutcomeStoreError, match="in use"):
            SharedLearner(cfg.shared, demo_router("keyword"), cfg.feedback.state_dir)
        assert {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()} == before
        with open(segment, "r+b") as f:
            f.truncate(len(before[segment.name]) - 4)  # the owner "finishes" its line
        redis_srv.start()
        assert wait_for(lambda: link(a).pending() == 0 and link(a).log_version == 1,
                        timeout_s=10.0)

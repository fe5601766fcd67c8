"""Who may teach the router, and decisions any replica can verify.

Client keys (hashed, scoped, rate-limited) in front of real gateways on loopback, decision
tokens posted back as feedback (forged, tampered, expired, someone else's), anonymous access
only when configured, the journal naming the key, and two replicas on a real redis-server
taking each other's decisions before anything reached Redis."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import stat
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from serve_helpers import (  # noqa: E402
    MATH,
    POEM,
    Fake,
    RunningGateway,
    dead_url,
    fake_backends,
    gateway_config,
    running_gateway,
    wait_for,
)

from tagrouter_fast.core import TagDecider, TagScorer  # noqa: E402
from tagrouter_fast.demo.router import demo_router  # noqa: E402
from tagrouter_fast.router import TagRouter  # noqa: E402
from tagrouter_fast.serve.config import Config, ConfigError  # noqa: E402
from tagrouter_fast.serve.edge.app import create_app  # noqa: E402
from tagrouter_fast.serve.learn.keys import ClientKey, Keyring, new_key, parse_keys  # noqa: E402
from tagrouter_fast.serve.learn.outcomes import OutcomeStore, UnknownDecision  # noqa: E402
from tagrouter_fast.serve.learn.tokens import (  # noqa: E402
    MAX_TOKEN_CHARS,
    SECRET_FILE,
    DecisionTokens,
    TokenError,
)

#: The query of the attack in issue 21 (the keyword tagger: Algebra, Mathematical Problem
#: Solving): routed to big.
EQUATION = "Solve the equation 4x + 5 = 8"
ADMIN_TOKEN = "admin-token-of-the-keys-tests-0123456789"

# One key per role. Secrets live in the test only; the gateway gets the records (hashes).
KEYS: dict[str, tuple[str, ClientKey]] = {
    "app": new_key("app", ["route", "feedback"]),
    "tuner": new_key("tuner", ["route", "feedback", "override"]),
    "other": new_key("other", ["route", "feedback"]),
    "reader": new_key("reader", ["route"]),
    "limited": new_key("limited", ["route", "feedback"], feedback_per_s=1, feedback_burst=2),
    "ops": new_key("ops", ["admin"]),
}


def secret(name: str) -> str:
    return KEYS[name][0]


def auth(name: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {secret(name)}"} if name else {}


def post(g: RunningGateway, path: str, body: Any, key: str | None = None,
         **headers: str) -> httpx.Response:
    return httpx.post(g.url + path, json=body, headers={**auth(key), **headers}, timeout=10.0)


def route(g: RunningGateway, key: str | None, query: str = POEM, **opts: Any) -> httpx.Response:
    body: dict[str, Any] = {"query": query}
    if opts:
        body["tagrouter"] = opts
    return post(g, "/v1/route", body, key)


def feedback(g: RunningGateway, did: str, outcome: Any = "win", key: str | None = None
             ) -> httpx.Response:
    return post(g, "/v1/feedback", {"decision_id": did, "outcome": outcome}, key)


def err(r: httpx.Response) -> tuple[int, str | None]:
    return r.status_code, r.json()["error"]["code"]


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Fake]]:
    with fake_backends("small", "big") as f:
        yield f


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("keys") / "keys.jsonl"
    p.write_text("# client keys: sha256 only\n\n" + "".join(
        k.line() + "\n" for _, k in KEYS.values()))
    return p


def keyed_config(fakes: dict[str, Fake], state_dir: Path, keys_file: Path, **sections: Any
                 ) -> Config:
    urls = {"small": fakes["small"].url, "big": fakes["big"].url}
    sections.setdefault("admin", {"token_env": "KEYS_TEST_ADMIN_TOKEN"})
    return gateway_config(
        urls, feedback={"state_dir": str(state_dir)},
        auth={"keys_file": str(keys_file), **sections.pop("auth", {})}, **sections,
    )


@pytest.fixture
def gateway(fakes: dict[str, Fake], keys_file: Path, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:
    monkeypatch.setenv("KEYS_TEST_ADMIN_TOKEN", ADMIN_TOKEN)
    with running_gateway(keyed_config(fakes, tmp_path / "state", keys_file)) as g:
        yield g


# ==== The attack of issue 21 ====


def attempt_issue_21_attack(url: str, attacker: dict[str, str], accomplice: dict[str, str]
                            ) -> list[int]:
    """The attack as the issue ran it, from a client with a route+feedback key (and an
    accomplice's decisions): theta -100 gets decisions for the small model, 12 forged wins for
    them. Returns every status code the gateway answered. Against the gateway before client
    keys (no auth), every one is 200 and the equation moves to small."""
    statuses: list[int] = []
    with httpx.Client(base_url=url, timeout=10.0) as c:
        forced = []
        for who in (attacker, accomplice):
            for _ in range(6):
                r = c.post("/v1/route", json={"query": EQUATION, "tagrouter": {"theta": -100}},
                           headers=who)
                statuses.append(r.status_code)
                if r.status_code == 200 and r.json()["model"] == "small":
                    forced.append(r.json()["decision_id"])
        for did in forced:
            r = c.post("/v1/feedback", json={"decision_id": did, "outcome": "win"},
                       headers=attacker)
            statuses.append(r.status_code)
    return statuses


def test_the_forged_outcome_attack_of_issue_21_fails_with_403(gateway: RunningGateway) -> None:
    g = gateway
    assert route(g, "app", EQUATION).json()["model"] == "big"
    before = g.gw.router.scorer.to_bytes()

    statuses = attempt_issue_21_attack(g.url, auth("app"), auth("tuner"))
    # The attacker's own theta override: 403 (no override scope), six times; the accomplice
    # (who may override) gets its 6 decisions for small; the attacker's 6 wins for them: 403.
    assert statuses == [403] * 6 + [200] * 6 + [403] * 6
    r = route(g, "app", EQUATION, theta=-100)
    assert err(r) == (403, "missing_scope") and "'override'" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "tagrouter.theta"
    # The override by header, by share, and on the completions endpoints: 403 as well.
    assert post(g, "/v1/route", {"query": EQUATION}, "app",
                **{"x-tagrouter-theta": "-100"}).status_code == 403
    assert route(g, "app", EQUATION, llm_share=0.0).status_code == 403
    body = {"model": "tagrouter", "messages": [{"role": "user", "content": EQUATION}],
            "tagrouter": {"theta": -100}}
    assert err(post(g, "/v1/chat/completions", body, "app")) == (403, "missing_scope")

    # Its own genuine decision (big), edited to say small: the signature no longer holds.
    did = route(g, "app", EQUATION).json()["decision_id"]
    r = feedback(g, _with_model(g, did, "small"), "win", "app")
    assert err(r) == (404, "forged_decision")

    # Nothing moved: the store is byte for byte what it was, the equation still goes to big.
    assert g.gw.router.scorer.to_bytes() == before
    assert route(g, "app", EQUATION).json()["model"] == "big"

    # Control: the same 12 wins from the key those decisions were issued to (it holds the
    # override scope: trusted with it) do flip the equation, so the 403s above are what held.
    forced = [route(g, "tuner", EQUATION, theta=-100).json() for _ in range(12)]
    assert {d["model"] for d in forced} == {"small"}
    for d in forced:
        assert feedback(g, d["decision_id"], "win", "tuner").status_code == 200
    assert route(g, "app", EQUATION).json()["model"] == "small"


def _with_model(g: RunningGateway, token: str, model: str) -> str:
    """``token`` re-encoded with another model and the old MAC: what an attacker can make."""
    import base64

    raw = bytearray(base64.urlsafe_b64decode(token[4:] + "=" * (-len(token[4:]) % 4)))
    claims = g.gw.tokens.verify(token)
    old = claims.model.encode()
    i = raw.index(bytes([len(old)]) + old)
    raw[i:i + 1 + len(old)] = bytes([len(model)]) + model.encode()
    return "trd_" + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


def test_outcomes_only_for_the_keys_own_decisions(gateway: RunningGateway) -> None:
    g = gateway
    mine = route(g, "app").json()["decision_id"]
    theirs = route(g, "other").json()["decision_id"]
    r = feedback(g, theirs, "win", "app")
    assert err(r) == (403, "not_your_decision")
    assert feedback(g, mine, "win", "app").status_code == 200
    assert feedback(g, theirs, "loss", "other").status_code == 200
    assert err(feedback(g, mine, "loss", "app")) == (409, "duplicate_outcome")
    # Answers of the completions endpoint carry a token for their key too.
    chat = {"model": "tagrouter", "messages": [{"role": "user", "content": MATH}]}
    r = post(g, "/v1/chat/completions", chat, "other")
    did = r.headers["x-tagrouter-decision-id"]
    assert did.startswith("trd_") and r.headers["x-tagrouter-model"] == "big"
    assert err(feedback(g, did, "win", "app")) == (403, "not_your_decision")
    assert feedback(g, did, "win", "other").status_code == 200


def test_scoring_a_passthrough_is_an_override(fakes: dict[str, Fake], keys_file: Path,
                                              tmp_path: Path) -> None:
    """With learn_passthrough, a passthrough answer can teach; the client chose the model, so
    only a key with the override scope gets a token for it (else: pick small, report wins)."""
    cfg = keyed_config(fakes, tmp_path / "state", keys_file, router={"learn_passthrough": True},
                       admin={})
    body = {"model": "small", "messages": [{"role": "user", "content": EQUATION}]}
    with running_gateway(cfg) as g:
        r = post(g, "/v1/chat/completions", body, "app")
        assert r.status_code == 200 and r.headers["x-tagrouter-reason"] == "passthrough"
        did = r.headers["x-tagrouter-decision-id"]
        assert not did.startswith("trd_")  # answered, but not scorable
        assert err(feedback(g, did, "win", "app")) == (404, "unknown_decision")
        r = post(g, "/v1/chat/completions", body, "tuner")
        assert feedback(g, r.headers["x-tagrouter-decision-id"], "win", "tuner").status_code \
            == 200


# ==== Keys ====


def test_v1_needs_a_key_and_the_openai_sdk_sends_it(gateway: RunningGateway) -> None:
    g = gateway
    for path, body in (("/v1/route", {"query": POEM}),
                       ("/v1/chat/completions", {"model": "tagrouter", "messages": [
                           {"role": "user", "content": POEM}]}),
                       ("/v1/feedback", {"decision_id": "x", "outcome": "win"})):
        r = post(g, path, body)
        assert err(r) == (401, "missing_api_key") and r.headers["www-authenticate"] == "Bearer"
        assert err(post(g, path, body, None, authorization="Bearer unused")) == \
            (401, "invalid_api_key")
        wrong = secret("app")[:-4] + "AAAA"
        assert err(post(g, path, body, None, authorization=f"Bearer {wrong}")) == \
            (401, "invalid_api_key")
    assert httpx.get(g.url + "/v1/models").status_code == 401
    assert httpx.get(g.url + "/v1/models", headers=auth("reader")).status_code == 200

    client = openai.OpenAI(base_url=g.url + "/v1", api_key=secret("app"), max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="tagrouter", messages=[{"role": "user", "content": POEM}])
    assert raw.headers["x-tagrouter-model"] == "small"
    assert feedback(g, raw.headers["x-tagrouter-decision-id"], 0.9, "app").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=g.url + "/v1", api_key="sk-nope", max_retries=0) \
            .chat.completions.create(model="tagrouter",
                                     messages=[{"role": "user", "content": POEM}])
    # Health and metrics stay open (probes and scrapers hold no key).
    assert httpx.get(g.url + "/readyz").status_code == 200
    assert 'tagrouter_rejected_total{reason="unauthenticated"}' in httpx.get(
        g.url + "/metrics").text


def test_scopes(gateway: RunningGateway) -> None:
    g = gateway
    did = route(g, "reader").json()["decision_id"]
    r = feedback(g, did, "win", "reader")
    assert err(r) == (403, "missing_scope") and "'feedback'" in r.json()["error"]["message"]
    assert err(route(g, "ops")) == (403, "missing_scope")  # admin only: no routing
    # Admin: the admin token (every scope), or a key with the admin scope.
    for who, status in ((None, 401), ("app", 403), ("ops", 200)):
        assert post(g, "/admin/theta", {"theta": 0.0}, who).status_code == status
    r = post(g, "/admin/theta", {"theta": 0.0}, None, authorization=f"Bearer {ADMIN_TOKEN}")
    assert r.status_code == 200
    r = post(g, "/v1/route", {"query": POEM, "tagrouter": {"theta": 5}}, None,
             authorization=f"Bearer {ADMIN_TOKEN}")
    assert r.status_code == 200 and r.json()["model"] == "big"


def test_keys_are_stored_hashed(gateway: RunningGateway, keys_file: Path, tmp_path: Path
                                ) -> None:
    text = keys_file.read_text()
    for s, k in KEYS.values():
        assert s not in text
        assert f"sha256:{hashlib.sha256(s.encode()).hexdigest()}" in text
        assert k.digest == hashlib.sha256(s.encode()).digest()
    # Nothing the gateway holds is a secret: its keyring has digests only.
    ring = gateway.gw.keyring
    assert all(s not in repr(vars(ring)) for s, _ in KEYS.values())
    # A secret pasted where its hash belongs is refused, without echoing it.
    raw = {"router": {}, "backends": [{"name": "small", "base_url": "http://h/v1"}],
           "auth": {"keys": [{"id": "x", "hash": secret("app"), "scopes": ["route"]}]}}
    with pytest.raises(ConfigError, match=r"auth.keys\[0\].hash: must be sha256:") as e:
        Config.from_dict(raw)
    assert secret("app") not in str(e.value)
    # Keys from a variable (a JSON array, one line), and errors naming the file and line.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(KEYS["app"][1].line() + "\n" + '{"id": "y", "hash": "sha256:00"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2.hash"):
        parse_keys(bad.read_text(), str(bad))
    env = "[" + ",".join(k.line() for _, k in KEYS.values()) + "]"
    assert [k.id for k in parse_keys(env, "$X")] == list(KEYS)


def test_key_config_errors_name_the_key(fakes: dict[str, Fake], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    urls = {"small": fakes["small"].url, "big": fakes["big"].url}
    monkeypatch.delenv("NO_SUCH_KEYS_VAR", raising=False)
    cases = [
        ({"keys_env": "NO_SUCH_KEYS_VAR"}, "auth.keys_env: environment variable NO_SUCH_KEYS_VAR"),
        ({"keys_file": str(tmp_path / "missing.jsonl")}, "auth.keys_file: cannot read"),
        ({}, "auth: no client keys and no anonymous access"),
        ({"keys": [json.loads(KEYS["app"][1].line())] * 2}, "'app' is given twice"),
    ]
    for section, message in cases:
        with pytest.raises(ConfigError, match=message):
            create_app(gateway_config(urls, auth=section), router=demo_router("keyword"))
    for section, message in [
        ({"anonymous_feedback": True}, "auth.anonymous_feedback: needs allow_anonymous"),
        ({"allow_anonymous": True, "anonymous_feedback": 1}, "auth.anonymous_feedback: must be"),
        ({"keys": [{"id": "a", "hash": "sha256:" + "0" * 64, "scopes": ["teach"]}]},
         r"auth.keys\[0\].scopes: unknown scope 'teach'"),
        ({"allow_anonymus": True}, "auth.allow_anonymus: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=message):
            gateway_config(urls, auth=section)


def test_feedback_rate_limit_per_key(gateway: RunningGateway) -> None:
    g = gateway
    now = [1000.0]
    g.gw.keyring.clock = lambda: now[0]
    ids = [route(g, "limited").json()["decision_id"] for _ in range(4)]
    assert feedback(g, ids[0], "win", "limited").status_code == 200
    assert feedback(g, ids[1], "win", "limited").status_code == 200  # burst of 2
    r = feedback(g, ids[2], "win", "limited")
    assert err(r) == (429, "feedback_rate_limit") and r.headers["retry-after"] == "1"
    # Other keys have their own buckets (or none).
    assert feedback(g, route(g, "app").json()["decision_id"], "win", "app").status_code == 200
    now[0] += 1.0  # one post per second refills
    assert feedback(g, ids[2], "win", "limited").status_code == 200
    assert feedback(g, ids[3], "win", "limited").status_code == 429


# ==== Decision tokens ====


def test_forged_and_tampered_tokens_are_404_and_expired_410(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    g = gateway
    did = route(g, "app").json()["decision_id"]
    assert err(feedback(g, "nope", "win", "app")) == (404, "unknown_decision")
    assert err(feedback(g, "trd_!!notbase64", "win", "app")) == (404, "forged_decision")
    assert err(feedback(g, "trd_" + "A" * 80, "win", "app")) == (404, "forged_decision")
    for i in (6, 20, len(did) - 3):  # a flipped character anywhere: id, time, tags, MAC
        c = "B" if did[i] != "B" else "C"
        assert err(feedback(g, did[:i] + c + did[i + 1:], "win", "app")) == \
            (404, "forged_decision"), i
    assert err(feedback(g, did[:-6], "win", "app")) == (404, "forged_decision")  # truncated
    tags = demo_router("keyword").scorer.tags
    # A well-formed token under another secret (another deployment, a rotated-out secret).
    other = DecisionTokens([b"another-deployment-secret-0123456789"], tags, ttl_s=3600)
    made = other.issue("app", "small", ["Poetry Writing"])
    assert made is not None and err(feedback(g, made, "win", "app")) == (404, "forged_decision")
    # Genuine but old: signed with this gateway's secret an hour and a bit ago.
    own = (tmp_path / "state" / SECRET_FILE).read_text().strip().encode()
    past = DecisionTokens([own], tags, ttl_s=3600, clock=lambda: time.time() - 3601)
    old = past.issue("app", "small", ["Poetry Writing"])
    assert old is not None
    r = feedback(g, old, "win", "app")
    assert err(r) == (410, "expired_decision") and r.json()["error"]["param"] == "decision_id"
    # Genuine, for a model this store no longer has.
    now = DecisionTokens([own], tags, ttl_s=3600)
    ghost = now.issue("app", "ghost", ["Poetry Writing"])
    assert ghost is not None and err(feedback(g, ghost, "win", "app")) == (410, "stale_decision")
    # The genuine one still counts, once.
    assert feedback(g, did, "win", "app").status_code == 200
    metrics = httpx.get(g.url + "/metrics").text
    for result in ("unknown", "forged", "expired", "stale", "accepted"):
        assert f'tagrouter_feedback_total{{result="{result}"}}' in metrics


def test_token_format_and_size() -> None:
    router = demo_router("keyword")
    tags = router.scorer.tags
    codec = DecisionTokens([b"k" * 32], tags, ttl_s=3600)
    token = codec.issue("app", "small", tags[:2])
    assert token is not None and len(token) < 100, token
    c = codec.verify(token)
    assert (c.key, c.model, c.tags, len(c.id)) == ("app", "small", tuple(tags[:2]), 24)
    # Tags outside the bundle's table travel as text: still well under the limit for a
    # tagger's 32 tags of a typical length...
    long = [f"an unaligned tag number {i:02d}" for i in range(32)]
    token = codec.issue("app", "small", long)
    assert token is not None and len(token) < 1400 and codec.verify(token).tags == tuple(long)
    # ... and refused, never cut, beyond it (the answer then gets a plain id).
    assert codec.issue("app", "small", [f"{i:02d}" + "x" * 62 for i in range(32)]) is None
    assert MAX_TOKEN_CHARS <= 2048
    # A new tag table (a bundle reload): old tokens still verify, new ones use the new table.
    codec.use_tags(["Other"])
    assert codec.verify(token).tags == tuple(long)
    # Rotation: the new secret first signs, the old one still verifies.
    rotated = DecisionTokens([b"n" * 32, b"k" * 32], tags, ttl_s=3600)
    assert rotated.verify(token).key == "app"
    fresh = rotated.issue("app", "small", tags[:1])
    assert fresh is not None
    with pytest.raises(TokenError):
        DecisionTokens([b"k" * 32], tags, ttl_s=3600).verify(fresh)


def test_journal_lines_name_the_key(gateway: RunningGateway, tmp_path: Path) -> None:
    g = gateway
    did = route(g, "app").json()["decision_id"]
    assert feedback(g, did, "tie", "app").status_code == 200
    lines = [json.loads(x.split(b" ", 1)[1])
             for p in sorted((tmp_path / "state").glob("journal-*.log"))
             for x in p.read_bytes().splitlines()]
    assert lines[-1]["key"] == "app" and lines[-1]["outcome"] == "tie"
    assert lines[-1]["id"] == g.gw.tokens.verify(did).id  # the token's decision id


def test_old_journal_lines_without_a_key_still_read(tmp_path: Path) -> None:
    def router() -> TagRouter:
        base = [("q1", ["Poem"], "big", "win"), ("q1", ["Poem"], "small", "loss")]
        return TagRouter(TagDecider(TagScorer.from_records(base), {"big": 10.0, "small": 1.0}),
                         align=False)

    with OutcomeStore(router(), tmp_path) as s:
        s.remember("old", ["Poem"], "small")
        s.feedback("old", "win")  # no key: a line as written before keys
        s.feedback("new", "win", decision=(["Poem"], "small", time.time()), key="app")
    r = router()
    with OutcomeStore(r, tmp_path, snapshot_every=10**6):
        assert r.scorer.counts("small", "Poem") == (2, 0, 1)


def test_a_decision_evicted_from_the_registry_is_never_counted_twice(tmp_path: Path) -> None:
    """Tokens bring their decision, so eviction (max_decisions) must not turn a retry into a
    second count: anything not newer than the newest evicted decision is refused, also after a
    restart (the watermark is in the manifest)."""
    def router() -> TagRouter:
        base = [("q1", ["Poem"], "big", "win"), ("q1", ["Poem"], "small", "loss")]
        return TagRouter(TagDecider(TagScorer.from_records(base), {"big": 10.0, "small": 1.0}),
                         align=False)

    t0 = time.time()
    dec = {f"d{i}": (["Poem"], "small", t0 + i) for i in range(5)}
    r = router()
    with OutcomeStore(r, tmp_path, max_decisions=3) as s:
        for i in range(4):
            s.feedback(f"d{i}", "win", decision=dec[f"d{i}"], key="app")
        with pytest.raises(UnknownDecision, match="max_decisions"):
            s.feedback("d0", "win", decision=dec["d0"], key="app")  # evicted: refused
        wins = r.scorer.counts("small", "Poem")[0]
        s.feedback("d4", "win", decision=dec["d4"], key="app")  # newer: counted
        assert r.scorer.counts("small", "Poem")[0] == wins + 1
    with OutcomeStore(router(), tmp_path, max_decisions=3) as s:
        for did in ("d0", "d1"):
            with pytest.raises(UnknownDecision):
                s.feedback(did, "win", decision=dec[did], key="app")


# ==== Anonymous access ====


def test_anonymous_only_when_configured_and_loudly(
    fakes: dict[str, Fake], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    urls = {"small": fakes["small"].url, "big": fakes["big"].url}
    app_line = json.loads(KEYS["app"][1].line())
    # Keys only: no anonymous calls (covered above); route-only anonymous access:
    cfg = gateway_config(urls, feedback={"state_dir": str(tmp_path / "a")},
                         auth={"allow_anonymous": True, "keys": [app_line]})
    with caplog.at_level(logging.WARNING, logger="tagrouter.serve"), running_gateway(cfg) as g:
        assert any("allow_anonymous = true" in r.getMessage() for r in caplog.records)
        r = route(g, None)
        assert r.status_code == 200
        assert err(feedback(g, r.json()["decision_id"], "win")) == (403, "missing_scope")
        assert err(route(g, None, theta=5)) == (403, "missing_scope")
        # Any api_key that is not one of ours is anonymous (the SDK insists on one) ...
        r = post(g, "/v1/route", {"query": POEM}, None, authorization="Bearer EMPTY")
        assert r.status_code == 200
        # ... but a key of ours that fails is told, not silently downgraded.
        bad = secret("app")[:-4] + "AAAA"
        assert post(g, "/v1/route", {"query": POEM}, None,
                    authorization=f"Bearer {bad}").status_code == 401
        # Keys still work beside it, and anonymous callers never administer.
        assert route(g, "app").status_code == 200
        assert post(g, "/admin/theta", {"theta": 1}).status_code == 403
    # Anonymous feedback when enabled explicitly: anonymous decisions for anonymous callers.
    cfg = gateway_config(urls, feedback={"state_dir": str(tmp_path / "b")},
                         auth={"allow_anonymous": True, "anonymous_feedback": True,
                               "keys": [app_line]})
    with running_gateway(cfg) as g:
        anon = route(g, None).json()["decision_id"]
        keyed = route(g, "app").json()["decision_id"]
        assert err(feedback(g, keyed, "win")) == (403, "not_your_decision")
        assert err(feedback(g, anon, "win", "app")) == (403, "not_your_decision")
        assert feedback(g, anon, "win").status_code == 200
        assert err(route(g, None, theta=5)) == (403, "missing_scope")  # still no override


def test_demo_config_is_open_and_says_so() -> None:
    from tagrouter_fast.demo.start import start_demo

    with start_demo(tagger="keyword") as (config, _):
        a = config.auth
        assert a.allow_anonymous and a.anonymous_feedback and a.anonymous_override


def test_decision_secret(fakes: dict[str, Fake], tmp_path: Path) -> None:
    urls = {"small": fakes["small"].url, "big": fakes["big"].url}
    app_line = json.loads(KEYS["app"][1].line())
    # One gateway: generated in the state directory, private, kept across restarts.
    cfg = gateway_config(urls, feedback={"state_dir": str(tmp_path / "s")},
                         auth={"keys": [app_line]})
    with running_gateway(cfg) as g:
        did = route(g, "app").json()["decision_id"]
    path = tmp_path / "s" / SECRET_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(path.read_text().strip()) >= 32
    with running_gateway(cfg) as g:
        assert feedback(g, did, "win", "app").status_code == 200
    # Replicas must share one: refusing to start beats answering 404 to each other's clients.
    shared = gateway_config(urls, feedback={"state_dir": str(tmp_path / "r")},
                            auth={"keys": [app_line]}, shared={"redis_url": "redis://h:1"})
    with pytest.raises(ConfigError, match="auth.decision_secret_file: replicas"):
        create_app(shared, router=demo_router("keyword"))
    short = tmp_path / "short"
    short.write_text("too-short\n")
    with pytest.raises(ConfigError, match="at least 32"):
        create_app(gateway_config(urls, auth={"keys": [app_line],
                                              "decision_secret_file": str(short)}),
                   router=demo_router("keyword"))


def test_cli_keys_new_prints_the_key_once_and_its_hashed_line() -> None:
    from tagrouter_fast.cli import main

    out, errs = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(errs):
        assert main(["keys", "new", "--id", "ci", "--scopes", "route,feedback",
                     "--feedback-per-s", "5"]) == 0
    key_secret = errs.getvalue().split()[-1]
    assert key_secret.startswith("tr_ci.") and key_secret not in out.getvalue()
    (record,) = parse_keys(out.getvalue(), "stdout")
    assert record.scopes == {"route", "feedback"} and record.feedback_per_s == 5
    assert Keyring([record]).authenticate(f"Bearer {key_secret}").id == "ci"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errs):
        assert main(["keys", "new", "--id", "x", "--scopes", "route,teach"]) == 2
    assert "--scopes: unknown scope 'teach'" in errs.getvalue()


@pytest.mark.parametrize("name", ["tagrouter_fast.serve.learn.keys",
                                  "tagrouter_fast.serve.learn.tokens"])
def test_docstring_examples(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ==== Replicas: any replica takes any replica's decision, at once ====


def test_feedback_at_the_other_replica_before_anything_reached_redis(
    redis_srv: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYS_TEST_DECISION_SECRET", "replicas-share-one-secret-0123456789abcdef")
    keys = [json.loads(KEYS[k][1].line()) for k in ("app", "other")]

    def replica(name: str) -> Config:
        return gateway_config(
            {"small": dead_url(), "big": dead_url()},
            feedback={"state_dir": str(tmp_path / name)}, server={"access_log": False},
            shared={"redis_url": redis_srv.url, "key_prefix": "k"},
            auth={"keys": keys, "decision_secret_env": "KEYS_TEST_DECISION_SECRET"},
        )

    with ExitStack() as stack:
        a = stack.enter_context(running_gateway(replica("a")))
        b = stack.enter_context(running_gateway(replica("b")))
        # Redis up: each outcome posted to B the moment A answered (the cross-replica race).
        for i in range(30):
            did = route(a, "app", POEM if i % 2 else MATH).json()["decision_id"]
            r = feedback(b, did, "loss", "app")
            assert r.status_code == 200, (i, r.text)
        assert wait_for(lambda: not b.gw.learner.pending(), timeout_s=10.0)
        # Redis down: A's decisions cannot have reached it; B takes them all the same.
        redis_srv.stop()
        down = [route(a, "app").json()["decision_id"] for _ in range(5)]
        for did in down:
            assert feedback(b, did, "win", "app").status_code == 200
        assert err(feedback(b, route(a, "other").json()["decision_id"], "win", "app")) == \
            (403, "not_your_decision")
        assert b.gw.learner.pending() == 5
        redis_srv.start()
        assert wait_for(lambda: a.gw.learner.log_version == 35 == b.gw.learner.log_version
                        and not b.gw.learner.pending(), timeout_s=10.0)
        assert a.gw.router.scorer.to_bytes() == b.gw.router.scorer.to_bytes()
        # Idempotency stays in Redis: the same decisions posted to A now are duplicates.
        for did in down[:2]:
            assert err(feedback(a, did, "win", "app")) == (409, "duplicate_outcome")

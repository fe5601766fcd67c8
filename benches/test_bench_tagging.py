"""Latency of the query -> tags path, per stage (pytest-benchmark; `make bench`).

Targets (2-core CPU): default tagger end to end p50 <= 10 ms; alignment cache hit <= 5 us.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tagrouter_fast.tagging import encoder as encmod

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpacaeval2" / "queries.csv"

PHRASES = [
    "Text Rewriting",
    "Geometry",
    "Question Answering",
    "Python Programming",
    "Creative Writing",
    "Personal Finance",
    "Email Writing",
    "Role Play",
]


def _queries() -> list[str]:
    if DATA.is_file():
        with DATA.open(newline="", encoding="utf-8") as f:
            return [r["query_text"] for r in csv.DictReader(f)]
    return [
        "Rewrite the sentence so that it's in the present tense: She had worked at the "
        "company for the past 3 years.",
        "Suggest a recipe for a vegan dessert.",
        "What if the Maya civilization had never collapsed?",
    ]


@pytest.fixture(scope="module")
def enc():
    return encmod.default_encoder()


@pytest.fixture(scope="module")
def tagger(enc):
    from tagrouter_fast.tagging.taggers import DefaultTagger

    return DefaultTagger(enc)


@pytest.fixture(scope="module")
def aligner(enc, tagger):
    from tagrouter_fast.tagging.align import TagAligner

    return TagAligner(tagger.vocab.tags, enc, floor=0.5)


def test_encoder_1_phrase(benchmark, enc):
    benchmark.group = "encoder 1 phrase"
    out = benchmark(enc.encode, ["Keyword Extraction"])
    assert out.shape == (1, 384)


def test_encoder_8_phrases(benchmark, enc):
    benchmark.group = "encoder 8 phrases"
    out = benchmark(enc.encode, PHRASES)
    assert out.shape == (8, 384)


def test_hnsw_query(benchmark, aligner, enc):
    benchmark.group = "HNSW query (1 vector)"
    q = enc.encode(["Sentence Paraphrasing"])
    idx, _ = benchmark(aligner.nearest, q)
    benchmark.extra_info["correct"] = bool(idx[0] == aligner.nearest(q, exact=True)[0][0])
    benchmark.extra_info["n_tags"] = len(aligner.tags)


def test_exact_query(benchmark, aligner, enc):
    benchmark.group = "HNSW query (1 vector)"
    q = enc.encode(["Sentence Paraphrasing"])
    benchmark(aligner.nearest, q, exact=True)


def test_alignment_cache_hit_one_tag(benchmark, aligner):
    benchmark.group = "alignment cache hit"
    aligner.align(["sentence paraphrasing"])
    r = benchmark(aligner.align, ["sentence paraphrasing"])
    assert r.tags


def test_alignment_cache_hit_five_tags(benchmark, aligner):
    benchmark.group = "alignment cache hit"
    tags = ["Text Rewriting", "sentence paraphrasing", "verb tense", "grammar fixes", "english"]
    aligner.align(tags)
    r = benchmark(aligner.align, tags)
    assert r.tags


def test_alignment_lookup_hit(benchmark, aligner):
    benchmark.group = "alignment cache hit"
    aligner.lookup("sentence paraphrasing")
    canon, _ = benchmark(aligner.lookup, "sentence paraphrasing")
    assert canon


@pytest.mark.parametrize("head", [True, False], ids=["instruction-head", "no-head"])
def test_default_tagger_end_to_end(benchmark, tagger, head):
    from tagrouter_fast.tagging.taggers import DefaultTagger

    benchmark.group = "default tagger end to end"
    if not head:
        # The same tagger without the instruction-head pass, measured beside it.
        tagger = DefaultTagger(tagger.encoder, instruction_head=False)
    qs = _queries()
    it = iter(range(10**9))

    def run():
        return tagger.tag(qs[next(it) % len(qs)])

    tags = benchmark.pedantic(run, rounds=min(len(qs), 805), iterations=1, warmup_rounds=5)
    assert tags
    benchmark.extra_info["queries"] = len(qs)


def test_default_tagger_batch_32(benchmark, tagger):
    benchmark.group = "default tagger batch of 32 (per call)"
    qs = _queries()[:32]
    out = benchmark(tagger.tag_batch, qs)
    assert len(out) == len(qs)

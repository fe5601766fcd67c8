"""DefaultTagger.tag against its floor, one encoder pass over the same prompt (`make bench`).

The tagger makes one encoder call per query (the instruction head rides in the same call), so
its p50 should sit just above one encoder pass. `two_calls` is the former path (query and head
in separate encoder calls), kept for comparison. Every benchmark walks the same AlpacaEval
prompts in the same order, one prompt per round, so they see the same input mix.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pytest
from skip_policy import data_absent

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpacaeval2" / "queries.csv"

if not DATA.is_file():
    pytest.skip(data_absent(DATA.parent), allow_module_level=True)

GROUP = "encoder-floor"


def _prompts() -> list[str]:
    with DATA.open(newline="", encoding="utf-8") as f:
        return [r["query_text"] for r in csv.DictReader(f)][:200]


@pytest.fixture(scope="module")
def tagger():
    from tagrouter_fast.tagging.taggers import DefaultTagger

    return DefaultTagger()


def _walker(fn):
    prompts = itertools.cycle(_prompts())
    return lambda: fn(next(prompts))


@pytest.mark.benchmark(group=GROUP)
def test_encoder_one_pass(benchmark, tagger):
    enc, n = tagger.encoder, tagger.max_tokens
    benchmark(_walker(lambda q: enc.encode([q], max_length=n)))


@pytest.mark.benchmark(group=GROUP)
def test_default_tagger_tag(benchmark, tagger):
    benchmark(_walker(tagger.tag))


@pytest.mark.benchmark(group=GROUP)
def test_two_calls_former_path(benchmark, tagger):
    from tagrouter_fast.tagging.taggers.default import instruction_head

    enc, n = tagger.encoder, tagger.max_tokens

    def two(q: str) -> None:
        enc.encode([q], max_length=n)
        h = instruction_head(q)
        if h is not None:
            enc.encode([h], max_length=n)

    benchmark(_walker(two))

"""Queries, the transformers greedy oracle and the decoding-loop checks shared by the generator
export tests (the optimum export and the static-KV GQA export must behave the same)."""

from __future__ import annotations

from typing import Any

from tagrouter_fast.tagging.taggers.generator import TagGeneratorTagger, build_messages

QUERIES = [
    "Rewrite the sentence so that it's in the present tense: She had worked at the company "
    "for the past 3 years.",
    "Write a poem about the sea.",
    "What is the capital of Australia?",
    "hi",
    "Summarize this article about quantum computing, then translate the summary to French "
    "and give me three tips for sleeping better. " * 3,
    "  leading spaces and a {brace} and <|im_end|> literal",
    "\nstarts with a newline",
]
MAX_NEW = 12


def hf_greedy(hf: Any, queries: list[str], max_new: int = MAX_NEW, eos: Any = None) -> list:
    """transformers' greedy tokens for queries in one left-padded batch, cut at the first EOS."""
    import torch

    model, tok = hf
    texts = [
        tok.apply_chat_template(build_messages(q), tokenize=False, add_generation_prompt=True)
        for q in queries
    ]
    enc = tok(texts, return_tensors="pt", padding=True)
    stops = sorted(eos) if eos is not None else model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
        )
    res = []
    for row in out[:, enc.input_ids.shape[1] :].tolist():
        cut = next((i for i, t in enumerate(row) if t in set(stops)), len(row))
        res.append(row[:cut])
    return res


def check_eos_stops_rows_independently(onnx_dir: Any, hf: Any) -> None:
    """Rows of one batch stop at their own EOS, with and without the prefix cache."""
    free = TagGeneratorTagger(onnx_dir, max_new_tokens=MAX_NEW).generate_ids(QUERIES)
    # Declare tokens the model emits mid-sequence as EOS so rows stop at different steps.
    eos = {free[0][3], free[1][6]}
    want = hf_greedy(hf, QUERIES, eos=eos)
    assert len(want[0]) == 3 and len(want[1]) <= 6  # the test does what it says
    for prefix_cache in (True, False):
        tagger = TagGeneratorTagger(
            onnx_dir, max_new_tokens=MAX_NEW, batch_size=4, prefix_cache=prefix_cache
        )
        tagger.eos_ids = frozenset(eos)
        assert tagger.generate_ids(QUERIES) == want


def check_prefix_fallback_when_tokens_differ(onnx_dir: Any, hf: Any) -> None:
    """A cached prefix that no prompt starts with: every query takes the full-prefill path."""
    tagger = TagGeneratorTagger(onnx_dir, max_new_tokens=MAX_NEW, batch_size=4)
    tagger._prefix_ids = tagger._prefix_ids[:-1] + [(tagger._prefix_ids[-1] + 1) % 300]
    assert tagger.generate_ids(QUERIES[:4]) == hf_greedy(hf, QUERIES[:4])
    assert tagger.stats["prefix_hits"] == 0

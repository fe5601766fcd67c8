"""Queries and the transformers greedy oracle shared by the generator export tests."""

from __future__ import annotations

from typing import Any

from tagrouter_fast.taggers.generator import build_messages

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

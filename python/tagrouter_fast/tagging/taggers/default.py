"""The embedded default tagger: tags from a shipped vocabulary, chosen by embedding similarity.

Works right after ``pip install``: no generator model, no download. The query is embedded with the
default ONNX all-MiniLM-L6-v2 encoder and compared with the vocabulary in ``vocab.txt`` (open-domain
tags in the paper's style: task types, domains, skills, output formats, interaction styles). Each
vocabulary tag is represented by several prototypes (its name and short example phrasings written
beside it); its score is the best prototype's cosine similarity. The tagger keeps the best task
type, then fills up to ``k`` tags above ``floor`` with maximal marginal relevance (MMR) so the tags
describe different aspects of the query instead of five synonyms.

Vocabulary file format (``vocab.txt``)::

    ## task                                   <- category for the lines that follow
    Text Rewriting | rewrite this sentence; paraphrase the paragraph
    Geometry                                  <- a tag with no extra prototypes

Lines starting with a single ``#`` are comments.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from tagrouter_fast.tagging.encoder import CHARS_PER_TOKEN

__all__ = ["DefaultTagger", "Vocabulary", "instruction_head", "load_vocabulary", "shape_tags"]

# Categories whose best tag is always considered for the first slot: every query has an intent.
TASK_CATEGORY = "task"

# Surface cues of a query's intent. MiniLM embeddings are dominated by topic words, so a question
# about a movie scores movie tags well but "Question Answering" poorly; a few anchored patterns
# add ``cue_bonus`` to the matching task tag (only if the vocabulary has it). Patterns look at the
# start of the query or at explicit instruction verbs, where intent is stated.
_CUES: tuple[tuple[str, str], ...] = (
    (
        r"^\W*what if\b|\bimagine (?:a|if|that)\b|\bsuppose (?:that|you|i|we)\b",
        "Hypothetical Scenario",
    ),
    (r"^\W*(?:how (?:do|can|should|would|could) (?:i|you|we|one)|how to)\b", "How To Guide"),
    (r"\btranslat(?:e|ion)\b", "Translation"),
    (r"\bsummar(?:y|i[sz]e)\b|\btl;?dr\b", "Summarization"),
    (r"\b(?:rewrite|rephrase|paraphrase|reword)\b", "Text Rewriting"),
    (r"^\W*(?:can you |please )?explain\b|\bexplain (?:to me|how|why|what)\b", "Explanation"),
    (
        r"^\W*(?:who|what|whats|when|where|which|why|is|are|was|were|does|did|"
        r"how (?:much|many|far|long|old|big|tall|often))\b",
        "Question Answering",
    ),
    (r"^\W*(?:please )?(?:write|compose|draft|create|generate)\b", "Text Generation"),
    (r"\b(?:act as|pretend (?:to be|you are)|play the (?:role|part)|role ?play)\b", "Role Play"),
    (r"\b(?:recommend|suggest)\b", "Recommendation"),
    (r"\b(?:classify|categori[sz]e)\b", "Classification"),
    (r"\b(?:brainstorm|come up with|think of some)\b", "Brainstorming"),
)


@dataclass(frozen=True)
class Vocabulary:
    """Parsed ``vocab.txt``.

    Attributes:
        tags: Tag names, in file order.
        categories: Category of each tag.
        prototypes: Texts to embed (names and example phrasings).
        owner: For each prototype, the index of its tag.
        sha256: Hash of the file content (cache key).
    """

    tags: list[str]
    categories: list[str]
    prototypes: list[str]
    owner: np.ndarray
    sha256: str


def load_vocabulary(path: str | Path | None = None) -> Vocabulary:
    """Parse a vocabulary file (default: the shipped ``vocab.txt``).

    Args:
        path: A vocabulary file; ``None`` for the packaged one.

    Returns:
        The :class:`Vocabulary`.

    Raises:
        ValueError: A tag appears twice or the file has no tags.
    """
    if path is None:
        files = resources.files("tagrouter_fast.tagging.taggers")
        text = files.joinpath("vocab.txt").read_text("utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    tags: list[str] = []
    cats: list[str] = []
    protos: list[str] = []
    owner: list[int] = []
    seen: dict[str, int] = {}
    category = "other"
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        if s.startswith("##"):
            category = s[2:].strip().split()[0].lower() if s[2:].strip() else "other"
            continue
        if s.startswith("#"):
            continue
        name, _, hints = s.partition("|")
        name = name.strip()
        key = name.casefold()
        if key in seen:
            raise ValueError(f"vocabulary line {lineno}: duplicate tag {name!r}")
        seen[key] = len(tags)
        idx = len(tags)
        tags.append(name)
        cats.append(category)
        for p in [name, *(h.strip() for h in hints.split(";"))]:
            if p:
                protos.append(p)
                owner.append(idx)
    if not tags:
        raise ValueError("vocabulary has no tags")
    return Vocabulary(
        tags=tags,
        categories=cats,
        prototypes=protos,
        owner=np.asarray(owner, dtype=np.int64),
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
    )


#: Word counts at and beyond which a query is "Long Input" / at and below which it is a "Short
#: Instruction" (AlpacaEval 2.0: ~10% of queries each).
LONG_INPUT_WORDS = 80
SHORT_INSTRUCTION_WORDS = 8

_WORD = re.compile(r"\S+")


def shape_tags(query: str) -> list[str]:
    """Tags for a query's surface shape, which its topic tags do not describe.

    A query that carries its own input text (several lines, or many words) is a bounded task
    that most models answer acceptably; a bare short instruction or an open question leaves
    more room for a strong model to do better. Deterministic and free (no encoder call).

    >>> shape_tags("Summarize in one line:\\nThe cat sat on the mat all day long.")
    ['Multi-line Input']
    >>> shape_tags("Why is the sky blue?")
    ['Short Instruction', 'Question']
    """
    # Exact on any length without splitting the whole text: only whether there are at least
    # LONG_INPUT_WORDS / more than SHORT_INSTRUCTION_WORDS words matters.
    words = sum(1 for _ in islice(_WORD.finditer(query), LONG_INPUT_WORDS))
    out = []
    if "\n" in query and "\n" in query.strip():
        out.append("Multi-line Input")
    if words >= LONG_INPUT_WORDS:
        out.append("Long Input")
    if words <= SHORT_INSTRUCTION_WORDS:
        out.append("Short Instruction")
    if "?" in query:
        out.append("Question")
    return out


_HEAD_END = re.compile(r"[:\n]|[.?!](?=\s|$)")


@functools.cache
def _helper() -> ThreadPoolExecutor:
    """The threads that run instruction heads beside their queries (one per routing thread
    at most is busy; a few suffice for a server's concurrent requests). Created on first use;
    two racing first calls may each build one: the extra pool serves its caller once and is
    collected (its worker exits with it)."""
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="tagrouter-head")


def instruction_head(query: str, max_words: int = 24, min_rest: int = 6) -> str | None:
    """The instruction of a query that carries its own input ("Summarize this abstract: ..."),
    or ``None`` when the query has no separate instruction.

    The head is the text before the first colon, newline or sentence end, if it has at most
    ``max_words`` words and at least ``min_rest`` words follow it. A mean-pooled embedding of the
    whole query is dominated by the input's topic words; the head alone says what to do.

    >>> instruction_head("Summarize this abstract: Deep networks need a lot of labelled data.")
    'Summarize this abstract'
    >>> instruction_head("Write a haiku about autumn leaves") is None
    True
    """
    s = query.strip()
    m = _HEAD_END.search(s)
    if m is None:
        return None
    head = s[: m.start() if m.group() in ":\n" else m.end()].strip()
    n_head = len(head.split())
    if not head or n_head > max_words or len(s.split()) - n_head < min_rest:
        return None
    return head


class DefaultTagger:
    """Offline tagger: embedding similarity to a shipped tag vocabulary, top-k with MMR.

    Args:
        encoder: Sentence encoder (default: :func:`tagrouter_fast.tagging.encoder.default_encoder`).
        k: Maximum tags per query.
        floor: Minimum similarity for a tag (the task slot uses ``task_floor``).
        mmr_lambda: MMR trade-off: 1.0 pure relevance, lower favours diversity.
        task_floor: Minimum similarity for the guaranteed task-type tag.
        relative: Also drop tags scoring below ``top score - relative`` (keeps weak tails out
            of sharply focused queries).
        candidates: How many top-scoring tags MMR considers.
        cue_bonus: Score added to a task tag whose surface cue (e.g. a leading "what if")
            matches the query; 0 disables cues.
        max_tokens: Query tokens embedded (the start of a query carries its intent; shorter
            inputs keep latency low on long prompts).
        vocab: A vocabulary file path or a :class:`Vocabulary`; default the shipped one.
        instruction_head: Score task tags on the query's instruction alone too
            (:func:`instruction_head`), keeping the better score: the task of "Summarize this
            abstract: <200 words about networks>" is then Summarization, not a network topic.
            The heads are embedded in the same encoder call as the queries.
        head_pooling: Take each head's vector from its query's own encoder run (the mean of
            the query's token states over the head's tokens, `OnnxEncoder.encode_prefixed`)
            instead of a run of the head alone: one encoder run per query instead of two.
            The default since 2026-12-07: routing quality measured no different in paired
            comparisons on four pools (docs/eval-results.md, "Instruction head"), and a
            routed query with a head costs 1.10x one encoder pass of CPU instead of 1.70x
            (docs/serving.md). ``False`` runs the head alone, as the tables of
            docs/eval-results.md were measured. Needs an encoder with token outputs; ignored
            otherwise.
        shape_tags: Also emit tags for the query's surface shape (:func:`shape_tags`:
            "Multi-line Input", "Long Input", "Short Instruction", "Question"), after the
            vocabulary tags. Off by default: on AlpacaEval 2.0 they help two pools and hurt two
            (docs/eval-results.md).

    Attributes:
        fingerprint: Stable id of encoder + vocabulary + parameters, for cache keys.

    >>> DefaultTagger().tag("Rewrite in the past tense: I eat apples.")  # doctest: +SKIP
    ['Text Rewriting', 'Verb Tense', ...]
    """

    def __init__(
        self,
        encoder: Any = None,
        *,
        k: int = 5,
        floor: float = 0.3,
        mmr_lambda: float = 0.7,
        task_floor: float = 0.3,
        relative: float = 0.15,
        candidates: int = 30,
        max_tokens: int = 128,
        cue_bonus: float = 0.15,
        vocab: str | Path | Vocabulary | None = None,
        instruction_head: bool = True,
        shape_tags: bool = False,
        head_pooling: bool = True,
    ) -> None:
        if encoder is None:
            from tagrouter_fast.tagging.encoder import default_encoder

            encoder = default_encoder()
        self.encoder = encoder
        self.vocab = vocab if isinstance(vocab, Vocabulary) else load_vocabulary(vocab)
        self.k = int(k)
        self.floor = float(floor)
        self.mmr_lambda = float(mmr_lambda)
        self.task_floor = float(task_floor)
        self.relative = float(relative)
        self.candidates = int(candidates)
        self.max_tokens = int(max_tokens)
        #: Characters of a query the tagger reads: the most the encoder tokenises for
        #: ``max_tokens`` tokens (:meth:`OnnxEncoder.encode` looks at up to 16x its bound).
        self.max_chars = max(self.max_tokens, 1) * CHARS_PER_TOKEN * 16
        self.cue_bonus = float(cue_bonus)
        self.shape_tags = bool(shape_tags)
        self.instruction_head = bool(instruction_head)
        # Pooling the head from the query's own run needs an encoder with token outputs.
        self.head_pooling = bool(head_pooling) and bool(getattr(encoder, "pools_prefixes", False))

        v = self.vocab
        self._proto_emb = self._embed_vocab()
        n_tags = len(v.tags)
        # Tag centroid (mean of its prototypes) for the MMR redundancy term.
        cent = np.zeros((n_tags, self._proto_emb.shape[1]), dtype=np.float32)
        np.add.at(cent, v.owner, self._proto_emb)
        cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
        self._centroids = cent
        self._is_task = np.array([c == TASK_CATEGORY for c in v.categories])
        # Prototypes are grouped by tag (file order), so reduceat gives the per-tag max.
        self._starts = np.flatnonzero(np.r_[True, v.owner[1:] != v.owner[:-1]])
        index = {t: i for i, t in enumerate(v.tags)}
        self._cues = [(re.compile(p, re.IGNORECASE), index[t]) for p, t in _CUES if t in index]
        params = (
            f"{k}|{floor}|{mmr_lambda}|{task_floor}|{relative}|{candidates}|{max_tokens}|"
            f"{cue_bonus}"
            + ("|shape" if self.shape_tags else "")
            + ("|head" if self.instruction_head else "")
            + ("|headpool" if self.head_pooling and self.instruction_head else "")
        )
        h = hashlib.sha256(f"{encoder.fingerprint}|{v.sha256}|{params}".encode())
        self.fingerprint: str = "default-" + h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"DefaultTagger(k={self.k}, floor={self.floor}, tags={len(self.vocab.tags)})"

    def _embed_vocab(self) -> np.ndarray:
        from tagrouter_fast.tagging.cache import cache_dir, load_array, save_array

        v = self.vocab
        path = cache_dir() / "tagger" / f"{self.encoder.fingerprint}-{v.sha256[:16]}.npy"
        arr = load_array(path)
        if arr is None or arr.shape[0] != len(v.prototypes):
            arr = np.asarray(self.encoder.encode(v.prototypes), dtype=np.float32)
            save_array(path, arr)
        return arr

    def _encode(self, queries: list[str]) -> np.ndarray:
        try:
            return np.asarray(
                self.encoder.encode(queries, max_length=self.max_tokens), dtype=np.float32
            )
        except TypeError:  # encoders without a max_length parameter
            return np.asarray(self.encoder.encode(queries), dtype=np.float32)

    def scores(self, query_embedding: np.ndarray) -> np.ndarray:
        """Per-tag score (best prototype cosine) for one unit query embedding.

        Args:
            query_embedding: ``(d,)`` unit vector.

        Returns:
            ``(n_tags,)`` float32.
        """
        proto = np.einsum("kj,j->k", self._proto_emb, query_embedding)
        return np.maximum.reduceat(proto, self._starts)

    def _cue_bonus(self, queries: list[str], n_tags: int) -> np.ndarray:
        """``(n, n_tags)`` score bonus of each query's matching cue tags (zero elsewhere)."""
        bonus = np.zeros((len(queries), n_tags), dtype=np.float32)
        if self.cue_bonus and self._cues:
            for row, query in zip(bonus, queries, strict=True):
                head = query[:300]
                row[[i for rx, i in self._cues if rx.search(head)]] = self.cue_bonus
        return bonus

    def _select(self, s: np.ndarray, top: float | None = None) -> list[str]:
        k = self.k
        if k <= 0:
            return []
        # The relative floor follows the whole query's best match (``top``), not a task score
        # raised by the instruction head, which would crowd out every topic tag.
        top = float(s.max()) if top is None else top
        floor = max(self.floor, top - self.relative)
        n_cand = min(self.candidates, len(s))
        cand = np.argpartition(-s, n_cand - 1)[:n_cand]
        cand = cand[np.argsort(-s[cand], kind="stable")]
        chosen: list[int] = []
        task = np.flatnonzero(self._is_task)
        if len(task):
            best_task = int(task[np.argmax(s[task])])
            if s[best_task] >= self.task_floor:
                chosen.append(best_task)
        pool = [int(c) for c in cand if s[c] >= floor and int(c) not in chosen]
        lam = self.mmr_lambda
        cents = self._centroids
        while pool and len(chosen) < k:
            if chosen:
                red = (cents[pool] @ cents[chosen].T).max(axis=1)
                mmr = lam * s[pool] - (1.0 - lam) * red
                j = int(np.argmax(mmr))
            else:
                j = 0
            chosen.append(pool.pop(j))
        if not chosen:
            # Routing needs at least one tag; the best match is still the best description.
            chosen.append(int(cand[0]))
        return [self.vocab.tags[i] for i in chosen]

    def tag(self, query: str) -> list[str]:
        """Tags of one query.

        Args:
            query: The user query.

        Returns:
            Up to ``k`` vocabulary tags, most relevant first.
        """
        return self.tag_batch([query])[0]

    def _with_shape(self, query: str, tags: list[str]) -> list[str]:
        if not self.shape_tags:
            return tags
        return tags + [t for t in shape_tags(query) if t not in tags]

    def tag_batch(self, queries: Sequence[str]) -> list[list[str]]:
        """Tags of many queries (one encoder call, instruction heads included).

        Args:
            queries: The user queries.

        Returns:
            One tag list per query.
        """
        qs = list(queries)
        if not qs:
            return []
        rows, tops = self._score_rows(qs)
        return [
            self._with_shape(q, self._select(row, top))
            for q, row, top in zip(qs, rows, tops, strict=True)
        ]

    def _score_rows(self, qs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per-tag scores of each query (cues and the instruction head applied), and each
        query's best score before the instruction head."""
        # Nothing past the encoder's furthest look (max_chars) can change a tag, so cut first:
        # a hostile 10 MB query costs what its first max_chars do (shape tags, computed on the
        # whole query in _with_shape, are the only length-derived features).
        qs = [q[: self.max_chars] for q in qs]
        heads = [instruction_head(q) if self.instruction_head else None for q in qs]
        extra = [h for h in heads if h is not None]
        if self.head_pooling and extra:
            return self._score_pooled(qs, heads)
        # One encoder call for queries and heads: the encoder sorts by length, so heads are
        # batched with each other when there are many queries. A single query whose head is
        # much shorter than itself gets two runs instead: padding a 10-token head to the
        # query's 128 tokens costs more than a second, tiny run (benches/test_bench_route_floor:
        # long prompts 2.5x -> 1.3x one encoder pass, identical tags).
        if len(qs) == 1 and extra and 3 * len(extra[0]) < len(qs[0]):
            # The head's run goes on a helper thread beside the query's (onnxruntime sessions
            # run concurrently and release the GIL): its fixed cost, a few ms for a few tokens,
            # overlaps the long run instead of following it (benches/test_bench_route_floor).
            head_run = _helper().submit(self._encode, extra)
            e = np.concatenate([self._encode(qs), head_run.result()])
        else:
            e = self._encode(qs + extra)
        # einsum, not `@`: for these small products multithreaded BLAS fights onnxruntime for
        # the cores and leaves spinning threads that slow the next encoder run (7.8 ms -> 0.5 ms
        # right after an encoder pass, same numbers).
        proto = np.einsum("ij,kj->ik", e, self._proto_emb)  # (n + heads, P)
        per_tag = np.maximum.reduceat(proto, self._starts, axis=1)
        full = per_tag[: len(qs)]
        rows = full.copy()
        k = len(qs)
        for i, h in enumerate(heads):
            if h is not None:
                rows[i, self._is_task] = np.maximum(
                    rows[i, self._is_task], per_tag[k, self._is_task]
                )
                k += 1
        # Cues go on last, so an explicit "pretend to be" still beats a head that reads like a
        # scenario; the relative floor comes from the whole query's scores.
        bonus = self._cue_bonus(qs, full.shape[1])
        return rows + bonus, (full + bonus).max(axis=1)

    def _score_pooled(
        self, qs: list[str], heads: list[str | None]
    ) -> tuple[np.ndarray, np.ndarray]:
        """`_score_rows` with each head's vector pooled from its query's own encoder run
        (``head_pooling``): one run per query, no second run for the head."""
        ends: list[int | None] = []
        for q, h in zip(qs, heads, strict=True):
            # The head is a prefix of the stripped query: skip the leading whitespace.
            ends.append(None if h is None else len(q) - len(q.lstrip()) + len(h))
        full, pre, has = self.encoder.encode_prefixed(  # type: ignore[attr-defined]
            qs, ends, max_length=self.max_tokens
        )
        e = np.concatenate([full, pre[has]])
        proto = np.einsum("ij,kj->ik", e, self._proto_emb)
        per_tag = np.maximum.reduceat(proto, self._starts, axis=1)
        rows = per_tag[: len(qs)].copy()
        k = len(qs)
        for i in np.flatnonzero(has):
            rows[i, self._is_task] = np.maximum(rows[i, self._is_task], per_tag[k, self._is_task])
            k += 1
        bonus = self._cue_bonus(qs, rows.shape[1])
        return rows + bonus, (per_tag[: len(qs)] + bonus).max(axis=1)

    def tag_scored(self, query: str) -> list[tuple[str, float]]:
        """Like :meth:`tag`, with each tag's similarity (for inspection and tuning)."""
        rows, tops = self._score_rows([query])
        s = rows[0]
        index = {t: i for i, t in enumerate(self.vocab.tags)}
        return [(t, float(s[index[t]])) for t in self._select(s, float(tops[0]))]

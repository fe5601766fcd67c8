"""`tagrouter judge`: how a new model gets its judgments.

A model's answers are judged pairwise against the reference answers by an LLM judge behind any
OpenAI-compatible chat-completions endpoint, with the pairwise prompt of the TagRouter paper
(Appendix H, "Prompt for Pairwise Comparison of Model Responses"), paraphrased in
``judge_prompt.txt``. The output is an ``outcomes.csv`` of the routing-table format
(`tagrouter_fast.data.table`): with the queries' ``queries.csv`` beside it, `load_table` reads
it, and `TagScorer.with_model` / the gateway's add-model turn it into a routable model.

Position bias: each pair is judged twice, the model's answer shown first (as A) and then second
(as B). The two verdicts, seen from the model's side, combine as:

- both say the model's answer is better: ``win``; both say the reference is better: ``loss``;
- anything else (a tie in either order, or the orders disagree): ``tie``.

A verdict that flips with the order says more about the order than about the answers, so it
counts as neither a win nor a loss. ``score`` is the mean of the two per-order scores (win 1,
tie 0.5, loss 0), kept as the table's opaque ``score`` column.

Resumable: rows already in ``--out`` for this model are skipped, rows are appended (and
flushed) as each query finishes, so an interrupted run continues where it stopped. A query whose
judge calls keep failing (or whose verdict cannot be read) gets no row: missing, never a loss;
rerun to retry it.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
import random
import re
import string
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "JudgeConfig",
    "JudgeError",
    "JudgeSummary",
    "PromptTemplate",
    "combine",
    "judge_files",
    "load_prompt",
    "parse_verdict",
    "read_answers",
    "read_queries",
]

OUT_COLUMNS = ("query_id", "model", "outcome", "score", "in_chars", "out_chars")
_VERDICT_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


class JudgeError(RuntimeError):
    """The judge endpoint refused the run (bad URL, key or model: a 4xx other than 429), or an
    input file is unusable. The message names the endpoint or the file."""


# ==== Prompt ====


@dataclass(frozen=True)
class PromptTemplate:
    """The judge prompt: a system message and a user message with ``$question``,
    ``$answer_a`` and ``$answer_b`` (`string.Template` syntax, so braces and dollar signs in
    answers are inserted as they are)."""

    system: str
    user: str

    def messages(self, question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
        user = string.Template(self.user).substitute(
            question=question, answer_a=answer_a, answer_b=answer_b
        )
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


def load_prompt(path: str | os.PathLike[str] | None = None) -> PromptTemplate:
    """Reads a prompt file (default: the packaged ``judge_prompt.txt``): a ``### system``
    section and a ``### user`` section.

    Raises:
        JudgeError: a section is missing or the user part lacks a placeholder.
    """
    if path is None:
        text = (
            resources.files("tagrouter_fast.builder")
            .joinpath("judge_prompt.txt")
            .read_text(encoding="utf-8")
        )
        where = "judge_prompt.txt"
    else:
        text = Path(path).read_text(encoding="utf-8")
        where = os.fspath(path)
    m = re.fullmatch(r"\s*### system\n(.*?)\n### user\n(.*)", text, flags=re.S)
    if not m:
        raise JudgeError(f"{where}: expected a '### system' section, then a '### user' section")
    system, user = m.group(1).strip(), m.group(2).strip()
    for name in ("question", "answer_a", "answer_b"):
        if f"${name}" not in user:
            raise JudgeError(f"{where}: the user section lacks ${name}")
    return PromptTemplate(system=" ".join(system.split()), user=user)


_RESULT_RE = re.compile(r'"?compare[ _]result"?\s*[:=]\s*"?\s*([ABC])\b', re.I)


def parse_verdict(text: str) -> str | None:
    """``"A"``, ``"B"`` or ``"C"`` from a judge reply, or None when it gives none.

    Reads the JSON object the prompt asks for (also inside a code fence), else a
    ``compare result: X`` phrase, else a reply that is only the letter.

    >>> parse_verdict('```json\\n{"explanation": "...", "compare result": "B"}\\n```')
    'B'
    >>> parse_verdict("I cannot decide.") is None
    True
    """
    for m in re.finditer(r"\{.*?\}", text, flags=re.S):
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            for key in ("compare result", "compare_result", "verdict"):
                v = obj.get(key)
                if isinstance(v, str) and v.strip().upper() in ("A", "B", "C"):
                    return v.strip().upper()
    found = _RESULT_RE.findall(text)
    if found:
        return str(found[-1]).upper()
    bare = text.strip().strip('"*.`').upper()
    return bare if bare in ("A", "B", "C") else None


def combine(model_first: str, model_second: str) -> tuple[str, float]:
    """``(outcome, score)`` of the model from the verdicts of both orders: ``model_first``
    with the model's answer as A, ``model_second`` with it as B.

    >>> combine("A", "B"), combine("B", "A"), combine("A", "A"), combine("C", "B")
    (('win', 1.0), ('loss', 0.0), ('tie', 0.5), ('tie', 0.75))
    """
    first = {"A": "win", "B": "loss", "C": "tie"}[model_first]
    second = {"A": "loss", "B": "win", "C": "tie"}[model_second]
    score = (_VERDICT_SCORE[first] + _VERDICT_SCORE[second]) / 2
    outcome = first if first == second and first != "tie" else "tie"
    return outcome, score


# ==== Input files ====


def _open_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as e:
        raise JudgeError(f"{path}: not UTF-8 ({e.reason})") from None
    return header, rows


def read_queries(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{query_id: query_text}`` from a ``queries.csv`` of the routing-table format.

    Raises:
        JudgeError: a missing column, an empty or duplicate id (file and line named).
    """
    p = Path(path)
    header, rows = _open_csv(p)
    missing = [c for c in ("query_id", "query_text") if c not in header]
    if missing:
        raise JudgeError(f"{p}:1: missing column(s) {missing}; header is {header}")
    out: dict[str, str] = {}
    for line, row in rows:
        qid = (row.get("query_id") or "").strip()
        if not qid:
            raise JudgeError(f"{p}:{line}: empty query_id")
        if qid in out:
            raise JudgeError(f"{p}:{line}: duplicate query_id {qid!r}")
        out[qid] = row.get("query_text") or ""
    if not out:
        raise JudgeError(f"{p}: no queries")
    return out


@dataclass(frozen=True)
class Answer:
    text: str
    cost_usd: str = ""  # as written in the answers file, passed through


def read_answers(path: str | os.PathLike[str]) -> dict[str, Answer]:
    """Answers by query id from a CSV (``query_id, answer[, cost_usd]``) or a JSON-lines file
    (``{"query_id": ..., "answer": ...[, "cost_usd": ...]}`` per line, ``.jsonl``).

    Raises:
        JudgeError: a missing column or key, a duplicate id, a line that is not JSON.
    """
    p = Path(path)
    out: dict[str, Answer] = {}

    def add(qid: object, text: object, cost: object, where: str) -> None:
        if not isinstance(qid, str) or not qid.strip():
            raise JudgeError(f"{where}: empty or missing query_id")
        if not isinstance(text, str):
            raise JudgeError(f"{where}: 'answer' must be a string")
        if qid.strip() in out:
            raise JudgeError(f"{where}: duplicate query_id {qid.strip()!r}")
        out[qid.strip()] = Answer(text, "" if cost is None else str(cost).strip())

    if p.suffix.lower() in (".jsonl", ".ndjson"):
        try:
            lines = p.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise JudgeError(f"{p}: not UTF-8 ({e.reason})") from None
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise JudgeError(f"{p}:{n}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise JudgeError(f"{p}:{n}: expected a JSON object")
            add(obj.get("query_id"), obj.get("answer"), obj.get("cost_usd"), f"{p}:{n}")
    else:
        header, rows = _open_csv(p)
        missing = [c for c in ("query_id", "answer") if c not in header]
        if missing:
            raise JudgeError(f"{p}:1: missing column(s) {missing}; header is {header}")
        for lineno, row in rows:
            add(row.get("query_id"), row.get("answer") or "", row.get("cost_usd"), f"{p}:{lineno}")
    return out


# ==== Output (resumable) ====


def _existing_rows(out: Path, model: str) -> tuple[list[str] | None, set[str]]:
    """The header of an existing ``--out`` and the query ids it already judged for ``model``.
    A torn last line (an interrupted append) is cut off first."""
    if not out.exists() or out.stat().st_size == 0:
        return None, set()
    data = out.read_bytes()
    if not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with out.open("r+b") as f:
            f.truncate(cut)
    header, rows = _open_csv(out)
    missing = [c for c in ("query_id", "model", "outcome") if c not in header]
    if missing:
        raise JudgeError(f"{out}:1: not an outcomes file (missing {missing}); header is {header}")
    done = {(r.get("query_id") or "").strip() for _, r in rows if r.get("model") == model}
    return header, done


# ==== Talking to the judge ====


@dataclass(frozen=True)
class JudgeConfig:
    """How to call the judge.

    Attributes:
        url: OpenAI-compatible base URL (``http://host:port/v1``); ``/chat/completions`` is
            appended unless the URL already ends with it.
        model: the judge model id sent in each request.
        api_key: sent as ``Authorization: Bearer ...`` when given.
        concurrency: at most this many requests in flight.
        timeout_s: per request (connect, read, write, pool).
        retries: extra attempts after a timeout, a connection error, a 429, a 5xx, or a reply
            that is not a chat completion or holds no verdict.
        backoff_s: first retry delay; doubles per attempt (with jitter), capped at 30 s; a
            ``Retry-After`` header is honoured up to that cap.
        max_chars: question and answers are cut to this many characters (bounded prompts).
        max_tokens, temperature: sent with each request.
    """

    url: str
    model: str
    api_key: str | None = None
    concurrency: int = 8
    timeout_s: float = 60.0
    retries: int = 4
    backoff_s: float = 1.0
    max_chars: int = 16_000
    max_tokens: int = 1024
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise JudgeError(f"judge url must start with http:// or https://, got {self.url!r}")
        if not self.model:
            raise JudgeError("judge model id is empty")
        for name in ("concurrency", "max_chars", "max_tokens"):
            if getattr(self, name) < 1:
                raise JudgeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.retries < 0:
            raise JudgeError(f"retries must be >= 0, got {self.retries}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)) or self.backoff_s < 0:
            raise JudgeError("timeout_s must be > 0 and backoff_s >= 0")

    @property
    def endpoint(self) -> str:
        u = self.url.rstrip("/")
        return u if u.endswith("/chat/completions") else u + "/chat/completions"


class _Retry(Exception):
    def __init__(self, why: str, after: float | None = None) -> None:
        super().__init__(why)
        self.after = after


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... {len(text) - limit} characters cut for the judge]"


async def _ask(
    client: Any,
    cfg: JudgeConfig,
    sem: asyncio.Semaphore,
    messages: list[dict[str, str]],
    failures: list[str],
) -> str | None:
    """One verdict letter, retrying transient failures; None (and the last reason appended to
    ``failures``) when every attempt failed."""
    import httpx

    body = {
        "model": cfg.model,
        "messages": messages,
        "temperature": cfg.temperature,
        "max_tokens": cfg.max_tokens,
    }
    last = ""
    for attempt in range(cfg.retries + 1):
        try:
            async with sem:
                resp = await client.post(cfg.endpoint, json=body)
            if resp.status_code == 429 or resp.status_code >= 500:
                after = resp.headers.get("retry-after")
                raise _Retry(
                    f"HTTP {resp.status_code}", float(after) if _is_number(after) else None
                )
            if resp.status_code >= 400:
                # A bad key, model or URL does not get better by retrying: stop the run.
                raise JudgeError(f"{cfg.endpoint}: HTTP {resp.status_code}: {resp.text[:300]!r}")
            try:
                content = resp.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise _Retry(f"not a chat completion: {resp.text[:200]!r}") from None
            verdict = parse_verdict(content if isinstance(content, str) else "")
            if verdict is None:
                raise _Retry(f"no verdict in the reply: {str(content)[:200]!r}")
            return verdict
        except (_Retry, httpx.TimeoutException, httpx.TransportError) as e:
            last = f"{type(e).__name__}: {e}" if not isinstance(e, _Retry) else str(e)
            if attempt == cfg.retries:
                break
            delay = min(30.0, cfg.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
            if isinstance(e, _Retry) and e.after is not None:
                delay = min(30.0, max(delay, e.after))
            await asyncio.sleep(delay)
    failures.append(last)
    return None


def _is_number(v: str | None) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except ValueError:
        return False


@dataclass
class JudgeSummary:
    """What a run did."""

    judged: int = 0
    skipped_done: int = 0
    no_answer: int = 0
    no_reference: int = 0
    failed: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: {"win": 0, "tie": 0, "loss": 0})
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        o = self.outcomes
        parts = [
            f"judged {self.judged} (win {o['win']}, tie {o['tie']}, loss {o['loss']})",
            f"already in --out {self.skipped_done}",
        ]
        if self.no_answer or self.no_reference:
            parts.append(f"no answer {self.no_answer}, no reference {self.no_reference}")
        if self.failed:
            parts.append(f"FAILED {self.failed} (no row written; rerun to retry)")
        return "; ".join(parts)


async def _run(
    todo: Sequence[tuple[str, str, Answer, Answer]],
    cfg: JudgeConfig,
    prompt: PromptTemplate,
    write: Callable[[str, str, float, Answer], None],
    summary: JudgeSummary,
    show_progress: bool,
) -> None:
    import httpx
    from tqdm.auto import tqdm

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(
        max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency
    )
    sem = asyncio.Semaphore(cfg.concurrency)
    queue: asyncio.Queue[tuple[str, str, Answer, Answer]] = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    bar = tqdm(total=len(todo), desc="judging", unit="query", disable=not show_progress)
    async with httpx.AsyncClient(
        headers=headers, timeout=httpx.Timeout(cfg.timeout_s), limits=limits
    ) as client:

        async def worker() -> None:
            while True:
                try:
                    qid, question, answer, reference = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                q = _clip(question, cfg.max_chars)
                mine, ref = _clip(answer.text, cfg.max_chars), _clip(reference.text, cfg.max_chars)
                first, second = await asyncio.gather(
                    _ask(client, cfg, sem, prompt.messages(q, mine, ref), summary.failures),
                    _ask(client, cfg, sem, prompt.messages(q, ref, mine), summary.failures),
                )
                if first is None or second is None:
                    summary.failed += 1
                else:
                    outcome, score = combine(first, second)
                    write(qid, outcome, score, answer)
                    summary.judged += 1
                    summary.outcomes[outcome] += 1
                bar.update(1)

        # Workers, not one task per query: memory stays bounded by the concurrency.
        workers = [asyncio.create_task(worker()) for _ in range(min(cfg.concurrency, len(todo)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            bar.close()


def judge_files(
    *,
    queries: str | os.PathLike[str],
    answers: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    model: str,
    out: str | os.PathLike[str],
    config: JudgeConfig,
    prompt: PromptTemplate | None = None,
    show_progress: bool = True,
) -> JudgeSummary:
    """Judges ``model``'s answers against the reference answers and appends one outcomes row
    per query to ``out`` (see the module docstring for the rules).

    Args:
        queries: ``queries.csv`` (``query_id, query_text``).
        answers: the model's answers (`read_answers`).
        reference: the reference answers, same format.
        model: the model name written in the ``model`` column.
        out: the ``outcomes.csv`` to create or extend; rows it already has for ``model`` are
            skipped.
        config: the judge endpoint and limits.
        prompt: the judge prompt (default: `load_prompt()`).
        show_progress: a tqdm progress bar on stderr.

    Returns:
        Counts of judged, skipped and failed queries.

    Raises:
        JudgeError: an unusable input file, or the endpoint refused (4xx other than 429).
    """
    if not model or model != model.strip():
        raise JudgeError(f"model name must be non-empty without surrounding spaces: {model!r}")
    qs = read_queries(queries)
    mine, refs = read_answers(answers), read_answers(reference)
    out_path = Path(out)
    header, done = _existing_rows(out_path, model)
    summary = JudgeSummary()
    todo = []
    for qid, text in qs.items():
        if qid in done:
            summary.skipped_done += 1
        elif qid not in mine:
            summary.no_answer += 1
        elif qid not in refs:
            summary.no_reference += 1
        else:
            todo.append((qid, text, mine[qid], refs[qid]))
    columns = header or list(OUT_COLUMNS) + (
        ["cost_usd"] if any(a.cost_usd for a in mine.values()) else []
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("a", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        if header is None:
            w.writeheader()

        def write(qid: str, outcome: str, score: float, answer: Answer) -> None:
            row: Mapping[str, object] = {
                "query_id": qid,
                "model": model,
                "outcome": outcome,
                "score": f"{score:g}",
                "in_chars": len(qs[qid]),
                "out_chars": len(answer.text),
                "cost_usd": answer.cost_usd,
            }
            w.writerow(row)
            f.flush()  # an interrupted run keeps every finished row

        prompt = prompt or load_prompt()
        asyncio.run(_run(todo, config, prompt, write, summary, show_progress))
    summary.failures = list(dict.fromkeys(summary.failures))[:5]  # the distinct reasons
    return summary

"""Parse what a tag generator emits into a clean tag list, never raising.

Generators answer in many shapes: a JSON list of strings, a JSON list of ``{"tag": ...,
"explanation": ...}`` objects (the TagGenerator's training format), a single such object, any of
those inside a Markdown code fence or followed by chatter, a JSON list cut off by the token limit,
comma-separated text, or bullet / numbered lines. :func:`parse_tags` tries them in that order and
returns :class:`ParsedTags`; on garbage it returns no tags with ``ok=False`` and a ``reason``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any, NamedTuple

__all__ = ["MAX_TAG_CHARS", "MAX_TAGS", "ParsedTags", "clean_tag", "parse_tags"]

MAX_TAG_CHARS = 64
MAX_TAGS = 32
# Keys that hold the tag in object-shaped answers, in order of preference.
_TAG_KEYS = ("tag", "Tag", "name", "label", "keyword")
_LIST_KEYS = ("tags", "Tags", "keywords", "labels")

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)(?:```|$)", re.S)
_TAG_FIELD = re.compile(r'"(?:tag|Tag|name|label)"\s*:\s*"((?:[^"\\\n]|\\.)*)"')
_QUOTED = re.compile(r'"((?:[^"\\\n]|\\.)*)"')
_BULLET = re.compile(r"^\s*(?:[-*\u2022+]|\d{1,3}[.)]|[a-zA-Z][.)])\s+(.+?)\s*$")
_LEAD_LABEL = re.compile(r"^\s*(?:tags?|keywords?|labels?)\s*[:\uff1a]\s*", re.I)
_MARKDOWN = re.compile(r"[*_`#]+")
_SPACES = re.compile(r"\s+")


class ParsedTags(NamedTuple):
    """Result of :func:`parse_tags`.

    Attributes:
        tags: Cleaned, de-duplicated tags in output order (empty when ``ok`` is false).
        ok: Whether any tag was found.
        reason: The format recognised (``"json"``, ``"json-partial"``, ``"bullets"``,
            ``"comma-separated"``, ``"single"``) or, when ``ok`` is false, why nothing was.
    """

    tags: list[str]
    ok: bool
    reason: str


def clean_tag(raw: Any, max_chars: int = MAX_TAG_CHARS) -> str | None:
    """Normalise one tag candidate; ``None`` when nothing usable remains.

    Strips whitespace, quotes, Markdown emphasis, control characters and trailing punctuation,
    collapses inner whitespace, and rejects strings longer than ``max_chars`` (those are
    explanations, not tags).

    Args:
        raw: The candidate (non-strings give ``None``).
        max_chars: Longest tag kept.

    Returns:
        The cleaned tag or ``None``.

    >>> clean_tag('  **"Text Rewriting".** ')
    'Text Rewriting'
    """
    if not isinstance(raw, str):
        return None
    s = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in raw)
    s = _MARKDOWN.sub("", s)
    s = _SPACES.sub(" ", s)
    # Quotes and trailing punctuation nest either way round ('"Tag".' and '"Tag."'): strip both
    # until nothing changes.
    prev = None
    while prev != s:
        prev = s
        s = s.strip(" \"'`\u201c\u201d\u2018\u2019[]{}()<>").rstrip(" .,;:!?")
    if not s or len(s) > max_chars:
        return None
    return s


def _from_json(value: Any, depth: int = 0) -> list[Any]:
    """Collect tag candidates from decoded JSON (strings, tag objects, nested lists)."""
    if depth > 4:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        out: list[Any] = []
        for v in value:
            out.extend(_from_json(v, depth + 1))
        return out
    if isinstance(value, dict):
        for k in _TAG_KEYS:
            if k in value:
                return [value[k]] if isinstance(value[k], str) else []
        for k in _LIST_KEYS:
            if k in value:
                return _from_json(value[k], depth + 1)
    return []


def _try_json(text: str) -> list[Any] | None:
    """Decode the first JSON array/object in ``text``, ignoring whatever follows it."""
    dec = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", text):
        try:
            value, _ = dec.raw_decode(text, m.start())
        except (ValueError, RecursionError):
            continue
        cands = _from_json(value)
        if cands:
            return cands
    return None


def _finish(cands: list[Any], reason: str, max_tags: int, max_chars: int) -> ParsedTags:
    seen: set[str] = set()
    tags: list[str] = []
    for c in cands:
        t = clean_tag(c, max_chars)
        if t is None:
            continue
        key = t.casefold()
        if key in seen:
            continue
        seen.add(key)
        tags.append(t)
        if len(tags) >= max_tags:
            break
    if not tags:
        return ParsedTags([], False, f"{reason}: no usable tag after cleaning")
    return ParsedTags(tags, True, reason)


def _split_line_tag(line: str) -> str:
    # "Text Rewriting: the query asks..." / "Text Rewriting - because..." -> the tag part.
    line = _MARKDOWN.sub("", line)
    for sep in (": ", " - ", " \u2013 ", " \u2014 "):
        if sep in line:
            return line.split(sep, 1)[0]
    return line


def parse_tags(
    text: Any, *, max_tags: int = MAX_TAGS, max_chars: int = MAX_TAG_CHARS
) -> ParsedTags:
    """Extract tags from a generator's reply. Never raises.

    Args:
        text: The raw reply (anything; non-strings give ``ok=False``).
        max_tags: Keep at most this many tags.
        max_chars: Drop tags longer than this.

    Returns:
        :class:`ParsedTags` with the tags, whether any were found, and the format or failure.

    >>> parse_tags('```json\\n[{"tag": "Geometry", "explanation": "..."}]\\n``` done').tags
    ['Geometry']
    >>> parse_tags("Poetry, Haiku, poetry").tags
    ['Poetry', 'Haiku']
    >>> parse_tags("").reason
    'empty output'
    """
    try:
        return _parse(text, max_tags, max_chars)
    except Exception as e:  # the contract is "never raises"; a bug here must not kill a batch
        return ParsedTags([], False, f"parser error: {type(e).__name__}")


def _parse(text: Any, max_tags: int, max_chars: int) -> ParsedTags:
    if not isinstance(text, str):
        return ParsedTags([], False, f"not a string ({type(text).__name__})")
    body = text.strip()
    if not body:
        return ParsedTags([], False, "empty output")
    fenced = _FENCE.search(body)
    if fenced and fenced.group(1).strip():
        body = fenced.group(1).strip()

    first = re.search(r"[\[{]", body)
    if first is not None:
        start = first.start()
        try:
            value, _ = json.JSONDecoder().raw_decode(body, start)
        except (ValueError, RecursionError):
            # A JSON answer cut off by max_new_tokens: keep the complete fields before the cut.
            seg = body[start:]
            fields = _TAG_FIELD.findall(seg) or (_QUOTED.findall(seg) if '":' not in seg else [])
            if fields:
                return _finish([_unescape(f) for f in fields], "json-partial", max_tags, max_chars)
        else:
            cands = _from_json(value)
            if cands:
                return _finish(cands, "json", max_tags, max_chars)
            if start == 0:
                return ParsedTags([], False, "no tags found: JSON without tag strings")
        later = _try_json(body[start + 1 :])
        if later:
            return _finish(later, "json", max_tags, max_chars)

    lines = [ln for ln in body.splitlines() if ln.strip()]
    bullets = [m.group(1) for ln in lines if (m := _BULLET.match(ln))]
    if bullets and len(bullets) >= max(1, len(lines) // 2):
        return _finish([_split_line_tag(b) for b in bullets], "bullets", max_tags, max_chars)

    flat = _LEAD_LABEL.sub("", " ".join(lines) if len(lines) <= 2 else lines[0])
    for sep in (",", ";", "\u3001", "\uff0c", "|"):
        if sep in flat:
            parts = [p for p in flat.split(sep)]
            return _finish(parts, "comma-separated", max_tags, max_chars)
    if len(lines) > 1 and all(len(ln) <= max_chars for ln in lines):
        return _finish(lines, "lines", max_tags, max_chars)
    if len(lines) == 1 and len(flat.split()) <= 6:
        return _finish([flat], "single", max_tags, max_chars)
    return ParsedTags([], False, "no tags found: unrecognised format")


def _unescape(s: str) -> str:
    try:
        out = json.loads(f'"{s}"')
        return out if isinstance(out, str) else s
    except ValueError:
        return s

"""Checked reads of JSON body fields: each raises `ProtocolError` naming the field's path, so
the protocol parsers say exactly what is wrong and nothing deeper sees a bad value.

``status`` is 400 for a client's body and 502 for a backend's answer (its fault, not the
client's).

>>> int_field({"max_tokens": 5}, "max_tokens", "max_tokens", lo=1)
5
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from tagrouter_fast.serve.edge.wire import ProtocolError

__all__ = [
    "bool_field", "dumps", "int_field", "list_field", "number_field", "obj", "obj_field",
    "str_field", "str_list",
]


def dumps(value: Any) -> str:
    """Compact JSON, as the wire carries it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _type(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def obj(v: Any, where: str, status: int = 400) -> Mapping[str, Any]:
    if not isinstance(v, dict):
        raise ProtocolError(status, where, f"must be an object, got {_type(v)}")
    return v


def str_field(d: Mapping[str, Any], key: str, where: str, *, required: bool = False,
              status: int = 400) -> str | None:
    v = d.get(key)
    if v is None:
        if required:
            raise ProtocolError(status, where, "missing")
        return None
    if not isinstance(v, str):
        raise ProtocolError(status, where, f"must be a string, got {_type(v)}")
    return v


def bool_field(d: Mapping[str, Any], key: str, where: str) -> bool | None:
    v = d.get(key)
    if v is not None and not isinstance(v, bool):
        raise ProtocolError(400, where, f"must be a boolean, got {_type(v)}")
    return v


def int_field(d: Mapping[str, Any], key: str, where: str, *, lo: int | None = None,
              status: int = 400) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(status, where, f"must be an integer, got {_type(v)}")
    if lo is not None and v < lo:
        raise ProtocolError(status, where, f"must be at least {lo}, got {v}")
    return v


def number_field(d: Mapping[str, Any], key: str, where: str, lo: float, hi: float
                 ) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProtocolError(400, where, f"must be a finite number, got {v!r}")
    if not lo <= v <= hi:
        raise ProtocolError(400, where, f"must be in [{lo:g}, {hi:g}], got {v!r}")
    return float(v)


def obj_field(d: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any] | None:
    v = d.get(key)
    return None if v is None else obj(v, where)


def list_field(d: Mapping[str, Any], key: str, where: str, *, required: bool = False,
               status: int = 400) -> list[Any]:
    v = d.get(key)
    if v is None:
        if required:
            raise ProtocolError(status, where, "missing")
        return []
    if not isinstance(v, list):
        raise ProtocolError(status, where, f"must be an array, got {_type(v)}")
    return v


def str_list(d: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    """A string or an array of strings (OpenAI's ``stop``), as a tuple."""
    v = d.get(key)
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return tuple(v)
    raise ProtocolError(400, where, "must be a string or an array of strings")

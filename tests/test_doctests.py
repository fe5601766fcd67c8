"""The `>>>` examples in the package's docstrings run and give what they show: every module that
holds one is found by walking the source tree, so a new example is tested without a list to
update (and a module whose examples never run is a failure, not a silent pass)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import tagrouter_fast

PACKAGE = Path(tagrouter_fast.__file__).parent


def _modules_with_examples() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if ">>> " not in path.read_text(encoding="utf-8"):
            continue
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


MODULES = _modules_with_examples()


def test_the_walk_finds_the_modules_with_examples() -> None:
    # The walk itself must work: these hold examples today.
    for name in ("tagrouter_fast", "tagrouter_fast.core", "tagrouter_fast.router",
                 "tagrouter_fast.journal", "tagrouter_fast.serve.learn.outcomes"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has examples that never run (all skipped?)"
    assert result.failed == 0

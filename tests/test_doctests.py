"""The `>>>` examples in the public modules' docstrings run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "tagrouter_fast",
    "tagrouter_fast.router",
    "tagrouter_fast.core",
    "tagrouter_fast.journal",
    "tagrouter_fast.tagging.taggers.default",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0

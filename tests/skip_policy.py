"""The reasons a test may skip, and the check that holds every skip to them.

A skip hides a test, so it is allowed only where what is missing is not ours to require:

- ``hardware: ...``: a CUDA GPU (or, for a no-CUDA error path, its absence);
- ``platform: ...``: an OS facility (/proc, FIFOs, /dev/zero) that Linux has and others may not;
- ``shared data absent: ...``: ``../shared/data/alpacaeval2`` lives next to a checkout, not in it;
- ``optional extra 'NAME' ...``: an extra README.md names as optional is not installed.

Anything else (a runtime dependency, the ``test`` extra, maturin, a reason that names no
category) fails the test instead: conftest.py turns such a skip into a failure. Under CI
(``TAGROUTER_REQUIRE_SERVERS=1``, set by .ci/run) the extras `make test` installs must be there
too, so only the extras it does not install (`CI_MAY_LACK`) may skip.
"""

from __future__ import annotations

import os
import re
from collections.abc import Generator
from pathlib import Path
from types import ModuleType

import pytest

#: The extras README.md calls optional: every extra of pyproject.toml but ``test``.
OPTIONAL_EXTRAS = frozenset(
    {"cuda", "export", "eval", "serve", "ray", "demo-llm", "peers", "peers-litellm"}
)
#: The optional extras `make test` does not install (the Makefile's EXTRAS and demo-llm are the
#: rest): the only extras whose absence CI accepts.
CI_MAY_LACK = frozenset({"cuda", "peers", "peers-litellm"})

#: The public AlpacaEval table, next to the checkout (the project's data rules keep it out).
ALPACAEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpacaeval2"

# pytest.importorskip's own reason names only the module: the extra that provides it, for the
# test files that call importorskip without a reason. "test" is not optional: its absence fails.
_MODULE_EXTRA = {
    "starlette": "serve",
    "uvicorn": "serve",
    "httpx": "serve",
    "aiohttp": "serve",
    "redis": "serve",
    "openai": "test",
    "anthropic": "test",
    "httpx2": "test",  # anthropic's own transport in its newer releases
    "playwright": "test",  # the dashboard's browser test (Debian's chromium, no download)
}
# Reasons written before this policy, in test files kept as they are: the category each is in.
_LEGACY = {
    "real-model demo:": "optional extra 'demo-llm': ",  # tests/test_serve_llama_demo.py
    "needs /proc": "platform: ",  # tests/test_serve_outcomes.py
}
_EXTRA = re.compile(r"optional extra '([\w-]+)'")
_IMPORT = re.compile(r"could not import '([\w.]+)'")


def hardware(why: str) -> str:
    """A skip reason for missing (or present) hardware, e.g. ``hardware("needs a CUDA GPU")``."""
    return f"hardware: {why}"


def platform_lacks(why: str) -> str:
    """A skip reason for an OS facility this platform lacks."""
    return f"platform: {why}"


def extra_missing(extra: str, what: str) -> str:
    """A skip reason for an optional extra that is not installed.

    Raises:
        ValueError: ``extra`` is not one of `OPTIONAL_EXTRAS`.
    """
    if extra not in OPTIONAL_EXTRAS:
        raise ValueError(f"{extra!r} is not an optional extra (one of {sorted(OPTIONAL_EXTRAS)})")
    return f"optional extra '{extra}' is not installed (pip install '.[{extra}]'): {what}"


def import_extra(extra: str, module: str) -> ModuleType:
    """``module``, or a skip saying which optional extra provides it."""
    return pytest.importorskip(module, reason=extra_missing(extra, f"no module {module}"))


def data_absent(path: Path) -> str:
    """A skip reason for the shared data missing at ``path``."""
    return f"shared data absent: {path} (the public AlpacaEval table next to this checkout)"


#: Marks a test that reads the shared AlpacaEval table: skipped, saying where, when it is absent.
requires_alpacaeval = pytest.mark.skipif(
    not (ALPACAEVAL / "queries.csv").is_file(), reason=data_absent(ALPACAEVAL)
)


def category(reason: str) -> str | None:
    """``"hardware"``, ``"platform"``, ``"data"``, ``"extra NAME"``, or None for a reason that
    names no allowed category (``NAME`` may be ``test``, which is not optional)."""
    reason = reason.removeprefix("Skipped: ")
    for legacy, kind in _LEGACY.items():
        if reason.startswith(legacy):
            reason = kind + reason
    if reason.startswith("hardware:"):
        return "hardware"
    if reason.startswith("platform:"):
        return "platform"
    if reason.startswith("shared data absent:"):
        return "data"
    if m := _EXTRA.match(reason):
        return f"extra {m.group(1)}"
    if (m := _IMPORT.match(reason)) and (extra := _MODULE_EXTRA.get(m.group(1).split(".")[0])):
        return f"extra {extra}"
    return None


def refusal(reason: str, *, ci: bool) -> str | None:
    """Why a skip with this reason must be a failure, or None when it may stay a skip.

    Args:
        reason: the skip's reason as pytest reports it.
        ci: True under CI (``TAGROUTER_REQUIRE_SERVERS``), where `make test` installed the
            extras not in `CI_MAY_LACK`.
    """
    kind = category(reason)
    if kind is None:
        return (
            f"a skip is allowed only for hardware, platform, absent shared data or an optional "
            f"extra (tests/skip_policy.py), not for: {reason}"
        )
    if kind.startswith("extra "):
        extra = kind.removeprefix("extra ")
        if extra not in OPTIONAL_EXTRAS:
            return f"the {extra!r} extra is required, not optional: {reason}"
        if ci and extra not in CI_MAY_LACK:
            return (
                f"`make test` installs the {extra!r} extra, so under CI "
                f"(TAGROUTER_REQUIRE_SERVERS) its absence is a failure: {reason}"
            )
    return None


# ==== The hooks conftest.py imports: a refused skip is reported as a failure ====


def hold_to_policy(report: pytest.CollectReport | pytest.TestReport) -> None:
    """Turn ``report``, when it is a skip that `refusal` refuses, into a failure saying why."""
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return
    path, lineno, reason = report.longrepr
    ci = bool(os.environ.get("TAGROUTER_REQUIRE_SERVERS"))
    why = refusal(reason.removeprefix("Skipped: "), ci=ci)
    if why is not None:
        report.outcome = "failed"
        # pytest's lineno is 0-based here; shown 1-based like a traceback.
        report.longrepr = f"{path}:{(lineno or 0) + 1}: {why}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    hold_to_policy(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    # A module-level skip refused here is a collection error: the run stops and says why.
    report = yield
    hold_to_policy(report)
    return report

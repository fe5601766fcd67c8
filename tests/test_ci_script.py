"""`.ci/run` fails when a required service cannot be installed: it never turns into skips.

The script runs with a PATH holding only the few tools it needs before `make` and an `apt-get`
that always fails, so no required server (redis-server, chromium) can be found or installed: the
run must stop with an error naming what is missing, before any test runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_run_fails_when_a_required_server_cannot_be_installed(tmp_path: Path) -> None:
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    for tool in ("bash", "dirname", "id", "env", "cat"):
        found = shutil.which(tool)
        assert found, f"{tool} is needed to run .ci/run"
        (fakebin / tool).symlink_to(found)
    apt = fakebin / "apt-get"
    apt.write_text("#!/bin/bash\necho \"E: Unable to locate package $*\" >&2\nexit 100\n")
    apt.chmod(0o755)
    marker = tmp_path / "make-ran"
    make = fakebin / "make"  # reached only if the script went past its checks
    make.write_text(f"#!/bin/bash\ntouch {marker}\n")
    make.chmod(0o755)
    run = subprocess.run(
        [str(fakebin / "bash"), str(ROOT / ".ci" / "run")],
        env={"PATH": str(fakebin), "HOME": os.environ.get("HOME", "/root")},
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode != 0, run.stdout + run.stderr
    assert "could not be installed" in run.stderr
    assert not marker.exists(), "the tests ran although a required server was missing"

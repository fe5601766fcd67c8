"""The ``[shadow]`` table of the gateway config: mode, sampling, judge, limits and prices.

Checked when read, each bad value one `ConfigError` naming ``shadow.<key>``, like the rest of
the config (`tagrouter_fast.serve.config`). What the settings do:
`tagrouter_fast.serve.shadow.runner`.

>>> ShadowConfig.from_dict({"default_model": "big", "judge_url": "x", "judge_model": "j"})
Traceback (most recent call last):
...
tagrouter_fast.serve.config.ConfigError: config error: shadow.judge_url: must be an http(s) URL...
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from tagrouter_fast.serve.config import ConfigError
from tagrouter_fast.serve.shadow.spend import Price

__all__ = ["MODES", "ShadowConfig"]

MODES = ("shadow", "ab", "route")


@dataclass(frozen=True)
class ShadowConfig:
    """The ``[shadow]`` table. Every bad value raises `ConfigError` naming ``shadow.<key>``.

    ``prices`` maps model names to USD per 1k input/output tokens; it must price the default
    model and the judge model (a candidate without a price is never shadow-called: its spend
    could not be capped). ``daily_cap_usd`` None: no cap. ``seed``: the sampling RNG's seed.
    """

    default_model: str
    judge_url: str
    judge_model: str
    mode: str = "shadow"
    sample: float = 0.1
    explore: float = 0.1
    ab_share: float = 0.0
    max_concurrency: int = 8
    daily_cap_usd: float | None = None
    timeout_s: float = 120.0
    judge_api_key_env: str | None = None
    prices: Mapping[str, Price] = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(key: str, problem: str) -> ConfigError:
            return ConfigError(f"shadow.{key}", problem)

        if self.mode not in MODES:
            raise bad("mode", f"must be one of {list(MODES)}, got {self.mode!r}")
        for key in ("default_model", "judge_model", "judge_url"):
            v = getattr(self, key)
            if not isinstance(v, str) or not v.strip():
                raise bad(key, f"must be a non-empty string, got {v!r}")
        if not self.judge_url.startswith(("http://", "https://")):
            raise bad("judge_url", f"must be an http(s) URL, got {self.judge_url!r}")
        for key in ("sample", "explore", "ab_share"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise bad(key, f"must be a number in [0, 1], got {v!r}")
        if self.mode == "ab" and self.ab_share <= 0.0:
            raise bad("ab_share", "mode 'ab' needs a share > 0 of requests routed live")
        if self.mode != "ab" and self.ab_share:
            raise bad("ab_share", f"only applies to mode 'ab' (mode is {self.mode!r})")
        mc = self.max_concurrency
        if isinstance(mc, bool) or not isinstance(mc, int) or not 1 <= mc <= 10_000:
            raise bad("max_concurrency", f"must be an integer in 1..10000, got {mc!r}")
        cap = self.daily_cap_usd
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float))
                                or not math.isfinite(cap) or cap < 0):
            raise bad("daily_cap_usd", f"must be a finite number >= 0, got {cap!r}")
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (
                math.isfinite(t) and t > 0):
            raise bad("timeout_s", f"must be a finite number > 0, got {t!r}")
        env = self.judge_api_key_env
        if env is not None and (not isinstance(env, str) or not env.strip()):
            raise bad("judge_api_key_env", f"must be a non-empty string, got {env!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or
                                      not isinstance(self.seed, int)):
            raise bad("seed", f"must be an integer, got {self.seed!r}")
        for name, p in self.prices.items():
            if not isinstance(p, Price):
                raise bad(f"prices.{name}", f"must be a Price, got {type(p).__name__}")
        for who, model in (("default_model", self.default_model),
                           ("judge_model", self.judge_model)):
            if model not in self.prices:
                raise bad("prices", f"no price for the {who.split('_')[0]} model {model!r}: "
                          f"add [shadow.prices.{model}] input_per_1k, output_per_1k")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ShadowConfig:
        """The config from a parsed ``[shadow]`` TOML table.

        >>> cfg = ShadowConfig.from_dict({
        ...     "default_model": "big", "judge_url": "http://judge:8000/v1", "judge_model": "j",
        ...     "prices": {"big": {"input_per_1k": 0.01, "output_per_1k": 0.03},
        ...                "j": {"input_per_1k": 0.001, "output_per_1k": 0.002}}})
        >>> cfg.mode, cfg.prices["big"].output_per_1k
        ('shadow', 0.03)
        """
        if not isinstance(raw, Mapping):
            raise ConfigError("shadow", f"must be a table, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        for key in raw:
            if key not in known:
                raise ConfigError(f"shadow.{key}", "unknown key")
        for key in ("default_model", "judge_url", "judge_model"):
            if key not in raw:
                raise ConfigError(f"shadow.{key}", "missing")
        args = dict(raw)
        prices = args.pop("prices", {})
        if not isinstance(prices, Mapping):
            raise ConfigError("shadow.prices", "must be a table of [shadow.prices.<model>]")
        parsed: dict[str, Price] = {}
        for model, p in prices.items():
            where = f"shadow.prices.{model}"
            if not isinstance(p, Mapping) or set(p) != {"input_per_1k", "output_per_1k"}:
                raise ConfigError(where, f"must be a table with exactly input_per_1k and "
                                  f"output_per_1k, got {p!r}")
            try:
                parsed[str(model)] = Price(p["input_per_1k"], p["output_per_1k"])
            except ValueError as e:
                raise ConfigError(where, str(e)) from None
        return cls(prices=parsed, **args)

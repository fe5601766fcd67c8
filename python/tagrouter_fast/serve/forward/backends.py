"""A configured backend: its config, resolved credentials, URLs and per-phase timeouts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tagrouter_fast.serve.config import BackendConfig, ConfigError
from tagrouter_fast.serve.forward.client import Timeouts

__all__ = ["Backend"]


@dataclass(frozen=True)
class Backend:
    """A configured backend with its resolved credentials and URLs."""

    config: BackendConfig
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def model(self) -> str:
        return self.config.model

    @classmethod
    def from_config(cls, cfg: BackendConfig, where: str = "backends") -> Backend:
        """Reads the API key from ``cfg.api_key_env``.

        Raises:
            ConfigError: the environment variable is named but not set.
        """
        headers = {"content-type": "application/json", "accept": "application/json"}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ConfigError(
                    f"{where}.api_key_env",
                    f"environment variable {cfg.api_key_env} is not set",
                )
            headers["authorization"] = f"Bearer {key}"
        return cls(cfg, headers)

    def url(self, path: str) -> str:
        return self.config.base_url + path

    def timeouts(self, *, stream: bool) -> Timeouts:
        c = self.config
        # The read timeout is per read, not per call: the call's deadline (timeout_s) is
        # enforced around it (anyio.fail_after); for streams the read timeout is the idle limit.
        read = c.stream_idle_timeout_s if stream else c.timeout_s
        return Timeouts(connect_s=c.connect_timeout_s, read_s=read, pool_s=c.timeout_s)

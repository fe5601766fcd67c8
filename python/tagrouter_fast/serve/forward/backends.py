"""A configured backend: its config, resolved credentials, URLs, per-phase timeouts and the
token count of its tokenizer (when it names one)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tagrouter_fast.serve.config import BackendConfig, ConfigError
from tagrouter_fast.serve.forward.client import Timeouts

__all__ = ["Backend"]


@dataclass(frozen=True)
class Backend:
    """A configured backend with its resolved credentials and URLs."""

    config: BackendConfig
    headers: dict[str, str] = field(default_factory=dict)
    #: Tokens of a text by the backend's own tokenizer (``tokenizer`` in its config); None:
    #: the context check uses the estimate.
    count_tokens: Callable[[str], int] | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def model(self) -> str:
        return self.config.model

    @property
    def protocol(self) -> str:
        return self.config.protocol

    @classmethod
    def from_config(cls, cfg: BackendConfig, where: str = "backends") -> Backend:
        """Reads the API key from ``cfg.api_key_env`` (a bearer token, or Anthropic's
        ``x-api-key`` with its ``anthropic-version``) and loads ``cfg.tokenizer``.

        Raises:
            ConfigError: the environment variable is named but not set; the tokenizer file
                cannot be loaded.
        """
        headers = {"content-type": "application/json", "accept": "application/json"}
        key = None
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ConfigError(
                    f"{where}.api_key_env",
                    f"environment variable {cfg.api_key_env} is not set",
                )
        if cfg.protocol == "anthropic":
            headers["anthropic-version"] = ANTHROPIC_VERSION
            if key:
                headers["x-api-key"] = key
        elif key:
            headers["authorization"] = f"Bearer {key}"
        count = None if cfg.tokenizer is None else _load_tokenizer(cfg.tokenizer,
                                                                    f"{where}.tokenizer")
        return cls(cfg, headers, count)

    def url(self, path: str) -> str:
        return self.config.base_url + path

    def chat_path(self) -> str:
        """Where a conversation goes: ``/messages`` (Anthropic) or ``/chat/completions``."""
        return "/messages" if self.config.protocol == "anthropic" else "/chat/completions"

    def timeouts(self, *, stream: bool) -> Timeouts:
        c = self.config
        # The read timeout is per read, not per call: the call's deadline (timeout_s) is
        # enforced around it (anyio.fail_after); for streams the read timeout is the idle limit.
        read = c.stream_idle_timeout_s if stream else c.timeout_s
        return Timeouts(connect_s=c.connect_timeout_s, read_s=read, pool_s=c.timeout_s)


#: The Messages API version of the bodies the gateway writes (an Anthropic backend requires the
#: header); the same as `edge.anthropic_messages.ANTHROPIC_VERSION`.
ANTHROPIC_VERSION = "2023-06-01"


def _load_tokenizer(path: Path, where: str) -> Callable[[str], int]:
    """The token count of a `tokenizers` JSON file (special tokens left out: the chat template's
    few are within the margin a context limit should keep anyway)."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises its own Exception subclass for any bad file
        raise ConfigError(where, f"cannot load {path} as a tokenizers JSON file ({e})") from None

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids)

    return count

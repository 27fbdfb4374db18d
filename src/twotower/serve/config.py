"""The server's settings, importable without torch or fastapi (`twotower serve --help` shows their
defaults before anything heavy is loaded)."""

from __future__ import annotations

from dataclasses import dataclass

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    """Server limits and defaults, checked when the server starts."""

    model_name: str = "twotower"
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS  # Host headers accepted when no key is set
    max_prompt_tokens: int = 2048
    max_tokens_limit: int = 1024
    default_max_tokens: int = 128
    max_body_bytes: int = 1 << 20
    max_queue: int = 64  # requests waiting for the worker; more get 429
    max_batch_size: int = 16
    batch_wait: float = 0.01  # seconds the worker waits for compatible requests to join a batch
    request_timeout: float = 120.0  # seconds from arrival to the last token
    read_timeout: float = 10.0  # seconds a connection has to send a whole request before it is closed
    refuse_late_work: bool = True  # refuse (429) requests that the measured speed says cannot finish in time

    def validate(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty; give a non-empty key or none")
        for name in ("max_prompt_tokens", "max_tokens_limit", "default_max_tokens", "max_body_bytes", "max_queue",
                     "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.request_timeout > 0 and self.read_timeout > 0):
            raise ValueError("request_timeout and read_timeout must be > 0")

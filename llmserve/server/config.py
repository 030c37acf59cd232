"""Server configuration: where to listen, what to call the model, and the limits it enforces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ServerConfig:
    """HTTP-side settings; the engine has its own EngineConfig."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = "default"
    api_key: str | None = None  # None: no authentication
    max_waiting: int = 1024  # engine waiting-queue length beyond which requests get 429
    max_body_bytes: int = 1 << 20
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish on shutdown
    max_n: int = 16  # most choices one request may ask for
    retry_after_s: int = 1  # the Retry-After hint sent with 429
    build_retry_after_s: int = 5  # the Retry-After hint sent with 503 for a model still being built

    def __post_init__(self) -> None:
        assert 0 <= self.port < 65536, f"port must be in [0, 65535], got {self.port}"
        assert self.served_model_name, "served_model_name must not be empty"
        assert self.api_key is None or self.api_key, "api_key must be None or non-empty"
        assert self.max_waiting >= 1, f"max_waiting must be >= 1, got {self.max_waiting}"
        assert self.max_body_bytes >= 1024, f"max_body_bytes must be >= 1024, got {self.max_body_bytes}"
        assert self.shutdown_timeout >= 0, f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}"
        assert self.build_retry_after_s >= 1, f"build_retry_after_s must be >= 1, got {self.build_retry_after_s}"
        assert self.max_n >= 1, f"max_n must be >= 1, got {self.max_n}"

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
    # requests accepted but not running (not yet started, or preempted) beyond which new ones get 429
    max_waiting: int = 1024
    max_body_bytes: int = 1 << 20
    # 20 s drain + 2 s abort grace + connection close stays inside Kubernetes' default 30 s grace period
    shutdown_timeout: float = 20.0  # seconds in-flight requests get to finish on shutdown
    max_n: int = 16  # most choices one request may ask for
    retry_after_s: int = 1  # the Retry-After hint sent with 429
    build_retry_after_s: int = 5  # the Retry-After hint sent with 503 for a model still being built
    body_timeout: float = 30.0  # seconds to receive a whole request body once its headers arrived (408 beyond)
    # idle keep-alive connections, and headers still arriving, are closed after this many seconds;
    # above the 60 s idle timeout of common proxies and load balancers, so they close first
    keepalive_timeout: float = 75.0
    sse_keepalive_s: float = 15.0  # a `: keep-alive` comment after this many silent seconds in a stream; 0: none
    queue_timeout: float | None = None  # seconds a request may wait to start before a 503; None: no limit
    # "auto": the model's generation_config.json gives the sampling defaults of omitted fields; "none": the API's
    generation_config: str = "auto"
    # max_tokens of a request that sets none (both endpoints), before the model's generation_config.json and
    # the API's defaults; None: those decide (chat: the rest of the context, completions: 16)
    default_max_tokens: int | None = None
    # Host header names answered, any port ("*": any); None: loopback names when `host` is a loopback
    # address (a page on another site cannot reach the server through DNS rebinding), else any
    allowed_hosts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        assert 0 <= self.port < 65536, f"port must be in [0, 65535], got {self.port}"
        assert self.served_model_name, "served_model_name must not be empty"
        assert self.api_key is None or self.api_key, "api_key must be None or non-empty"
        assert self.max_waiting >= 1, f"max_waiting must be >= 1, got {self.max_waiting}"
        assert self.max_body_bytes >= 1024, f"max_body_bytes must be >= 1024, got {self.max_body_bytes}"
        assert self.shutdown_timeout >= 0, f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}"
        assert self.build_retry_after_s >= 1, f"build_retry_after_s must be >= 1, got {self.build_retry_after_s}"
        assert self.max_n >= 1, f"max_n must be >= 1, got {self.max_n}"
        assert self.generation_config in ("auto", "none"), f"generation_config must be auto or none, got {self.generation_config!r}"
        assert self.default_max_tokens is None or self.default_max_tokens >= 1, (
            f"default_max_tokens must be >= 1 or None, got {self.default_max_tokens}")
        assert self.body_timeout > 0, f"body_timeout must be > 0, got {self.body_timeout}"
        assert self.keepalive_timeout > 0, f"keepalive_timeout must be > 0, got {self.keepalive_timeout}"
        assert self.sse_keepalive_s >= 0, f"sse_keepalive_s must be >= 0, got {self.sse_keepalive_s}"
        assert self.queue_timeout is None or self.queue_timeout > 0, (
            f"queue_timeout must be > 0 or None, got {self.queue_timeout}")
        assert self.allowed_hosts is None or (self.allowed_hosts and all(self.allowed_hosts)), (
            f"allowed_hosts must be None or a list of host names, got {self.allowed_hosts}")

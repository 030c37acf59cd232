"""Engine configuration: one validated dataclass per concern, passed explicitly."""

from __future__ import annotations

import re
from dataclasses import dataclass

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass(slots=True)
class CacheConfig:
    """Paged KV cache: block size and how much memory the blocks may take."""

    block_size: int = 16
    # Bytes for the KV cache on CPU; on CUDA, None means "a fraction of free memory".
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.90
    num_blocks: int | None = None  # overrides the memory budget (tests use tiny pools)
    enable_prefix_caching: bool = True
    # "auto": the model dtype; "fp8": e4m3 K/V (CUDA), half the bytes a decode step reads
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        _check(self.kv_cache_dtype in ("auto", "fp8"), f"unknown kv_cache_dtype {self.kv_cache_dtype!r}")
        _check(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
               f"block_size must be a power of two, got {self.block_size}")
        _check(0.0 < self.gpu_memory_utilization <= 1.0,
               f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _check(self.num_blocks is None or self.num_blocks > 0, f"num_blocks must be positive, got {self.num_blocks}")
        _check(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
               f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}")


@dataclass(slots=True)
class SchedulerConfig:
    """In-flight batching limits: tokens per step, sequences per step, context length."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int = 8192
    max_waiting: int = 1024  # beyond this, new requests are refused (HTTP 429)
    # queue step N+1 on the device before step N's tokens reach the host; None: on for CUDA
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        _check(self.max_num_batched_tokens > 0,
               f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        _check(self.max_num_seqs > 0, f"max_num_seqs must be positive, got {self.max_num_seqs}")
        _check(self.max_model_len > 0, f"max_model_len must be positive, got {self.max_model_len}")


@dataclass(slots=True)
class DeviceConfig:
    """Where and in which precision the model runs."""

    device: str = "cpu"
    dtype: str = "float32"  # float32 | float16 | bfloat16
    enforce_eager: bool = False  # CUDA only: no CUDA graphs
    quantization: str | None = None  # "int8": CPU int8 weights and dynamic activations

    def __post_init__(self) -> None:
        _check(_DEVICE.fullmatch(self.device) is not None, f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        _check(self.dtype in ("float32", "float16", "bfloat16"), f"unknown dtype {self.dtype!r}")
        _check(self.quantization in (None, "int8"), f"unknown quantization {self.quantization!r}")
        _check(self.quantization is None or self.device == "cpu",
               f"int8 quantization runs on CPU only, got device {self.device!r}")


@dataclass(slots=True)
class ParallelConfig:
    """Tensor x pipeline parallel ranks, one worker process each (rank 0 is the engine core's)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # a collective (all-reduce, stage hand-off, sampled-token broadcast) waiting longer than this
    # means a rank died or hung: the step fails and the engine stops
    step_timeout_s: float = 120.0
    # where the ranks meet (tcp://HOST:PORT); None: a free port on this host
    distributed_init_method: str | None = None
    # ranks this host runs, rank 0 included; the others join from other hosts (`llmserve worker`)
    local_ranks: int | None = None
    # steps in flight at once over disjoint requests; None: one per pipeline stage (1: no overlap)
    pipeline_depth: int | None = None

    def __post_init__(self) -> None:
        _check(self.tensor_parallel_size >= 1, f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        _check(self.pipeline_parallel_size >= 1,
               f"pipeline_parallel_size must be >= 1, got {self.pipeline_parallel_size}")
        _check(self.step_timeout_s > 0, f"step_timeout_s must be positive, got {self.step_timeout_s}")
        _check(self.pipeline_depth is None or self.pipeline_depth >= 1,
               f"pipeline_depth must be >= 1, got {self.pipeline_depth}")
        _check(self.local_ranks is None or 1 <= self.local_ranks <= self.world_size,
               f"local_ranks must be in [1, {self.world_size}], got {self.local_ranks}")
        _check(self.local_ranks in (None, self.world_size) or self.distributed_init_method is not None,
               "ranks on other hosts need --dist-init-method tcp://HOST:PORT (an address they can reach)")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs besides the model weights."""

    model: str = "default"
    cache: CacheConfig | None = None
    scheduler: SchedulerConfig | None = None
    device: DeviceConfig | None = None
    parallel: ParallelConfig | None = None
    seed: int = 0
    # the server runs the engine core in its own process; True keeps it in the API process (debugging)
    engine_in_process: bool = False
    # throwaway requests at start-up, so Triton compiles before the first request; None: on CUDA only
    warmup: bool | None = None

    def __post_init__(self) -> None:
        self.cache = self.cache or CacheConfig()
        self.scheduler = self.scheduler or SchedulerConfig()
        self.device = self.device or DeviceConfig()
        self.parallel = self.parallel or ParallelConfig()
        _check(self.parallel.world_size == 1 or self.device.quantization is None,
               "int8 quantization runs with tp=1 and pp=1 only")
        _check(self.cache.kv_cache_dtype == "auto" or self.device.device.startswith("cuda"),
               "kv_cache_dtype fp8 needs CUDA (the CPU kernels are float32)")


def _check(ok: bool, message: str) -> None:
    # ValueError, not assert: a bad flag is the user's error (one line from the CLI), and -O keeps the checks.
    if not ok:
        raise ValueError(message)

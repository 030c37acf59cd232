"""Build profiles: the limits an engine is built for, read from YAML or TOML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import tomllib

BACKENDS = ("native", "trtllm")
DEVICES = ("any", "cpu", "cuda")  # the kind of target a profile is written for
DTYPES = ("float32", "float16", "bfloat16")
# trtllm-build --gemm_plugin choices (tensorrt_llm/plugin/plugin.py PLUGIN_DTYPE_OPTIONS_MAP["gemm_plugin"]).
GEMM_PLUGINS = ("auto", "disable", "float16", "bfloat16", "float32", "int32", "fp8", "nvfp4")


@dataclass(slots=True)
class BuildProfile:
    """What to build: backend, weight dtype, batch/token/length limits, KV block size, parallelism."""

    name: str
    backend: str = "native"  # native | trtllm
    device: str = "any"  # any | cpu | cuda: builds for another target kind are refused
    dtype: str = "float32"
    max_batch_size: int = 64  # trtllm-build --max_batch_size; native: SchedulerConfig.max_num_seqs
    max_num_tokens: int = 2048  # --max_num_tokens; native: max_num_batched_tokens
    max_seq_len: int = 8192  # --max_seq_len; native: max_model_len
    max_input_len: int = 1024  # --max_input_len (ignored by trtllm with packed input + context FMHA)
    kv_block_size: int = 16  # --tokens_per_block; native: CacheConfig.block_size
    tp_size: int = 1
    pp_size: int = 1
    # trtllm-only knobs (the native backend ignores them)
    gemm_plugin: str = "auto"
    use_paged_context_fmha: bool = True
    use_fused_mlp: bool = True
    multiple_profiles: bool = False

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name,
               f"profile name must be non-empty without '/', got {self.name!r}")
        _check(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        _check(self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}")
        _check(self.backend != "trtllm" or self.device != "cpu",
               "backend trtllm builds for CUDA GPUs only; use device cuda (or any)")
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for field in ("max_batch_size", "max_num_tokens", "max_seq_len", "max_input_len", "tp_size", "pp_size"):
            value = getattr(self, field)
            _check(isinstance(value, int) and value >= 1, f"{field} must be a positive integer, got {value!r}")
        block = self.kv_block_size
        _check(isinstance(block, int) and block > 0 and block & (block - 1) == 0,
               f"kv_block_size must be a power of two, got {block!r}")
        _check(self.max_input_len <= self.max_seq_len,
               f"max_input_len ({self.max_input_len}) must not exceed max_seq_len ({self.max_seq_len})")
        _check(self.gemm_plugin in GEMM_PLUGINS, f"gemm_plugin must be one of {GEMM_PLUGINS}, got {self.gemm_plugin!r}")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check_target(self, target: dict) -> None:
        """Raise ValueError when this profile is written for another kind of target than `target`."""
        kind = str(target.get("kind"))
        if self.device not in ("any", kind):
            raise ValueError(
                f"build profile {self.name!r} is written for {self.device.upper()} (`device: {self.device}`) but the "
                f"build target is {kind.upper()}; build it with `--device {self.device}`, or use a profile "
                f"written for {kind.upper()} (`device: {kind}` or `device: any`)")

    def engine_overrides(self) -> dict[str, dict[str, int]]:
        """CacheConfig / SchedulerConfig field values this profile fixes, keyed 'cache' and 'scheduler'."""
        return {"cache": {"block_size": self.kv_block_size},
                "scheduler": {"max_num_seqs": self.max_batch_size, "max_num_batched_tokens": self.max_num_tokens,
                              "max_model_len": self.max_seq_len}}


def profile_from_dict(raw: dict, default_name: str = "") -> BuildProfile:
    """A validated profile from a mapping; unknown keys are refused by name."""
    known = {f.name for f in dataclasses.fields(BuildProfile)}
    unknown = sorted(set(raw) - known)
    _check(not unknown, f"unknown build profile fields {unknown}; known: {sorted(known)}")
    return BuildProfile(**{"name": default_name, **raw})


def load_profile(path: str | Path) -> BuildProfile:
    """Read a profile from `.yaml`/`.yml` or `.toml`; the name defaults to the file stem."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"build profile {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    elif path.suffix == ".toml":
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"build profile {path} is not valid TOML: {exc}") from exc
    else:
        raise ValueError(f"build profile {path} must end in .yaml, .yml or .toml")
    _check(isinstance(raw, dict), f"build profile {path} must hold a mapping, got {type(raw).__name__}")
    return profile_from_dict(raw, default_name=path.stem)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)

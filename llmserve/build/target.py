"""The build target (CPU, or a CUDA GPU's compute capability) and the library versions of a build."""

from __future__ import annotations

import importlib.metadata
import importlib.util


class NoCudaDeviceError(RuntimeError):
    """A CUDA device was asked for on a machine without a usable one."""


def current_target(device: str = "cpu") -> dict:
    """{'kind': 'cpu'} or {'kind': 'cuda', 'compute_capability': 'sm_90', 'device_name': ...} for `device`."""
    if not device.startswith("cuda"):
        return {"kind": "cpu"}
    import torch

    if not torch.cuda.is_available():
        raise NoCudaDeviceError(f"device {device!r} requested but this machine has no usable CUDA GPU "
                                f"(torch {torch.__version__}); use --device cpu")
    index = torch.device(device).index or 0
    major, minor = torch.cuda.get_device_capability(index)
    return {"kind": "cuda", "compute_capability": f"sm_{major}{minor}",
            "device_name": torch.cuda.get_device_name(index)}


def target_key(target: dict) -> str:
    """A folder-name-safe id of `target`: 'cpu' or 'cuda-sm_90'."""
    if target.get("kind") == "cpu":
        return "cpu"
    return f"{target['kind']}-{target.get('compute_capability', 'unknown')}"


def same_target(a: dict, b: dict) -> bool:
    """Engines are portable across devices of one kind and compute capability (device name is informative)."""
    return target_key(a) == target_key(b)


def describe(target: dict) -> str:
    """Human string: 'CPU' or 'CUDA sm_90 (NVIDIA H100 80GB HBM3)'."""
    if target.get("kind") == "cpu":
        return "CPU"
    name = target.get("device_name")
    return f"CUDA {target.get('compute_capability', '?')}" + (f" ({name})" if name else "")


def library_versions() -> dict[str, str]:
    """Versions of the libraries a build depends on; tensorrt_llm only when importable."""
    versions = {}
    for package in ("torch", "transformers", "safetensors", "llmserve"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "unknown"
    if importlib.util.find_spec("tensorrt_llm") is not None:  # metadata only: importing it needs a GPU
        try:
            versions["tensorrt_llm"] = importlib.metadata.version("tensorrt_llm")
        except importlib.metadata.PackageNotFoundError:
            versions["tensorrt_llm"] = "unknown"
    return versions

"""What every quantized scheme does to the native model: swap its decoder linears for quantized ones,
and read a checkpoint's quantized tensors under the native modules' names."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from llmserve.checkpoint import names

# the native model's decoder linears (mlp.gate_up holds TensorRT-LLM's mlp.fc then mlp.gate)
NATIVE_LINEARS = ("attention.qkv", "attention.dense", "mlp.gate_up", "mlp.proj")
NATIVE_SCALE_NAMES = {names.WEIGHT_SCALE: "weight_scale", names.INPUT_SCALE: "input_scale",
                      names.PREQUANT_SCALE: "prequant_scale"}

Tensors = Iterable[tuple[str, torch.Tensor]]


def replace_linears(model: nn.Module, make: Callable[[int, str, nn.Module], nn.Module]) -> None:
    """Replace each decoder layer's linear at `NATIVE_LINEARS` by `make(layer index, path, linear)`."""
    for i, layer in enumerate(model.transformer.layers):
        for path in NATIVE_LINEARS:
            parent_name, child = path.split(".")
            parent = getattr(layer, parent_name)
            setattr(parent, child, make(i, path, getattr(parent, child)))


def native_tensors(tensors: Tensors, quant_algo: str,
                   fuse_gate_up: Callable[[str, dict[str, torch.Tensor]], Tensors]) -> Iterator[tuple[str, torch.Tensor]]:
    """A quantized checkpoint's tensors under the native modules' names: scales renamed, and each layer's
    `mlp.fc` + `mlp.gate` tensors handed, once all have arrived, to `fuse_gate_up(mlp prefix, parts)`
    (parts keyed `fc.weight`, `gate.weights_scaling_factor`, ...), which yields the `mlp.gate_up` ones."""
    per_layer = 2 * (1 + len(names.QUANT_SCALES[quant_algo]))  # fc and gate: a weight and its scales each
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        prefix, _, leaf = name.rpartition(".")
        module_prefix, _, module = prefix.rpartition(".")
        if module in ("fc", "gate") and module_prefix.endswith(".mlp"):
            parts = pending.setdefault(module_prefix, {})
            parts[f"{module}.{leaf}"] = tensor
            if len(parts) == per_layer:
                yield from fuse_gate_up(module_prefix, pending.pop(module_prefix))
            continue
        yield (f"{prefix}.{NATIVE_SCALE_NAMES[leaf]}", tensor) if leaf in NATIVE_SCALE_NAMES else (name, tensor)
    assert not pending, f"{quant_algo} gate/up tensors incomplete for {sorted(pending)}"


def shared_prequant(mlp: str, parts: dict[str, torch.Tensor], scaling: str) -> torch.Tensor:
    """The one prequant scale (float32) of a layer's `mlp.fc` and `mlp.gate`, which the native runtime runs
    as one GEMM; ValueError when the checkpoint scaled them differently (`scaling`: "smoothed", ...)."""
    fc, gate = parts[f"fc.{names.PREQUANT_SCALE}"].float(), parts[f"gate.{names.PREQUANT_SCALE}"].float()
    if not torch.allclose(fc, gate, rtol=1e-3):
        raise ValueError(f"{mlp}: mlp.fc and mlp.gate are {scaling} differently; llmserve runs them as one GEMM "
                         f"and needs one prequant_scaling_factor for both")
    return fc

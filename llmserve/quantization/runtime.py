"""Which module runs a checkpoint's `quant_algo` in the native runtime (the loader's one entry here)."""

from __future__ import annotations


def scheme(quant_algo: str):
    """The module running one `quant_algo` natively: its `use_linears(model)` swaps the decoder's linears,
    its `checkpoint_tensors(tensors)` renames a checkpoint's tensors for them."""
    if quant_algo == "FP8":
        from llmserve.quantization import fp8
        return fp8
    if quant_algo == "W8A8_SQ_PER_CHANNEL":
        from llmserve.quantization import int8_sq
        return int8_sq
    if quant_algo in ("W8A16", "W4A16_AWQ"):
        from llmserve.quantization.weight_only import NativeScheme
        return NativeScheme(quant_algo)
    raise ValueError(f"quant_algo {quant_algo} has no native runtime")

"""The converter's `--quantization` schemes: each calibrates the model (when it needs to), then writes
its linears."""

from __future__ import annotations

from pathlib import Path

import torch

# --quantization -> TensorRT-LLM quant_algo
QUANTIZATIONS = {"fp8": "FP8", "int8-sq": "W8A8_SQ_PER_CHANNEL", "int8-wo": "W8A16", "int4-wo": "W4A16_AWQ"}
DEFAULT_GROUP_SIZE = 128


def quantizer_factory(quantization: str, calibration=None, smoothquant_alpha: float = 0.5, progress: bool = True,
                      group_size: int = DEFAULT_GROUP_SIZE):
    """What `convert_checkpoint(quantizer_for=...)` calls once the conversion is checked: run the model over
    the calibration samples (`calibration`, a CalibrationConfig; default: 128 ShareGPT samples) unless the
    scheme needs none (int8-wo), then build the scheme's quantizer. Bad settings raise ValueError before
    any work."""
    from llmserve.quantization.calibrate import CalibrationConfig

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {sorted(QUANTIZATIONS)}, got {quantization!r}")
    if not 0.0 <= smoothquant_alpha <= 1.0:
        raise ValueError(f"--smoothquant-alpha must be in [0, 1], got {smoothquant_alpha}")
    calibration = calibration or CalibrationConfig()

    def make(src_dir: str | Path, source, config, dtype: torch.dtype, mapping):
        from llmserve.quantization import weight_only

        if quantization == "int8-wo":  # weight-only per channel: nothing to calibrate
            return weight_only.Int8WeightOnlyQuantizer(config, dtype)
        if quantization == "int4-wo":
            weight_only.check_group_size(config, group_size, mapping.tp_size)  # before minutes of calibration
        from llmserve.quantization.calibrate import input_amax

        amax = input_amax(src_dir, calibration, progress=progress)
        if quantization == "fp8":
            from llmserve.quantization.fp8 import Fp8Quantizer

            return Fp8Quantizer(source.get, config, amax)
        if quantization == "int4-wo":
            return weight_only.AwqQuantizer(config, amax, group_size, dtype)
        from llmserve.quantization.int8_sq import SmoothQuantizer

        return SmoothQuantizer(config, amax, smoothquant_alpha, dtype)
    return make


def convert_quantized(src_dir: str | Path, out_dir: str | Path, quantization: str, *, calibration=None,
                      smoothquant_alpha: float = 0.5, group_size: int = DEFAULT_GROUP_SIZE, progress: bool = True,
                      **convert_args) -> Path:
    """`convert_checkpoint` with the decoder's linears quantized by `quantization` (a QUANTIZATIONS key)."""
    from llmserve.checkpoint.convert import convert_checkpoint

    return convert_checkpoint(src_dir, out_dir, progress=progress, **convert_args,
                              quantizer_for=quantizer_factory(quantization, calibration, smoothquant_alpha, progress,
                                                              group_size))


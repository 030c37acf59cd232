"""Quantized checkpoints: calibration on real text, scales, and TensorRT-LLM's quantized tensor names."""

"""Triton when it is installed (CUDA machines). CPU-only installs get `triton = tl = None` and a `jit`
that leaves the function as it is, so modules defining kernels still import and use their torch paths."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:
    triton = tl = None

    def jit(fn=None, **_options):
        return fn if fn is not None else (lambda f: f)

__all__ = ["jit", "tl", "triton"]

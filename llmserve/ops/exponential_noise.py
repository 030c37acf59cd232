"""Counter-based Exp(1) noise for seeded sampling: element (b, v) is a pure function of (keys[b], v).

Row b is the stream of SplitMix64 started at keys[b]: z = keys[b] + (v + 1) * golden, then
SplitMix64's finaliser; the top 23 bits k give u = (k + 0.5) / 2^23 in (0, 1) and the noise is
-log(u), finite and never 0. Not 24 bits: (2^24 - 1) + 0.5 rounds to 2^24 in float32, so u was 1
and the noise 0 once in 2^24 draws, and that token won the race (p / 0) whatever its probability,
even 0 (0 / 0 is nan, which argmax takes): a random token in about 0.3% of seeded steps over a
49k vocabulary. No generator state, so a row's noise is the same alone or in any batch, and every
seeded row of a step is computed at once. One Triton kernel on CUDA (the torch twin is
~15 small kernels there); the torch twin, ~15 vectorized int64 passes, elsewhere.
Legend: B rows, V vocabulary.
"""

from __future__ import annotations

import torch

from llmserve.ops.triton_support import jit as _jit, tl, triton  # noqa: F401

GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
MASK64 = (1 << 64) - 1


def signed64(value: int) -> int:
    """`value` mod 2^64 as a signed int64 (what an int64 tensor holds for it)."""
    value &= MASK64
    return value - (1 << 64) if value >> 63 else value


def mix64(value: int) -> int:
    """One SplitMix64 step on a Python int (any sign): a well-spread unsigned 64-bit hash."""
    z = (value + GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def exponential_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, V] float32 Exp(1) draws from int64 keys [B], on the keys' device."""
    if keys.is_cuda and triton is not None:
        return exponential_noise_triton(keys, vocab)
    return exponential_noise_torch(keys, vocab)


def exponential_noise_torch(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    # int64 tensors wrap on overflow, which is the mod-2^64 arithmetic the hash needs
    steps = torch.arange(1, vocab + 1, dtype=torch.int64, device=keys.device) * signed64(GOLDEN)  # [V]
    z = keys.unsqueeze(1) + steps  # [B, V]
    z.bitwise_xor_(_shift_right(z, 30)).mul_(signed64(MIX1))
    z.bitwise_xor_(_shift_right(z, 27)).mul_(signed64(MIX2))
    z.bitwise_xor_(_shift_right(z, 31))
    u = _shift_right(z, 41).float().add_(0.5).mul_(2.0 ** -23)  # (0, 1), 2^23 levels, all exact in float32
    return u.log_().neg_()


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    # torch shifts signed int64 arithmetically; masking the sign copies makes it logical
    return (z >> bits) & ((1 << (64 - bits)) - 1)


@_jit
def _noise_kernel(keys_ptr, out_ptr, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    key = tl.load(keys_ptr + row).to(tl.uint64, bitcast=True)
    z = key + (cols + 1).to(tl.uint64) * 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    u = ((z >> 41).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23
    tl.store(out_ptr + row * vocab + cols, -tl.log(u), mask=cols < vocab)


def exponential_noise_triton(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    out = torch.empty(keys.shape[0], vocab, dtype=torch.float32, device=keys.device)
    block = 1024
    if keys.shape[0]:
        _noise_kernel[(keys.shape[0], triton.cdiv(vocab, block))](keys.contiguous(), out, vocab, BLOCK=block,
                                                                 num_warps=4)
    return out

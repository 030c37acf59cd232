"""The grammar bitmask applied to the logits of the constrained rows of a step.

`masks` [M, W + 1] int32 holds one packed row per constrained request: bit t of word t // 32 allows
token t, and the last word is the request's row in the batch (a row past the batch: not sampled this
step). On CUDA one Triton kernel writes -inf over the cleared bits of those rows only; the decode
step of a small model is bound by host work, so its cost is one launch rather than half a dozen
elementwise passes over [B, V].
"""

from __future__ import annotations

import torch

from llmserve.ops.triton_support import jit as _jit, tl, triton

BLOCK = 1024  # vocabulary ids per program (32 words)


def apply_token_bitmask(logits: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """`logits` [B, V] with -inf where the row's mask clears a token; a new tensor (the input is kept)."""
    if masks is None:
        return logits
    out = logits.clone()
    if out.is_cuda and triton is not None:
        num_masks, vocab = masks.shape[0], out.shape[1]
        _mask_rows_kernel[(num_masks, triton.cdiv(vocab, BLOCK))](
            out, masks, out.shape[0], vocab, out.stride(0), masks.stride(0), masks.shape[1] - 1, BLOCK=BLOCK)
        return out
    rows = masks[:, -1].long()
    sampled = rows < out.shape[0]
    rows, words = rows[sampled], masks[sampled, :-1]
    shifts = torch.arange(32, dtype=torch.int32, device=out.device)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :out.shape[1]]  # [m, V]
    out[rows] = out[rows].masked_fill(allowed == 0, float("-inf"))
    return out


@_jit
def _mask_rows_kernel(logits_ptr, masks_ptr, num_rows, vocab, stride_logits, stride_masks, row_word,
                      BLOCK: tl.constexpr):
    mask_ptr = masks_ptr + tl.program_id(0) * stride_masks
    row = tl.load(mask_ptr + row_word)
    if row < num_rows:
        ids = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        in_vocab = ids < vocab
        words = tl.load(mask_ptr + ids // 32, mask=in_vocab, other=-1)
        cleared = ((words >> (ids % 32)) & 1) == 0
        tl.store(logits_ptr + row * stride_logits + ids, float("-inf"), mask=in_vocab & cleared)

"""LLaMA over a paged KV cache, for a flat ragged batch of tokens from many sequences.

Also Mistral (the same block) and Qwen2 (the same block with q/k/v biases, `config.attn_bias`).

Legend: T tokens in the step's flat batch, E hidden size, H query heads, Hkv KV heads,
D head dim, I intermediate size, V vocabulary, N cache blocks, S block size.
Module names follow the TensorRT-LLM checkpoint (`transformer.layers.{i}.attention.qkv`,
`mlp.fc` = gate, `mlp.gate` = up, ...), so a converted rank shard loads as is.

Tensor and pipeline parallel: a rank builds its stage's layers with its share of the heads and
MLP columns (`rank_config`); the attention output and MLP down projections are row-parallel, so
their partial sums are all-reduced before the residual add; the embedding and the LM head split
the vocabulary (V padded to a multiple of tp). A later stage starts from the hidden states and
residual the previous stage sends, and only the last stage has the final norm and the LM head.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.checkpoint.model_config import ModelConfig
from llmserve.ops.attention import REFERENCE_BACKEND, AttentionBackend, AttentionMetadata
from llmserve.ops.fused import add_rms_norm, rms_norm, rope_, silu_and_mul
from llmserve.distributed import ParallelState, rank_config, single_rank


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add fused into the norm."""
        return add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies [D/2], with the llama3 or linear scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if kind == "linear":
        return inv_freq / scaling["factor"]
    assert kind == "default", f"rope scaling {kind!r} is not supported"
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """GPT-NeoX style RoPE from a precomputed cos/sin table indexed by position."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(config))  # [P, D/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, D] in place (a view into the fused qkv output)."""
        return rope_(x, positions, self.cos, self.sin)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, attention: AttentionBackend, parallel: ParallelState):
        super().__init__()
        self.backend = attention
        self.parallel = parallel
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attn_bias)
        self.dense = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.scale = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv(x)  # [T, (H + 2 Hkv) D]
        # q and k heads are adjacent in a row: one in-place rotation covers both
        rotary(positions, qkv[:, :self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads,
                                                                   self.head_dim))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache[0], kv_cache[1]  # [N, S, Hkv, D] each
        self.backend.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = self.backend.attend(q, k_cache, v_cache, meta, self.scale)  # [T, H, D]
        return self.parallel.all_reduce(self.dense(out.view(-1, self.q_size)))  # row-parallel: sum the ranks


class MLP(nn.Module):
    """SwiGLU; gate (TRT `mlp.fc`) and up (TRT `mlp.gate`) run as one GEMM."""

    def __init__(self, config: ModelConfig, parallel: ParallelState):
        super().__init__()
        self.parallel = parallel
        self.intermediate_size = config.intermediate_size
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_reduce(self.proj(silu_and_mul(self.gate_up(x))))  # [T, 2I] -> [T, I] -> [T, E]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, attention: AttentionBackend, parallel: ParallelState):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, attention, parallel)
        self.post_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, parallel)

    def forward(self, h, residual, positions, rotary, kv_cache, meta):
        """h: the previous sublayer's output, residual: the stream before it (None at layer 0).
        Returns this layer's MLP output and the stream before it; the next norm adds them."""
        x, residual = self.input_layernorm.add_forward(h, residual)
        h = self.attention(x, positions, rotary, kv_cache, meta)
        x, residual = self.post_layernorm.add_forward(h, residual)
        return self.mlp(x), residual


class VocabParallelEmbedding(nn.Module):
    """Rows [tp_rank * n, (tp_rank + 1) * n) of the vocabulary, n = ceil(V / tp); the ranks' lookups are
    summed (each token's row lives on one rank, the others contribute zeros)."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelState):
        super().__init__()
        self.parallel = parallel
        self.rows = -(-vocab_size // parallel.tp_size)
        self.start = parallel.tp_rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        mine = (local >= 0) & (local < self.rows)
        out = F.embedding(local.clamp(0, self.rows - 1), self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.parallel.all_reduce(out)


class Transformer(nn.Module):
    """One pipeline stage's part of the model (all of it when pp = 1)."""

    def __init__(self, config: ModelConfig, attention: AttentionBackend, parallel: ParallelState):
        super().__init__()
        self.parallel = parallel
        self.hidden_size = config.hidden_size
        local = rank_config(config, parallel)
        self.vocab_embedding = (VocabParallelEmbedding(config.vocab_size, config.hidden_size, parallel)
                                if parallel.is_first_stage else None)
        self.layers = nn.ModuleList(DecoderLayer(local, attention, parallel) for _ in range(local.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.rms_norm_eps) if parallel.is_last_stage else None
        self.rotary = RotaryEmbedding(config)

    def forward(self, input_ids, positions, kv_caches, meta):
        """Final hidden states [T, E] on the last stage; None on the others, which send theirs on."""
        if self.vocab_embedding is not None:
            h, residual = self.vocab_embedding(input_ids), None  # [T, E]
        else:
            h, residual = self.parallel.recv_from_previous_stage(input_ids.shape[0], self.hidden_size,
                                                                 self.layers[0].input_layernorm.weight.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, positions, self.rotary, kv_cache, meta)
        if self.ln_f is None:
            self.parallel.send_to_next_stage(h, residual)
            return None
        return self.ln_f.add_forward(h, residual)[0]


class LlamaForCausalLM(nn.Module):
    """The whole model (one rank's part of it when parallel): `forward` gives hidden states,
    `compute_logits` the vocabulary scores."""

    def __init__(self, config: ModelConfig, attention: AttentionBackend = REFERENCE_BACKEND,
                 parallel: ParallelState | None = None):
        super().__init__()
        self.config = config
        self.parallel = parallel = parallel or single_rank()
        self.transformer = Transformer(config, attention, parallel)
        # tied weights share the embedding only when one rank holds both ends of the model
        own_head = parallel.is_last_stage and (not config.tie_word_embeddings or parallel.world_size > 1)
        vocab_rows = -(-config.vocab_size // parallel.tp_size)  # this rank's share, padded (all of V at tp = 1)
        self.lm_head = nn.Linear(config.hidden_size, vocab_rows, bias=False) if own_head else None
        self.logits_linear: nn.Module | None = None  # a quantized lm_head replaces the weight matmul

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor | None:
        return self.transformer(input_ids, positions, kv_caches, meta)  # [T, E]; None before the last stage

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, E] -> [B, V]; with tp each rank scores its vocabulary rows and the ranks gather them."""
        if self.logits_linear is not None:
            logits = self.logits_linear(hidden)  # a quantized head of this rank's rows
        else:
            weight = self.transformer.vocab_embedding.weight if self.lm_head is None else self.lm_head.weight
            logits = F.linear(hidden, weight)
        logits = self.parallel.all_gather_last_dim(logits)
        return logits[:, :self.config.vocab_size] if self.parallel.tp_size > 1 else logits

    @torch.no_grad()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy one rank's TensorRT-LLM-named tensors (local layer numbers) into the modules; every weight
        must arrive. The embedding arrives whole and each rank keeps its vocabulary rows."""
        params = dict(self.named_parameters())
        # the scales of quantized linears are buffers, loaded like weights
        params |= {name: buffer for name, buffer in self.named_buffers()
                   if name.endswith(("weight_scale", "input_scale", "prequant_scale"))}
        missing = set(params)
        local_intermediate = rank_config(self.config, self.parallel).intermediate_size
        for name, tensor in tensors:
            target, rows = _target_of(name, local_intermediate)
            if target == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding already holds it
            assert target in params, f"unexpected weight {name}"
            param = params[target]
            if target == "transformer.vocab_embedding.weight" and self.parallel.tp_size > 1:
                embedding = self.transformer.vocab_embedding
                mine = tensor[embedding.start:embedding.start + embedding.rows]
                tensor = F.pad(mine, (0, 0, 0, embedding.rows - mine.shape[0]))  # the last rank's rows run past V
            dest = param if rows is None else param[rows]
            assert dest.shape == tensor.shape, f"{name}: shape {tuple(tensor.shape)} != {tuple(dest.shape)}"
            dest.copy_(tensor.to(param.dtype))
            missing.discard(target)
        assert not missing, f"weights missing from the checkpoint: {sorted(missing)[:5]}"


def _target_of(name: str, intermediate_size: int) -> tuple[str, slice | None]:
    # The fused gate_up parameter holds TRT `mlp.fc` (gate) then `mlp.gate` (up).
    if name.endswith("mlp.fc.weight"):
        return name.replace("mlp.fc.weight", "mlp.gate_up.weight"), slice(0, intermediate_size)
    if name.endswith("mlp.gate.weight"):
        return name.replace("mlp.gate.weight", "mlp.gate_up.weight"), slice(intermediate_size, None)
    return name, None

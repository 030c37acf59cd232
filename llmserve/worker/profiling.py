"""How many KV blocks fit: a CPU budget, or on CUDA the memory left after a worst-case warm-up step."""

from __future__ import annotations

import torch

from llmserve.checkpoint.model_config import ModelConfig
from llmserve.config import CacheConfig, EngineConfig
from llmserve.core.scheduler_output import single_prefill
from llmserve.sampling_params import SamplingParams
from llmserve.worker.model_runner import ModelRunner, kv_bytes_per_block, kv_cache_dtype

DEFAULT_CPU_KV_BYTES = 1 << 30


def num_kv_blocks(model, local_config: ModelConfig, config: EngineConfig) -> int:
    """KV blocks that fit this process's budget: the configured count, else the CPU budget or, on CUDA,
    the memory left after a worst-case step, over the bytes one block takes in `local_config`'s layers."""
    cache = config.cache
    if cache.num_blocks:
        return cache.num_blocks
    per_block = kv_bytes_per_block(local_config, cache.block_size, kv_cache_dtype(cache, config.device))
    if cache.kv_cache_memory_bytes:
        budget = cache.kv_cache_memory_bytes
    elif not config.device.device.startswith("cuda"):
        budget = DEFAULT_CPU_KV_BYTES
    else:
        budget = cuda_kv_budget(model, local_config, config)
    return max(budget // per_block, 1)


def cuda_kv_budget(model, model_config: ModelConfig, config: EngineConfig) -> int:
    """Bytes for KV blocks: the utilisation share of total memory minus weights and peak activations."""
    device = torch.device(config.device.device)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    num_tokens = min(config.scheduler.max_num_batched_tokens, model_config.max_position_embeddings - 1)
    _warm_up(model, model_config, config, num_tokens)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    budget = int(total * config.cache.gpu_memory_utilization) - peak - used_by_others
    torch.cuda.empty_cache()
    assert budget > 0, f"no memory left for the KV cache (peak {peak / 2**30:.1f} GiB of {total / 2**30:.1f} GiB)"
    return budget


def _warm_up(model, model_config: ModelConfig, config: EngineConfig, num_tokens: int) -> None:
    """One prefill of `num_tokens` tokens through a throwaway runner with just enough blocks."""
    block_size = config.cache.block_size
    num_blocks = -(-num_tokens // block_size)
    cache = CacheConfig(block_size=block_size, num_blocks=num_blocks)
    runner = ModelRunner(model, model_config, cache, config.device, num_blocks)
    runner.execute(single_prefill("warmup", [1] * num_tokens, SamplingParams(max_tokens=1), list(range(num_blocks))))
    del runner

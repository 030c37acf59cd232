"""HF LLaMA family -> TensorRT-LLM unified checkpoint: `config.json` + one `rank{N}.safetensors` per rank.

Split rules follow TensorRT-LLM's `models/llama/convert.py` (and `models/qwen/convert.py` for the
q/k/v bias): fused per-rank [q;k;v] with KV heads duplicated when there are fewer than tp,
column/row splits from `names.LAYER_WEIGHTS`, embedding on the first pipeline rank, `ln_f` and
the zero-padded `lm_head` on the last.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from llmserve.checkpoint import names
from llmserve.checkpoint.atomic_dir import chmod_as_created, existing_ancestor, staged_dir
from llmserve.checkpoint.hf import HFCheckpoint
from llmserve.checkpoint.model_config import ModelConfig
from llmserve.checkpoint.names import Split

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# TensorRT-LLM's QWenForCausalLM reads `qwen_type` from the checkpoint config (its own converter writes it).
QWEN_TYPES = {"Qwen2ForCausalLM": {"qwen_type": "qwen2"}}
# Everything a converted directory needs besides weights to be served on its own.
TOKENIZER_PATTERNS = ("tokenizer*.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
                      "vocab.json", "merges.txt", "generation_config.json", "chat_template.*")


@dataclass(slots=True)
class Mapping:
    """Tensor x pipeline parallel layout; rank = pp_rank * tp_size + tp_rank (TensorRT-LLM order)."""

    tp_size: int = 1
    pp_size: int = 1

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.pp_size < 1:
            raise ValueError(f"tp_size and pp_size must be >= 1, got tp={self.tp_size} pp={self.pp_size}")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def tp_rank(self, rank: int) -> int:
        self._check_rank(rank)
        return rank % self.tp_size

    def pp_rank(self, rank: int) -> int:
        self._check_rank(rank)
        return rank // self.tp_size

    def rank(self, tp_rank: int, pp_rank: int) -> int:
        """The global rank of (tp_rank, pp_rank)."""
        return pp_rank * self.tp_size + tp_rank

    def pp_layers(self, pp_rank: int, num_layers: int) -> list[int]:
        """Global layer ids of stage `pp_rank`, as `torch.tensor_split(arange(L), pp)` gives them."""
        if not 0 <= pp_rank < self.pp_size:
            raise ValueError(f"pp_rank {pp_rank} outside pipeline of size {self.pp_size}")
        base, extra = divmod(num_layers, self.pp_size)  # the first `extra` stages get one more layer
        start = pp_rank * base + min(pp_rank, extra)
        return list(range(start, start + base + (pp_rank < extra)))

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of size {self.world_size}")


def validate_mapping(config: ModelConfig, mapping: Mapping) -> None:
    """Raise ValueError naming the reason when `mapping` cannot shard `config`."""
    tp, heads, kv = mapping.tp_size, config.num_attention_heads, config.num_key_value_heads
    if heads % tp:
        raise ValueError(f"tp={tp} must divide the {heads} attention heads")
    if kv >= tp and kv % tp:
        raise ValueError(f"tp={tp} must divide the {kv} KV heads (or be a multiple of them)")
    if kv < tp and tp % kv:
        raise ValueError(f"tp={tp} must be a multiple of the {kv} KV heads to duplicate them")
    if config.intermediate_size % tp:
        raise ValueError(f"tp={tp} must divide intermediate_size={config.intermediate_size}")
    if mapping.pp_size > config.num_hidden_layers:
        raise ValueError(f"pp={mapping.pp_size} exceeds the {config.num_hidden_layers} layers")


def heads_per_rank(config: ModelConfig, tp_size: int) -> tuple[int, int]:
    """(query heads, KV heads) stored on each TP rank; KV heads are at least 1 (duplicated)."""
    return config.num_attention_heads // tp_size, max(1, config.num_key_value_heads // tp_size)


def split_column(weight: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """Rank `tp_rank`'s slice of the output dim (dim 0) of an (out, in) weight."""
    assert weight.shape[0] % tp_size == 0, f"dim 0 of {tuple(weight.shape)} is not divisible by tp={tp_size}"
    return weight.chunk(tp_size, dim=0)[tp_rank]


def split_row(weight: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """Rank `tp_rank`'s slice of the input dim (dim 1) of an (out, in) weight."""
    assert weight.shape[1] % tp_size == 0, f"dim 1 of {tuple(weight.shape)} is not divisible by tp={tp_size}"
    return weight.chunk(tp_size, dim=1)[tp_rank]


def split_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: ModelConfig,
              tp_size: int, tp_rank: int) -> torch.Tensor:
    """Rank `tp_rank`'s fused [q_r; k_r; v_r] rows, duplicating KV heads when fewer than tp."""
    kv_heads = config.num_key_value_heads
    if kv_heads >= tp_size:
        kv_size, kv_rank = tp_size, tp_rank
    else:
        # Same rows as repeating each KV head tp/kv times contiguously, then splitting by tp.
        kv_size, kv_rank = kv_heads, tp_rank * kv_heads // tp_size
    parts = (split_column(q, tp_size, tp_rank), split_column(k, kv_size, kv_rank), split_column(v, kv_size, kv_rank))
    return torch.cat(parts, dim=0)


def split_output_rows(tensor: torch.Tensor, linear: str, config: ModelConfig, tp_size: int,
                      tp_rank: int) -> torch.Tensor:
    """Rank `tp_rank`'s output rows of a whole column-parallel linear's tensor (a weight, or per-row
    scales): `attention.qkv`'s [q; k; v] rows go through `split_qkv`."""
    if linear != "attention.qkv":
        return split_column(tensor, tp_size, tp_rank)
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    return split_qkv(*tensor.split([q_rows, kv_rows, kv_rows]), config, tp_size, tp_rank)


def pad_and_split_lm_head(weight: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """Rank `tp_rank`'s rows of `weight` zero-padded to ceil(V / tp) * tp rows."""
    vocab_size = weight.shape[0]
    rows = -(-vocab_size // tp_size)
    start, end = min(tp_rank * rows, vocab_size), min((tp_rank + 1) * rows, vocab_size)
    # Pad only this rank's slice: the full padded matrix is never materialised.
    return torch.nn.functional.pad(weight[start:end], (0, 0, 0, rows - (end - start)))


def rank_slice(get: Callable[[str], torch.Tensor], config: ModelConfig, layer: int, linear: str,
               tp_size: int, tp_rank: int) -> torch.Tensor:
    """Rank `tp_rank`'s slice of one decoder linear's weight (`attention.qkv`, `mlp.fc`, ...), unconverted."""
    if linear == "attention.qkv":
        q, k, v = (get(names.hf_layer(layer, suffix)) for suffix in names.QKV_HF)
        return split_qkv(q, k, v, config, tp_size, tp_rank)
    hf_suffix, split = LINEAR_SOURCES[linear]
    return SPLITTERS[split](get(names.hf_layer(layer, hf_suffix)), tp_size, tp_rank)


SPLITTERS: dict[Split, Callable[[torch.Tensor, int, int], torch.Tensor]] = {
    Split.REPLICATED: lambda weight, tp_size, tp_rank: weight,
    Split.COLUMN: split_column,
    Split.ROW: split_row,
}


# decoder linear (TRT name) -> (HF weight suffix, split); q/k/v are fused by `split_qkv`
LINEAR_SOURCES = {trt.removesuffix(".weight"): (hf, split) for hf, (trt, split) in names.LAYER_WEIGHTS.items()
                  if trt.removesuffix(".weight") in names.QUANTIZED_LINEARS}


def rank_tensors(get: Callable[[str], torch.Tensor], config: ModelConfig, mapping: Mapping, rank: int,
                 dtype: torch.dtype, quantizer=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield rank `rank`'s TensorRT-LLM tensors, reading each HF tensor through `get` when needed.
    `quantizer` (llmserve/quantization/): writes each decoder linear quantized, followed by its scales."""
    tp, tp_rank, pp_rank = mapping.tp_size, mapping.tp_rank(rank), mapping.pp_rank(rank)
    if pp_rank == 0:
        yield names.TRT_EMBEDDING, _owned(get(names.HF_EMBEDDING), dtype)
    for local, layer in enumerate(mapping.pp_layers(pp_rank, config.num_hidden_layers)):
        for hf_suffix, (trt_suffix, split) in names.LAYER_WEIGHTS.items():
            linear = trt_suffix.removesuffix(".weight")
            if quantizer is not None and linear in names.QUANTIZED_LINEARS:
                yield from quantizer.rank_linear(get, layer, local, linear, mapping, rank)
                continue
            weight = SPLITTERS[split](get(names.hf_layer(layer, hf_suffix)), tp, tp_rank)
            yield names.trt_layer(local, trt_suffix), _owned(weight, dtype)
        if quantizer is not None:
            yield from quantizer.rank_linear(get, layer, local, "attention.qkv", mapping, rank)
        else:
            q, k, v = (get(names.hf_layer(layer, suffix)) for suffix in names.QKV_HF)
            yield names.trt_layer(local, names.QKV_TRT), _owned(split_qkv(q, k, v, config, tp, tp_rank), dtype)
        if config.attn_bias:  # [q; k; v] biases split like the weight's rows (1-D: dim 0 is the row)
            q, k, v = (get(names.hf_layer(layer, suffix)) for suffix in names.QKV_BIAS_HF)
            yield names.trt_layer(local, names.QKV_BIAS_TRT), _owned(split_qkv(q, k, v, config, tp, tp_rank), dtype)
    if pp_rank == mapping.pp_size - 1:
        yield names.TRT_FINAL_NORM, _owned(get(names.HF_FINAL_NORM), dtype)
        lm_head = get(names.HF_EMBEDDING if config.tie_word_embeddings else names.HF_LM_HEAD)
        yield names.TRT_LM_HEAD, _owned(pad_and_split_lm_head(lm_head, tp, tp_rank), dtype)


def num_rank_tensors(config: ModelConfig, mapping: Mapping, rank: int) -> int:
    """How many tensors `rank_tensors` yields for `rank`."""
    return len(rank_tensor_names(config, mapping, rank))


def rank_tensor_names(config: ModelConfig, mapping: Mapping, rank: int) -> list[str]:
    """The names `rank_tensors` yields for `rank`, in its order: what a rank file must hold, nothing more."""
    pp_rank = mapping.pp_rank(rank)
    suffixes = names.trt_layer_suffixes(config.attn_bias, config.quant_algo)
    num_layers = len(mapping.pp_layers(pp_rank, config.num_hidden_layers))
    layers = [names.trt_layer(local, suffix) for local in range(num_layers) for suffix in suffixes]
    first = [names.TRT_EMBEDDING] if pp_rank == 0 else []
    last = [names.TRT_FINAL_NORM, names.TRT_LM_HEAD] if pp_rank == mapping.pp_size - 1 else []
    return first + layers + last


def _owned(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A fresh contiguous copy: a slice must not keep the whole source tensor alive, and
    # safetensors refuses tensors that share storage (tied embedding and lm_head at tp=1).
    return tensor.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def trtllm_config(config: ModelConfig, mapping: Mapping, dtype: str) -> dict:
    """The TensorRT-LLM `config.json` of `config` sharded by `mapping`, weights in `dtype`."""
    return {
        "architecture": config.architecture,
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_size": config.head_dim,
        "hidden_act": config.hidden_act,
        "intermediate_size": config.intermediate_size,
        "norm_epsilon": config.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": config.rope_theta,
        "rotary_scaling": config.rope_scaling,
        "tie_word_embeddings": config.tie_word_embeddings,
        "mapping": {"world_size": mapping.world_size, "tp_size": mapping.tp_size, "pp_size": mapping.pp_size},
        "quantization": quantization_config(config.quant_algo, config.quant_group_size),
        "mlp_bias": False,
        "attn_bias": config.attn_bias,
        **QWEN_TYPES.get(config.architecture, {}),
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }


def quantization_config(quant_algo: str | None, group_size: int | None = None) -> dict:
    """The checkpoint config's `quantization` section (the LM head stays unquantized)."""
    if quant_algo is None:
        return {"quant_algo": None, "kv_cache_quant_algo": None}
    section = {"quant_algo": quant_algo, "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}
    if group_size is not None:  # W4A16_AWQ as ModelOpt exports it
        section |= {"group_size": group_size, "has_zero_point": False, "pre_quant_scale": True}
    return section


def convert_checkpoint(src_dir: str | Path, out_dir: str | Path, tp_size: int = 1, pp_size: int = 1,
                       dtype: str | None = None, progress: bool = True, quantizer_for=None) -> Path:
    """Write the TensorRT-LLM checkpoint of the HF LLaMA at `src_dir` into `out_dir`, one rank at a time.

    The files go to a temporary folder beside `out_dir`, renamed onto it when complete: an interrupted
    conversion leaves nothing, and a previous conversion in `out_dir` is replaced whole. Any other
    non-empty `out_dir` is refused. `quantizer_for(src_dir, source, config, dtype, mapping)` (from
    `llmserve.quantization.schemes`), called once everything is checked, returns the quantizer that
    writes the decoder's linears (it may calibrate first); its `quant_algo` goes into the config.
    """
    _refuse_converted_source(src_dir)
    source = HFCheckpoint(src_dir)
    config, mapping = source.config, Mapping(tp_size, pp_size)
    dtype = dtype or config.dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quantizer_for is not None and config.attn_bias:
        raise ValueError(f"{config.architecture} with q/k/v biases cannot be quantized yet")
    validate_mapping(config, mapping)
    out = _check_out_dir(src_dir, out_dir)
    quantizer = None
    if quantizer_for is not None:
        from dataclasses import replace

        quantizer = quantizer_for(src_dir, source, config, DTYPES[dtype], mapping)
        config = replace(config, quant_algo=quantizer.quant_algo,
                         quant_group_size=getattr(quantizer, "group_size", None))
    with staged_dir(out) as staging, tqdm(total=mapping.world_size, desc="ranks", disable=not progress) as ranks:
        for rank in range(mapping.world_size):
            tensors = rank_tensors(source.get, config, mapping, rank, DTYPES[dtype], quantizer)
            total = num_rank_tensors(config, mapping, rank)
            with tqdm(total=total, desc=f"rank{rank}", leave=False, disable=not progress) as bar:
                shard = {}
                for name, tensor in tensors:
                    shard[name] = tensor
                    bar.update()
            save_rank_file(shard, staging / f"rank{rank}.safetensors")
            del shard  # one rank's tensors in memory at a time
            ranks.update()
        (staging / "config.json").write_text(json.dumps(trtllm_config(config, mapping, dtype), indent=2))
        copy_tokenizer_files(src_dir, staging)
    return out


def save_rank_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one rank shard with the permissions the umask gives (safetensors itself writes 0600)."""
    save_file(tensors, path, metadata={"format": "pt"})
    chmod_as_created(path)


def _refuse_converted_source(src_dir: str | Path) -> None:
    from llmserve.checkpoint.trtllm_format import is_trtllm_checkpoint  # imports this module

    if is_trtllm_checkpoint(src_dir):
        raise ValueError(f"{src_dir} is already a TensorRT-LLM checkpoint: serve it (`llmserve serve --model "
                         f"{src_dir}`) or build it (`llmserve build --checkpoint {src_dir}`) directly; to change "
                         f"tp, pp or dtype, convert again from the HuggingFace checkpoint")


def _check_out_dir(src_dir: str | Path, out_dir: str | Path) -> Path:
    """`out_dir` as a Path, when it is new, empty, or holds a previous conversion (which gets replaced)."""
    from llmserve.checkpoint.trtllm_format import is_trtllm_checkpoint

    out = Path(out_dir)
    if out.resolve() == Path(src_dir).resolve():
        raise ValueError(f"output directory {out} is the source checkpoint itself; choose another directory")
    anchor = existing_ancestor(out)
    if not anchor.is_dir():
        raise NotADirectoryError(f"cannot write {out}: {anchor} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_trtllm_checkpoint(out):
        raise ValueError(f"output directory {out} is not empty and holds no converted checkpoint; choose a new "
                         f"or empty directory (a previous conversion there would be replaced)")
    return out


def copy_tokenizer_files(src_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Copy tokenizer, generation config and chat template files; return the copies."""
    sources = {path for pattern in TOKENIZER_PATTERNS for path in Path(src_dir).glob(pattern) if path.is_file()}
    # copyfile, not copy2: new files get the umask's mode, like every other output file
    return [Path(shutil.copyfile(path, Path(out_dir) / path.name)) for path in sorted(sources)]

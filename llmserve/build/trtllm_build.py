"""The trtllm backend's build: convert the checkpoint, then run `trtllm-build` with flags from the profile.

Flag spellings checked (code-search tool) against TensorRT-LLM `tensorrt_llm/commands/build.py`
(argparse: --checkpoint_dir, --output_dir, --max_batch_size, --max_input_len, --max_seq_len,
--max_num_tokens, --kv_cache_type {continuous,paged,disabled} parsed by enum name, --workers) and
`tensorrt_llm/plugin/plugin.py` (`add_plugin_argument` over `cli_plugin_args`: --gpt_attention_plugin and
--gemm_plugin take auto|float16|float32|bfloat16|int32|disable (gemm also fp8|nvfp4); --context_fmha,
--remove_input_padding, --use_paged_context_fmha, --use_fused_mlp, --multiple_profiles take enable|disable;
--tokens_per_block takes an int). `--paged_kv_cache` is deprecated there, hence --kv_cache_type.
Written against that source; never executed here (no tensorrt_llm on any machine of this project).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

from llmserve.build.profile import BuildProfile

ENGINE_SUBDIR = "trtllm_engine"


class TrtllmUnavailableError(RuntimeError):
    """TensorRT-LLM (the package or its `trtllm-build` command) is not installed here."""


def _flag(on: bool) -> str:
    return "enable" if on else "disable"


def trtllm_build_command(profile: BuildProfile, checkpoint_dir: str | Path, out_dir: str | Path) -> list[str]:
    """The `trtllm-build` argv for `profile` over a converted checkpoint, engines into `out_dir`."""
    return [
        "trtllm-build",
        "--checkpoint_dir", str(checkpoint_dir),
        "--output_dir", str(out_dir),
        "--max_batch_size", str(profile.max_batch_size),
        "--max_num_tokens", str(profile.max_num_tokens),
        "--max_seq_len", str(profile.max_seq_len),
        "--max_input_len", str(profile.max_input_len),
        "--tokens_per_block", str(profile.kv_block_size),
        "--gemm_plugin", profile.gemm_plugin,
        "--gpt_attention_plugin", "auto",
        "--kv_cache_type", "paged",
        "--remove_input_padding", "enable",
        "--context_fmha", "enable",
        "--use_paged_context_fmha", _flag(profile.use_paged_context_fmha),
        "--use_fused_mlp", _flag(profile.use_fused_mlp),
        "--multiple_profiles", _flag(profile.multiple_profiles),
        "--workers", str(profile.world_size),  # one build process per rank engine
    ]


def missing_trtllm() -> list[str]:
    """What is missing for a TensorRT-LLM build on this machine (empty when ready)."""
    missing = []
    if importlib.util.find_spec("tensorrt_llm") is None:
        missing.append("the Python package `tensorrt_llm` (install it from NVIDIA's index, "
                       "`pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com`, on a machine "
                       "with an NVIDIA GPU and driver)")
    if shutil.which("trtllm-build") is None:
        missing.append("the `trtllm-build` command on PATH (installed with tensorrt_llm)")
    return missing


def require_trtllm() -> None:
    """Raise TrtllmUnavailableError naming what is missing, before any work is done."""
    missing = missing_trtllm()
    if missing:
        raise TrtllmUnavailableError("TensorRT-LLM build unavailable: missing " + "; ".join(missing)
                                     + ". Use a profile with `backend: native` to build without it.")


def build_trtllm(checkpoint_dir: str | Path, profile: BuildProfile, out_dir: str | Path) -> Path:
    """Convert into `out_dir/checkpoint/`, run trtllm-build into `out_dir/trtllm_engine/`; return the latter.

    The intermediate checkpoint is deleted after a successful build (the engine holds the weights);
    tokenizer and generation-config files are copied next to the engine for serving.
    """
    from llmserve.build.native import matches_profile, prepare_checkpoint
    from llmserve.checkpoint.convert import copy_tokenizer_files

    require_trtllm()  # fail fast: no conversion of an 8B model before learning the build cannot run
    intermediate = Path(out_dir) / "checkpoint"
    if matches_profile(checkpoint_dir, profile):  # already converted as wanted: no 16 GB copy
        converted = Path(checkpoint_dir)
    else:
        converted = prepare_checkpoint(checkpoint_dir, profile, intermediate)
    engine_dir = Path(out_dir) / ENGINE_SUBDIR
    command = trtllm_build_command(profile, converted, engine_dir)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout)[-4000:]
        raise RuntimeError(f"trtllm-build failed with exit code {result.returncode}:\n{tail}")
    copy_tokenizer_files(checkpoint_dir, engine_dir)
    shutil.rmtree(intermediate, ignore_errors=True)
    return engine_dir

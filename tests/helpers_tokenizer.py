"""Tokenizers for tests: a tiny byte-level BPE trained in-process, and the default model's if present."""

from __future__ import annotations

import functools
from pathlib import Path

SMOLLM2_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m-instruct"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "日本語のテキストです。東京は大きい。中文也可以。",
    "emoji 😀🎉👍🏽 café naïve — “quotes” ünïcödé",
    "def f(x):\n    return x + 1\n",
    "Stop strings like ### or </answer> end a reply.",
]


@functools.lru_cache(maxsize=1)
def tiny_byte_level_tokenizer():
    """A ~400-token byte-level BPE (every byte is a token, so ids can split UTF-8 anywhere)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """The default model's tokenizer from its local checkpoint, or None when it is absent."""
    if not any(SMOLLM2_DIR.glob("tokenizer*")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOLLM2_DIR)

"""The model's tokenizer, loaded on the API side from the folder the engine reports."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(path: str | Path | None):
    """The HF tokenizer saved beside the checkpoint, or None when there is none."""
    if path is None:
        return None
    path = Path(path)
    if not any(path.glob("tokenizer*")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)

"""Tokenizers and chat templates through transformers (folders and GGUF files)."""
from __future__ import annotations

import os
import warnings

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(folder: str | None = None, gguf_file: str | None = None):
    """AutoTokenizer for a checkpoint folder, or None when the folder has no tokenizer files."""
    from transformers import AutoTokenizer
    if gguf_file is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_file)),
                                                 gguf_file=os.path.basename(gguf_file))
    if folder is None or not any(os.path.exists(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(folder)

"""Tokenizers and chat templates: transformers for checkpoint folders; GGUF files read with the `gguf` package.

A GGUF file of a byte-level BPE model whose pre-tokenizer is GPT-2's own split (`tokenizer.ggml.model == "gpt2"`
with `tokenizer.ggml.pre` one of GPT2_SPLIT_PRE, as SmolLM2's files are) is turned into a `tokenizers` BPE
tokenizer here, without PyTorch: transformers' own GGUF reader imports torch, which the library does not otherwise
need. Every other kind (other pre-tokenizer splits such as Llama 3's or Qwen2's, SentencePiece "llama") goes
through transformers' reader.
"""
from __future__ import annotations

import os
import warnings

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

# llama.cpp's token types (gguf.TokenType): 3 = control (added, special), 4 = user-defined (added, not special)
_CONTROL, _USER_DEFINED = 3, 4
# `tokenizer.ggml.pre` values whose split is GPT-2's byte-level regex (checked against transformers' reader)
GPT2_SPLIT_PRE = ("gpt2", "smollm", "default", None)


def load_tokenizer(folder: str | None = None, gguf_file: str | None = None):
    """AutoTokenizer for a checkpoint folder (None when the folder has no tokenizer files), or the tokenizer held in
    a GGUF file."""
    if gguf_file is not None:
        return gguf_tokenizer(gguf_file)
    if folder is None or not any(os.path.exists(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


def _field(reader, name, default=None):
    field = reader.fields.get(name)
    return default if field is None else field.contents()


def gguf_tokenizer(path: str, reader=None):
    """The tokenizer of a GGUF file as a transformers fast tokenizer (chat template and special tokens included)."""
    import gguf
    reader = reader if reader is not None else gguf.GGUFReader(path)
    kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in GPT2_SPLIT_PRE:
        return _transformers_gguf_tokenizer(path, kind if kind != "gpt2" else f"gpt2 with the {pre!r} split")
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", False))
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                                   byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == _USER_DEFINED])

    def token(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    kwargs = {name: token(key) for name, key in (("bos_token", "bos"), ("eos_token", "eos"),
                                                  ("unk_token", "unknown"), ("pad_token", "padding"))}
    if bool(_field(reader, "tokenizer.ggml.add_bos_token", False)) and kwargs["bos_token"] is not None:
        # the file asks for a leading BOS, which a fast tokenizer adds through its post-processor
        from tokenizers import processors
        bos = kwargs["bos_token"]
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                               special_tokens=[(bos, tokens.index(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=_field(reader, "tokenizer.chat_template"),
                                   **{k: v for k, v in kwargs.items() if v is not None})


def _transformers_gguf_tokenizer(path: str, kind):
    try:
        import torch  # noqa: F401  transformers' GGUF reader needs it
    except ImportError as e:
        raise ImportError(f"{path}: its tokenizer is of kind {kind!r}, which rss_jax reads through transformers' GGUF "
                          "reader, and that needs PyTorch; fix: `pip install torch`, or load the model from a "
                          "Hugging Face folder with its tokenizer files") from e
    from transformers import AutoTokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                             gguf_file=os.path.basename(path))

"""Training data: JSONL records -> padded token arrays with loss masks, and the deterministic example stream.

Record formats (one JSON object per line; blank lines are skipped):
  SFT / distillation: {"prompt": str, "response": str}    or {"prompt_ids": [int], "response_ids": [int]}
  DPO:                {"prompt": str, "chosen": str, "rejected": str}  or the same keys with an `_ids` suffix
Text fields go through the tokenizer's chat template (the prompt as a user turn, or a list of {"role", "content"}
messages; the response as the assistant turn), or are tokenized plainly with `chat=False`. Text and `_ids` fields
may be mixed within a record.

Every example is laid out as [prompt tokens, response tokens, padding] in a row of fixed width T (the longest example
rounded up to a multiple of 8, so one compiled step serves the whole data set). `loss_mask[t] = 1` exactly on the
response tokens: prompt and padding tokens carry no loss. Padding sits on the right, where a causal model cannot see
it from any earlier position.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

FIELDS = {"sft": ("response",), "dpo": ("chosen", "rejected")}


class DataError(ValueError):
    """The training data cannot be used; the message names the file and, where there is one, the line."""


@dataclasses.dataclass
class Dataset:
    """tokens/loss_mask [N, S, T] with S = 1 sequence per example (SFT) or 2 (DPO: chosen, rejected);
    n_tokens [N] = non-padding tokens of each example over its S sequences."""
    kind: str
    tokens: np.ndarray
    loss_mask: np.ndarray
    n_tokens: np.ndarray
    path: str = ""

    def __len__(self):
        return int(self.tokens.shape[0])

    @property
    def width(self) -> int:
        return int(self.tokens.shape[-1])


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """[(line number, record)]; raises DataError naming the first malformed line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file; check the --data path")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                                "fix that line: the file holds one JSON object per line") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}; "
                                'write one object per line, such as '
                                '{"prompt": "...", "chosen": "...", "rejected": "..."}')
            records.append((lineno, rec))
    if not records:
        raise DataError(f"{path}: the data file holds no examples; add one JSON object per line")
    return records


class Encoder:
    """Turns a record's prompt and response fields into token-id lists (chat template or plain text)."""

    def __init__(self, tokenizer, chat: bool = True, eos_id: int | None = None):
        self.tok = tokenizer
        self.chat = chat and tokenizer is not None and getattr(tokenizer, "chat_template", None) is not None
        self.eos_id = eos_id if eos_id is not None else (tokenizer.eos_token_id if tokenizer is not None else None)

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    @staticmethod
    def messages(prompt) -> list[dict]:
        return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]

    def prompt(self, prompt) -> tuple[list[int], str | None]:
        """-> (prompt ids, the prompt's rendered text when the chat template is used)."""
        if self.chat:
            text = self.tok.apply_chat_template(self.messages(prompt), tokenize=False, add_generation_prompt=True)
            return self._ids(text, special=False), text
        if isinstance(prompt, list):
            prompt = "\n".join(m["content"] for m in prompt)
        return self._ids(prompt, special=True), None

    def response(self, prompt, prompt_text: str | None, response: str) -> list[int]:
        if self.chat and prompt_text is not None:  # a token-id prompt gets a plain response plus EOS
            full = self.tok.apply_chat_template(self.messages(prompt) + [{"role": "assistant", "content": response}],
                                                tokenize=False)
            if full.startswith(prompt_text):
                return self._ids(full[len(prompt_text):], special=False)
        ids = self._ids(response, special=False)
        return ids + ([self.eos_id] if self.eos_id is not None else [])


def _id_list(value, where: str, field: str, vocab_size: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DataError(f"{where}: {field!r} must be a list of integer token ids; give a list such as [12, 7, 99], or "
                        f"the text in {field[:-4]!r}")
    bad = [v for v in value if not 0 <= v < vocab_size]
    if bad:
        raise DataError(f"{where}: {field!r} holds token id {bad[0]} outside the vocabulary [0, {vocab_size}); "
                        "the ids come from another tokenizer: re-tokenise with this model's tokenizer or give text")
    return value


def encode_records(records, kind: str, path: str, tokenizer=None, chat: bool = True, vocab_size: int | None = None,
                   eos_id: int | None = None) -> list[tuple[list[int], list[list[int]]]]:
    """[(prompt ids, [response ids per sequence])] with every field checked (line numbers in the errors)."""
    if kind not in FIELDS:
        raise ValueError(f"kind must be one of {sorted(FIELDS)}, got {kind!r}")
    vocab_size = vocab_size if vocab_size is not None else (len(tokenizer) if tokenizer is not None else 1 << 31)
    enc = Encoder(tokenizer, chat, eos_id) if tokenizer is not None else None
    out = []
    for lineno, rec in records:
        where = f"{path}:{lineno}"

        def text_field(name):
            if enc is None:
                raise DataError(f"{where}: field {name!r} is text but the model has no tokenizer; give "
                                f"{name + '_ids'!r} as a list of token ids instead")
            value = rec[name]
            if name == "prompt" and isinstance(value, list):
                if not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
                    raise DataError(f"{where}: a list 'prompt' must hold {{'role', 'content'}} messages; write "
                                    '[{"role": "user", "content": "..."}], or give the prompt as a string')
                return value
            if not isinstance(value, str):
                raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}; give text, or "
                                f"token ids in {name + '_ids'!r}")
            return value

        if "prompt_ids" in rec:
            prompt_ids = _id_list(rec["prompt_ids"], where, "prompt_ids", vocab_size)
            prompt_raw = prompt_text = None
        elif "prompt" in rec:
            prompt_raw = text_field("prompt")
            prompt_ids, prompt_text = enc.prompt(prompt_raw)
        else:
            raise DataError(f"{where}: missing field 'prompt' (or 'prompt_ids'); add the prompt text to that line")
        if not prompt_ids:
            raise DataError(f"{where}: empty prompt; the first response token needs at least one token before it")
        responses = []
        for name in FIELDS[kind]:
            if name + "_ids" in rec:
                ids = _id_list(rec[name + "_ids"], where, name + "_ids", vocab_size)
                if not ids:
                    raise DataError(f"{where}: empty response {name + '_ids'!r}; give at least one token or drop "
                                    "the line")
            elif name in rec:
                value = text_field(name)
                if not value.strip():
                    raise DataError(f"{where}: empty response {name!r}; give some text or drop the line")
                ids = enc.response(prompt_raw, prompt_text, value)
            else:
                others = " and ".join(repr(f) for f in FIELDS[kind])
                raise DataError(f"{where}: missing field {name!r} (or {name + '_ids'!r}); {kind} data needs "
                                f"'prompt' and {others}")
            bad = [v for v in ids if not 0 <= v < vocab_size]
            if bad:
                raise DataError(f"{where}: {name!r} encodes to token id {bad[0]} outside the vocabulary "
                                f"[0, {vocab_size}); the model's tokenizer and its vocabulary disagree: check the "
                                "checkpoint")
            responses.append(list(ids))
        out.append((list(prompt_ids), responses))
    return out


def truncate(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit prompt + response into max_length tokens: keep the response's start (at least half the budget when the
    prompt is long) and the prompt's end."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    keep_r = min(len(response), max(max_length - len(prompt), max_length // 2))
    keep_p = max_length - keep_r
    return prompt[-keep_p:], response[:keep_r]


def build_dataset(path: str, kind: str, tokenizer=None, vocab_size: int | None = None, max_length: int = 512,
                  chat: bool = True, pad_id: int = 0, eos_id: int | None = None) -> Dataset:
    """Read and encode a JSONL file into a Dataset (see the module docstring for the layout)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    encoded = encode_records(read_jsonl(path), kind, path, tokenizer, chat, vocab_size, eos_id)
    rows = []
    for prompt, responses in encoded:
        rows.append([truncate(prompt, r, max_length) for r in responses])
    longest = max(len(p) + len(r) for seqs in rows for p, r in seqs)
    width = min(-(-longest // 8) * 8, max(max_length, longest))
    n, s = len(rows), len(FIELDS[kind])
    tokens = np.full((n, s, width), pad_id, np.int32)
    mask = np.zeros((n, s, width), np.int32)
    n_tokens = np.zeros((n,), np.int64)
    for i, seqs in enumerate(rows):
        for j, (p, r) in enumerate(seqs):
            tokens[i, j, :len(p) + len(r)] = p + r
            mask[i, j, len(p):len(p) + len(r)] = 1
            n_tokens[i] += len(p) + len(r)
    return Dataset(kind=kind, tokens=tokens, loss_mask=mask, n_tokens=n_tokens, path=os.path.abspath(path))


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


class ExampleStream:
    """The example order of a run: epoch e visits the examples in the permutation drawn from (seed, e). `position`
    counts examples consumed since the start of the run; it is all a checkpoint needs to resume the stream."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, position: int = 0):
        self.n, self.seed, self.shuffle, self.position = n, seed, shuffle, int(position)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: epoch_permutation(self.n, self.seed, epoch, self.shuffle)}
        return self._perms[epoch]

    def take(self, count: int) -> np.ndarray:
        out = np.empty((count,), np.int64)
        for k in range(count):
            epoch, i = divmod(self.position + k, self.n)
            out[k] = self._perm(epoch)[i]
        self.position += count
        return out

"""Declarative checkpoint name maps: checkpoint tensor name -> (our parameter path, layout transform).

A rule is (regex, target, transform). A regex with one group captures the layer index, and the target is a stacked
[L, ...] parameter; `transform` is "T" (transpose a [out, in] Linear into our [in, out]) or None.
The filler checks every tensor's shape against the model's abstract state and that every parameter was written.
"""
from __future__ import annotations

import re

import numpy as np

HF_LLAMA = [
    (r"model\.embed_tokens\.weight", "embed_tokens", None),
    (r"model\.norm\.weight", "norm", None),
    (r"lm_head\.weight", "lm_head", None),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.attn_norm", None),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.mlp_norm", None),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "layers.wq", "T"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "layers.wk", "T"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "layers.wv", "T"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.bias", "layers.bq", None),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.bias", "layers.bk", None),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.bias", "layers.bv", None),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.wo", "T"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers.w_gate", "T"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers.w_up", "T"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.w_down", "T"),
]

# GPT-2 checkpoints come with or without the `transformer.` prefix; Conv1D weights are already [in, out].
HF_GPT2 = [
    (r"(?:transformer\.)?wte\.weight", "wte", None),
    (r"(?:transformer\.)?wpe\.weight", "wpe", None),
    (r"(?:transformer\.)?ln_f\.weight", "ln_f_w", None),
    (r"(?:transformer\.)?ln_f\.bias", "ln_f_b", None),
    (r"(?:transformer\.)?h\.(\d+)\.ln_1\.weight", "layers.ln1_w", None),
    (r"(?:transformer\.)?h\.(\d+)\.ln_1\.bias", "layers.ln1_b", None),
    (r"(?:transformer\.)?h\.(\d+)\.attn\.c_attn\.weight", "layers.w_qkv", None),
    (r"(?:transformer\.)?h\.(\d+)\.attn\.c_attn\.bias", "layers.b_qkv", None),
    (r"(?:transformer\.)?h\.(\d+)\.attn\.c_proj\.weight", "layers.w_o", None),
    (r"(?:transformer\.)?h\.(\d+)\.attn\.c_proj\.bias", "layers.b_o", None),
    (r"(?:transformer\.)?h\.(\d+)\.ln_2\.weight", "layers.ln2_w", None),
    (r"(?:transformer\.)?h\.(\d+)\.ln_2\.bias", "layers.ln2_b", None),
    (r"(?:transformer\.)?h\.(\d+)\.mlp\.c_fc\.weight", "layers.w_fc", None),
    (r"(?:transformer\.)?h\.(\d+)\.mlp\.c_fc\.bias", "layers.b_fc", None),
    (r"(?:transformer\.)?h\.(\d+)\.mlp\.c_proj\.weight", "layers.w_proj", None),
    (r"(?:transformer\.)?h\.(\d+)\.mlp\.c_proj\.bias", "layers.b_proj", None),
]

_OPT_LAYER = r"(?:model\.)?decoder\.layers\.(\d+)\."
HF_OPT = [
    (r"(?:model\.)?decoder\.embed_tokens\.weight", "embed_tokens", None),
    (r"(?:model\.)?decoder\.embed_positions\.weight", "embed_positions", None),
    (r"(?:model\.)?decoder\.project_in\.weight", "project_in", "T"),
    (r"(?:model\.)?decoder\.project_out\.weight", "project_out", "T"),
    (r"(?:model\.)?decoder\.final_layer_norm\.weight", "final_ln_w", None),
    (r"(?:model\.)?decoder\.final_layer_norm\.bias", "final_ln_b", None),
    (_OPT_LAYER + r"self_attn_layer_norm\.weight", "layers.attn_ln_w", None),
    (_OPT_LAYER + r"self_attn_layer_norm\.bias", "layers.attn_ln_b", None),
    (_OPT_LAYER + r"final_layer_norm\.weight", "layers.mlp_ln_w", None),
    (_OPT_LAYER + r"final_layer_norm\.bias", "layers.mlp_ln_b", None),
    (_OPT_LAYER + r"self_attn\.q_proj\.weight", "layers.wq", "T"),
    (_OPT_LAYER + r"self_attn\.k_proj\.weight", "layers.wk", "T"),
    (_OPT_LAYER + r"self_attn\.v_proj\.weight", "layers.wv", "T"),
    (_OPT_LAYER + r"self_attn\.out_proj\.weight", "layers.wo", "T"),
    (_OPT_LAYER + r"self_attn\.q_proj\.bias", "layers.bq", None),
    (_OPT_LAYER + r"self_attn\.k_proj\.bias", "layers.bk", None),
    (_OPT_LAYER + r"self_attn\.v_proj\.bias", "layers.bv", None),
    (_OPT_LAYER + r"self_attn\.out_proj\.bias", "layers.bo", None),
    (_OPT_LAYER + r"fc1\.weight", "layers.w_fc1", "T"),
    (_OPT_LAYER + r"fc1\.bias", "layers.b_fc1", None),
    (_OPT_LAYER + r"fc2\.weight", "layers.w_fc2", "T"),
    (_OPT_LAYER + r"fc2\.bias", "layers.b_fc2", None),
]

# llama.cpp names (GGUF). q/k rows are permuted by the converter; the GGUF loader undoes that before this map.
GGUF_LLAMA = [
    (r"token_embd\.weight", "embed_tokens", None),
    (r"output_norm\.weight", "norm", None),
    (r"output\.weight", "lm_head", None),
    (r"blk\.(\d+)\.attn_norm\.weight", "layers.attn_norm", None),
    (r"blk\.(\d+)\.ffn_norm\.weight", "layers.mlp_norm", None),
    (r"blk\.(\d+)\.attn_q\.weight", "layers.wq", "T"),
    (r"blk\.(\d+)\.attn_k\.weight", "layers.wk", "T"),
    (r"blk\.(\d+)\.attn_v\.weight", "layers.wv", "T"),
    (r"blk\.(\d+)\.attn_q\.bias", "layers.bq", None),
    (r"blk\.(\d+)\.attn_k\.bias", "layers.bk", None),
    (r"blk\.(\d+)\.attn_v\.bias", "layers.bv", None),
    (r"blk\.(\d+)\.attn_output\.weight", "layers.wo", "T"),
    (r"blk\.(\d+)\.ffn_gate\.weight", "layers.w_gate", "T"),
    (r"blk\.(\d+)\.ffn_up\.weight", "layers.w_up", "T"),
    (r"blk\.(\d+)\.ffn_down\.weight", "layers.w_down", "T"),
]

HF_MAPS = {"llama": HF_LLAMA, "gpt2": HF_GPT2, "opt": HF_OPT}

# Tensors that checkpoints carry but the model does not need (buffers, or a head tied to the embedding).
IGNORED = re.compile(r".*(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not fit the model (names the file and the tensor)."""


def _flat_targets(abstract_state) -> dict:
    """path 'layers.wq' -> ShapeDtypeStruct, from an abstract nnx.State."""
    from flax import nnx
    return flatten(nnx.to_pure_dict(abstract_state))


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'layers': {'wq': x}} -> {'layers.wq': x}"""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(flat: dict) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


class StateFiller:
    """Collects checkpoint tensors into NumPy buffers shaped like the model's state, checking every shape."""

    def __init__(self, abstract_state, rules, source: str, tied: bool):
        self.targets = _flat_targets(abstract_state)
        self.rules = [(re.compile(rx + r"$"), tgt, tr) for rx, tgt, tr in rules]
        self.source = source
        self.tied = tied
        self.buffers: dict[str, np.ndarray] = {}
        self.filled: dict[str, set] = {}
        self.unexpected: list[str] = []

    def match(self, name: str):
        for rx, tgt, tr in self.rules:
            m = rx.match(name)
            if m:
                return tgt, (int(m.group(1)) if m.groups() else None), tr
        return None

    def wants(self, name: str) -> bool:
        m = self.match(name)
        return m is not None and m[0] in self.targets

    def add(self, name: str, array, where: str | None = None):
        where = where or self.source
        m = self.match(name)
        if m is None or m[0] not in self.targets:
            if m is None and not IGNORED.match(name):
                self.unexpected.append(name)
            return
        tgt, layer, tr = m
        spec = self.targets[tgt]
        array = np.asarray(array)
        if tr == "T":
            array = array.T
        want = tuple(spec.shape[1:]) if layer is not None else tuple(spec.shape)
        if tuple(array.shape) != want:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {tuple(array.shape) if tr is None else tuple(array.T.shape)}"
                f" but the model built from the config expects {want if tr is None else want[::-1]} for {tgt}; "
                "the checkpoint does not match its config.json")
        buf = self.buffers.get(tgt)
        if buf is None:
            buf = self.buffers[tgt] = np.zeros(spec.shape, dtype=np.float32)
            self.filled[tgt] = set()
        if layer is not None:
            if layer >= spec.shape[0]:
                raise CheckpointError(f"{where}: tensor {name!r} is for layer {layer} but the config has "
                                      f"{spec.shape[0]} layers")
            buf[layer] = array
        else:
            buf[...] = array
        self.filled[tgt].add(layer)

    def finish(self) -> dict:
        """Every target fully written? Returns {path: float32 array}."""
        missing = []
        for tgt, spec in self.targets.items():
            got = self.filled.get(tgt, set())
            if tgt == "lm_head" and not got and self.tied:
                continue
            need = set(range(spec.shape[0])) if tgt.startswith("layers.") else {None}
            if not need <= got:
                lost = sorted(need - got, key=lambda x: -1 if x is None else x)
                missing.append(f"{tgt}" + (f" (layers {lost[:5]}{'...' if len(lost) > 5 else ''})"
                                           if lost and lost[0] is not None else ""))
        if missing:
            raise CheckpointError(f"{self.source}: checkpoint is missing tensors for {', '.join(missing)}")
        return self.buffers

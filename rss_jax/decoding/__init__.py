"""Decoding methods. `generate` is the entry point for ar, sd, sss and eft."""
from __future__ import annotations

from rss_jax.decoding import common
from rss_jax.decoding.autoregressive import SamplerConfig, generate_ar, sampler_config
from rss_jax.decoding.common import GenerateOutput

METHODS = ("ar", "sd", "sss", "eft")
MODES = ("exact", "paper", "authors_code")


def generate(lm, prompts, method="ar", draft=None, sft=None, k=4, mode="exact", shift=1.0, max_new_tokens=128,
             temperature=1.0, top_k=None, top_p=None, min_p=None, draft_top_k=None, draft_top_p=None, eos=None,
             seed=0, chat=True, prompt_offset=0, draft_temperature=None) -> GenerateOutput:
    """Generate continuations of `prompts` (strings, chat template applied when chat=True, or lists of token ids).

    method: "ar" (plain decoding of lm), "sd" (speculative decoding with `draft`), "sss" (reward-shifted speculative
    sampling: `draft` = aligned draft, `sft` = its SFT version, `mode` exact|paper|authors_code, `shift` = lambda),
    "eft" (product-of-experts decoding of the same distribution as exact sss, no speculation).
    Drafts are separate models or feature-draft heads (`rss_jax.heads.FeatureDraft`, made for `lm`; for sss/eft both
    drafts must be heads or both models; prompts of at least 2 tokens).
    draft_top_k, draft_top_p, draft_temperature (sd, and sss exact): filter or re-temper only the proposal the drafts
    are sampled from; the output law stays the target's (sd) or p~ (sss). A proposal a little sharper than the
    target (draft_temperature below temperature) can raise acceptance when the draft is under-confident. With
    draft_temperature None, a head calibrated for that (`draft.draft_temperature_scale`, as the shipped heads are)
    drafts at scale * temperature; pass draft_temperature=temperature to draft at the target's temperature.
    prompt_offset: prompt b samples with the keys of row prompt_offset + b, so a long list decoded in chunks (each
    with offset = its start) gives the same tokens as one call.
    Returns texts, tokens [B, max_new_tokens] (-1 after each row's length; a final EOS is included), lengths, stats.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if not isinstance(prompt_offset, int) or prompt_offset < 0:
        raise ValueError(f"prompt_offset must be an integer >= 0, got {prompt_offset!r}")
    cfg = sampler_config(lm, max_new_tokens, temperature, top_k, top_p, min_p, eos)
    prompt_ids = common.encode_prompts(lm, prompts, chat)
    from rss_jax import sharding
    sharding.check_batch(lm.mesh, len(prompt_ids), what=f"the batch of {len(prompt_ids)} prompts")
    if method == "ar":
        common.check_context(lm, prompt_ids, max_new_tokens)
        row_ids = list(range(prompt_offset, prompt_offset + len(prompt_ids)))
        tokens, stats = generate_ar(lm, prompt_ids, cfg, seed, row_ids=row_ids)
        return common.finish_output(lm, tokens, prompt_ids, stats)
    from rss_jax.decoding import speculative
    return speculative.generate_speculative(lm, prompt_ids, cfg, method=method, draft=draft, sft=sft, k=k,
                                            mode=mode, shift=shift, draft_top_k=draft_top_k,
                                            draft_top_p=draft_top_p, seed=seed, prompt_offset=prompt_offset,
                                            draft_temperature=draft_temperature)


__all__ = ["generate", "GenerateOutput", "SamplerConfig", "METHODS", "MODES"]

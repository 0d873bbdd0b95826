"""The weak-to-strong evaluation (`rss-jax w2s`): every method of the library on held-out prompts of one target,
scored by a gold reward and two report-only scorers, with cost per token, as one resumable pipeline.

Stages, each cached under the work folder (default runs/w2s) and reused when its settings match (and, for the
methods that draft, when the drafts' weights do: a head re-made under the same name runs those chunks again):

1. prompts: the first `eval_prompts` requests of data/prompts_eval.jsonl (topics the shipped heads never saw);
2. drafts: the shipped SFT and aligned feature-draft heads; the separate-model v2 drafts when they are in the
   cache (`--v2 make` re-makes them with their recipe first; `--v2 skip` leaves them out);
3. one artifact per (method, chunk of prompts): the responses, their three scores and the call's costs, written
   under a temporary name and renamed, so a killed run loses at most the chunk it was running;
4. fluency: the target's negative log-likelihood per token (temperature 1) of every scored response, cached next to
   each artifact and keyed by its texts. The gold reward cannot see reward hacking (strings of positive words);
   the unaligned target can, as a higher NLL. Report-only, like AFINN and TextBlob;
5. the summary JSON (docs/results/weak_to_strong.json) and the report (docs/RESULTS.md with two PNG plots), built
   from the artifacts alone.

Every chunk uses fixed keys (prompt offsets, or a seed per chunk for the population methods), so a re-run, or a run
killed and resumed, gives the same numbers. Best-of-n for n < n_max and soft Best-of-n are read off the BoN(n_max)
pool: BoN's row i of prompt b draws with the key of (i * B + b) whatever n is, so BoN(n) is exactly the first n rows
of the pool (the batch-1 latency runs re-run each of them, which gives their wall-clock and records that the tokens
agree).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_PROMPTS = os.path.join(ROOT, "data", "prompts_eval.jsonl")
SCHEMA = 1


@dataclasses.dataclass(frozen=True)
class Settings:
    """What decides the numbers: changing any field re-runs the chunks it touches (the hash names the artifacts)."""
    model: str = "smollm2-135m-instruct"
    eval_prompts: int = 100
    search_prompts: int = 20  # BoN(n_max), Speculative Rejection, TreeBoN, GSI, RS, CARDS: the first this many
    latency_prompts: int = 4  # each method again on the first this many, one prompt per call, for the wall-clock
    new_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 40
    k: int = 3  # bench_speculative's K sweep: K 3 beat K 2 and K 4 for SD and SSS with the heads
    n_max: int = 64
    bon_ns: tuple = (4, 16)
    soft_beta: float = 20.0
    # (n_init, stops, alpha); the second is scripts/spr_schedules.py's best schedule at a quarter of BoN(64)'s
    # batched cost on 24 training prompts at these sampling settings (results/spr_schedules_w2s.json)
    spr: tuple = ((64, (16,), 0.75), (64, (8, 24, 48), 0.5))
    treebon: tuple = (16, 4, 4)  # n, children, layers
    gsi_n: int = 16
    rsd_delta: float = 0.7
    tau_r: float = 0.9
    args_k: int = 10
    args_weight: float = 1.5
    chunk: int = 25
    search_chunk: int = 4
    seed: int = 0
    heads: tuple = ("smollm2-135m-instruct-head-sft", "smollm2-135m-instruct-head-aligned")

    def key(self, method: str) -> str:
        """The hash of what `method`'s chunks depend on: the shared sampling settings and the method's own (so
        changing, say, the BoN sizes re-runs BoN only, and more prompts only add chunks)."""
        own = {"bon_pool": ("n_max", "bon_ns", "soft_beta", "search_chunk"), "args": ("args_k", "args_weight"),
               "cards": ("tau_r",), "rs": ("tau_r",), "treebon": ("treebon", "heads"), "gsi": ("gsi_n",),
               "rsd": ("rsd_delta",)}.get(method, ())
        if method.startswith("spr_") or method in SEARCH:
            own += ("search_chunk",)
        elif method.startswith(("sd", "sss", "eft")):
            own = ("k", "heads")
        if not is_search(method):
            own += ("chunk",)
        d = dataclasses.asdict(self)
        blob = {f: d[f] for f in ("model", "new_tokens", "temperature", "top_k", "seed") + own}
        text = json.dumps([SCHEMA, method, blob], sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


TINY = dict(latency_prompts=1, eval_prompts=4, search_prompts=2, new_tokens=8, n_max=4, bon_ns=(2,), spr=((4, (2,), 0.5),),
            treebon=(4, 2, 2), gsi_n=2, args_k=3, chunk=2, search_chunk=2, k=2)

# method key -> table label, in the table's order (BoN(n) for other n and the SpR settings are named from Settings)
METHODS = {
    "vanilla": "vanilla target", "sd_sft": "SD, SFT head", "sd": "SD, aligned head", "sss_exact": "SSS exact",
    "sss_paper": "SSS paper", "sss_authors_code": "SSS authors_code", "eft": "EFT (heads)", "args": "ARGS",
    "cards": "CARDS", "rs": "RS", "treebon": "TreeBoN", "gsi": "GSI", "rsd": "RSD",
    "sd_sft_v2": "SD, SFT v2", "sd_v2": "SD, aligned v2", "sss_exact_v2": "SSS exact v2",
    "sss_paper_v2": "SSS paper v2", "sss_authors_code_v2": "SSS authors_code v2", "eft_v2": "EFT v2",
}
SPECULATIVE = ("sd_sft", "sd", "sss_exact", "sss_paper", "sss_authors_code", "eft")  # (and each with _v2)
V2_NAMES = ("smollm2-135m-instruct-distilled", "smollm2-135m-instruct-aligned")


def spr_key(n_init, stops, alpha) -> str:
    return f"spr_{n_init}_{'-'.join(map(str, stops))}_{alpha:g}"


# ------------------------------------------------------------------------------------------------------------------
# scorers
# ------------------------------------------------------------------------------------------------------------------

class Scorers:
    """Gold reward (VADER compound of the response) and the report-only AFINN score (the package's sum of word
    valences) and TextBlob polarity (in [-1, 1]). All three read lexicons shipped inside their packages."""

    def __init__(self):
        from rss_jax.rewards import vader_compound
        try:
            from afinn import Afinn
            from textblob import TextBlob
        except ImportError as e:
            raise ImportError(f"the weak-to-strong scorers need the `w2s` extra ({e.name} is missing); install it "
                              "with `pip install -e \".[w2s]\"` (make test does)") from e
        self._vader, self._afinn, self._blob = vader_compound(), Afinn(), TextBlob

    def __call__(self, texts):
        return dict(gold=[self._vader(t) for t in texts],
                    afinn=[float(self._afinn.score(t)) for t in texts],
                    textblob=[float(self._blob(t).sentiment.polarity) for t in texts])


class CountingReward:
    """VADER as the methods' reward, counting the responses it scores (the reward cost of a method)."""

    def __init__(self, tokenizer):
        import rss_jax as rj
        self.inner, self.rows = rj.rewards.vader_reward(tokenizer), 0

    def score(self, prompt_ids, response_ids):
        self.rows += len(response_ids)
        return self.inner.score(prompt_ids, response_ids)

    __call__ = score


# ------------------------------------------------------------------------------------------------------------------
# artifacts
# ------------------------------------------------------------------------------------------------------------------

def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(tmp, path)


def load_prompts(n: int, path: str = EVAL_PROMPTS) -> list[str]:
    with open(path) as f:
        rows = [json.loads(line)["prompt"] for line in f if line.strip()]
    if n > len(rows):
        raise ValueError(f"--eval-prompts {n} asks for more prompts than {path} holds ({len(rows)}); lower it")
    return rows[:n]


# ------------------------------------------------------------------------------------------------------------------
# running one chunk of one method
# ------------------------------------------------------------------------------------------------------------------

def _spec_cost(out):
    st = out.stats
    return dict(target_row_forwards=int(st["row_blocks_total"]), target_calls=int(st["target_calls"]),
                accepted_histogram=st["accepted_histogram"], acceptance_rate=st["acceptance_rate"],
                k=int(st["k"]))


def run_chunk(ctx, method: str, prompts: list[str], offset: int, chunk_index: int, timing: bool = False) -> dict:
    """Run `method` on `prompts` (the chunk starting at eval prompt `offset`) -> the artifact dict."""
    import rss_jax as rj
    s: Settings = ctx["settings"]
    lm, reward = ctx["lm"], ctx["reward"]
    reward.rows = 0
    kw = dict(max_new_tokens=s.new_tokens, temperature=s.temperature)
    b = len(prompts)
    chunk_seed = s.seed + 1000 * (chunk_index + 1)  # population methods: keys depend on the batch, so one per chunk
    extra = {}
    t0 = time.perf_counter()
    if method == "vanilla":
        out = rj.generate(lm, prompts, method="ar", top_k=s.top_k, seed=s.seed, prompt_offset=offset, **kw)
        cost = dict(target_row_forwards=int(out.stats["target_calls"]) * b, target_calls=int(out.stats["target_calls"]))
    elif method.removesuffix("_v2") in SPECULATIVE:
        v2 = method.endswith("_v2")
        base = method[:-3] if v2 else method
        sft, aligned = (ctx["v2"] if v2 else ctx["heads"])
        gen = dict(prompt_offset=offset, seed=s.seed, **kw)
        if base in ("sd_sft", "sd"):
            out = rj.generate(lm, prompts, method="sd", draft=sft if base == "sd_sft" else aligned, k=s.k,
                              draft_top_k=s.top_k, **gen)
        elif base == "eft":
            out = rj.generate(lm, prompts, method="eft", draft=aligned, sft=sft, **gen)
        else:
            out = rj.generate(lm, prompts, method="sss", draft=aligned, sft=sft, k=s.k, mode=base[4:],
                              draft_top_k=s.top_k, **gen)
        cost = _spec_cost(out)
    elif method == "bon_pool":
        out = rj.best_of_n(lm, prompts, reward, n=s.n_max, top_k=s.top_k, seed=chunk_seed, **kw)
        cost = dict(target_row_forwards=int(out.stats["decode_slots"]), target_calls=int(out.stats["target_forwards"]))
        pool_call_s, pool_rows = time.perf_counter() - t0, reward.rows
        extra = _pool_variants(ctx, out, prompts, chunk_seed, timing=timing)
    elif method.startswith("spr_"):
        n_init, stops, alpha = ctx["spr"][method]
        out = rj.speculative_rejection(lm, prompts, reward, alpha=alpha, n_init=n_init, stops=list(stops),
                                       top_k=s.top_k, seed=chunk_seed, **kw)
        cost = dict(target_row_forwards=int(out.stats["decode_slots"]), target_calls=int(out.stats["target_forwards"]),
                    schedule=out.stats["schedule"])
    elif method == "args":
        out = rj.args(lm, prompts, reward, k=s.args_k, weight=s.args_weight, max_new_tokens=s.new_tokens,
                      seed=s.seed, prompt_offset=offset)
        tf = int(out.stats.get("target_forwards", 0))
        cost = dict(target_row_forwards=tf * b, target_calls=tf)
    elif method in ("cards", "rs"):
        if method == "cards":
            out = rj.cards(lm, prompts, reward, tau_r=s.tau_r, top_k=s.top_k, seed=s.seed, prompt_offset=offset,
                           **kw)
        else:
            out = rj.rejection_sampling(lm, prompts, reward, tau_r=s.tau_r, top_k=s.top_k, seed=chunk_seed, **kw)
        cost = dict(target_row_forwards=int(out.stats["sequential"]["target_forwards"]),
                    target_calls=int(out.stats["target_forwards"]))
    elif method == "treebon":
        n, children, layers = s.treebon
        sft, aligned = ctx["heads"]
        out = rj.treebon(lm, prompts, reward, n=n, n_children=children, n_layers=layers, dpo=aligned, sft=sft,
                         top_k=s.top_k, seed=chunk_seed, **kw)
        tf = int(out.stats["target_forwards"])
        cost = dict(target_row_forwards=tf * b * n, target_calls=tf)
    elif method in ("gsi", "rsd"):
        small = ctx["small"]
        if method == "gsi":
            out = rj.gsi(small, lm, prompts, reward, n=s.gsi_n, top_k=s.top_k, seed=s.seed, prompt_offset=offset,
                         **kw)
        else:
            out = rj.rsd(small, lm, prompts, reward, delta=s.rsd_delta, top_k=s.top_k, seed=s.seed,
                         prompt_offset=offset, **kw)
        st = out.stats
        big = int(st.get("big_scored_tokens", 0)) + int(st.get("big_tokens", 0)) + int(st.get("big_synced_tokens", 0))
        if small is lm:  # the small model is the target itself: its steps are target forwards too
            big += int(st.get("small_tokens", 0))
        cost = dict(target_row_forwards=big, target_calls=int(st.get("target_forwards", st.get("big_calls", 0))),
                    acceptance_rate=st.get("acceptance_rate"))
    else:
        raise ValueError(f"unknown w2s method {method!r}")
    call_s = time.perf_counter() - t0
    if method == "bon_pool":  # the variants' own timing runs are not the pool's cost
        call_s, reward.rows = pool_call_s, pool_rows
    compile_s = float(out.stats.get("compile_s") or 0.0)
    texts = list(out.texts)
    art = dict(method=method, offset=offset, prompts=prompts, texts=texts, new_tokens=[int(x) for x in out.lengths],
               call_s=call_s, compile_s=compile_s, wall_s=max(call_s - compile_s, 0.0), reward_rows=reward.rows,
               **cost, **ctx["score"](texts))
    if extra:
        art["variants"] = extra
    return art


def _pool_variants(ctx, pool, prompts, chunk_seed, timing: bool) -> dict:
    """BoN(n) for the smaller n and soft BoN(n) read off a BoN(n_max) pool; on the timing chunk each is also run on
    its own, for its wall-clock and to check that its tokens are the pool's."""
    import rss_jax as rj
    from rss_jax.decoding.best_of_n import soft_choice
    s: Settings = ctx["settings"]
    lm, tok = ctx["lm"], ctx["lm"].tokenizer
    cand, scores = np.asarray(pool.candidates), np.asarray(pool.candidate_scores, np.float64)
    out = {}
    kw = dict(max_new_tokens=s.new_tokens, temperature=s.temperature, top_k=s.top_k, seed=chunk_seed)
    soft_n = max(s.bon_ns)
    for name, n, beta in [(f"bon_{n}", n, None) for n in s.bon_ns] + [(f"soft_bon_{soft_n}", soft_n, s.soft_beta)]:
        chosen = soft_choice(scores[:, :n], beta, chunk_seed)
        rows = cand[np.arange(len(prompts)), chosen]
        lengths = (rows >= 0).sum(1)
        texts = [tok.decode(r[:m].tolist(), skip_special_tokens=True) for r, m in zip(rows, lengths)]
        v = dict(texts=texts, new_tokens=[int(x) for x in lengths], target_row_forwards=None, **ctx["score"](texts))
        if timing:
            ctx["reward"].rows = 0
            t0 = time.perf_counter()
            own = rj.best_of_n(lm, prompts, ctx["reward"], n=n, beta=beta, **kw)
            call_s = time.perf_counter() - t0
            compile_s = float(own.stats.get("compile_s") or 0.0)
            v.update(timing=dict(call_s=call_s, compile_s=compile_s, wall_s=call_s - compile_s,
                                 new_tokens=int(own.lengths.sum()), reward_rows=ctx["reward"].rows,
                                 target_row_forwards=int(own.stats["decode_slots"]),
                                 same_tokens_as_pool=bool(np.array_equal(np.asarray(own.tokens), rows))))
        out[name] = v
    return out


# ------------------------------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------------------------------

def _progress(total, desc, unit="chunk"):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None


# the population methods, RS (which draws its max_tries = 21 responses per prompt as one population) and CARDS
# (whose segment retries cost as much; one 25-prompt chunk ran over 8 minutes): on the first `search_prompts` only
SEARCH = ("bon_pool", "treebon", "gsi", "cards", "rs")


def is_search(method: str) -> bool:
    return method in SEARCH or method.startswith("spr_")


def plan(s: Settings, methods=None, with_v2: bool = False) -> list[tuple[str, str, int, int]]:
    """(phase, method, offset, size) of every chunk to run, in order. Phase "quality": the responses that are
    scored, in chunks of `chunk` prompts (`search_chunk` for the population methods); phase "latency": the first
    `latency_prompts` prompts again, one per call (batch 1, a user waiting for one answer), which gives the wall
    seconds per token in the table."""
    names = ["vanilla", "sss_exact", "eft", "sd_sft", "sd", "sss_paper", "sss_authors_code", "args", "rsd",
             "bon_pool"] + [spr_key(*c) for c in s.spr] + ["treebon", "gsi", "rs", "cards"]
    if with_v2:
        names += ["sd_sft_v2", "sd_v2", "sss_exact_v2", "sss_paper_v2", "sss_authors_code_v2", "eft_v2"]
    if methods:
        unknown = [m for m in methods if m not in names]
        if unknown:
            raise ValueError(f"unknown --methods {unknown}; choose from {names}")
        names = [m for m in names if m in methods]
    jobs = []
    for m in names:
        n, size = (s.search_prompts, s.search_chunk) if is_search(m) else (s.eval_prompts, s.chunk)
        n = min(n, s.eval_prompts)
        jobs += [("quality", m, off, min(size, n - off)) for off in range(0, n, size)]
    for m in names:
        jobs += [("latency", m, off, 1) for off in range(min(s.latency_prompts, s.eval_prompts))]
    return jobs


def _v2_drafts(mode: str):
    """The separate-model v2 drafts from the cache (made by `make drafts-v2` when `mode` is make), or None."""
    from rss_jax.loading import cache_root
    if mode == "skip" or cache_root() is None:
        return None
    paths = [os.path.join(cache_root(), "drafts", n) for n in V2_NAMES]
    if not all(os.path.isdir(p) for p in paths) and mode == "make":
        print("w2s: re-making the v2 drafts with `make drafts-v2` (about 90 minutes on 2 cores)", file=sys.stderr)
        subprocess.run(["make", "-C", ROOT, "drafts-v2"], check=True)
    if not all(os.path.isdir(p) for p in paths):
        return None
    import rss_jax as rj
    return tuple(rj.load(p) for p in paths)


def run(s: Settings, work: str, out_json: str, results_md: str | None = None, methods=None, v2: str = "auto",
        tiny_model=None, command: str = "") -> dict:
    """Run (or resume) the pipeline; returns the summary that is written to `out_json`."""
    import rss_jax as rj
    t_start = time.perf_counter()
    commit = git_commit()  # what the run starts from
    prompts = load_prompts(s.eval_prompts)
    if tiny_model is not None:  # the test suite's small version: (lm, sft head, aligned head) built in the test
        lm, sft, aligned = tiny_model
        v2_models = None
    else:
        lm = rj.load(s.model)
        sft, aligned = (rj.load(h) for h in s.heads)
        v2_models = _v2_drafts(v2)
    ctx = dict(settings=s, lm=lm, heads=(sft, aligned), v2=v2_models, reward=CountingReward(lm.tokenizer),
               score=Scorers(), spr={spr_key(*c): c for c in s.spr})
    ctx["small"] = v2_models[1] if v2_models else lm
    jobs = plan(s, methods, with_v2=v2_models is not None)
    # the drafts' weights are not in the settings (a re-made head keeps its name), so each artifact of a method
    # that uses them records their fingerprint and is run again when it differs
    prints = dict(heads=weights_fingerprint(sft, aligned),
                  v2=weights_fingerprint(*v2_models) if v2_models else None,
                  small=None if ctx["small"] is lm else weights_fingerprint(ctx["small"]))
    finished = [_finished(_art_path(work, s, *j[:3]), _uses(j[1], prints)) for j in jobs]  # each artifact read once
    bar = _progress(len(jobs), "w2s")
    if bar is not None:
        bar.update(sum(finished))
    for (phase, m, off, size), done in zip(jobs, finished):
        if done:
            continue
        path = _art_path(work, s, phase, m, off)
        weights = _uses(m, prints)
        if bar is not None:
            bar.set_postfix_str(f"{m} @ {off}" + (" (batch 1)" if phase == "latency" else ""))
        if phase == "latency":
            index = 10 ** 6 + off  # keys of its own: the latency runs time the method, they are not scored twice
        else:
            index = off // (s.search_chunk if is_search(m) else s.chunk)
        art = run_chunk(ctx, m, prompts[off:off + size], off, index, timing=phase == "latency")
        if weights is not None:
            art["weights"] = weights
        _write_json(path, art)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    fluency(lm, work, s, jobs)
    summary = summarize(s, work, jobs, prompts, command, small_is_target=ctx["small"] is lm,
                        run_s=time.perf_counter() - t_start, commit=commit)
    _write_json(out_json, summary)
    if results_md:
        from rss_jax import w2s_report
        w2s_report.write(summary, results_md)
    return summary


def _fluency_path(art_path: str) -> str:
    return art_path[:-len(".json")] + ".nll.json"


def _fluency_groups(art: dict) -> dict:
    """The scored responses of one artifact, by name: "" for its own, and each BoN variant read off the pool."""
    groups = {"": (art["prompts"], art["texts"])}
    for name, v in (art.get("variants") or {}).items():
        groups[name] = (art["prompts"], v["texts"])
    return groups


FLUENCY_SCHEMA = 1  # bump when what is scored changes (template, special tokens), so old caches are not reused


def fluency(lm, work: str, s: Settings, jobs, batch_size: int = 16, slice_responses: int = 400) -> None:
    """Stage 4: the target's NLL of every scored response, written next to each quality artifact as
    chunk_*.nll.json. The missing ones are scored in slices of about `slice_responses` (each slice sorted by length
    inside `response_nll`) and written after each slice, so a killed run keeps what it finished. The cache is keyed
    by the target's weights and the texts: a re-run scores nothing again, and a chunk that was run again is scored
    afresh."""
    from rss_jax.likelihood import response_nll
    target = weights_fingerprint(lm)
    todo = []
    for phase, m, off, _ in jobs:
        if phase != "quality":
            continue
        path = _art_path(work, s, phase, m, off)
        with open(path) as f:
            groups = _fluency_groups(json.load(f))
        key = hashlib.sha256(json.dumps([FLUENCY_SCHEMA, target, groups], sort_keys=True).encode()).hexdigest()[:16]
        cached = _fluency_path(path)
        if os.path.exists(cached):
            with open(cached) as f:
                if json.load(f).get("key") == key:
                    continue
        todo.append((cached, key, groups))
    if not todo:
        return
    total = sum(len(ps) for _, _, groups in todo for ps, _ in groups.values())
    bar = _progress(total, "w2s fluency", unit="response")
    i = 0
    while i < len(todo):
        part, size = [], 0
        while i < len(todo) and (not part or size < slice_responses):
            part.append(todo[i])
            size += sum(len(ps) for ps, _ in todo[i][2].values())
            i += 1
        items = [(p, t) for _, _, groups in part for ps, ts in groups.values() for p, t in zip(ps, ts)]
        nll, count = response_nll(lm, [p for p, _ in items], [t for _, t in items], batch_size=batch_size)
        at = 0
        for cached, key, groups in part:
            out = {}
            for name, (ps, _) in groups.items():
                out[name] = dict(nll=nll[at:at + len(ps)].tolist(), tokens=count[at:at + len(ps)].tolist())
                at += len(ps)
            _write_json(cached, dict(key=key, groups=out))
        if bar is not None:
            bar.update(size)
    if bar is not None:
        bar.close()


def weights_fingerprint(*models) -> str:
    """A short hash of the models' weights (every array's dtype, shape and bytes), draft vocabularies and proposal
    calibrations."""
    import jax
    h = hashlib.sha256()
    for m in models:
        cfg = getattr(m, "config", None)
        ids = getattr(cfg, "token_ids", None)  # a feature head's draft vocabulary
        if ids is None:
            ids = getattr(cfg, "head_token_ids", None)  # a trimmed-head LM's
        h.update(repr(None if ids is None else list(ids)).encode())
        scale = getattr(m, "draft_temperature_scale", None)  # a calibrated head drafts at another temperature
        if scale is not None:  # (only then: the fingerprints of uncalibrated drafts stay what they were)
            h.update(f"draft_temperature_scale={scale!r}".encode())
        for leaf in jax.tree.leaves(m.state):
            a = np.asarray(leaf)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _uses(method: str, prints: dict) -> str | None:
    """The fingerprint of the drafts `method` runs with (None when it uses the target alone)."""
    if method.endswith("_v2"):
        return prints["v2"]
    if method in SPECULATIVE or method == "treebon":
        return prints["heads"]
    if method in ("gsi", "rsd"):
        return prints["small"]
    return None


def _finished(path: str, weights: str | None) -> bool:
    """A finished artifact at `path`, made with the drafts of fingerprint `weights`; None: with no drafts (a GSI chunk
    made with the v2 draft as its small model is not reused once the small model is the target)."""
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f).get("weights") == weights


def _art_path(work, s: Settings, phase, method, offset) -> str:
    tag = "" if phase == "quality" else "-b1"
    return os.path.join(work, f"{method}{tag}-{s.key(method)}", f"chunk_{offset:05d}.json")


def _stats(values):
    a = np.asarray(values, np.float64)
    se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan")
    return float(a.mean()), se


def _entry(arts, lat, label):
    """One method's row: scores and costs from the quality chunks `arts`, wall-clock from the batch-1 latency runs
    `lat` (dicts with wall_s and new_tokens; their costs stand in where the quality chunks carry none, as for the
    BoN variants read off the pool)."""
    texts = sum((a["texts"] for a in arts), [])
    new = sum(sum(a["new_tokens"]) for a in arts)
    g_mean, g_se = _stats(sum((a["gold"] for a in arts), []))
    af_mean, af_se = _stats(sum((a["afinn"] for a in arts), []))
    tb_mean, tb_se = _stats(sum((a["textblob"] for a in arts), []))
    e = dict(label=label, prompts=len(texts), gold_reward_mean=g_mean, gold_reward_se=g_se, afinn_mean=af_mean,
             afinn_se=af_se, textblob_mean=tb_mean, textblob_se=tb_se, new_tokens=int(new),
             mean_new_tokens=new / max(len(texts), 1))
    cost = arts if all(a.get("target_row_forwards") is not None for a in arts) else lat
    cost_new = max(sum(_tokens(a) for a in cost), 1)
    lat_new = max(sum(_tokens(a) for a in lat), 1)
    lat_wall = sum(a["wall_s"] for a in lat)
    e.update(wall_s_per_token=lat_wall / lat_new if lat else None, latency_prompts=len(lat),
             latency_wall_s=lat_wall, latency_new_tokens=int(sum(_tokens(a) for a in lat)),
             compile_s=sum(a.get("compile_s", 0.0) for a in arts) + sum(a.get("compile_s", 0.0) for a in lat),
             target_calls_per_token=sum(a["target_row_forwards"] for a in cost) / cost_new,
             reward_calls_per_token=sum(a["reward_rows"] for a in cost) / cost_new)
    if all("wall_s" in a for a in arts):  # the chunked run's throughput (the quality chunks are batched)
        e["wall_s_per_token_batched"] = sum(a["wall_s"] for a in arts) / max(new, 1)
    e.update(target_nll_mean=None, target_nll_se=None)
    # per response: NLL per token under the target (T 1); None for an empty response
    flu = [n / c if c else None for a in arts for n, c in zip(a["fluency"]["nll"], a["fluency"]["tokens"])] \
        if arts and all("fluency" in a for a in arts) else []
    if any(x is not None for x in flu):
        e["target_nll_mean"], e["target_nll_se"] = _stats([x for x in flu if x is not None])
    hists = [a["accepted_histogram"] for a in arts if a.get("accepted_histogram") is not None]
    e.update(acceptance_rate=None, acceptance_by_offset=None, tokens_per_target_call=None)
    if hists:
        from rss_jax.decoding.speculative import acceptance_by_offset
        h = np.sum(np.asarray(hists, np.int64), axis=0)
        k = len(h) - 1
        blocks = int(h.sum())
        acc = int((h * np.arange(k + 1)).sum())
        e.update(acceptance_rate=acc / (k * blocks) if k and blocks else None,
                 acceptance_by_offset=acceptance_by_offset(h) if k else None,
                 tokens_per_target_call=new / blocks if blocks else None, k=k)
    elif arts and arts[0].get("acceptance_rate") is not None:  # GSI / RSD: the share of accepted small-model steps
        e["acceptance_rate"] = float(np.mean([a["acceptance_rate"] for a in arts]))
    e["examples"] = [dict(prompt=p, text=t, gold=g) for p, t, g in
                     zip(sum((a["prompts"] for a in arts), [])[:3], texts[:3], sum((a["gold"] for a in arts), [])[:3])]
    for ex, x in zip(e["examples"], flu):
        ex["target_nll"] = x
    return e


def _tokens(a) -> int:
    n = a["new_tokens"]
    return int(sum(n)) if isinstance(n, list) else int(n)


def git_commit() -> str | None:
    """The checkout's commit, with "+changes" when tracked files differ from it (None outside a git checkout)."""
    try:
        run_ = functools.partial(subprocess.run, capture_output=True, text=True, timeout=10, cwd=ROOT)
        head = run_(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run_(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+changes" if dirty else "")) or None


def summarize(s: Settings, work, jobs, prompts, command, small_is_target=True, run_s=None, commit=None) -> dict:
    import jax

    from rss_jax import report
    quality, latency = {}, {}
    for phase, m, off, _ in jobs:
        path = _art_path(work, s, phase, m, off)
        with open(path) as f:
            art = json.load(f)
        if phase == "quality" and os.path.exists(_fluency_path(path)):
            with open(_fluency_path(path)) as f:
                groups = json.load(f)["groups"]
            for name, (_, texts) in _fluency_groups(art).items():
                if name not in groups or len(groups[name]["nll"]) != len(texts):
                    raise ValueError(f"{_fluency_path(path)} does not match its artifact ({name or 'responses'}); "
                                     "delete it and re-run `rss-jax w2s` to score the responses again")
            art["fluency"] = groups[""]
            for name, v in (art.get("variants") or {}).items():
                v["fluency"] = groups[name]
        (quality if phase == "quality" else latency).setdefault(m, []).append(art)
    methods = {}
    for m, arts in quality.items():
        lat = latency.get(m, [])
        if m == "bon_pool":
            methods[f"bon_{s.n_max}"] = _entry(arts, lat, f"BoN({s.n_max})")
            for name in arts[0]["variants"]:
                n = name.rsplit("_", 1)[1]
                label = f"soft BoN({n}, β {s.soft_beta:g})" if name.startswith("soft") else f"BoN({n})"
                vs = [dict(a["variants"][name], prompts=a["prompts"]) for a in arts]
                timings = [a["variants"][name]["timing"] for a in lat]
                methods[name] = _entry(vs, timings, label)
                methods[name]["read_off_pool"] = True
                methods[name]["same_tokens_as_pool"] = bool(timings) and all(t["same_tokens_as_pool"] for t in timings)
        elif m.startswith("spr_"):
            n_init, stops, alpha = next(c for c in s.spr if spr_key(*c) == m)
            methods[m] = _entry(arts, lat, f"SpR(n {n_init}, stop {','.join(map(str, stops))}, α {alpha:g})")
        else:
            label = METHODS[m]
            if m in ("gsi", "rsd"):
                label += " (small = target)" if small_is_target else " (small = aligned v2 draft)"
            methods[m] = _entry(arts, lat, label)
    bon = sorted((k for k in methods if k.startswith("bon_")), key=lambda k: int(k.split("_")[1]))
    bon += [k for k in methods if k.startswith("soft_bon_")]
    order = [k for k in ("vanilla",) if k in methods] + bon + [k for k in methods if k.startswith("spr_")] + \
        [k for k in METHODS if k in methods and k != "vanilla"]  # SpR after the BoN rows it is measured against
    methods = {k: methods[k] for k in order}
    every = [a for group in (quality, latency) for arts in group.values() for a in arts]
    return dict(eval_prompts=len(prompts), search_prompts=min(s.search_prompts, len(prompts)),
                latency_prompts=min(s.latency_prompts, len(prompts)), settings=dataclasses.asdict(s),
                machine=report.machine(), backend=jax.default_backend(), command=command, git_commit=commit,
                run_s=run_s, chunks_s=sum(a["call_s"] for a in every), methods=methods)

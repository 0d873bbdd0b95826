"""docs/RESULTS.md and its two plots, written from the weak-to-strong summary JSON alone (`rss_jax.w2s`)."""
from __future__ import annotations

import os


def _fmt(x, nd=3, dash="–"):
    if x is None or (isinstance(x, float) and x != x):
        return dash
    return f"{x:.{nd}f}"


def plots(summary: dict, folder: str, stem: str = "weak_to_strong") -> tuple[str, str]:
    """Gold reward against wall seconds per token (log) and against target forwards per token (log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(folder, exist_ok=True)
    paths = []
    markers = "os^vD<>phX*P"
    for key, xlabel, name in (("wall_s_per_token", "wall-clock seconds per returned token (log)", "wall"),
                              ("target_calls_per_token", "target forwards per returned token (one row = one, log)",
                               "forwards")):
        fig, ax = plt.subplots(figsize=(8.2, 5.4))
        for i, (m, e) in enumerate(summary["methods"].items()):
            x = e.get(key)
            if not x or x <= 0:
                continue
            ax.errorbar([x], [e["gold_reward_mean"]], yerr=[e["gold_reward_se"] or 0], fmt=markers[i % len(markers)],
                        ms=6, capsize=2, label=e["label"])
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("gold reward (mean VADER of the response, ± s.e.)")
        ax.set_title(f"{summary['settings']['model']}: {summary['eval_prompts']} held-out prompts, "
                     f"{summary['settings']['new_tokens']} new tokens")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6.5, ncol=2, loc="best")
        fig.tight_layout()
        path = os.path.join(folder, f"{stem}_{name}.png")
        tmp = path + ".tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, path)
        paths.append(path)
    return tuple(paths)


def markdown(summary: dict, wall_png: str, fw_png: str) -> str:
    s = summary["settings"]
    m = summary["methods"]
    van = m.get("vanilla")
    lines = [
        "# Weak-to-strong results",
        "",
        "Does reward-shifted speculative sampling give the aligned model's quality at less cost than the "
        "alternatives? Every number below is read from `docs/results/weak_to_strong.json`, which this command "
        "wrote:",
        "",
        "```",
        summary["command"] or "rss-jax w2s",
        "```",
        "",
        f"* **Machine:** {summary['machine']} (JAX backend: {summary['backend']}); git commit "
        f"`{summary['git_commit']}`. The method calls of all chunks took "
        f"{_fmt((summary.get('chunks_s') or 0) / 60, 1)} minutes in all; the invocation that wrote this report took "
        f"{_fmt((summary.get('run_s') or 0) / 60, 1)} (it reuses every finished chunk, so a resumed run reports "
        "only what it ran, plus loading).",
        f"* **Target:** {s['model']}, the strong unaligned model. **Drafts:** the shipped SFT and aligned "
        "feature-draft heads (rows with `v2` use the separate-model v2 drafts).",
        f"* **Prompts:** the first {summary['eval_prompts']} requests of `data/prompts_eval.jsonl` (topics no "
        f"draft saw in training); BoN({s['n_max']}), the smaller BoN, Speculative Rejection, TreeBoN, GSI, "
        "RS and CARDS ran on the first "
        f"{summary['search_prompts']} of them.",
        f"* **Sampling:** T {s['temperature']}, {s['new_tokens']} new tokens at most (EOS ends a response), K "
        f"{s['k']}; top-k {s['top_k']} on the target for vanilla, BoN, SpR, RS, CARDS, TreeBoN, GSI and RSD, on the "
        "proposal for SD and SSS; no target filter for SD, SSS and EFT (SSS exact and EFT sample one law).",
        "* **Scores:** gold reward = VADER compound of the response (also what every reward-guided method "
        "optimises); AFINN (sum of word valences) and TextBlob polarity are for reporting only. **Target NLL** is "
        "the unaligned target's negative log-likelihood per response token at temperature 1 (mean over responses): "
        "a fluency check the reward cannot game. Text the target would write itself scores low; strings of "
        "positive words that VADER likes score high. It depends on the sampling law too: rows drawn with the "
        "target's top-k filter (vanilla, BoN, SpR, ...) score lower than the unfiltered law of SD, SSS and EFT, so "
        "compare SSS with SD (the target's own unfiltered law), not with vanilla.",
        f"* **Wall-clock:** seconds per returned token of each method run on the first "
        f"{summary.get('latency_prompts')} prompts one at a time (batch 1: what a user waiting for one answer "
        "sees), the whole call with its host work and reward calls, compiles excluded. \"batched\" is the same "
        f"for the scored run, {s['chunk']} prompts per call ({s['search_chunk']} for the population methods): on "
        "two CPU cores a batch of 25 is bound by arithmetic, where verifying K+1 tokens costs nearly K+1 steps, so "
        "speculation pays at batch 1 and not there.",
        "* **Forwards and reward calls** per returned token count one row's target forward as one (a K+1-token "
        "verification is one), so BoN(n) costs about n; reward calls count scored responses. Rows marked † are "
        "read off the BoN pool (BoN(n) is exactly the pool's first n rows, checked on the batch-1 runs) and take "
        "their costs from their own batch-1 runs.",
        "",
        "| method | gold ± s.e. | AFINN | TextBlob | target NLL | wall s / token | vs vanilla | batched wall s / "
        "token | target fw / token | reward calls / token | acceptance | α_1 .. α_K | tokens / target call "
        "| prompts |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, e in m.items():
        speed = _ratio(van["wall_s_per_token"], e["wall_s_per_token"]) if van and e["wall_s_per_token"] else None
        by = e.get("acceptance_by_offset")
        lines.append(
            f"| {e['label']}{' †' if e.get('read_off_pool') else ''} | {_fmt(e['gold_reward_mean'])} ± "
            f"{_fmt(e['gold_reward_se'])} | {_fmt(e['afinn_mean'], 2)} | {_fmt(e['textblob_mean'])} | "
            f"{_fmt(e.get('target_nll_mean'), 2)} | "
            f"{_fmt(e['wall_s_per_token'], 4)} | {_fmt(speed, 2)}x | {_fmt(e.get('wall_s_per_token_batched'), 4)} | "
            f"{_fmt(e['target_calls_per_token'], 2)} | "
            f"{_fmt(e['reward_calls_per_token'], 2)} | {_fmt(e.get('acceptance_rate'), 2)} | "
            f"{' / '.join(_fmt(a, 2) for a in by) if by else '–'} | {_fmt(e.get('tokens_per_target_call'), 2)} | "
            f"{e['prompts']} |")
    lines += ["", "\"vs vanilla\" is the speed-up in wall seconds per token (above 1 is faster).", ""]
    lines += findings(summary)
    lines += ["", f"![gold reward against wall-clock]({wall_png})", "",
              f"![gold reward against target forwards]({fw_png})", "", "## Example outputs", ""]
    show = [k for k in ("vanilla", "bon_16", "sd_sft", "sss_exact", "eft", "args", "treebon", "rsd", "sss_exact_v2")
            if k in m]
    n_ex = min(len(m[k]["examples"]) for k in show) if show else 0
    for i in range(n_ex):
        lines += [f"**Prompt:** {m[show[0]]['examples'][i]['prompt']}", "",
                  "| method | gold | target NLL | response |", "|---|---|---|---|"]
        for k in show:
            ex = m[k]["examples"][i]
            text = " ".join(ex["text"].split()).replace("|", "\\|")
            lines.append(f"| {m[k]['label']} | {_fmt(ex['gold'])} | {_fmt(ex.get('target_nll'), 2)} | {text} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _signed(x, nd=2) -> str:
    """x with its sign, and no "-0.00" for a difference that rounds to zero."""
    text = f"{x:+.{nd}f}"
    return "+" + text[1:] if float(text) == 0 else text


def _ratio(a, b):
    return a / b if b else float("nan")


def findings(summary: dict) -> list[str]:
    """The issue's claims, each checked against the numbers (true or false as measured)."""
    m = summary["methods"]
    out = ["## What the numbers show", ""]

    def have(*ks):
        return all(k in m for k in ks)
    if have("vanilla", "sss_exact"):
        v, x = m["vanilla"], m["sss_exact"]
        gap = x["gold_reward_mean"] - v["gold_reward_mean"]
        se = (v["gold_reward_se"] ** 2 + x["gold_reward_se"] ** 2) ** 0.5
        out.append(f"* SSS exact against vanilla: gold {gap:+.3f} ({_ratio(gap, se):.1f} standard errors of the "
                   f"difference), AFINN {x['afinn_mean'] - v['afinn_mean']:+.2f}, TextBlob "
                   f"{x['textblob_mean'] - v['textblob_mean']:+.3f}; wall per token "
                   f"{_ratio(v['wall_s_per_token'], x['wall_s_per_token']):.2f}x vanilla's speed.")
    if have("sss_exact", "eft"):
        x, e = m["sss_exact"], m["eft"]
        gap = x["gold_reward_mean"] - e["gold_reward_mean"]
        se = (x["gold_reward_se"] ** 2 + e["gold_reward_se"] ** 2) ** 0.5
        out.append(f"* SSS exact and EFT sample one law: gold differs by {gap:+.3f} ({_ratio(gap, se):.1f} s.e.); SSS "
                   f"runs at {_ratio(e['wall_s_per_token'], x['wall_s_per_token']):.2f}x EFT's speed.")
    if "sss_exact" in m:
        x = m["sss_exact"]
        better = [e for k, e in m.items() if e["gold_reward_mean"] > x["gold_reward_mean"]]
        slower = [e["label"] for e in better if e["wall_s_per_token"] > x["wall_s_per_token"]]

        def named(e):
            if e.get("target_nll_mean") is None or x.get("target_nll_mean") is None:
                return e["label"]
            return (f"{e['label']} (target NLL {_fmt(e['target_nll_mean'], 2)}, SSS exact's "
                    f"{_fmt(x['target_nll_mean'], 2)})")
        faster = [named(e) for e in better if e["wall_s_per_token"] <= x["wall_s_per_token"]]
        out.append(f"* Methods with a higher gold reward than SSS exact: {len(better)}; of those slower per token: "
                   f"{', '.join(slower) or 'none'}; not slower: {', '.join(faster) or 'none'}.")
    nll = {k: e["target_nll_mean"] for k, e in m.items() if e.get("target_nll_mean") is not None}
    if "vanilla" in nll:
        parts = [f"vanilla {_fmt(nll['vanilla'], 2)} ± {_fmt(m['vanilla']['target_nll_se'], 2)}"]
        if "sss_exact" in nll:
            parts.append(f"SSS exact {_fmt(nll['sss_exact'], 2)}" + (
                f" against {m['sd_sft']['label']}'s {_fmt(nll['sd_sft'], 2)} (the target's own law without its top-k "
                f"filter: {_signed(nll['sss_exact'] - nll['sd_sft'])})" if "sd_sft" in nll else ""))
        hi = sorted((k for k in nll if k != "vanilla"), key=lambda k: -nll[k])[:3]
        if hi:
            parts.append("highest: " + ", ".join(
                f"{m[k]['label']} {_fmt(nll[k], 2)} ({_signed(nll[k] - nll['vanilla'])})" for k in hi))
        out.append("* Fluency, the target's NLL per response token (lower reads more like the target's own text): "
                   + "; ".join(parts) + ".")
    bon = next((k for k in m if k.startswith("bon_") and k == f"bon_{summary['settings']['n_max']}"), None)
    if bon:
        b = m[bon]
        for k, e in m.items():
            if k.startswith("spr_"):
                gap = e["gold_reward_mean"] - b["gold_reward_mean"]
                within = abs(gap) <= b["gold_reward_se"]
                batched = _ratio(e.get("wall_s_per_token_batched") or float("nan"),
                                 b.get("wall_s_per_token_batched") or float("nan"))
                out.append(f"* {e['label']}: gold {gap:+.3f} against {b['label']} (its s.e. "
                           f"{b['gold_reward_se']:.3f}: {'within' if within else 'not within'} one s.e.) at "
                           f"{_ratio(e['wall_s_per_token'], b['wall_s_per_token']):.2f} of its wall-clock per token "
                           "at batch 1" + ("." if batched != batched else f" and {batched:.2f} batched."))
    spec = [e for e in m.values() if e.get("tokens_per_target_call")]
    if spec:
        out.append("* Acceptance per drafted token and tokens per target call: " + "; ".join(
            f"{e['label']} {_fmt(e['acceptance_rate'], 2)} / {_fmt(e['tokens_per_target_call'], 2)}" for e in spec)
            + ".")
    return out


def write(summary: dict, results_md: str) -> str:
    folder = os.path.dirname(results_md) or "."
    wall_png, fw_png = plots(summary, os.path.join(folder, "results"))
    text = markdown(summary, os.path.join("results", os.path.basename(wall_png)),
                    os.path.join("results", os.path.basename(fw_png)))
    tmp = results_md + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, results_md)
    return results_md

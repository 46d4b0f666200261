"""The Markdown report: models side by side, every figure with its sample size and method."""

from __future__ import annotations

from typing import Any

LIMITATIONS = [
    "These probes measure associations in a model's probabilities, not harm in use: a model can "
    "score well here and still produce biased text in a real conversation, and the reverse.",
    "The suites are short and written in English by tokenmill's authors. Their templates, group terms "
    "and stereotype labels reflect one cultural view; a different wording can change the numbers.",
    "The groups are few and coarse (two genders in the occupations suite; a handful of nationalities, "
    "religions and ages elsewhere). Nobody outside them is measured, and the terms stand in for real people.",
    "Log-likelihoods also reflect how frequent a word is: a rare group term or occupation lowers a "
    "sentence's score for reasons unrelated to bias. Comparisons within a pair or a subject pair limit this, "
    "but the paired sentences differ in their terms, whose token counts and frequencies differ.",
    "Masked-LM pseudo-log-likelihoods and causal log-likelihoods are different quantities: compare models "
    "of the same kind, and compare masked and causal models only by the direction of their preferences.",
    "Comparisons within one suite share templates and terms, so they are not independent samples; the "
    "intervals treat them as if they were and are therefore too narrow, the per-comparison ones most of all.",
    "Counterfactual generation is sampled: with few samples per group, word differences are mostly noise. "
    "The permutation p-value says how much; it is not corrected for testing many prompts.",
    "A sentiment classifier, when given, carries its own biases and was not validated here.",
]


def _pct(p: dict[str, Any]) -> str:
    if p["share"] is None:
        return "n/a (n=0)"
    return f"{100 * p['share']:.1f}% [{100 * p['ci95'][0]:.1f}, {100 * p['ci95'][1]:.1f}] ({p['k']}/{p['n']})"


def _mean(s: dict[str, Any], digits: int = 3) -> str:
    if s["mean"] is None:
        return "n/a (n=0)"
    ci = f" [{s['ci95'][0]:+.{digits}f}, {s['ci95'][1]:+.{digits}f}]" if s["ci95"] else ""
    return f"{s['mean']:+.{digits}f}{ci} (n={s['n']})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _occupations(section: dict[str, Any], models: list[str]) -> list[str]:
    res = {m: section["results"][m]["summary"] for m in models}
    a, b = res[models[0]]["groups"]
    lines = [
        f"Each comparison is the log-ratio {res[models[0]]['log_ratio']}: positive means the occupation is "
        f"likelier after the {a} subject. Per model, how `log p` was computed:",
        "",
    ]
    lines += [f"- **{m}**: {section['results'][m]['raw']['method']}." for m in models] + [""]
    rows = [
        ["comparisons (template x subject pair x occupation)", *[str(res[m]["comparisons"]) for m in models]],
        [
            "occupations whose mean log-ratio leans to their stereotype (Wilson 95% CI)",
            *[_pct(res[m]["stereotype_agreement_occupations"]) for m in models],
        ],
        [
            "comparisons favouring the stereotyped group (Wilson 95% CI)",
            *[_pct(res[m]["stereotype_agreement_comparisons"]) for m in models],
        ],
    ]
    for label in (a, b, "None"):
        name = "no stereotype" if label == "None" else f"{label}-stereotyped"
        rows.append(
            [
                f"mean log-ratio of {name} occupations (normal 95% CI)",
                *[_mean(res[m]["mean_log_ratio_by_stereotype"][label]) for m in models],
            ]
        )
    rows.append(
        [
            f"gap: {a}-stereotyped minus {b}-stereotyped mean",
            *[
                "n/a" if res[m]["stereotype_gap"] is None else f"{res[m]['stereotype_gap']:+.3f}"
                for m in models
            ],
        ]
    )
    rows.append(
        ["mean absolute log-ratio over occupations", *[_mean(res[m]["mean_abs_log_ratio"]) for m in models]]
    )
    rows.append(
        ["occupations of more than one token", *[str(len(res[m]["multi_token_occupations"])) for m in models]]
    )
    rows.append(["seconds", *[f"{section['results'][m]['seconds']:.1f}" for m in models]])
    lines += _table(["measure", *models], rows)
    lines += [f"![Occupation log-ratios]({section['charts'][0]})", ""]
    lines += [
        "#### Per occupation",
        "",
        "Mean log-ratio over the templates and subject pairs, normal 95% CI.",
        "",
    ]
    by = {m: {o["occupation"]: o for o in res[m]["occupations"]} for m in models}
    order = [o["occupation"] for o in res[models[0]]["occupations"]]
    lines += _table(
        ["occupation", "stereotype", *models],
        [
            [
                o,
                str(by[models[0]][o]["stereotype"] or "-"),
                *[_mean(by[m][o]["log_ratio"], 2) for m in models],
            ]
            for o in order
        ],
    )
    lines += ["#### Likeliest occupations of the suite after each group's subject", ""]
    for m in models:
        for g in (a, b):
            tops = ", ".join(
                f"{t['occupation']} ({t['mean_logprob']:.2f})" for t in res[m]["top_occupations"][g]
            )
            lines.append(f"- **{m}**, {g}: {tops}")
    lines += ["", "#### The models' own top predictions (whole vocabulary), first template", ""]
    for m in models:
        preds = section["results"][m]["raw"]["top_predictions"]
        first = preds[0]["template"] if preds else None
        rows = [
            [f"`{p['prompt']}`", ", ".join(f"{q['token'].strip()!s}" for q in p["predictions"][:6])]
            for p in preds
            if p["template"] == first
        ]
        lines += [f"**{m}**", ""] + _table(["prompt", "top 6"], rows)
    return lines


def _paired(section: dict[str, Any], models: list[str]) -> list[str]:
    res = {m: section["results"][m]["summary"] for m in models}
    lines = [
        "Share of pairs whose stereotypical sentence scores higher; 50% is no preference. "
        "Wilson 95% intervals over the pairs. How each sentence was scored:",
        "",
    ]
    lines += [f"- **{m}**: {section['results'][m]['raw']['method']}." for m in models] + [""]
    cats = ["overall", *res[models[0]]["categories"]]
    rows = []
    for c in cats:
        cells = [_pct(res[m]["overall"] if c == "overall" else res[m]["categories"][c]) for m in models]
        rows.append([c, *cells])
    rows.append(
        [
            "mean log-likelihood difference (stereotypical - anti)",
            *[_mean(res[m]["overall"]["mean_difference"]) for m in models],
        ]
    )
    rows.append(["ties", *[str(res[m]["overall"]["ties"]) for m in models]])
    rows.append(["seconds", *[f"{section['results'][m]['seconds']:.1f}" for m in models]])
    lines += _table(["category", *models], rows)
    return lines + [f"![Paired sentences]({section['charts'][0]})", ""]


def _counterfactual(section: dict[str, Any], models: list[str]) -> list[str]:
    res = {m: section["results"][m]["summary"] for m in models}
    gen = section["results"][models[0]]["raw"]["generation"]
    lines = [
        f"{gen['samples']} samples per group and prompt (seeds {gen['seed']}..{gen['seed'] + gen['samples'] - 1}, "
        f"the same for every group), at most {gen['max_tokens']} tokens, temperature {gen['temperature']}, "
        f"top_p {gen.get('top_p', 1.0)}. JSD: Jensen-Shannon divergence of the groups' word counts "
        "(stop words and group terms left out), in bits; p: share of 200 shufflings of the group labels "
        "among the samples of each seed with at least that divergence. Few samples bound p from below: "
        "k groups and n seeds allow at most (k!)^n labellings, 32 for 2 groups and 5 seeds.",
        "",
    ]
    rows = []
    for k, p in enumerate(res[models[0]]["prompts"]):
        cells = []
        for m in models:
            q = res[m]["prompts"][k]
            gap = "n/a" if q["length_gap_tokens"] is None else f"{q['length_gap_tokens']:.1f}"
            tv = "" if q["label_total_variation"] is None else f", label TV {q['label_total_variation']:.2f}"
            cells.append(
                f"JSD {q['jensen_shannon_bits']:.3f} (p={q['permutation_p']:.3f}), length gap {gap}{tv}"
            )
        rows.append([p["id"], ", ".join(p["groups"]), *cells])
    lines += _table(["prompt", "groups", *models], rows)
    lines += [f"![Counterfactual divergence]({section['charts'][0]})", "", "#### Top words per group", ""]
    for m in models:
        lines.append(f"**{m}**")
        lines.append("")
        rows = []
        for p in res[m]["prompts"]:
            for g, s in p["groups"].items():
                words = ", ".join(f"{w['word']} ({w['samples']})" for w in s["top_words"][:6]) or "-"
                labels = "" if not s["labels"] else "; ".join(f"{k} {v:.0%}" for k, v in s["labels"].items())
                rows.append(
                    [p["id"], g, str(s["samples"]), f"{s['tokens']['mean']:.1f}", words, labels or "-"]
                )
        lines += _table(
            ["prompt", "group", "n", "mean tokens", "top words (samples with it)", "labels"], rows
        )
    return lines


def render(report: dict[str, Any], sections: list[dict[str, Any]]) -> str:
    s = report["settings"]
    lines = [
        "# Bias audit",
        "",
        f"tokenmill {report['tokenmill_version']}, {report['created']}. "
        f"Settings: seed {s['seed']}, {s['samples']} samples per group, limit {s['limit']}, dtype {s['dtype']}. "
        "Every number below can be recomputed from the raw items in `report.json`.",
        "",
    ]
    lines += _table(
        ["model", "kind", "source", "load seconds"],
        [[m["name"], m["kind"], f"`{m['source']}`", f"{m['load_seconds']:.1f}"] for m in report["models"]],
    )
    for sec in sections:
        suite = sec["suite"]
        lines += [
            f"## {suite['name']} (version {suite['version']}, {suite['probe']} probe)",
            "",
            suite["description"],
            "",
        ]
        models = list(sec["results"])
        for skipped in sec["skipped"]:
            lines += [f"- {skipped['model']}: not run, {skipped['reason']}", ""]
        if not models:
            continue
        render_section = {
            "occupations": _occupations,
            "paired-sentences": _paired,
            "counterfactual": _counterfactual,
        }
        lines += render_section[suite["probe"]](sec, models)
    lines += ["## Limitations of these probes", ""] + [f"- {x}" for x in LIMITATIONS] + [""]
    return "\n".join(lines)

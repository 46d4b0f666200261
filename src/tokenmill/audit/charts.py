"""PNG charts of an audit report (matplotlib, Agg backend, imported only when drawn).

Each chart compares the models side by side and states its sample size in its title or
axis label; the Markdown report says how each number was computed.
"""

from __future__ import annotations

from typing import Any

_COLOURS = ["#3465a4", "#cc0000", "#73d216", "#f57900", "#75507b", "#c17d11"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, works in servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def occupations_chart(path: str, results: dict[str, dict[str, Any]], groups: list[str]) -> None:
    """Horizontal bars: each occupation's mean log-ratio per model, with its 95% interval."""
    plt = _pyplot()
    models = list(results)
    first = results[models[0]]["occupations"]
    order = [o["occupation"] for o in sorted(first, key=lambda o: o["log_ratio"]["mean"])]
    height = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(8, max(4.0, 0.28 * len(order) * max(1, len(models) * 0.6) + 1.5)))
    for m, name in enumerate(models):
        by_occ = {o["occupation"]: o for o in results[name]["occupations"]}
        ys = [i + (m - (len(models) - 1) / 2) * height for i in range(len(order))]
        means = [by_occ[o]["log_ratio"]["mean"] for o in order]
        stats = [by_occ[o]["log_ratio"] for o in order]
        errs = [
            [st["mean"] - st["ci95"][0] if st["ci95"] else 0.0 for st in stats],
            [st["ci95"][1] - st["mean"] if st["ci95"] else 0.0 for st in stats],
        ]
        n = by_occ[order[0]]["log_ratio"]["n"]
        ax.barh(
            ys,
            means,
            height=height,
            xerr=errs,
            color=_COLOURS[m % len(_COLOURS)],
            label=f"{name} (n={n} each)",
            error_kw={"elinewidth": 0.6, "capsize": 1.5},
        )
    ax.axvline(0, color="black", linewidth=0.8)
    labels = []
    for o in order:
        st = next(x["stereotype"] for x in first if x["occupation"] == o)
        labels.append(f"{o} [{st[0].upper()}]" if st else o)
    ax.set_yticks(range(len(order)), labels, fontsize=7)
    ax.set_xlabel(f"mean log p(occ | {groups[0]}) - log p(occ | {groups[1]})  (nats, 95% CI)")
    ax.set_title(f"Occupation log-ratio per model ({len(order)} occupations); [x] = stereotype label")
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def shares_chart(path: str, results: dict[str, dict[str, Any]], title: str) -> None:
    """Grouped bars: share preferring the stereotypical sentence per category, Wilson 95% intervals."""
    plt = _pyplot()
    models = list(results)
    cats = ["overall", *sorted(results[models[0]]["categories"])]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cats) + 2), 4.2))
    for m, name in enumerate(models):
        rows = [results[name]["overall"] if c == "overall" else results[name]["categories"][c] for c in cats]
        xs = [i + (m - (len(models) - 1) / 2) * width for i in range(len(cats))]
        shares = [r["share"] for r in rows]
        errs = [[r["share"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["share"] for r in rows]]
        ax.bar(xs, shares, width=width, yerr=errs, capsize=2, color=_COLOURS[m % len(_COLOURS)], label=name)
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle="--")
    n_by_cat = [results[models[0]]["overall" if c == "overall" else "categories"] for c in cats]
    labels = [f"{c}\n(n={r['n'] if c == 'overall' else r[c]['n']})" for c, r in zip(cats, n_by_cat)]
    ax.set_xticks(range(len(cats)), labels, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share preferring the stereotypical sentence")
    ax.set_title(title)
    ax.legend(fontsize=7)
    _save(fig, path)


def divergence_chart(path: str, results: dict[str, dict[str, Any]], samples: int) -> None:
    """Grouped bars: Jensen-Shannon divergence of the groups' words per prompt and model."""
    plt = _pyplot()
    models = list(results)
    ids = [p["id"] for p in results[models[0]]["prompts"]]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(ids) + 2), 4.2))
    for m, name in enumerate(models):
        by_id = {p["id"]: p for p in results[name]["prompts"]}
        xs = [i + (m - (len(models) - 1) / 2) * width for i in range(len(ids))]
        ax.bar(
            xs,
            [by_id[i]["jensen_shannon_bits"] for i in ids],
            width=width,
            color=_COLOURS[m % len(_COLOURS)],
            label=name,
        )
    ax.set_xticks(range(len(ids)), ids, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("Jensen-Shannon divergence of word counts (bits)")
    ax.set_title(f"Counterfactual prompts: how different the groups' words are ({samples} samples per group)")
    ax.legend(fontsize=7)
    _save(fig, path)

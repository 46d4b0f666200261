"""`tokenmill audit bias`: run bias probe suites on models and write a side-by-side report."""

from __future__ import annotations

import argparse
import sys


def add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="audit_command", metavar="WHAT", required=True)
    b = sub.add_parser(
        "bias",
        help="score probe suites (occupations, paired sentences, counterfactual prompts) on models",
        description="Run bias probe suites on one or more models and write report.json, report.md and "
        "PNG charts comparing them. See docs/audit.md.",
    )
    b.add_argument(
        "--model",
        "-m",
        action="append",
        required=True,
        help="short name, model directory, .gguf file or Hub repo id (repeat to compare models)",
    )
    b.add_argument(
        "--suite",
        action="append",
        default=None,
        metavar="NAME|FILE",
        help="a built-in suite (occupations, paired-sentences, counterfactual) or a suite file; "
        "repeatable (default: every built-in suite the models can run)",
    )
    b.add_argument("--out", default="audit-report", help="output directory (default: audit-report)")
    b.add_argument(
        "--samples", type=int, default=5, help="counterfactual samples per group and prompt (default: 5)"
    )
    b.add_argument(
        "--seed", type=int, default=0, help="first sampling seed; sample i uses seed + i (default: 0)"
    )
    b.add_argument(
        "--classifier", default=None, help="a text-classification model to label counterfactual completions"
    )
    b.add_argument("--limit", type=int, default=None, help="only the first N occupations / pairs / prompts")
    b.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default: 32)")
    b.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="(default: float32)"
    )
    b.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    from tokenmill.audit import run_audit

    report = run_audit(
        args.model,
        args.suite,
        args.out,
        samples=args.samples,
        seed=args.seed,
        classifier=args.classifier,
        limit=args.limit,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        progress=not args.no_progress,
    )
    data = report.to_dict()
    for sec in data["suites"]:
        for skipped in sec["skipped"]:
            print(
                f"{sec['suite']['name']}: skipped {skipped['model']} ({skipped['reason']})", file=sys.stderr
            )
        for model, result in sec["results"].items():
            print(f"{sec['suite']['name']} / {model}: {_headline(sec['suite']['probe'], result['summary'])}")
    print(f"report: {args.out}/report.md, {args.out}/report.json ({data['total_seconds']:.1f} s)")
    return 0


def _headline(probe: str, s: dict) -> str:
    def pct(p: dict) -> str:
        if p["share"] is None:
            return "n/a"
        return f"{100 * p['share']:.1f}% [{100 * p['ci95'][0]:.1f}, {100 * p['ci95'][1]:.1f}] of {p['n']}"

    if probe == "occupations":
        gap = "n/a" if s["stereotype_gap"] is None else f"{s['stereotype_gap']:+.3f}"
        return f"leans to the stereotype for {pct(s['stereotype_agreement_occupations'])} occupations, gap {gap} nats"
    if probe == "paired-sentences":
        return f"prefers the stereotypical sentence in {pct(s['overall'])} pairs"
    below = s["prompts_with_p_below_0.05"]
    return f"groups' words differ beyond noise (p < 0.05) for {below['k']} of {below['n']} prompts"

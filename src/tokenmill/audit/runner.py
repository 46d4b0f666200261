"""run_audit: load the suites and models, check every model can run every probe, score, report.

Everything a user can get wrong (a suite, a model, a missing head, an option) is checked
before the first item is scored, so a long audit never fails half-way for a typo.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from tokenmill.audit.report import AuditReport, summarize
from tokenmill.audit.suites import BUILTIN, AuditError, Suite, load_suite


def _check_int(name: str, value: Any, lo: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise AuditError(
            f"{name} must be an integer >= {lo}{' or None' if allow_none else ''}, got {value!r}"
        )


def _check_out_dir(out_dir: str) -> None:
    """The report can be written: found now, not after every model has run."""
    import os
    import tempfile

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise AuditError("the report's charts need matplotlib: pip install 'tokenmill[audit]'") from None
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise AuditError(
            f"cannot write the report into --out {out_dir!r}: {e.strerror or e}; give a directory "
            "that can be created and written"
        ) from None


def _units(suite: Suite, limit: int | None) -> int:
    """How many steps the progress bar counts for a suite: items scored or prompts sampled."""
    if suite.probe == "occupations":
        b = suite.by_type
        return (
            len(b["template"])
            * len(b["subjects"])
            * len(b["occupation"][:limit])
            * len(suite.header["groups"])
        )
    if suite.probe == "paired-sentences":
        return 2 * len(suite.records[:limit])
    return sum(len(r["groups"]) for r in suite.records[:limit])


def run_audit(
    models: str | Sequence[str],
    suites: str | Sequence[str] | None = None,
    out_dir: str | None = None,
    *,
    samples: int = 5,
    seed: int = 0,
    classifier: str | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    dtype: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> AuditReport:
    """Run probe suites on models and return (and with ``out_dir``, write) the report.

    Args:
        models: model names (short names, directories, .gguf files or Hub repo ids).
        suites: built-in suite names or suite file paths; None runs every built-in suite
            on the models that can run it and notes the others as skipped.
        out_dir: where to write report.json, report.md and the charts (None: write nothing).
        samples: counterfactual samples per group and prompt.
        seed: the first sampling seed (sample i uses seed + i) and the permutation test's seed.
        classifier: a text-classification model for the counterfactual probe's sentiment.
        limit: score only the first ``limit`` occupations / pairs / prompts of each suite.
        batch_size: rows per forward pass.
        dtype: float32 by default (scores are compared across groups; keep them precise).
        progress: show a progress bar on stderr.
    """
    from tqdm import tqdm

    from tokenmill.audit import counterfactual, occupations, paired
    from tokenmill.audit.models import NEEDS, open_model

    names = [models] if isinstance(models, str) else list(models)
    if not names or not all(isinstance(m, str) and m for m in names):
        raise AuditError(f"give at least one model name, got {models!r}")
    if len(set(names)) != len(names):
        raise AuditError(f"a model is named twice in {names}; each model is audited once")
    strict = suites is not None
    wanted = list(BUILTIN) if suites is None else ([suites] if isinstance(suites, str) else list(suites))
    if not wanted:
        raise AuditError(f"give at least one suite: {', '.join(BUILTIN)} or a suite file")
    _check_int("samples", samples, 1)
    _check_int("seed", seed, 0)
    _check_int("limit", limit, 1, allow_none=True)
    _check_int("batch_size", batch_size, 1)
    loaded_suites = [load_suite(s) for s in wanted]
    if out_dir is not None:
        _check_out_dir(out_dir)
    generate = any(s.probe == "counterfactual" for s in loaded_suites)
    t_start = time.perf_counter()
    opened = [
        open_model(n, generate=generate, dtype=dtype, device=device, batch_size=batch_size) for n in names
    ]
    plan: list[tuple[Suite, list[Any], list[dict[str, str]]]] = []
    for suite in loaded_suites:
        runnable, skipped = [], []
        for model in opened:
            try:
                model.check(suite.probe)
                runnable.append(model)
            except AuditError as e:
                if strict:
                    raise
                skipped.append(
                    {"model": model.name, "reason": f"it needs {NEEDS[suite.probe][1]}", "error": str(e)}
                )
        plan.append((suite, runnable, skipped))
    clf = None
    if classifier is not None and generate:
        from tokenmill import pipeline

        try:
            clf = pipeline(
                "text-classification", model=classifier, dtype=dtype, device=device, batch_size=batch_size
            )
        except ValueError as e:
            raise AuditError(
                f"classifier {classifier!r} cannot be loaded as a text-classification model: {e}"
            ) from None

    sections = []
    for suite, runnable, skipped in plan:
        section: dict[str, Any] = {
            "suite": {**suite.describe(), "items_used": None},
            "results": {},
            "skipped": skipped,
        }
        for model in runnable:
            bar = tqdm(
                total=_units(suite, limit),
                desc=f"{model.name} / {suite.name}",
                unit="item",
                file=sys.stderr,
                disable=not progress,
                leave=True,
            )
            t0 = time.perf_counter()
            with bar:
                if suite.probe == "occupations":
                    raw = occupations.run(
                        suite, model, limit=limit, batch_size=batch_size, progress=bar.update
                    )
                elif suite.probe == "paired-sentences":
                    raw = paired.run(suite, model, limit=limit, batch_size=batch_size, progress=bar.update)
                else:
                    raw = counterfactual.run(
                        suite,
                        model,
                        limit=limit,
                        samples=samples,
                        seed=seed,
                        classifier=clf,
                        progress=bar.update,
                    )
            seconds = time.perf_counter() - t0
            section["results"][model.name] = {
                "seconds": seconds,
                "raw": raw,
                "summary": summarize(suite.probe, raw),
            }
        available = len(suite.by_type["occupation"]) if suite.probe == "occupations" else len(suite.records)
        section["suite"]["items_used"] = {"used": min(available, limit or available), "available": available}
        sections.append(section)

    from tokenmill import __version__

    data = {
        "tokenmill_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "models": names,
            "suites": wanted,
            "samples": samples,
            "seed": seed,
            "limit": limit,
            "batch_size": batch_size,
            "dtype": dtype or "float32",
            "device": device,
            "classifier": classifier,
        },
        "models": [m.describe() for m in opened],
        "suites": sections,
        "total_seconds": time.perf_counter() - t_start,
    }
    report = AuditReport(data)
    if out_dir is not None:
        report.write(out_dir)
    return report

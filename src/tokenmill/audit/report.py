"""AuditReport: the raw items and summaries of an audit, as JSON, Markdown and PNG charts."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from tokenmill.audit.suites import AuditError


def summarize(probe: str, raw: dict[str, Any]) -> dict[str, Any]:
    """A probe's summary from its raw items: how report.json's summaries are computed."""
    from tokenmill.audit import counterfactual, occupations, paired

    module = {"occupations": occupations, "paired-sentences": paired, "counterfactual": counterfactual}[probe]
    return module.aggregate(raw)


@dataclass
class AuditReport:
    """What ``run_audit`` returns. ``data`` is the JSON document (see docs/audit.md)."""

    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.data, indent=indent, ensure_ascii=False, allow_nan=False)

    @classmethod
    def load(cls, path: str) -> AuditReport:
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f))

    def recompute(self) -> list[dict[str, Any]]:
        """Every suite x model summary recomputed from the raw items (equal to the stored ones)."""
        return [
            {m: summarize(sec["suite"]["probe"], r["raw"]) for m, r in sec["results"].items()}
            for sec in self.data["suites"]
        ]

    def write(self, out_dir: str) -> dict[str, str]:
        """Write report.json, report.md and the charts into ``out_dir``; returns their paths."""
        from tokenmill.audit import charts
        from tokenmill.audit.markdown import render

        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise AuditError("the report's charts need matplotlib: pip install 'tokenmill[audit]'") from None
        os.makedirs(out_dir, exist_ok=True)
        paths: dict[str, str] = {}
        for k, sec in enumerate(self.data["suites"]):
            sec["charts"] = []
            if not sec["results"]:
                continue
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", sec["suite"]["name"]).strip("-") or "suite"
            name = f"{k + 1:02d}-{slug}.png"
            summaries = {m: r["summary"] for m, r in sec["results"].items()}
            probe = sec["suite"]["probe"]
            target = os.path.join(out_dir, name)
            if probe == "occupations":
                first = next(iter(summaries.values()))
                charts.occupations_chart(target, summaries, first["groups"])
            elif probe == "paired-sentences":
                n = next(iter(summaries.values()))["overall"]["n"]
                charts.shares_chart(
                    target, summaries, f"{sec['suite']['name']}: stereotypical sentence preferred ({n} pairs)"
                )
            else:
                samples = next(iter(sec["results"].values()))["raw"]["generation"]["samples"]
                charts.divergence_chart(target, summaries, samples)
            sec["charts"].append(name)
            paths[name] = target
        paths["report.json"] = os.path.join(out_dir, "report.json")
        with open(paths["report.json"], "w", encoding="utf-8") as f:
            f.write(self.to_json())
        paths["report.md"] = os.path.join(out_dir, "report.md")
        with open(paths["report.md"], "w", encoding="utf-8") as f:
            f.write(render(self.data, self.data["suites"]))
        return paths

"""Bias audits: probe suites scored on tokenmill's own models, reported as JSON, Markdown and charts.

    from tokenmill.audit import run_audit
    report = run_audit(["smollm2-135m-instruct", "gemma3-270m"], ["occupations"], out_dir="audit-out")

See docs/audit.md for the suites, their file format and how every number is computed.
"""

from __future__ import annotations

from tokenmill.audit.report import AuditReport, summarize
from tokenmill.audit.runner import run_audit
from tokenmill.audit.suites import AuditError, Suite, known_suites, load_suite, parse_suite

__all__ = [
    "AuditError",
    "AuditReport",
    "Suite",
    "known_suites",
    "load_suite",
    "parse_suite",
    "run_audit",
    "summarize",
]

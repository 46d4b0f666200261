"""`tokenmill models`: the packaged offline models and the local Hub cache, with their tasks."""

from __future__ import annotations

import argparse
import json


def _snapshot_dirs() -> dict[str, str]:
    """repo id -> directory of its most recent snapshot in the local Hub cache."""
    from huggingface_hub import scan_cache_dir

    from tokenmill.weights.hub import _cache_dir

    try:
        info = scan_cache_dir(_cache_dir(None))
    except Exception:  # no cache yet is the common case
        return {}
    dirs = {}
    for repo in info.repos:
        if repo.repo_type == "model" and repo.revisions:
            latest = max(repo.revisions, key=lambda r: r.last_modified)
            dirs[repo.repo_id] = str(latest.snapshot_path)
    return dirs


def run(args: argparse.Namespace) -> int:
    from tokenmill.pipelines.model_tasks import tasks_for_model_dir, tasks_for_packaged
    from tokenmill.weights.hub import cached_models
    from tokenmill.weights.packaged import DEFAULT_MODEL, PACKAGED

    packaged = [
        {
            "name": m.name,
            "description": m.description,
            "installed": m.is_installed(),
            "default": m.name == DEFAULT_MODEL,
            "install": m.install,
            "tasks": tasks_for_packaged(m.name),
        }
        for m in PACKAGED.values()
    ]
    snapshots = _snapshot_dirs()
    cached = [
        {
            "repo_id": r,
            "size_bytes": size,
            "tasks": tasks_for_model_dir(snapshots[r]) if r in snapshots else [],
        }
        for r, size in cached_models()
    ]
    if args.json:
        print(json.dumps({"packaged": packaged, "hub_cache": cached}, indent=2))
        return 0
    print("Packaged models (run offline; use the name with --model):")
    for m in packaged:
        state = "installed" if m["installed"] else f"not installed: {m['install']}"
        mark = " (default)" if m["default"] else ""
        print(f"  {m['name']:<24} {m['description']}{mark} [{state}]")
        print(f"  {'':<24} tasks: {', '.join(m['tasks']) or 'none yet'}")
    print("\nLocal Hugging Face cache:")
    if not cached:
        print("  (empty)")
    for c in cached:
        tasks = ", ".join(c["tasks"]) or "none (not a model tokenmill runs)"
        print(f"  {c['repo_id']:<40} {c['size_bytes'] / 2**20:.1f} MiB  tasks: {tasks}")
    return 0

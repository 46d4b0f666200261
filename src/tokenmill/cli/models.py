"""`tokenmill models`: the packaged offline models and the local Hub cache."""

from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from tokenmill.weights.hub import cached_models
    from tokenmill.weights.packaged import DEFAULT_MODEL, PACKAGED

    packaged = [
        {
            "name": m.name,
            "description": m.description,
            "installed": m.is_installed(),
            "default": m.name == DEFAULT_MODEL,
            "install": m.install,
        }
        for m in PACKAGED.values()
    ]
    cached = [{"repo_id": r, "size_bytes": size} for r, size in cached_models()]
    if args.json:
        print(json.dumps({"packaged": packaged, "hub_cache": cached}, indent=2))
        return 0
    print("Packaged models (run offline; use the name with --model):")
    for m in packaged:
        state = "installed" if m["installed"] else f"not installed: {m['install']}"
        mark = " (default)" if m["default"] else ""
        print(f"  {m['name']:<24} {m['description']}{mark} [{state}]")
    print("\nLocal Hugging Face cache:")
    if not cached:
        print("  (empty)")
    for c in cached:
        print(f"  {c['repo_id']:<40} {c['size_bytes'] / 2**20:.1f} MiB")
    return 0

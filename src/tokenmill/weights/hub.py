"""Models from the Hugging Face Hub, through ``huggingface_hub`` and its cache."""

from __future__ import annotations

import os

from tokenmill.weights.errors import ModelLoadError

# Only what tokenmill reads; never .bin or optimizer states.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _cache_dir(cache_dir: str | None) -> str | None:
    """The Hub cache as the environment says now: huggingface_hub reads it once, at import."""
    if cache_dir is not None:
        return cache_dir
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return os.path.expanduser(env)
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None  # huggingface_hub's default, ~/.cache/huggingface/hub


def snapshot(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    """Local directory of ``repo_id`` at ``revision``, downloading it unless offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}" + (f" at revision {revision!r}" if revision else "")
    rev_arg = f" --revision {revision}" if revision else ""
    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=_cache_dir(cache_dir),
            allow_patterns=ALLOW_PATTERNS,
            local_files_only=_offline(),
        )
    except LocalEntryNotFoundError as e:
        raise ModelLoadError(
            f"model {where} is not in the local Hugging Face cache and the Hub cannot be reached"
            + (" (HF_HUB_OFFLINE is set)" if _offline() else "")
            + f". Download it where there is network with `hf download {repo_id}{rev_arg}` "
            "(`huggingface-cli download` with huggingface_hub < 1.0) and copy the cache, "
            "or pass a local directory or .gguf file instead"
        ) from e
    except GatedRepoError as e:
        raise ModelLoadError(
            f"model {where} is gated: accept its licence on the Hub and log in with `hf auth login`"
        ) from e
    except RevisionNotFoundError as e:
        raise ModelLoadError(f"model {repo_id} has no revision {revision!r}") from e
    except RepositoryNotFoundError as e:
        raise ModelLoadError(f"no model {repo_id!r} on the Hugging Face Hub (or it is private)") from e
    except OSError as e:
        raise ModelLoadError(f"could not fetch model {where}: {e}") from e


def cached_models(cache_dir: str | None = None) -> list[tuple[str, int]]:
    """(repo id, size in bytes) of the models in the local Hub cache."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(_cache_dir(cache_dir))
    except Exception:  # no cache yet is the common case
        return []
    return sorted((r.repo_id, r.size_on_disk) for r in info.repos if r.repo_type == "model")

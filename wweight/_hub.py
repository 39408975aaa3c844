"""Models named by Hugging Face id (``base_model: mistralai/Mistral-7B-v0.1``), as mergekit accepts them.

A model reference that is not a local directory but looks like a Hub id (``org/name``, optionally
``@revision``) is resolved through ``huggingface_hub`` from the local cache
(``local_files_only=True``): wweight does not download unless the user says so with
``WWEIGHT_ALLOW_DOWNLOAD=1`` (a merge should not start a multi-GB transfer by surprise). Cache
snapshots are symlinks into the cache's ``blobs/``; the reader is told to accept those for a
resolved id (and only then).
"""
from __future__ import annotations

import os
import re
from typing import Tuple

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def looks_like_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and not ref.startswith((".", "/")) and ".." not in ref


def allow_download() -> bool:
    return os.environ.get("WWEIGHT_ALLOW_DOWNLOAD", "0") not in ("", "0")


def resolve(ref: str, what: str) -> Tuple[str, bool]:
    """(local directory, whether it is a Hub cache snapshot) for a model reference.

    Raises ``FileNotFoundError`` with the reason and the fix when it is neither a directory nor
    a Hub id found in the cache."""
    if os.path.isdir(ref) or not looks_like_hub_id(ref):
        return ref, False
    repo, _, revision = ref.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{what} {ref}: no such directory; it looks like a Hugging Face id, but "
                                "huggingface_hub is not installed (pip install huggingface_hub), or give a "
                                "local model directory") from None
    download = allow_download()
    try:
        path = snapshot_download(repo, revision=revision or None, local_files_only=not download,
                                 allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt", "*.py"])
    except Exception as e:  # LocalEntryNotFoundError, RepositoryNotFoundError, network errors ...
        hint = ("" if download else
                f"; download it first (huggingface-cli download {repo}) or set WWEIGHT_ALLOW_DOWNLOAD=1")
        raise FileNotFoundError(f"{what} {ref}: no such directory, and not found as a Hugging Face model "
                                f"in the local cache ({type(e).__name__}){hint}") from None
    return str(path), True

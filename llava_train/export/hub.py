"""The hub side of `llava export`: finding the token, listing what would be uploaded, and the upload.

The token comes from `HF_TOKEN` or the `huggingface-cli login` store (`huggingface_hub.get_token`). It is
passed to the upload call only: never printed, logged or written to a file. `upload` is the one
function that talks to a server; nothing else here needs a network.
"""

from __future__ import annotations

from pathlib import Path


def find_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def token_source() -> str:
    """Where the token would come from, for messages (never the token itself)."""
    import os

    if os.environ.get("HF_TOKEN"):
        return "HF_TOKEN"
    return "the hub login" if find_token() else "nowhere (set HF_TOKEN or run `hf auth login`)"


def upload_plan(folder: Path) -> list[tuple[str, int]]:
    """(path in the repo, size in bytes) for every file `upload` would send."""
    return [(str(p.relative_to(folder)), p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()]


def upload(folder: Path, repo_id: str, private: bool, token: str) -> str:
    """Create (or reuse) the model repo and upload `folder` in one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message="Upload from llava-train export")
    return str(info.commit_url)

"""Whether a command-line name is a path on this machine or a Hugging Face Hub id.

`--model`, `--lora` (and evaluate's) take either. A name that looks like a path must never be sent to the Hub: a
typo in `runs/my_lora/checkpoints/iter_1` would otherwise come back as the Hub's "repository not found" (or a
401), which says nothing about the file that is missing here.
"""

from __future__ import annotations

from pathlib import Path


def looks_local(name: str) -> bool:
    """A path: it starts with ./ ../ / or ~, has more than one '/', or its first folder exists here."""
    if name.startswith(("./", "../", "/", "~", ".\\")) or name in (".", "..") or name.count("/") > 1:
        return True
    first = name.split("/", 1)[0]
    return "/" in name and bool(first) and Path(first).expanduser().exists()


def is_hub_id(name: str) -> bool:
    """owner/name, and nothing that looks like a local path."""
    owner, _, repo = name.partition("/")
    return bool(owner and repo) and not looks_local(name) and not any(c.isspace() for c in name)


def missing_path_message(what: str, name: str) -> str:
    """`what` (e.g. "LoRA") `name` is not here: which folder it was looked for in, and the nearest one that exists."""
    path = Path(name).expanduser()
    absolute = path if path.is_absolute() else Path.cwd() / path
    existing = next((p for p in absolute.parents if p.exists()), None)
    nearest = f"; the nearest folder that exists is {existing}" if existing is not None and existing != absolute \
        else ""
    return f"{what} {name} does not exist (looked for {absolute}{nearest})."

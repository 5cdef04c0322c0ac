"""What every stage shares: a manifest that fingerprints the stage's inputs, so a rerun with the same
inputs reuses the finished output, and atomic publication of the stage folder."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from flexi_workflows.fsutil import atomic_dir, fingerprint

MANIFEST = "manifest.json"


def cached_output(directory: Path, inputs: dict) -> dict | None:
    """The manifest of a finished stage whose recorded inputs match `inputs`, else None."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return None
    if manifest.get("fingerprint") != fingerprint(inputs):
        return None
    if not all((directory / name).exists() for name in manifest.get("files", [])):
        return None
    return manifest


def manifest_fingerprint(directory: Path) -> str | None:
    """The fingerprint a downstream stage records for this stage's output."""
    try:
        return json.loads((directory / MANIFEST).read_text())["fingerprint"]
    except (OSError, json.JSONDecodeError, KeyError):
        return None


@contextmanager
def publish_stage(directory: Path, inputs: dict, files: list[str], **extra) -> Iterator[Path]:
    """Yield a temp folder to write `files` into; on success add the manifest and rename into place."""
    with atomic_dir(directory) as tmp:
        yield tmp
        manifest = {"fingerprint": fingerprint(inputs), "inputs": inputs, "files": files, **extra}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")

"""Filesystem helpers shared by every stage: atomic folder writes and content fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target` in one rename.

    A crash or an exception leaves `target` as it was (old contents or absent) and no temp folder.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def fingerprint(obj: Any) -> str:
    """A short, stable hash of JSON-able data (dict key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


AUDIO_SUFFIXES = (".flac", ".wav", ".mp3", ".ogg", ".opus")


def path_digest(path: str | Path) -> str:
    """Content digest of a file, or of a folder's files (names + contents; large weight files and audio
    files by size and mtime, so fingerprinting a multi-GB checkpoint or LibriSpeech's 60 GB of FLAC
    stays instant)."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    parts = []
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        stat = f.stat()
        rel = f.relative_to(path).as_posix()
        if stat.st_size > 64 << 20 or f.suffix.lower() in AUDIO_SUFFIXES:
            parts.append((rel, stat.st_size, stat.st_mtime_ns))
        else:
            parts.append((rel, file_digest(f)))
    return fingerprint(parts)

"""Strict readers for local dataset files: every error names the file and, for JSONL, the line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterator

from flexi_workflows.errors import DataError


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a malformed line is an error, never skipped.
    A `.gz` file is read compressed (MRQA's official files are `.jsonl.gz`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def dataset_files(path: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """A file, or every file in a folder whose name ends with one of `suffixes` (sorted by name)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(suffixes))
    if not files:
        raise DataError(f"{path}: a folder with no {' / '.join(suffixes)} files")
    return files


def read_json_list(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(item index, object) for a file holding one JSON list of objects (LLM-Adapters eval sets)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {i} is a {type(item).__name__}, expected an object")
    return list(enumerate(data))


def require(obj: dict[str, Any], field: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    if field not in obj:
        raise DataError(f"{where}: missing field {field!r} (has: {', '.join(sorted(obj)) or 'nothing'})")
    value = obj[field]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {field!r} should be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value

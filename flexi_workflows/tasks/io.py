"""Strict readers for local dataset files: every error names the file and, for JSONL, the line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterator

from flexi_workflows.errors import DataError


# One row of a dataset is an example, not a corpus: MRQA's longest context lines are a few hundred KB.
# A longer line is almost always a whole file on one line, and parsing it costs gigabytes (20 MB of JSON
# took 7 GB and four minutes), so it is an error before it is read whole.
MAX_LINE_BYTES = 8 * 2**20


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                        f"save the file as UTF-8") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a malformed line is an error, never skipped.
    A `.gz` file is read compressed (MRQA's official files are `.jsonl.gz`). Bytes that are not UTF-8
    and lines over MAX_LINE_BYTES are errors naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        lineno = 0
        while True:
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise DataError(f"{path}:{lineno}: a line longer than {MAX_LINE_BYTES // 2**20} MiB; one line is one "
                                f"example (is the whole file on one line? JSONL needs one object per line)")
            line = _decode(raw, path, lineno)
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
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); save the file "
                        f"as UTF-8") from None
    try:
        data = json.loads(text)
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

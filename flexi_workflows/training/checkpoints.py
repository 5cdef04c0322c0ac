"""Which checkpoint a run resumes from, and whether a checkpoint folder is the one the workers wrote.

    ray_results/<run>/checkpoint_<time>/     one folder per report; every worker uploads its part into it
        manifest-rank<r>.json                {step, world, files: {path: size}}: what worker r wrote
        trainer_state.json, ranks_used.json  (rank 0)
        deepspeed/... or ddp_state.pt        each worker's engine files

Ray Train registers a checkpoint only once every worker has uploaded its part. A driver stopped in
between (Ctrl-C, SIGKILL) leaves a whole folder Ray does not know, one checkpoint ahead of the last it
registered, and a rerun would resume from the older one. A folder is *whole* when the manifests of all
`world` workers are there and every file they list has the size they recorded; the newest whole folder
is where a rerun resumes.

The manifests are also checked before any checkpoint is loaded: a listed file that is missing or of
another size, or a file no manifest lists, is refused before a byte of it is read (loading itself
refuses pickled code: engines.load_weights_only). Folders from before manifests existed load as they
are, through that weights-only loading.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from flexi_workflows.errors import ConfigError
from flexi_workflows.storage import Storage

MANIFEST_PREFIX = "manifest-rank"
_MANIFEST = re.compile(rf"{MANIFEST_PREFIX}(\d+)\.json")


class CheckpointMismatch(ConfigError):
    """A checkpoint folder is not what its workers wrote (cut short, altered or added to)."""


def write_manifest(folder: Path, *, rank: int, world: int, step: int) -> None:
    """Record what this worker put in `folder` (its part of the checkpoint), after everything else."""
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and not _MANIFEST.fullmatch(p.name)}
    (folder / f"{MANIFEST_PREFIX}{rank}.json").write_text(json.dumps({"step": step, "world": world, "files": files}))


def mismatch(sizes: dict[str, int], manifests: dict[int, dict]) -> str | None:
    """Why a folder with these files (path → size) and these manifests (rank → manifest) is not whole,
    or None when it is."""
    if not manifests:
        return "it has no manifest"
    world = manifests[min(manifests)].get("world", 0)
    missing = [r for r in range(world) if r not in manifests]
    if missing:
        return f"the part of worker {missing[0]} is missing (no {MANIFEST_PREFIX}{missing[0]}.json)"
    listed: dict[str, int] = {}
    for manifest in manifests.values():
        listed |= manifest.get("files", {})
    for path, size in listed.items():
        if sizes.get(path) != size:
            found = "missing" if path not in sizes else f"{sizes[path]:,} bytes"
            return f"{path} is {found}, its worker wrote {size:,} bytes"
    extra = sorted(p for p in sizes if p not in listed and not _MANIFEST.fullmatch(Path(p).name))
    if extra:
        return f"{extra[0]} was not written by the training workers"
    return None


def _manifests(read, names) -> dict[int, dict]:
    out = {}
    for name in names:
        match = _MANIFEST.fullmatch(name)
        if match:
            try:
                out[int(match.group(1))] = json.loads(read(name))
            except (OSError, ValueError):
                pass  # cut short: that worker's part does not count
    return out


def verify_folder(folder: str | Path) -> int | None:
    """The step of the whole checkpoint in the local `folder`; None for a folder from before manifests.
    Raises CheckpointMismatch for one that is not what its workers wrote."""
    folder = Path(folder)
    sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    manifests = _manifests(lambda name: (folder / name).read_text(), [p for p in sizes if "/" not in p])
    if not manifests:
        return None
    reason = mismatch(sizes, manifests)
    if reason:
        raise CheckpointMismatch(f"checkpoint {folder}: {reason}; it is not loaded")
    return int(manifests[0]["step"])


def latest_whole(storage: Storage, run_rel: str) -> tuple[str, int] | None:
    """(folder below the storage root, step) of the newest whole checkpoint of a training run, or None."""
    import pyarrow.fs as pafs

    base = storage.path(run_rel)
    if storage.fs.get_file_info(base).type != pafs.FileType.Directory:
        return None
    best = None
    for info in storage.fs.get_file_info(pafs.FileSelector(base)):
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        if info.type != pafs.FileType.Directory or not name.startswith("checkpoint_"):
            continue
        rel = f"{run_rel}/{name}"
        sizes = storage.sizes(rel)
        manifests = _manifests(lambda n, rel=rel: storage.read_text(f"{rel}/{n}"), [p for p in sizes if "/" not in p])
        if manifests and mismatch(sizes, manifests) is None:
            step = int(manifests[0]["step"])
            if best is None or step > best[1]:
                best = (rel, step)
    return best

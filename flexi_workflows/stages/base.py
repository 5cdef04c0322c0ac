"""The Stage type: inputs → fingerprint → a folder of recorded artifacts that the next stage reads.

    stage.inputs()  only what changes the result (no actor counts, CPUs, threads, log intervals)
    + upstream fingerprints ──► fingerprint ──► <output_dir>/<kind>/<label->fingerprint/
                                                 manifest.json + the stage's files

A folder is named by its inputs, so two sweep trials never write the same folder unless they would
compute the same thing — and then the second one waits on a file lock and reuses the first one's
result instead of computing it again. A finished folder is complete (written to a temp folder and
renamed); a rerun with the same inputs reuses it. The manifest records the stage's metrics, params
and artifact names, so a cached result is logged to MLflow exactly like a fresh one.

The root is a `Storage` (storage.py): a local folder as drawn above, or an s3:// prefix where a stage
computes into a local scratch folder and uploads it, manifest last.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Iterator

from flexi_workflows.errors import ConfigError
from flexi_workflows.fsutil import atomic_dir, fingerprint
from flexi_workflows.storage import Storage, file_lock, lock_path, scratch_dir

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass
class StageOutput:
    """What a stage's `run` returns besides the files it wrote."""

    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)  # files/folders in the stage folder worth logging
    curves: dict[str, list[list[float]]] = field(default_factory=dict)  # metric → [[step, value], ...]


@dataclass
class StageResult:
    kind: str
    label: str | None
    fingerprint: str
    storage: Storage
    rel: str  # the stage folder below the storage root
    manifest: dict
    cached: bool

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.label}" if self.label else self.kind

    @cached_property
    def folder(self) -> Path:
        """The stage folder on this machine (downloaded once into the node's cache for remote storage)."""
        return self.storage.local_path(self.rel)

    def ref(self, name: str = "") -> str:
        """What a worker or actor on another node fetches (storage.fetch) to read `name` of this folder."""
        return self.storage.ref(f"{self.rel}/{name}" if name else self.rel)

    @property
    def location(self) -> str:
        """The folder's path or URI, for messages and MLflow tags."""
        return self.storage.display(self.rel)

    @property
    def metrics(self) -> dict[str, float]:
        return self.manifest.get("metrics", {})

    @property
    def params(self) -> dict[str, Any]:
        return self.manifest.get("params", {})

    @property
    def artifacts(self) -> list[Path]:
        return [self.folder / name for name in self.manifest.get("artifacts", [])]

    def read_json(self, name: str) -> Any:
        """One recorded file, read straight from storage (no download of the whole folder)."""
        return json.loads(self.storage.read_text(f"{self.rel}/{name}"))


@dataclass
class StageContext:
    """Where a running stage may stream live progress (the train stage's loss curve, its val_loss to Tune)."""

    tracking_uri: str | None = None
    run_id: str | None = None
    report_to_tune: bool = False  # inside a sweep trial: forward per-epoch training reports to Tune
    fresh: bool = False  # --force: recompute from scratch, ignoring any partial state of an earlier attempt


class Stage:
    kind: ClassVar[str] = ""
    files: ClassVar[list[str]] = []  # what a finished folder must hold
    label: str | None = None
    upstream: list["Stage"]

    def __init__(self, root: Storage | str | Path, upstream: list["Stage"] | None = None) -> None:
        self.storage = root if isinstance(root, Storage) else Storage(root)
        self.upstream = list(upstream or [])

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.label}" if self.label else self.kind

    def inputs(self) -> dict[str, Any]:
        """Everything that changes this stage's result, apart from its upstream stages."""
        raise NotImplementedError

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint({"stage": self.kind, "inputs": self.inputs(),
                            "upstream": {u.name: u.fingerprint for u in self.upstream}})

    @property
    def rel(self) -> str:
        """The stage folder below the storage root."""
        leaf = f"{self.label}-{self.fingerprint}" if self.label else self.fingerprint
        return f"{self.kind}/{leaf}"

    @property
    def location(self) -> str:
        return self.storage.display(self.rel)

    @property
    def folder(self) -> Path:
        """The stage folder itself, for a local storage root (remote roots are read through `result().folder`)."""
        if self.storage.remote:
            raise ValueError(f"{self.location} is in remote storage; read it through the stage's result")
        return self.storage.local_path(self.rel)

    def check(self) -> None:
        """Cheap validation before any stage runs (bad input fails before expensive work)."""

    def datasets(self) -> list[dict[str, Any]]:
        """The data this stage reads, as stages.inputs.dataset_record gives it (MLflow input datasets)."""
        return []

    def run(self, tmp: Path, upstream: dict[str, StageResult], context: StageContext) -> StageOutput:
        """Compute the result into the empty folder `tmp`."""
        raise NotImplementedError

    # -- results ------------------------------------------------------------------------------------
    def finished(self) -> StageResult | None:
        """The recorded result if this stage's folder is complete, else None."""
        manifest = _read_manifest(self.storage, self.rel)
        if manifest is None or manifest.get("fingerprint") != self.fingerprint:
            return None
        if not all(self.storage.exists(f"{self.rel}/{name}") for name in manifest.get("files", [])):
            return None
        if manifest.get("sizes"):  # a file cut short or replaced since (a full disk, a partial copy): compute again
            found = self.storage.sizes(self.rel)
            damaged = [name for name, size in manifest["sizes"].items() if found.get(name) != size]
            if damaged:
                log.warning("%s: %s is not as the stage wrote it (%s bytes, recorded %s); computing the stage again",
                            self.name, self.storage.display(f"{self.rel}/{damaged[0]}"), found.get(damaged[0], "no"),
                            manifest["sizes"][damaged[0]])
                return None
        return StageResult(self.kind, self.label, self.fingerprint, self.storage, self.rel, manifest, cached=True)

    def result(self) -> StageResult:
        """The finished result, or a clear error naming the command that produces it."""
        done = self.finished()
        if done is None:
            raise ConfigError(f"{self.location}: no finished {self.name} stage for these inputs; "
                              f"run `flexi {self.kind}` (or `flexi run`) first")
        return done


def recipe_storage(recipe) -> Storage:
    """The recipe's `storage` (an s3:// URI or a folder), else its output_dir."""
    return Storage(recipe.storage or recipe.output_dir)


def file_sizes(root: Path, names) -> dict[str, int]:
    """The size of every file a stage declares (files inside a declared folder too), by path below `root`:
    reuse checks them, so a damaged file is computed again instead of failing a later stage."""
    sizes = {}
    for name in names:
        path = root / name
        if path.is_file():
            sizes[name] = path.stat().st_size
        elif path.is_dir():
            sizes |= {f.relative_to(root).as_posix(): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    return sizes


def _read_manifest(storage: Storage, rel: str) -> dict | None:
    try:
        return json.loads(storage.read_text(f"{rel}/{MANIFEST}"))
    except (OSError, json.JSONDecodeError):  # pyarrow's FileNotFoundError is an OSError
        return None


@contextmanager
def stage_lock(stage: Stage) -> Iterator[None]:
    """An exclusive lock per stage folder: concurrent trials that need the same stage compute it once."""
    with file_lock(lock_path(stage.storage, stage.rel)):
        yield


class FolderInUse(ConfigError):
    """Another process holds a folder's run lock."""


@contextmanager
def exclusive_run(storage: Storage, what: str = "output_dir") -> Iterator[None]:
    """Hold the run lock of a storage root for the duration, or fail at once naming who holds it.

    Two runs writing one folder would each redo or overwrite the other's stages (and race to create its
    MLflow store); the second is refused with the holder's pid, host, start and command. The lock is an
    flock (beside the stage folders of a local root, in this node's cache for a remote one): the kernel
    drops it when its process dies, so a killed run never leaves a stale lock."""
    import fcntl
    import os
    import socket
    import sys

    path = lock_path(storage, "run")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 — held open for the duration
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise FolderInUse(f"{storage.display('')} is in use by {holder}; wait for that run to end or give this "
                              f"one another {what}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"`{' '.join(sys.argv)[:200]}` (pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the flock

def run_stage(stage: Stage, *, force: bool = False, context: StageContext | None = None) -> StageResult:
    """Reuse the stage's finished folder, or compute it (its upstream stages must be finished)."""
    with stage_lock(stage):
        if not force:
            done = stage.finished()
            if done is not None:
                log.info("%s: inputs unchanged, reusing %s", stage.name, stage.location)
                return done
        upstream = {u.name: u.result() for u in stage.upstream}
        context = dataclasses.replace(context or StageContext(), fresh=force)
        started = time.time()
        storage = stage.storage
        with (atomic_dir(storage.local_path(stage.rel)) if not storage.remote else scratch_dir(stage.kind)) as tmp:
            out = stage.run(tmp, upstream, context)
            manifest = {
                "stage": stage.kind, "label": stage.label, "fingerprint": stage.fingerprint,
                "inputs": stage.inputs(), "upstream": {name: r.fingerprint for name, r in upstream.items()},
                "files": list(stage.files), "sizes": file_sizes(tmp, stage.files), "metrics": out.metrics, "params": out.params, "artifacts": out.artifacts, "curves": out.curves,
                "seconds": round(time.time() - started, 2), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            blob = json.dumps(manifest, indent=2, default=str) + "\n"
            if storage.remote:  # the files, then the manifest that declares the folder finished
                storage.delete(stage.rel)
                storage.upload(tmp, stage.rel)
                storage.write_bytes(f"{stage.rel}/{MANIFEST}", blob.encode())
            else:
                (tmp / MANIFEST).write_text(blob)
    return StageResult(stage.kind, stage.label, stage.fingerprint, storage, stage.rel, manifest, cached=False)

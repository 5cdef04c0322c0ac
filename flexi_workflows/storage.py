"""Where a run keeps what its stages, workers and actors exchange: a folder, or an s3:// bucket.

    recipe.storage (None → output_dir)
        /work/runs/x              a folder: on one machine, or a network mount every node sees
        s3://bucket/prefix?...    any pyarrow filesystem URI (endpoint_override, scheme, region in the query;
                                  credentials from the usual AWS_* variables, never in the recipe)

    stage folder   <storage>/<kind>/<label>-<fingerprint>/   written once, manifest last
    checkpoints    <storage>/ray_results/...                  Ray Train's storage_path
    summary        <storage>/summary.json, pareto_*.png

A process on any node reads an artifact by its reference (`Storage.ref`): a local path is read in
place; a remote one is downloaded once into that node's cache (`fetch`), keyed by the reference and
the remote listing (names, sizes, modification times), so a recomputed stage is fetched again and an
unchanged one never is. Nothing assumes the driver's disk is visible to workers.

S3 has no rename: a remote stage folder counts as finished only once its manifest (uploaded last)
names files that all exist — the same rule as for local folders, which are renamed into place.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

CACHE_ENV = "FLEXI_STORAGE_CACHE"


def is_remote(ref: str | Path | None) -> bool:
    """A filesystem URI (s3://, gs://, hdfs://, ...) rather than a local path."""
    if ref is None or isinstance(ref, Path) or "://" not in str(ref):  # `builtin:arith-tiny` is a name, not a URI
        return False
    scheme = urlsplit(str(ref)).scheme
    return len(scheme) > 1 and scheme != "file"  # a Windows drive letter is one character


def display(ref: str) -> str:
    """The reference without its query (endpoint and options) for messages and tags."""
    if not is_remote(ref):
        return str(ref)
    parts = urlsplit(ref)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def cache_root() -> Path:
    """This node's download cache for remote artifacts."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "flexi-workflows" / "storage")


# S3-compatible servers (MinIO, SeaweedFS, Ceph) may not read the aws-chunked uploads with checksum trailers
# that the AWS SDK sends by default; AWS S3 accepts both. A user's own setting wins.
S3_COMPAT_ENV = {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    if uri.startswith("s3://"):
        for key, value in S3_COMPAT_ENV.items():
            os.environ.setdefault(key, value)

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 — pyarrow raises several types for a bad URI
        raise ValueError(f"storage {display(uri)!r}: {type(exc).__name__}: {exc}") from None


def inside(rel: str | Path, storage: Storage) -> str:
    """`rel` as a path below the storage root, or a ValueError: every path the project writes goes through
    here, so no name taken from a recipe (an eval set's label, a method label) can reach outside the run's
    folder, even one that slipped past the recipe's own checks."""
    text = str(rel).replace("\\", "/").strip("/")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts or "\0" in text:
        raise ValueError(f"{storage.display()}: {str(rel)!r} would lie outside the run's folder")
    return "/".join(parts)


def child_path(folder: Path, name: str) -> Path:
    """`folder / name` for a file name taken from a recipe (an eval set's label), refused if it leaves `folder`."""
    target = (folder / name).resolve()
    if target.parent != folder.resolve() or name in ("", ".", ".."):
        raise ValueError(f"{name!r} is not a plain file name inside {folder}")
    return folder / name


class Storage:
    """A root folder on some filesystem; paths below it are relative, joined with '/'."""

    def __init__(self, uri: str | Path) -> None:
        uri = str(uri)
        if is_remote(uri):
            self.uri = uri
            self.fs, root = _filesystem(uri)
            self.root = root.rstrip("/")
            self.local: Path | None = None
        else:
            import pyarrow.fs as pafs

            self.local = Path(uri.removeprefix("file://")).expanduser().resolve()
            self.uri = str(self.local)
            self.fs = pafs.LocalFileSystem()
            self.root = self.local.as_posix()

    def __reduce__(self):  # workers and actors rebuild the filesystem from the URI
        return (Storage, (self.uri,))

    def __repr__(self) -> str:
        return f"Storage({display(self.uri)!r})"

    @property
    def remote(self) -> bool:
        return self.local is None

    def path(self, rel: str = "") -> str:
        """The path of `rel` inside the filesystem (what pyarrow and Ray Train's storage_path take)."""
        rel = inside(rel, self)
        return f"{self.root}/{rel}" if rel else self.root

    def ref(self, rel: str = "") -> str:
        """A reference any process can `fetch`: a local path, or the URI (with its query) of `rel`."""
        rel = inside(rel, self)
        if not self.remote:
            return str(self.local / rel) if rel else str(self.local)
        parts = urlsplit(self.uri)
        path = f"{parts.path.rstrip('/')}/{rel}" if rel else parts.path
        return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))

    def display(self, rel: str = "") -> str:
        return display(self.ref(rel))

    # -- reading ------------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def sizes(self, rel: str) -> dict[str, int]:
        """Every file below the folder `rel`: its path relative to `rel` → its size in bytes."""
        import pyarrow.fs as pafs

        base = self.path(rel)
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return {}
        return {i.path[len(base):].lstrip("/"): i.size
                for i in self.fs.get_file_info(pafs.FileSelector(base, recursive=True)) if i.type == pafs.FileType.File}

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as handle:
            return handle.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def local_path(self, rel: str = "") -> Path:
        """A local copy of `rel` (in place for a local root; this node's cache for a remote one)."""
        if not self.remote:
            rel = inside(rel, self)
            return self.local / rel if rel else self.local
        return fetch(self.ref(rel))

    # -- writing ------------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """One object or file, whole or not at all (an S3 PUT is atomic; a local file is renamed into place)."""
        if not self.remote:
            target = self.local / inside(rel, self)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, target)
            return
        with self.fs.open_output_stream(self.path(rel)) as handle:
            handle.write(data)

    def upload(self, local: Path, rel: str, *, skip: tuple[str, ...] = ()) -> None:
        """Copy a local folder's files to `rel` (each file whole), leaving out top-level names in `skip`."""
        import pyarrow.fs as pafs

        self.fs.create_dir(self.path(rel), recursive=True)
        for item in sorted(local.iterdir()):
            if item.name in skip:
                continue
            if not self.remote:
                target = self.local / inside(rel, self) / item.name
                if item.is_dir():
                    shutil.copytree(item, target, dirs_exist_ok=True)
                else:
                    shutil.copy2(item, target)
                continue
            pafs.copy_files(str(item), self.path(f"{rel}/{item.name}" if rel else item.name), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)

    def delete(self, rel: str) -> None:
        """Remove a folder or file if present."""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))

    def check_writable(self) -> None:
        """Write and remove a probe object: a wrong endpoint, bucket or credential fails here, before any work."""
        if not self.remote:  # nothing is created before work starts: the nearest existing folder must be writable
            existing = next(p for p in (self.local, *self.local.parents) if p.exists())
            if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
                raise OSError(f"storage {self.display()}: cannot write there ({existing} is not a writable folder)")
            try:  # a probe folder, removed at once: os.access says yes to root on a read-only mount or /sys
                Path(tempfile.mkdtemp(prefix=".flexi-probe-", dir=existing)).rmdir()
            except OSError as exc:
                raise OSError(f"storage {self.display()}: cannot write there ({existing}: {exc.strerror})") from None
            return
        probe = f".flexi-probe-{os.getpid()}"
        try:
            self.fs.create_dir(self.root, recursive=True)
            self.write_bytes(probe, b"ok")
            if self.read_bytes(probe) != b"ok":
                raise OSError("a probe object read back different bytes (a proxy rewriting objects?)")
            self.delete(probe)
        except OSError as exc:
            raise OSError(f"storage {self.display()}: cannot write there ({exc})") from None


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on a file on this machine (processes on one node serialize on it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _listing(ref: str):
    """(filesystem, path, info, [(name, size, mtime)]) of a remote file or folder."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(ref)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{display(ref)}: no such object or folder")
    if info.type == pafs.FileType.Directory:
        listing = [(i.path.removeprefix(path), i.size, i.mtime_ns) for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))]
    else:
        listing = [("", info.size, info.mtime_ns)]
    return fs, path, info, sorted(listing)


def remote_digest(ref: str) -> str:
    """What identifies a remote file or folder without downloading it: its URI and listing."""
    return hashlib.sha256(repr((display(ref), _listing(ref)[3])).encode()).hexdigest()[:16]


def child(ref: str, name: str) -> str:
    """The reference of `name` inside the folder `ref` (a URI keeps its query)."""
    if not is_remote(ref):
        return str(Path(ref) / name)
    parts = urlsplit(ref)
    return urlunsplit((parts.scheme, parts.netloc, f"{parts.path.rstrip('/')}/{name}", parts.query, ""))


def fetch(ref: str | Path) -> Path:
    """A local path for `ref`: a local path as it is; a remote file or folder downloaded once into this node's
    cache. The cache key includes the remote listing, so a changed remote copy is downloaded again."""
    if not is_remote(ref):
        return Path(ref).expanduser()
    import pyarrow.fs as pafs

    fs, path, info, listing = _listing(str(ref))
    key = hashlib.sha256(repr((display(str(ref)), listing)).encode()).hexdigest()[:20]
    name = Path(path.rstrip("/")).name or "root"
    target = cache_root() / key / name
    with file_lock(cache_root() / f".{key}.lock"):
        if target.exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_root()))
        try:
            if info.type == pafs.FileType.Directory:
                # file by file, each local folder made first: pyarrow's copy_files of an S3 "folder" does not
                # always create the local subfolders (S3 has none, only keys), and then fails to open a file
                (tmp / name).mkdir()  # an empty remote folder has no objects to copy
                for item in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
                    if item.type == pafs.FileType.File:
                        dest = tmp / name / item.path[len(path):].lstrip("/")
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        pafs.copy_files(item.path, str(dest), source_filesystem=fs,
                                        destination_filesystem=pafs.LocalFileSystem())
            else:
                pafs.copy_files(path, str(tmp / name), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A local temp folder for computing what is then uploaded (removed afterwards, whatever happens)."""
    cache_root().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}.scratch-", dir=cache_root()))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def lock_path(storage: Storage, rel: str) -> Path:
    """Where the lock for `rel` lives: beside it in a local root; in this node's cache for a remote one
    (two drivers on different machines can then both compute a stage; the results are the same, the
    last upload wins)."""
    if not storage.remote:
        target = storage.local_path(rel)
        return target.parent / f".{target.name}.lock"
    key = hashlib.sha256(display(storage.ref(rel)).encode()).hexdigest()[:20]
    return cache_root() / "locks" / f"{key}.lock"

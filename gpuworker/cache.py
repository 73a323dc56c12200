"""The node-local file cache: model files stored by content, shared by every worker on the node, kept
across jobs, bounded in size with least-recently-used eviction.

Layout under the cache root::

    blobs/<sha256>            a file's bytes, named by their hash (written once, never modified)
    manifests/<digest>.json   a complete manifest; its mtime is the context's last use (LRU order)
    views/<digest>/<path>     symlinks to the blobs, laid out as the model directory (what transformers loads)
    locks/<digest>.lock       held (shared) by every process using the files; eviction skips locked ones
    locks/<digest>.json       the manifest of a pinned context, so a download in progress keeps its blobs
    partial/                  downloads in progress (named with the downloader's pid), renamed into blobs/
                              once every piece is verified
    cache.lock                held (exclusive) while evicting, so two workers never evict at once

Everything that lands in ``blobs/`` or ``views/`` arrives by an atomic rename, so a worker killed at any
moment leaves either nothing or a complete, verified file, and concurrent workers never see half of one.
Blobs are shared between manifests (two fine-tunes with one tokenizer store it once). The default root is
the batch system's scratch directory, so the files sit on a node-local disk: ``$SLURM_TMPDIR``,
``$_CONDOR_SCRATCH_DIR`` or ``$TMPDIR``, else the user's cache directory. Some sites wipe per-job scratch
at the end of each job; point ``--cache-dir`` at a node-local path that outlives jobs to reuse files.

Every method blocks on the file system: the worker calls them on a thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import structlog

from pervade.errors import ConfigError
from pervade.manifest import FileEntry, Manifest, manifest_from_json, manifest_to_json
from pervade.procs import process_alive

log = structlog.get_logger(__name__)

#: The environment variables naming a batch system's node-local scratch directory, in order of preference.
SCRATCH_VARIABLES = ("SLURM_TMPDIR", "_CONDOR_SCRATCH_DIR", "TMPDIR")
CACHE_SUBDIR = "pervade-files"


def default_cache_root(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    for name in SCRATCH_VARIABLES:
        if environ.get(name):
            return Path(environ[name]) / CACHE_SUBDIR
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pervade" / "files"


class FileCache:
    """Model files on this node, by content. ``limit_bytes`` bounds the blobs (None: unbounded)."""

    def __init__(self, root: Path, limit_bytes: int | None = None) -> None:
        if limit_bytes is not None and limit_bytes < 1:
            raise ConfigError("the cache size limit must be positive")
        self.root = Path(root)
        self.limit_bytes = limit_bytes
        for sub in ("blobs", "manifests", "views", "locks", "partial"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        #: Open lock files of the manifests this process uses (a shared flock each).
        self._pins: dict[str, int] = {}
        self._known: dict[str, Manifest] = {}

    # --- paths, all built from our own data (hashes), never from a request -----------------------

    def blob_path(self, entry: FileEntry) -> Path:
        return self.root / "blobs" / entry.blob_name

    def view_dir(self, digest: str) -> Path:
        return self.root / "views" / digest

    def _manifest_path(self, digest: str) -> Path:
        return self.root / "manifests" / f"{digest}.json"

    def partial_path(self, entry: FileEntry) -> Path:
        """A fresh file for a download of ``entry`` in progress (unique per call: workers never share one)."""
        return self.root / "partial" / f"{entry.blob_name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"

    def staging_dir(self) -> Path:
        """A fresh directory for files being fetched from the hub (removed with the partials of dead pids)."""
        path = self.root / "partial" / f"hub.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return path

    # --- what is here ----------------------------------------------------------------------------

    def has_blob(self, entry: FileEntry) -> bool:
        try:
            return self.blob_path(entry).stat().st_size == entry.size
        except FileNotFoundError:
            return False

    def missing(self, manifest: Manifest) -> list[FileEntry]:
        """Files of ``manifest`` not yet in the cache (each blob once, even if listed under two paths)."""
        seen: set[bytes] = set()
        missing = []
        for entry in manifest.files:
            if entry.sha256 not in seen and not self.has_blob(entry):
                missing.append(entry)
            seen.add(entry.sha256)
        return missing

    def manifest(self, digest: str) -> Manifest | None:
        """A complete manifest held here (by any worker of the node), or None."""
        if digest in self._known:
            return self._known[digest]
        try:
            manifest = manifest_from_json(self._manifest_path(digest).read_bytes())
        except (FileNotFoundError, ConfigError):
            return None
        if manifest.digest != digest or self.missing(manifest):
            return None
        self._known[digest] = manifest
        return manifest

    def complete_digests(self) -> list[str]:
        """Every manifest whose files are all here, most recently used first."""
        paths = sorted((self.root / "manifests").glob("*.json"), key=_mtime, reverse=True)
        return [p.stem for p in paths if self.manifest(p.stem) is not None]

    def usage_bytes(self) -> int:
        return sum(_size(p) for p in (self.root / "blobs").iterdir())

    # --- adding ----------------------------------------------------------------------------------

    def commit_blob(self, entry: FileEntry, partial: Path) -> None:
        """Move a fully verified download into place (atomic; another worker may have won the race)."""
        os.replace(partial, self.blob_path(entry))

    def complete(self, manifest: Manifest) -> Path:
        """Record ``manifest`` as held and lay out its model directory; returns that directory."""
        digest = manifest.digest
        missing = self.missing(manifest)
        if missing:
            raise ConfigError(f"cannot complete {digest[:12]}: {len(missing)} files missing")
        view = self.view_dir(digest)
        if not view.is_dir():
            staging = self.root / "views" / f".{digest}.{uuid.uuid4().hex[:8]}"
            try:
                for entry in manifest.files:
                    link = staging / entry.path
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(os.path.relpath(self.blob_path(entry), link.parent))
                staging.rename(view)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
                if not view.is_dir():  # not a lost race with another worker: a real failure
                    raise
        path = self._manifest_path(digest)
        if not path.exists():
            tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_bytes(manifest_to_json(manifest))
            tmp.replace(path)
        self._known[digest] = manifest
        self.touch(digest)
        return view

    def touch(self, digest: str) -> None:
        """Mark a manifest used now (least recently used is evicted first)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self._manifest_path(digest))

    # --- use and eviction ------------------------------------------------------------------------

    def pin(self, manifest: Manifest) -> None:
        """Keep ``manifest``'s files from eviction and garbage collection (by any process) until ``unpin``,
        from before its download starts to after its model is dropped."""
        digest = manifest.digest
        if digest in self._pins:
            return
        with open(self.root / "cache.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # not while another process collects garbage
            fd = os.open(self.root / "locks" / f"{digest}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)
            pending = self.root / "locks" / f"{digest}.json"
            if not pending.exists():
                tmp = pending.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
                tmp.write_bytes(manifest_to_json(manifest))
                tmp.replace(pending)
        self._pins[digest] = fd

    def unpin(self, digest: str) -> None:
        fd = self._pins.pop(digest, None)
        if fd is not None:
            os.close(fd)  # releases the lock

    def make_room(self, incoming: Manifest | None = None) -> list[str]:
        """Evict least recently used manifests until the blobs, plus what ``incoming`` still needs, fit the
        limit. Manifests in use by any process are skipped. Returns the digests evicted."""
        if self.limit_bytes is None:
            return []
        needed = sum(e.size for e in self.missing(incoming)) if incoming is not None else 0
        evicted: list[str] = []
        with open(self.root / "cache.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            candidates = sorted((self.root / "manifests").glob("*.json"), key=_mtime)
            keep = {incoming.digest} if incoming is not None else set()
            while self.usage_bytes() + needed > self.limit_bytes and candidates:
                digest = candidates.pop(0).stem
                if digest in keep or not self._evict(digest):
                    continue
                evicted.append(digest)
                self._collect_garbage(protect=incoming)
        if evicted:
            log.info("cache_evicted", manifests=len(evicted), usage_bytes=self.usage_bytes(), limit_bytes=self.limit_bytes)
        return evicted

    def _evict(self, digest: str) -> bool:
        """Forget one manifest if no process uses it; its blobs go in the next garbage collection."""
        lock_path = self.root / "locks" / f"{digest}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # in use
            self._manifest_path(digest).unlink(missing_ok=True)
            view = self.view_dir(digest)
            if view.is_dir():  # out of the way first: an eviction killed midway leaves no broken view
                trash = self.root / "views" / f".trash-{digest}-{uuid.uuid4().hex[:8]}"
                view.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            self._known.pop(digest, None)
            return True
        finally:
            os.close(fd)

    def _collect_garbage(self, protect: Manifest | None) -> None:
        """Delete blobs that no remaining manifest, no pinned manifest (a download in progress, in any
        process) and not the one about to be fetched lists."""
        referenced = {e.blob_name for e in protect.files} if protect is not None else set()
        pinned = [p for p in (self.root / "locks").glob("*.json") if self._in_use(p.stem)]
        for path in [*(self.root / "manifests").glob("*.json"), *pinned]:
            try:
                referenced.update(e.blob_name for e in manifest_from_json(path.read_bytes()).files)
            except (FileNotFoundError, ConfigError):
                continue
        for blob in (self.root / "blobs").iterdir():
            if blob.name not in referenced:
                blob.unlink(missing_ok=True)

    def _in_use(self, digest: str) -> bool:
        """Whether any process (this one included) has ``digest`` pinned."""
        fd = os.open(self.root / "locks" / f"{digest}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def clean_partials(self) -> None:
        """Remove downloads abandoned by workers that died (their pid, in the name, is gone: the cache is
        node-local, so pids mean something)."""
        for part in (self.root / "partial").iterdir():
            fields = part.name.split(".")
            pid = next((int(f) for f in fields[1:2] if f.isdigit()), None)
            if pid is not None and pid != os.getpid() and process_alive(pid):
                continue
            if part.is_dir():
                shutil.rmtree(part, ignore_errors=True)
            else:
                part.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0

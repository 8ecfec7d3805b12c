"""The local cache of remote files: partial copies for lookups, whole verified copies for bulk reads.

::

    CACHE/
      files/NAME.emb              whole files: downloaded to tmp/, checked against their checksums, renamed here
      pages/BOOT/NAME.emb         partial copies for lookups: a sparse file, each page written once fetched
      pages/BOOT/NAME.have        one byte per page of the partial copy: nonzero once the page is written
      tmp/NAME.TOKEN.part         downloads in progress, each locked by its writer
      locks/NAME.lock             taken while downloading NAME, so that processes download it once
      locks/fetch-K.lock          taken while fetching pages that other processes may ask for too (K < 64)
      staging/TMP/, TMP.lock      stand-ins for datasets being written at a URL, each locked by its writer

``NAME`` is derived from the URL and the object's identity (size and ETag, or a manifest's count and keys
CRC): a changed object gets a new name, so its pages are never mixed with the old one's.  A whole file never
changes once renamed into place.  A partial copy's page is written before its byte in ``.have`` is set, so a
process that sees the byte (through the shared mapping of the same page cache) reads the page; partial copies
live under the boot they were written in (``/proc/sys/kernel/random/boot_id``) because pages not yet on disk
when a machine loses power may come back as zeros, and the next boot starts afresh.  The locks only avoid
duplicate downloads: where they do not work (some NFS setups) two processes download the same file, each to its
own temporary name, and the second rename replaces the first with the same bytes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator

import numpy as np

from embfile import errors
from embfile._format import PAGE
from embfile.folder import unique_name

PART_BYTES = 16 << 20  # a download's ranged requests
DOWNLOAD_IN_FLIGHT = 4
ABANDONED_AFTER = 10.0  # seconds: an unlocked download older than this is a dead writer's
FETCH_LOCKS = 64  # fetches of pages are serialised by one of this many locks, chosen by what they fetch


def default_root() -> str:
    """``$EMBFILE_CACHE``, else ``embfile`` in the user's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    if os.environ.get("EMBFILE_CACHE"):
        return os.environ["EMBFILE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "embfile")


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")[:16]
    except OSError:
        return "unknown"


def entry_name(url: str, identity: str) -> str:
    """The cache's name for one version of one remote file: readable, and unique to both."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[:64].removesuffix(".emb")
    digest = hashlib.sha256(f"{url}\0{identity}".encode()).hexdigest()[:24]
    return f"{base}-{digest}"


@contextlib.contextmanager
def disk_errors(path: str) -> Iterator[None]:
    """An OSError for lack of space in the cache as a :class:`CacheError` saying what to do."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise errors.CacheError(
                f"{path}: the cache's disk is full; free space there, or pass cache_dir= another disk or "
                "cache_limit= a smaller size"
            ) from None
        raise


class Cache:
    """The cache folder at ``root`` (default ``$EMBFILE_CACHE``, else ``~/.cache/embfile``), keeping at most
    ``limit`` bytes.

    ``limit`` bounds what stays on disk between uses: after each download (or window fetched) the least recently
    used files (whole or partial) are removed until the rest fit.  A removed file that a process still has
    mapped stays readable to it (the kernel frees the space when the last mapping goes), so while datasets
    larger than the limit are open the disk may hold more than the limit.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, limit: int | None = None) -> None:
        self.root = os.fspath(root) if root is not None else default_root()
        self.limit = limit
        self.boot = boot_id()
        for sub in ("files", "tmp", "locks", os.path.join("pages", self.boot)):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self._forget_other_boots()

    def whole(self, name: str) -> str | None:
        """The path of the whole copy of ``name`` if the cache has it (marked as just used)."""
        path = os.path.join(self.root, "files", name + ".emb")
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def partial(self, name: str, size: int) -> PartialCopy:
        return PartialCopy(os.path.join(self.root, "pages", self.boot, name), size)

    def download(self, name: str, fetch: Callable[[int, int], bytes], size: int, check: Callable[[str], None]) -> str:
        """The whole copy of ``name``, downloaded if the cache lacks it: ``fetch(start, end)`` reads ranges of
        the ``size``-byte object, ``check(path)`` raises if the downloaded file is not the one expected."""
        found = self.whole(name)
        if found:
            return found
        with self._locked(os.path.join(self.root, "locks", name + ".lock")):
            found = self.whole(name)  # another process downloaded it while this one waited
            if found:
                return found
            self._remove_abandoned()
            final = os.path.join(self.root, "files", name + ".emb")
            tmp = os.path.join(self.root, "tmp", f"{name}.{unique_name()}.part")
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # marks the download as live for _remove_abandoned
                with disk_errors(self.root):
                    _fetch_into(fd, fetch, size)
                    os.fsync(fd)
                check(tmp)
                os.rename(tmp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            finally:
                os.close(fd)
        self.evict(keep=final)
        return final

    def evict(self, keep: str | None = None) -> None:
        """Remove least recently used files until the cache holds at most ``limit`` bytes."""
        if self.limit is None:
            return
        entries = []
        for sub in ("files", os.path.join("pages", self.boot)):
            with os.scandir(os.path.join(self.root, sub)) as it:
                for e in it:
                    if e.is_file() and not e.name.endswith(".have"):
                        st = e.stat()
                        entries.append((st.st_mtime, st.st_blocks * 512, e.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.limit:
                break
            if path == keep:
                continue
            for p in (path, path.removesuffix(".emb") + ".have"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
            total -= size

    def clear(self) -> None:
        """Remove everything cached (files mapped by open datasets stay readable to them)."""
        for sub in ("files", "pages"):
            shutil.rmtree(os.path.join(self.root, sub), ignore_errors=True)
        self.__init__(self.root, self.limit)  # type: ignore[misc]

    @contextlib.contextmanager
    def staging_folder(self) -> Iterator[str]:
        """A new empty folder to stand in for a dataset written at a URL (here, where whole copies can be hard
        linked into it), locked while in use and removed after.  The folders of writers that died (their
        lock free; a writer killed in a long job leaves its shard in progress) are removed first."""
        root = os.path.join(self.root, "staging")
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):
            if name.endswith(".lock"):
                self._remove_if_abandoned(os.path.join(root, name), os.path.join(root, name.removesuffix(".lock")))
        path = tempfile.mkdtemp(dir=root)
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with contextlib.suppress(OSError):  # no locks here: a dead writer's folder stays
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + ".lock")
            os.close(fd)

    def fetching(self, what: str) -> contextlib.AbstractContextManager[None]:
        """Held while fetching pages named by ``what``: processes asking for the same pages at once (the
        workers of a DataLoader all read every window) then fetch them once, the others waiting, then finding
        them there.  Unrelated fetches share a lock only by chance (one of :data:`FETCH_LOCKS`)."""
        slot = zlib.crc32(what.encode()) % FETCH_LOCKS
        return self._locked(os.path.join(self.root, "locks", f"fetch-{slot}.lock"))

    @contextlib.contextmanager
    def _locked(self, path: str) -> Iterator[None]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with contextlib.suppress(OSError):  # no locks here: correct anyway, perhaps downloaded twice
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _remove_abandoned(self) -> None:
        """Remove downloads whose writer died."""
        tmp = os.path.join(self.root, "tmp")
        for name in os.listdir(tmp):
            self._remove_if_abandoned(os.path.join(tmp, name))

    @staticmethod
    def _remove_if_abandoned(lock: str, folder: str | None = None) -> None:
        """Remove ``lock`` (and ``folder``) if its writer died: its lock is free, and it is older than a
        just-created one that its writer has not locked yet."""
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            if time.time() - os.fstat(fd).st_mtime < ABANDONED_AFTER:
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return  # a live writer
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
        finally:
            os.close(fd)

    def _forget_other_boots(self) -> None:
        pages = os.path.join(self.root, "pages")
        for name in os.listdir(pages):
            if name != self.boot:
                shutil.rmtree(os.path.join(pages, name), ignore_errors=True)


def _fetch_into(fd: int, fetch: Callable[[int, int], bytes], size: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    os.ftruncate(fd, size)

    def part(start: int) -> None:
        data = fetch(start, min(start + PART_BYTES, size))
        view = memoryview(data)
        while view:
            view = view[os.pwrite(fd, view, start + len(data) - len(view)) :]

    with ThreadPoolExecutor(DOWNLOAD_IN_FLIGHT) as pool:
        list(pool.map(part, range(0, size, PART_BYTES)))


class PartialCopy:
    """A sparse local copy of a remote file, filled page by page, shared by every process of this boot.

    ``have`` is a uint8 view of the shared page map, one byte per 4096-byte page.
    """

    def __init__(self, base: str, size: int) -> None:
        self.path, self.size = base + ".emb", size
        self.n_pages = -(-size // PAGE)
        with disk_errors(base):
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if os.fstat(self._fd).st_size != size:
                os.ftruncate(self._fd, size)  # idempotent: every process sets the same size
            fd = os.open(base + ".have", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size < self.n_pages:
                    os.ftruncate(fd, self.n_pages)
                self._map = mmap.mmap(fd, self.n_pages) if self.n_pages else None
            finally:
                os.close(fd)
        self.have = np.frombuffer(self._map, np.uint8) if self._map is not None else np.zeros(0, np.uint8)
        os.utime(self.path)

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The runs of pages ``(first, last + 1)`` of bytes ``[start, end)`` that are not here yet."""
        first, last = start // PAGE, -(-end // PAGE)
        absent = np.flatnonzero(self.have[first:last] == 0) + first
        if not absent.size:
            return []
        breaks = np.flatnonzero(np.diff(absent) > 1)
        starts = np.concatenate([[absent[0]], absent[breaks + 1]])
        ends = np.concatenate([absent[breaks], [absent[-1]]]) + 1
        return list(zip(starts.tolist(), ends.tolist()))

    def write(self, page: int, data: bytes) -> None:
        """Write pages from ``page`` on, then mark them present (in that order: see the module)."""
        with disk_errors(self.path):
            view = memoryview(data)
            at = page * PAGE
            while view:
                n = os.pwrite(self._fd, view, at)
                view, at = view[n:], at + n
        self.have[page : page + -(-len(data) // PAGE)] = 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.have = np.zeros(0, np.uint8)
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None

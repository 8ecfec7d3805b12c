"""The local cache of remote files: partial copies for lookups, whole verified copies for bulk reads.

::

    CACHE/
      files/NAME.emb              whole files: downloaded to tmp/, checked against their checksums, renamed here
      pages/BOOT/NAME.emb         partial copies for lookups and streamed epochs: a sparse file, each page
                                  written once fetched
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

Files in use are never evicted: each handle holds a shared ``flock`` on the whole copy it maps, or on the
``.have`` file of its partial copy.  Within a partial copy, readers hold shared record locks (open file
description locks, ``F_OFD_SETLK``) on the byte ranges they are reading; a streamed epoch over a dataset larger
than ``limit`` gives back the space of a window it has read (:meth:`PartialCopy.free`, a hole punched) only
where it takes an exclusive lock, that is, where no other reader holds those bytes, and clears the pages' bytes
in ``.have`` before it punches, so what a reader finds marked present is there.
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

from embfile import _core, errors
from embfile._format import PAGE
from embfile.folder import unique_name

PART_BYTES = 16 << 20  # a download's ranged requests
DOWNLOAD_IN_FLIGHT = 4
ABANDONED_AFTER = 10.0  # seconds: an unlocked download older than this is a dead writer's
FETCH_LOCKS = 64  # fetches of pages are serialised by one of this many locks, chosen by what they fetch
RANGE_LOCKS = hasattr(fcntl, "F_OFD_SETLK")  # Linux: locks on byte ranges of a partial copy, per handle


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

    ``limit`` bounds what the cache holds on disk: after each download, and after each window a streamed epoch
    has read, the least recently used files (whole or partial) that no open handle uses are removed until the
    rest fit.  Files in use stay; if they alone exceed the limit, a streamed epoch gives back the space of each
    window once it has read it, so a dataset larger than the disk streams through ``limit`` bytes and a few
    windows.  Lookups and other reads keep what they fetched until their handle closes.
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

    def download(
        self,
        name: str,
        fetch: Callable[[int, int], bytes],
        size: int,
        check: Callable[[str], None],
        whole: bytes | None = None,
    ) -> str:
        """The whole copy of ``name``, downloaded if the cache lacks it: ``fetch(start, end)`` reads ranges of
        the ``size``-byte object (or it is ``whole``, read already), ``check(path)`` raises if the downloaded
        file is not the one expected."""
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
                    _fetch_into(fd, fetch if whole is None else lambda a, b: whole[a:b], size)
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

    def evict(self, keep: str | None = None) -> bool:
        """Remove least recently used files that no handle uses until the cache holds at most ``limit`` bytes:
        whether it still holds more (the files in use being larger)."""
        if self.limit is None:
            return False
        entries = []  # (last used, bytes on disk, path, the file a handle using it locks)
        for sub in ("files", os.path.join("pages", self.boot)):
            with os.scandir(os.path.join(self.root, sub)) as it:
                for e in it:
                    if e.is_file() and not e.name.endswith(".have"):
                        st = e.stat()
                        marker = e.path if sub == "files" else e.path.removesuffix(".emb") + ".have"
                        entries.append((st.st_mtime, st.st_blocks * 512, e.path, marker))
        total = sum(entry[1] for entry in entries)
        for _, size, path, marker in sorted(entries):
            if total <= self.limit:
                break
            if path != keep and _remove_unused(path, marker):
                total -= size
        return total > self.limit

    @staticmethod
    def in_use(path: str) -> int:
        """Mark the whole copy at ``path`` as in use (not to be evicted) until the returned descriptor is closed."""
        fd = os.open(path, os.O_RDONLY)
        with contextlib.suppress(OSError):  # no locks here: evicted while mapped, still readable (space freed later)
            fcntl.flock(fd, fcntl.LOCK_SH)
        return fd

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

    @contextlib.contextmanager
    def fetching(self, *what: str) -> Iterator[None]:
        """Held while fetching pages named by each of ``what``: processes asking for the same pages at once (the
        workers of a DataLoader all read every window) then fetch them once, the others waiting, then finding
        them there.  Unrelated fetches share a lock only by chance (one of :data:`FETCH_LOCKS`); the locks of
        several names are taken in one order, so that fetches naming some of the same never wait on each other
        in a circle."""
        slots = sorted({zlib.crc32(w.encode()) % FETCH_LOCKS for w in what})
        with contextlib.ExitStack() as held:
            for slot in slots:
                held.enter_context(self._locked(os.path.join(self.root, "locks", f"fetch-{slot}.lock")))
            yield

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


def _remove_unused(path: str, marker: str) -> bool:
    """Remove the cache entry at ``path`` (a whole copy, or a partial copy and its page map) unless a handle
    uses it, holding a shared lock on ``marker``: whether it was removed."""
    try:
        fd = os.open(marker, os.O_RDONLY)
    except FileNotFoundError:
        fd = -1
    try:
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            except OSError:
                pass  # no locks here: removed while mapped, still readable (its space freed at close)
        for p in (path, path.removesuffix(".emb") + ".have"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        return True
    finally:
        if fd >= 0:
            os.close(fd)


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

    ``have`` is a uint8 view of the shared page map, one byte per 4096-byte page.  The handle uses the copy (it
    is not evicted) until :meth:`close`.
    """

    punch_holes = RANGE_LOCKS  # cleared where the file system cannot punch holes: nothing is freed there

    def __init__(self, base: str, size: int) -> None:
        self.path, self.size = base + ".emb", size
        self.n_pages = -(-size // PAGE)
        with disk_errors(base):
            self._in_use = _opened_in_use(base + ".have")  # first: an eviction under way ends before this
            if os.fstat(self._in_use).st_size < self.n_pages:
                os.ftruncate(self._in_use, self.n_pages)
            self._map = mmap.mmap(self._in_use, self.n_pages) if self.n_pages else None
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if os.fstat(self._fd).st_size != size:
                os.ftruncate(self._fd, size)  # idempotent: every process sets the same size
        self.have = np.frombuffer(self._map, np.uint8) if self._map is not None else np.zeros(0, np.uint8)
        os.utime(self.path)

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The runs of pages ``(first, last + 1)`` of bytes ``[start, end)`` that are not here yet."""
        first, last = start // PAGE, -(-end // PAGE)
        if self.have[first:last].all():  # a lookup read before: the common case, answered at once
            return []
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

    def reopen(self) -> None:
        """Lock through a descriptor of this process's own: a forked child shares its parent's, and with it
        the parent's locks, which then do not keep either from freeing what the other reads."""
        if self._fd >= 0:
            fd, self._fd = self._fd, os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR)
            os.close(fd)

    def hold(self, start: int, end: int) -> None:
        """Keep bytes ``[start, end)`` from being freed by other handles until :meth:`let_go` (waits while one
        frees them)."""
        if RANGE_LOCKS and self._fd >= 0:
            _core.range_lock(self._fd, fcntl.F_RDLCK, start, end - start, wait=True)

    def let_go(self, start: int, end: int) -> None:
        if RANGE_LOCKS and self._fd >= 0:  # closed: its locks went with it
            _core.range_lock(self._fd, fcntl.F_UNLCK, start, end - start)

    def free(self, start: int, end: int) -> bool:
        """Give back the disk space of bytes ``[start, end)`` (whole pages), marked absent first, unless another
        handle holds some of them: whether they were freed."""
        if not self.punch_holes or self._fd < 0 or not _core.range_lock(self._fd, fcntl.F_WRLCK, start, end - start):
            return False
        try:
            first, last = start // PAGE, -(-end // PAGE)
            self.have[first:last] = 0
            try:
                _core.punch_hole(self._fd, first * PAGE, (last - first) * PAGE)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                PartialCopy.punch_holes = False
                return False
            return True
        finally:
            _core.range_lock(self._fd, fcntl.F_UNLCK, start, end - start)

    def close(self) -> None:
        for fd in (self._fd, self._in_use):
            if fd >= 0:
                os.close(fd)
        self._fd = self._in_use = -1
        self.have = np.zeros(0, np.uint8)
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None


def _opened_in_use(path: str) -> int:
    """``path`` opened (created if absent) and marked in use by a shared ``flock``, so that :meth:`Cache.evict`
    leaves it; if an eviction removed it meanwhile, the new file at ``path``."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits for an eviction of it under way
        except OSError:
            return fd  # no locks here
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)

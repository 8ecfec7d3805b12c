"""Where a write happens before it is renamed into place, and the cleanup after a killed writer.

Every writer (the .emb writer, the shard writer, the converters) works in a
hidden folder beside its destination, ``.NAME.XXXXXXXX.tmp/``, and renames its
output onto ``NAME`` only when it is complete and fsynced.  The writer holds an
``flock`` on that folder for as long as it lives; the kernel drops the lock when
the process dies, however it dies.  So the next writer to ``NAME`` can tell what
a killed writer left (unlocked) from what a live one is filling (locked), and
removes only the former.  (The lock is on the folder, not on the file, because
HDF5 takes its own flock on the files it writes.)
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import shutil
import tempfile
import threading

from embfile import errors

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over the file size limit


class Staging:
    """A new hidden folder beside ``dst``, locked until :meth:`commit` or :meth:`discard`.

    ``path`` is where to write: a file in that folder, or with ``folder=True`` the
    folder itself (its contents become ``dst``).
    """

    _lock: int | None = None  # until locked (a failed __init__ leaves nothing to discard)

    def __init__(self, dst: str | os.PathLike[str], folder: bool = False) -> None:
        self.dst = os.path.abspath(os.fspath(dst))
        self.parent, name = os.path.split(self.dst)
        if not os.path.isdir(self.parent):
            what = "is not a folder" if os.path.exists(self.parent) else "does not exist"
            raise FileNotFoundError(f"{os.fspath(dst)}: {self.parent} {what}")
        remove_stale(self.parent, name)
        while True:
            try:
                root = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=self.parent)
            except OSError as e:  # named by the user's path, not the hidden one
                raise type(e)(f"{os.fspath(dst)}: cannot write in {self.parent} ({e.strerror})") from None
            fd = lock(root)
            # A cleaner may have taken the new, not yet locked, folder for a dead one's: then start over.
            if fd is not None and os.path.exists(root) and os.path.samestat(os.stat(root), os.fstat(fd)):
                break
            if fd is not None:
                os.close(fd)
        self._root = root
        self._lock = fd
        if folder:  # mkdtemp makes it rwx------; a folder it becomes is made as any other, under the umask
            os.chmod(root, 0o777 & ~umask())
        self.path = root if folder else os.path.join(root, name)

    def commit(self) -> None:
        """fsync what was written, rename it onto the destination, fsync the parent folder."""
        fsync_path(self.path)
        os.replace(self.path, self.dst)  # still locked: no cleaner can take it first
        fsync_path(self.parent)
        if self.path != self._root:
            os.rmdir(self._root)
        self._release()

    def discard(self) -> None:
        """Remove what was staged; the destination is left as it was."""
        if self._lock is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __del__(self) -> None:
        self.discard()


class Flusher:
    """``fdatasync`` a file being written, on a helper thread, each time it has grown by ``every`` bytes.

    A durable write waits at its final fsync for the storage to flush all it was given.  On a VM's
    virtual disk that flush is the host's, and it does not start before it is asked for: filling
    the page cache and flushing it then take their sum.  Asked along the way, off the writer's
    thread, the flush runs while the writer fills, and the write takes about the longer of the two.
    The kernel reports a write error to one fsync only, so an error the helper meets is raised by
    every later :meth:`grown` and :meth:`close`: the file can no longer be committed.
    """

    def __init__(self, fd: int, every: int) -> None:
        self._fd, self._every = fd, every
        self._size = self._flushed = 0
        self._closing = False
        self._error: OSError | None = None
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="embfile-flush", daemon=True)
        self._thread.start()

    def grown(self, size: int) -> None:
        """The file now holds ``size`` bytes; raises what a flush met."""
        with self._wake:
            self._size = size
            if self._due():
                self._wake.notify()
        self._raise()

    def close(self) -> None:
        """Wait for a flush in progress, stop the helper, and raise what a flush met."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        self._raise()

    def _due(self) -> bool:
        return self._size - self._flushed >= self._every

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._due():
                    self._wake.wait()
                if self._closing:
                    return
                size = self._size
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                self._error = e
                return
            with self._wake:
                self._flushed = size


def disk_full(dst: str | os.PathLike[str], code: int, done: str = "") -> errors.DiskFullError:
    """The :class:`DiskFullError` for a write to ``dst`` that failed with ``code`` (an errno)."""
    e = errors.DiskFullError(f"{dst}: {os.strerror(code).lower()}{done}; the file there, if any, is as it was")
    e.errno = code
    return e


def require_space(dst: str | os.PathLike[str], nbytes: int) -> None:
    """Refuse to start a write of about ``nbytes`` to ``dst`` that its file system cannot hold."""
    st = os.statvfs(os.path.dirname(os.path.abspath(dst)))
    if st.f_bavail * st.f_frsize < nbytes:
        raise disk_full(dst, errno.ENOSPC, f": {nbytes} bytes needed, {st.f_bavail * st.f_frsize} free")


def umask() -> int:
    """This process's umask (read from /proc where it can be, without changing it)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)  # elsewhere: read by setting it, and set it back at once
        os.umask(mask)
        return mask


def remove_stale(parent: str, name: str) -> None:
    """Remove the staging files and folders of ``name`` in ``parent`` that no live writer holds."""
    for path in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.*.tmp")):
        fd = lock(path) if os.path.isdir(path) and not os.path.islink(path) else None
        if fd is not None:
            try:
                shutil.rmtree(path, ignore_errors=True)
            finally:
                os.close(fd)


def lock(path: str) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None if another process holds it (or it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a folder (a folder: so a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""One remote object read by byte ranges through fsspec: retries, and checks that what came back is what was asked.

fsspec gives every protocol one interface (s3fs for ``s3://``, gcsfs for ``gs://``, aiohttp for ``https://``,
pyarrow for ``hdfs://``); what it leaves to the caller is deciding which failures are worth another try, and
noticing a server that answered a range request with something else: the whole object (Range ignored), fewer
bytes (a cut connection), or a newer object under the same name.  Each of those here is a
:class:`~embfile.RemoteError` naming the URL, never bytes handed on as if they were the ones asked for.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from embfile import errors
from embfile._extras import require

T = TypeVar("T")

RETRIES = 5  # attempts after the first, with exponential backoff
BACKOFF = 0.1  # seconds before the first retry; doubled each time, jittered, capped at BACKOFF_CAP
BACKOFF_CAP = 4.0
# what botocore and google-auth raise when they find no credentials (named: neither need be installed)
NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}
IN_FLIGHT = 32  # ranges requested at once: an object store serves many at once, and latency is the cost
SMALL_READS = 16  # manifests or tags asked for at once, where the server lists none to say which there are


_clients: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()  # this process's fsspec clients
_inherited: list[Any] = []  # a forked child's copies of its parent's clients, kept from closing


def _keep_inherited_clients() -> None:
    """In a forked child, keep the parent's clients alive until the child ends.  Closing one here (when it is
    collected) would close its copies of the parent's sockets through the event loop they share, whose epoll
    set is the parent's too: the parent would then never hear the answer on those connections, and its next
    request on one would hang until it timed out (5 minutes)."""
    _inherited.extend(_clients.values())
    _clients.clear()


os.register_at_fork(after_in_child=_keep_inherited_clients)


def is_url(path: object) -> bool:
    """Whether ``path`` names a remote object (``PROTOCOL://...``, except ``file://``)."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


@dataclasses.dataclass(frozen=True)
class Identity:
    """What tells one version of an object from the next: size, and the ETag or version the server reports."""

    size: int
    etag: str | None = None
    version: str | None = None

    def token(self) -> str:
        return f"{self.size}:{self.etag or ''}:{self.version or ''}"


class Counts:
    """Requests sent and bytes received, shared by an object and the objects under it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes_read = 0


class Remote:
    """The object at ``url``, opened through fsspec with ``storage_options``.

    The filesystem client is created lazily in each process (a forked or spawned worker makes its own: an
    fsspec client holds an event loop and sockets that must not cross a fork).  ``counts`` adds up what this
    object and those :meth:`child` made from it asked of the server.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, counts: Counts | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.protocol = url.split("://", 1)[0] if "://" in url else "file"
        self._fs: Any = None
        self._pid = -1
        self.counts = counts or Counts()

    # -- the client ---------------------------------------------------------------------------------

    @property
    def fs(self) -> Any:
        if self._fs is None or self._pid != os.getpid():
            fsspec = require("fsspec", "remote")
            options = dict(self.storage_options)
            if self.protocol in ("s3", "s3a"):  # botocore keeps 10 connections unless told: too few to keep IN_FLIGHT
                options["config_kwargs"] = {"max_pool_connections": IN_FLIGHT, **options.get("config_kwargs", {})}
            try:
                self._fs, self._path = fsspec.core.url_to_fs(self.url, **options)
            except ImportError as e:
                raise ImportError(f"{self.url}: {e} (pip install 'embfile[remote]')") from None
            _clients[id(self._fs)] = self._fs  # by identity: fsspec's clients compare equal by their options
            self._pid = os.getpid()
        return self._fs

    @property
    def path(self) -> str:
        self.fs  # noqa: B018  (sets _path)
        return str(self._path)

    def child(self, relative: str) -> Remote:
        """The object at ``relative`` (``/``-separated) under this URL, with the same options."""
        return Remote(f"{self.url.rstrip('/')}/{relative}", self.storage_options, self.counts)

    # -- what is there --------------------------------------------------------------------------------

    def identity(self) -> Identity:
        """Size and ETag / version of the object now (one request); FileNotFoundError if there is none."""
        info = self._retrying("reading the size of", lambda: self._count(self.fs.info(self.path)))
        if info.get("type") == "directory":
            raise IsADirectoryError(f"{self.url} is a folder")
        size = info.get("size")
        if size is None:
            raise errors.RemoteError(f"{self.url}: the server does not report the object's size")
        etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
        version = info.get("VersionId") or info.get("generation")
        return Identity(int(size), str(etag).strip('"') if etag else None, str(version) if version else None)

    def read_all(self) -> bytes:
        """The whole (small) object: a manifest, ``LATEST``.  FileNotFoundError if there is none."""
        return self._retrying("reading", lambda: self._count(bytes(self.fs.cat_file(self.path))))

    def exists(self) -> bool:
        return bool(self._retrying("looking for", lambda: self._count(self.fs.exists(self.path))))

    # -- ranges ---------------------------------------------------------------------------------------

    def read_ranges(self, ranges: Sequence[tuple[int, int]], identity: Identity | None) -> list[bytes]:
        """The bytes ``[start, end)`` of each range, several requests in flight, each retried on its own.

        With ``identity``, a server that can tell (an HTTP ETag, S3's ETag or version id) refuses to answer
        from any other version of the object: a replaced object is a :class:`~embfile.RemoteError`, never a
        mix of two versions.
        """
        if len(ranges) <= 1:
            return [self.read_range(a, b, identity) for a, b in ranges]
        with ThreadPoolExecutor(min(IN_FLIGHT, len(ranges))) as pool:
            return list(pool.map(lambda r: self.read_range(r[0], r[1], identity), ranges))

    def read_range(self, start: int, end: int, identity: Identity | None) -> bytes:
        def attempt() -> bytes:
            data = self._count(bytes(self._get(start, end, identity)))
            if len(data) != end - start:
                if identity is not None and len(data) == identity.size and (start, end) != (0, identity.size):
                    raise RangeIgnored(
                        f"{self.url}: the server ignored the Range request for bytes {start}-{end} and sent the "
                        f"whole object ({len(data)} bytes): it cannot serve lookups by range",
                        data,
                    )
                raise _Truncated(f"{self.url}: asked for bytes {start}-{end}, received {len(data)} bytes")
            return data

        return self._retrying(f"reading bytes {start}-{end} of", attempt)

    # -- writing ------------------------------------------------------------------------------------------

    def upload(self, local: str, if_absent: bool = False) -> bool:
        """Put the file at ``local`` here.  With ``if_absent`` (a small file: a manifest), only if no object is
        here yet: False if one is."""
        if if_absent:
            with open(local, "rb") as f:
                return self.upload_bytes(f.read(), if_absent=True)
        self._retrying("uploading to", lambda: self.fs.put_file(local, self.path))
        return True

    def upload_bytes(self, data: bytes, if_absent: bool = False) -> bool:
        """Put ``data`` here (see :meth:`upload`).  S3 creates it only if absent in one request
        (``If-None-Match: *``); elsewhere the object is looked for first."""
        fs, path = self.fs, self.path
        if not if_absent:
            self._retrying("writing", lambda: fs.pipe_file(path, data))
            return True
        if self.protocol in ("s3", "s3a"):
            created = self._retrying("writing", lambda: _s3_put_if_absent(fs, path, data))
        else:
            created = not self.exists() and bool(self._retrying("writing", lambda: fs.pipe_file(path, data) or True))
        # a retried create whose first attempt went through finds its own bytes: that is a success
        return created or self.read_all() == data

    def remove(self) -> None:
        """Delete the object (if there is one)."""
        try:
            self._retrying("removing", lambda: self.fs.rm_file(self.path))
        except FileNotFoundError:
            pass

    def listing(self) -> dict[str, float | None]:
        """The objects right under this URL (a folder), by name, each with when it was written (a POSIX time;
        None where the store does not say), as the server lists them now."""
        fs, path = self.fs, self.path
        fs.invalidate_cache()  # fsspec clients keep listings: tasks elsewhere have added objects since
        try:
            listed = self._retrying("listing", lambda: self._count(fs.ls(path, detail=True)))
        except FileNotFoundError:
            return {}
        finally:  # and answer later questions from them (a listing of a parent lacks what is added after it)
            fs.invalidate_cache()
        return {
            info["name"].rstrip("/").rsplit("/", 1)[-1]: _written(info)
            for info in listed
            if info.get("type") != "directory"
        }

    def names(self) -> list[str]:
        """The names of the objects right under this URL (a folder), as the server lists them now."""
        return list(self.listing())

    def _get(self, start: int, end: int, identity: Identity | None) -> Any:
        fs, path = self.fs, self.path
        if identity is not None and self.protocol in ("http", "https") and identity.etag:
            return fs.cat_file(path, start=start, end=end, headers={"If-Match": f'"{identity.etag}"'})
        if identity is not None and self.protocol in ("s3", "s3a") and (identity.version or identity.etag):
            if identity.version:
                return fs.cat_file(path, version_id=identity.version, start=start, end=end)
            return _s3_get_if_match(fs, path, start, end, identity.etag)
        return fs.cat_file(path, start=start, end=end)

    def _count(self, answer: T) -> T:
        """``answer``, counted as one request (and its bytes, if it is data)."""
        with self.counts.lock:
            self.counts.requests += 1
            self.counts.bytes_read += len(answer) if isinstance(answer, bytes) else 0
        return answer

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, again after a transient failure (timeouts, resets, 5xx, truncation), then a RemoteError."""
        for attempt in range(RETRIES + 1):
            try:
                return call()
            except FileNotFoundError as e:
                if self.path in str(e) or self.url in str(e):
                    raise
                # something else missing (a bucket: "The specified bucket does not exist"): with the URL
                raise FileNotFoundError(errno.ENOENT, str(e), self.url) from None
            except (IsADirectoryError, errors.RemoteError):
                raise
            except PermissionError as e:  # fsspec's for a 403: its message names neither the object nor the call
                raise errors.RemoteError(
                    f"{what} {self.url}: the server answered 403 (permission denied: {e})"
                ) from None
            except Exception as e:
                if type(e).__name__ in NO_CREDENTIALS:  # no retry finds them: say so at once
                    raise errors.RemoteError(
                        f"{what} {self.url}: no credentials for the store ({type(e).__name__}); set them in the "
                        "environment (AWS_* variables, an instance role) or pass storage_options"
                    ) from None
                status = _status(e)
                if status == 412:
                    raise errors.RemoteError(
                        f"{self.url} changed on the server since it was opened (it no longer matches "
                        f"the version read so far): open it again"
                    ) from None
                if status is not None and 400 <= status < 500 and status not in (408, 429):
                    raise errors.RemoteError(f"{what} {self.url}: the server answered {status}") from None
                if attempt == RETRIES:
                    raise errors.RemoteError(
                        f"{what} {self.url} failed {RETRIES + 1} times, last with {type(e).__name__}: {e}".rstrip(": ")
                    ) from None
                delay = min(BACKOFF * 2**attempt, BACKOFF_CAP)
                time.sleep(delay * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])  # type: ignore[misc]


def _written(info: dict[str, Any]) -> float | None:
    """When a listed object was written, from what its store reports (S3 ``LastModified``, GCS ``updated``,
    a file system's ``mtime``)."""
    value = info.get("LastModified") or info.get("updated") or info.get("mtime") or info.get("last_modified")
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    return float(value) if isinstance(value, (int, float)) else None


class RangeIgnored(errors.RemoteError):
    """A server that answered a Range request with the whole object (``data``): it serves files only whole."""

    def __init__(self, message: str, data: bytes) -> None:
        super().__init__(message)
        self.data = data


class _Truncated(Exception):
    """A response shorter than asked for: retried, as a cut connection is."""


def _status(e: BaseException) -> int | None:
    """The HTTP status of the response an fsspec backend's exception reports, if any (aiohttp's
    ClientResponseError, botocore's ClientError under s3fs's OSError); None for failures below HTTP (a cut
    or unparsable response carries a ``code`` of 400 that no server sent)."""
    for source in (e, e.__cause__, e.__context__):
        if source is None:
            continue
        status = getattr(source, "status", None)
        if isinstance(status, int) and hasattr(source, "request_info"):
            return status
        response = getattr(source, "response", None)
        if isinstance(response, dict):
            code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(code, int):
                return code
    return None


def _s3_put_if_absent(fs: Any, path: str, data: bytes) -> bool:
    """An S3 PutObject that creates the object only if there is none (False if there is one)."""
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)

    async def put() -> bool:
        try:
            await fs._call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exception as e:
            if _status(e) in (409, 412):
                return False
            raise
        return True

    return bool(sync(fs.loop, put))


def _s3_get_if_match(fs: Any, path: str, start: int, end: int, etag: str | None) -> Any:
    """A ranged S3 GetObject that fails (412) unless the object still has ``etag`` (s3fs has no such option)."""
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)

    async def get() -> Any:
        resp = await fs._call_s3(
            "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=f'"{etag}"'
        )
        try:
            return await resp["Body"].read()
        finally:
            resp["Body"].close()

    return sync(fs.loop, get)

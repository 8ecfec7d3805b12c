"""Writing to a URL: every write is made on local disk, then uploaded, a dataset's manifest last.

The local writers and operations know paths only; the functions here put a URL in front of them.  A single
file (``write``, ``convert``) is written to a temporary folder and uploaded as one object (S3 makes an object
visible whole or not at all).  A dataset folder (``write_shards``, ``append``, ``remove``, ``compact``) is
*staged*: a local folder standing in for it, holding the latest version's manifest and the files the operation
reads (whole copies from the cache, hard-linked), on which the local operation runs and commits.
Then each version it committed is uploaded: its new files first, its manifest last, created only if absent
(S3's ``If-None-Match: *``; elsewhere looked for first), then ``LATEST``.  A killed upload leaves files that no
manifest names: the dataset stays at the version before, whole.  Another writer's version committed meanwhile
is a :class:`~embfile.CommitConflictError`, with nothing of this one visible.

The folder holds what the operation reads, downloaded into the cache (once: the cache keeps it): the key
index (an append checks its keys against it), and the shards an operation rewrites (a removal's, a
compaction's) when it reads them; never the whole dataset for an append.  A job's commit (:mod:`embfile.jobs`,
for Spark and Dask) stands in the same way (:func:`staged_commit`), with the keys sections of the shards its
tasks uploaded.  HTTP(S) URLs are read-only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from embfile import _format as F
from embfile import dataset_writer, errors, formats, operations, writer
from embfile import folder as layout
from embfile._staging import Staging
from embfile.remote.cache import Cache
from embfile.remote.dataset import RemoteDataset, RemoteFile, read_manifest, remote_tags, tagged_version, version_name
from embfile.remote.store import SMALL_READS, Remote, is_url

UPLOADS_IN_FLIGHT = 4


def writable(url: str, storage_options: dict[str, Any] | None) -> Remote:
    """The object store at ``url``, to write to (an HTTP(S) URL is a RemoteError: read-only)."""
    remote = Remote(url, storage_options)
    if remote.protocol in ("http", "https"):
        raise errors.RemoteError(f"{url}: http(s) URLs are read-only; write to the store behind it (s3://, gs://)")
    return remote


@contextlib.contextmanager
def staged_file(url: str, storage_options: dict[str, Any] | None) -> Iterator[str]:
    """A local path to write the file at ``url`` to; uploaded once the block ends without an exception."""
    remote = writable(url, storage_options)
    tmp = tempfile.mkdtemp(prefix="embfile-upload-")
    try:
        local = os.path.join(tmp, url.rstrip("/").rsplit("/", 1)[-1])
        yield local
        remote.upload(local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(url: str, cache_dir: Any, storage_options: dict[str, Any] | None) -> Iterator[str]:
    """A stand-in for the dataset folder at ``url`` to run an operation on (:func:`_stand_in`); the versions
    it commits are then uploaded (see the module)."""
    remote = writable(url.rstrip("/"), storage_options)
    with _stand_in(remote, Cache(cache_dir), read_index=True) as (staging, base):
        try:
            yield staging
        except errors.EmbFileError as e:  # it says where it looked: the user asked for the URL
            e.args = tuple(a.replace(staging, remote.url) if isinstance(a, str) else a for a in e.args)
            if isinstance(getattr(e, "message", None), str):
                e.message = e.message.replace(staging, remote.url)  # type: ignore[attr-defined]
            raise
        _publish(remote, staging, base.version if base else 0)


@contextlib.contextmanager
def _stand_in(remote: Remote, cache: Cache, read_index: bool) -> Iterator[tuple[str, layout.Manifest | None]]:
    """A local folder standing in for the dataset at ``remote``, and its latest manifest (None: no dataset
    yet, and the folder is empty): that manifest, its key index segments (``read_index``: whole copies,
    checked, hard-linked from the cache), and any other file of it an operation reads, downloaded when it is
    read (:meth:`~embfile.folder.Transaction.committed`).  An append costs the key index, not the dataset."""
    with cache.staging_folder() as staging:
        base = read_manifest(remote)
        if base is None and _is_object(remote):
            raise errors.ShardError(f"{remote.url} is a single .emb file, not a dataset folder")
        committed = {e.path: e for e in [*base.shards, *base.segments]} if base else {}

        def fetch(name: str) -> None:  # a file of the dataset, whole
            e = committed[name]
            f = RemoteFile(remote.child(name), cache, (e.count, e.keys_crc))
            try:
                whole = f.download()
                _link(whole.path, os.path.join(staging, name))
                if whole is not f.mapped:
                    whole.close()
            finally:
                f.close()

        if base is not None:
            layout.make_layout(staging)
            with open(layout.version_path(staging, base.version), "wb") as out:
                out.write(base.to_json())
            layout.write_latest(staging, base.version)
            if read_index:
                with ThreadPoolExecutor(UPLOADS_IN_FLIGHT) as pool:
                    list(pool.map(fetch, [e.path for e in base.segments]))
        with layout.stand_in(staging, fetch):
            try:
                yield staging, base
            except Exception as e:  # its message names the dataset by its URL, not by the staging folder
                e.args = tuple(a.replace(staging, remote.url) if isinstance(a, str) else a for a in e.args)
                raise


def _publish(remote: Remote, staging: str, base: int, uploaded: frozenset[str] = frozenset()) -> None:
    """Upload the versions committed in ``staging`` after ``base``: files (but those ``uploaded`` already),
    then manifest, then LATEST."""
    known = (layout.read_manifest(staging, base).files() if base else set()) | uploaded
    for version in [v for v in layout.versions(staging) if v > base]:
        manifest = layout.read_manifest(staging, version)
        new = sorted(manifest.files() - known)
        with ThreadPoolExecutor(UPLOADS_IN_FLIGHT) as pool:
            list(pool.map(lambda p: remote.child(p).upload(os.path.join(staging, p)), new))
        if not remote.child(version_name(version)).upload(layout.version_path(staging, version), if_absent=True):
            with ThreadPoolExecutor(UPLOADS_IN_FLIGHT) as pool:  # named by no version: this operation's own
                list(pool.map(lambda p: remote.child(p).remove(), new))
            raise errors.CommitConflictError(
                f"{remote.url}: another writer committed version {version} first; this operation left the "
                "dataset as that writer made it: run it again"
            )
        known |= set(new)
        remote.child(layout.LATEST).upload_bytes(f"{version}\n".encode())


@contextlib.contextmanager
def staged_commit(
    url: str,
    uploaded: Sequence[layout.FileEntry],
    read_index: bool,
    cache_dir: Any,
    storage_options: dict[str, Any] | None,
) -> Iterator[layout.Transaction]:
    """A transaction on a stand-in for the dataset at ``url`` (:func:`_stand_in`, with its key index if
    ``read_index``), published when the block ends without an exception.  The files ``uploaded`` there
    already are partial copies holding their keys sections only: all a commit reads of new shards."""
    remote = writable(url.rstrip("/"), storage_options)
    cache = Cache(cache_dir)
    opened: list[RemoteFile] = []

    def keys_of(e: layout.FileEntry) -> None:
        f = RemoteFile(remote.child(e.path), cache, (e.count, e.keys_crc))
        opened.append(f)
        if f.partial is not None:
            h = f.mapped.header
            f.fetch([(h.keys_offset, h.keys_offset + h.keys_size)])
        _link(f.partial.path if f.partial is not None else f.mapped.path, os.path.join(staging, e.path))

    try:
        with _stand_in(remote, cache, read_index) as (staging, base):
            if base is None:  # a new dataset: the job's commit makes its first version
                layout.make_layout(staging)
            with ThreadPoolExecutor(UPLOADS_IN_FLIGHT) as pool:
                list(pool.map(keys_of, uploaded))
            with layout.Transaction(staging) as tx:
                yield tx
            _publish(remote, staging, base.version if base else 0, frozenset(e.path for e in uploaded))
    finally:
        for f in opened:
            f.close()


class DatasetWriterAtUrl(dataset_writer.DatasetWriter):
    """A :class:`~embfile.DatasetWriter` of the dataset folder at a URL (what ``DatasetWriter(url)`` makes).

    It writes on a stand-in (:func:`_stand_in`, the key index downloaded: ``done_keys`` and the checks for keys
    already there are local), and publishes each version as it commits it (:func:`_publish`: the shard, then
    the manifest if no writer made that version first, then ``LATEST``), on a thread of its own while the next
    shard fills, so the job waits for an upload only when the next shard is full before it.  A published
    shard's local file is removed, as are segments merged away: the local disk holds the key index, the shard
    in progress and the one being published.  A failed publish is raised by the next ``add``, commit or
    :meth:`close` (which publishes the last version before it returns); another writer's version published
    meanwhile is a :class:`~embfile.CommitConflictError` (nothing of the shard visible), and the writer is
    closed: ``resume=True`` then continues from what the URL holds.
    """

    def __init__(
        self,
        folder: str,
        dim: int,
        dtype: object = None,
        metadata: dict[str, Any] | None = None,
        *,
        cache_dir: Any = None,
        storage_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        self.url = folder.rstrip("/")
        self._remote = writable(self.url, storage_options)
        self._stand = contextlib.ExitStack()
        self._publishing: Future[None] | None = None  # the version being published, on the thread below
        self._publisher = ThreadPoolExecutor(1, thread_name_prefix="embfile-publish")
        self._in_background = True  # cleared by close: the last version is published before it returns
        try:
            staging, base = self._stand.enter_context(_stand_in(self._remote, Cache(cache_dir), read_index=True))
            self._stand.callback(self._publisher.shutdown)  # before the stand-in goes
            self._published = base.version if base else 0
            super().__init__(staging, dim, dtype, metadata, **options)
            self.folder = self.url  # what messages name
            self._publishing = self._publisher.submit(self._publish)  # a new dataset's empty version 1
            self._published_before()
        except BaseException:
            if not self._stand.__exit__(*sys.exc_info()):
                raise

    def add(self, key: str, vector: Any) -> None:
        self._raise_failed_publish()
        super().add(key, vector)

    def add_batch(self, keys: Sequence[str] | np.ndarray, matrix: Any, lengths: Any = None) -> None:
        self._raise_failed_publish()
        super().add_batch(keys, matrix, lengths)

    def _raise_failed_publish(self) -> None:
        if self._publishing is not None and self._publishing.done():
            self._published_before()

    def _finish_shard(self) -> None:
        self._published_before()  # a failed publish raised here leaves the shard in progress as it was
        super()._finish_shard()

    def _commit(self) -> layout.Manifest:
        self._published_before()  # the stand-in changes no more while a version of it is uploaded
        manifest = super()._commit()
        self._publishing = self._publisher.submit(self._publish)
        if not self._in_background:
            self._published_before()
        return manifest

    def _published_before(self) -> None:
        """Wait for the version being published; raise what stopped it (a conflict closes the writer)."""
        publishing, self._publishing = self._publishing, None
        try:
            if publishing is not None:
                publishing.result()
        except errors.CommitConflictError:
            self.abort()
            raise

    def _publish(self) -> None:
        """Publish the versions committed since the last one published, then remove here their shards and the
        key-index segments merged away (the writer reads neither again)."""
        staging, published = self._tx.folder, self._published
        latest = layout.latest_version(staging)
        if latest <= published:
            return
        _publish(self._remote, staging, published)
        self._published = latest
        before = layout.read_manifest(staging, published).files() if published else set()
        latest_manifest = layout.read_manifest(staging, latest)
        keep = {e.path for e in latest_manifest.segments}
        done = [e.path for e in latest_manifest.shards if e.path not in before] + [  # this publish's shards
            f"{layout.INDEX}/{name}" for name in os.listdir(os.path.join(staging, layout.INDEX))
        ]
        for path in set(done) - keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(staging, path))

    def abort(self) -> None:
        """Discard the shard in progress; the versions published stay (one being published ends first)."""
        publishing, self._publishing = self._publishing, None
        try:
            if publishing is not None:
                concurrent.futures.wait([publishing])
            super().abort()
        finally:
            self._stand.close()

    def close(self) -> None:
        """Commit and publish the shard in progress (if it holds records), and let go of the stand-in."""
        self._in_background = False
        super().close()  # finishing the shard waits for the version being published (on an error, abort() lets go)
        self._stand.close()


dataset_writer.DatasetWriter._at_url = DatasetWriterAtUrl


def _is_object(remote: Remote) -> bool:
    """Whether ``remote`` is one object (not a folder, nor nothing)."""
    try:
        remote.identity()
    except (FileNotFoundError, IsADirectoryError):
        return False
    return True


def _link(source: str, target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@contextlib.contextmanager
def _data(data: Any, storage_options: dict[str, Any] | None) -> Iterator[Any]:
    """A URL given as data is the dataset there (open for the block)."""
    if not is_url(data):
        yield data
        return
    with RemoteDataset(data, storage_options=storage_options) as db:
        yield db


def write(
    path: Any,
    data: Any,
    dtype: object = None,
    metadata: dict[str, Any] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    **options: Any,
) -> None:
    with _data(data, storage_options) as data:
        if not is_url(path):
            return writer.write(path, data, dtype, metadata, **options)
        with staged_file(path, storage_options) as local:
            writer.write(local, data, dtype, metadata, **options)
    return None


def convert(src: Any, dst: Any, *, storage_options: dict[str, Any] | None = None, **options: Any) -> str:
    if is_url(src):
        with _readable(src, storage_options, options.get("src_format"), dst) as readable:
            return convert(readable, dst, storage_options=storage_options, **options)
    if not is_url(dst):
        return formats.convert(src, dst, **options)
    if options.get("on_error") == "skip" and options.get("report") is None:
        raise ValueError(f"{dst}: on_error='skip' to a URL needs report= (--report), a local file of what is skipped")
    with staged_file(dst, storage_options) as local:
        formats.convert(src, local, **options)
    return str(dst)


@contextlib.contextmanager
def _readable(url: str, storage_options: dict[str, Any] | None, src_format: str | None, dst: Any) -> Iterator[Any]:
    """What convert reads of the input at ``url``: an embfile file or dataset there, open (its records read by
    range requests, checked); any other file or folder, downloaded whole beside ``dst`` (or in the temporary
    folder, for a ``dst`` at a URL) and removed afterwards."""
    remote = Remote(url.rstrip("/"), storage_options)
    fs, path = remote.fs, remote.path
    if src_format in (None, "emb") and remote._retrying("reading", lambda: _holds_emb(fs, path)):
        with RemoteDataset(url, storage_options=storage_options) as db:
            yield db
        return
    # beside dst, hidden and locked as a conversion's own files are: what a killed one leaves, the next removes
    staging = None if is_url(dst) else Staging(dst, folder=True)
    tmp = tempfile.mkdtemp(prefix="embfile-download-") if staging is None else staging.path
    try:
        local = os.path.join(tmp, path.rstrip("/").rsplit("/", 1)[-1])  # its name: the format may be in it
        remote._retrying("downloading", lambda: fs.get(path, local, recursive=fs.isdir(path)))
        yield local
    finally:
        if staging is None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            staging.discard()


def _holds_emb(fs: Any, path: str) -> bool:
    """Whether ``path`` is an .emb file, or a folder of them (a dataset, versioned or in 0.1's layout)."""
    if fs.isdir(path):
        return bool(fs.exists(f"{path}/_embfile") or any(p.endswith(".emb") for p in fs.ls(path, detail=False)))
    return bytes(fs.cat_file(path, start=0, end=len(F.MAGIC))) == F.MAGIC


def merge(
    sources: Any,
    dst: Any,
    *,
    shard_bytes: int = 1 << 30,
    cache_dir: Any = None,
    storage_options: dict[str, Any] | None = None,
    **options: Any,
) -> None:
    with _new(dst, cache_dir, storage_options) as local:
        operations.merge(sources, local, shard_bytes=shard_bytes, storage_options=storage_options, **options)


def subset(
    src: Any,
    dst: Any,
    keys: Any,
    *,
    missing: str = "error",
    shard_bytes: int = 1 << 30,
    cache_dir: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> None:
    with _new(dst, cache_dir, storage_options) as local:
        operations.subset(src, local, keys, missing=missing, shard_bytes=shard_bytes, storage_options=storage_options)


def write_shards(
    folder: Any,
    data: Any,
    shard_bytes: int = 1 << 30,
    dtype: object = None,
    metadata: dict[str, Any] | None = None,
    *,
    mode: str = "error",
    on_duplicate: str = "error",
    cache_dir: Any = None,
    storage_options: dict[str, Any] | None = None,
    **options: Any,
) -> None:
    with _data(data, storage_options) as data, _folder(folder, cache_dir, storage_options) as local:
        dataset_writer.write_shards(
            local, data, shard_bytes, dtype, metadata, mode=mode, on_duplicate=on_duplicate, **options
        )


def append(
    folder: Any,
    data: Any,
    on_duplicate: str = "error",
    *,
    shard_bytes: int = 1 << 30,
    cache_dir: Any = None,
    storage_options: dict[str, Any] | None = None,
    **options: Any,
) -> int:
    with _data(data, storage_options) as data, _folder(folder, cache_dir, storage_options) as local:
        return operations.append(local, data, on_duplicate, shard_bytes=shard_bytes, **options)


def remove(
    folder: Any,
    keys: Any,
    missing: str = "error",
    *,
    cache_dir: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> int:
    with _folder(folder, cache_dir, storage_options) as local:
        return operations.remove(local, keys, missing)


def compact(
    folder: Any, shard_bytes: int = 1 << 30, *, cache_dir: Any = None, storage_options: dict[str, Any] | None = None
) -> int:
    with _folder(folder, cache_dir, storage_options) as local:
        return operations.compact(local, shard_bytes)


def vacuum(
    folder: Any, keep: int = 1, grace: float = 86400.0, *, storage_options: dict[str, Any] | None = None
) -> list[int]:
    if not is_url(folder):
        _local_only(storage_options)
        return layout.vacuum(folder, keep, grace)
    remote = writable(str(folder).rstrip("/"), storage_options)
    present = _history(remote)
    numbers = [m.version for m in present]
    now = time.time()
    gone = layout.superseded(present, keep, grace, now, set(remote_tags(remote).values()))
    for version in gone:  # oldest first: what remains is always whole versions
        remote.child(version_name(version)).remove()
    # Listed before the versions are read again: a file committed meanwhile is named by a version read after.
    files = {f"{sub}/{n}": t for sub in (layout.SHARDS, layout.INDEX) for n, t in remote.child(sub).listing().items()}
    kept = [read_manifest(remote, v) for v in numbers if v not in gone]
    named = set().union(*(m.files() for m in kept if m))
    for path, written in files.items():
        if path not in named and written is not None and now - written >= grace:  # young: a writer's, in flight
            remote.child(path).remove()
    return gone


def history(folder: Any, *, storage_options: dict[str, Any] | None = None) -> list[layout.Manifest]:
    """Every version still in the dataset folder ``folder`` (a path or a URL), oldest first: what made it, when,
    and the files it is made of."""
    if not is_url(folder):
        _local_only(storage_options)
        return list(layout.history(folder))
    return _history(Remote(str(folder).rstrip("/"), storage_options))


def _history(remote: Remote) -> list[layout.Manifest]:
    """The versions the server lists or, where it lists none (a plain http(s) server), every number up to the
    latest version asked for (versions are numbered from 1 on; a vacuum leaves gaps), read concurrently."""
    numbers: Sequence[int] = sorted(
        int(n.split(".")[0]) for n in remote.child(layout.VERSIONS).names() if n.endswith(".json")
    )
    if not numbers:
        latest = read_manifest(remote)
        numbers = range(1, latest.version + 1) if latest is not None else []

    def present(version: int) -> layout.Manifest | None:
        try:
            return read_manifest(remote, version)
        except errors.VersionNotFoundError:  # removed by a vacuum (since it was listed)
            return None

    with ThreadPoolExecutor(SMALL_READS) as pool:
        found = [m for m in pool.map(present, numbers) if m is not None]
    if not found:
        raise errors.ShardError(f"{remote.url}: not a versioned dataset: no version in it")
    return found


def tag(
    folder: Any,
    name: str,
    version: int | str | None = None,
    *,
    replace: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """Name ``version`` (default: the latest; a tag's name: the version it names) of the dataset folder
    ``folder`` (a path or a URL) ``name``, for good: open it as ``embfile.open(folder, version=name)``, and no
    vacuum removes it while the tag is there.  Returns the version's number.  A tag naming another version is
    a ValueError unless ``replace``.  Names are up to 128 letters, digits, ``.``, ``_`` and ``-``, not all
    digits."""
    if not is_url(folder):
        _local_only(storage_options)
        return layout.tag(folder, name, version, replace)
    remote = writable(str(folder).rstrip("/"), storage_options)
    where = remote.child(f"{layout.TAGS}/{layout.tag_name(name)}.json")
    manifest = read_manifest(remote, version)
    if manifest is None:
        raise errors.ShardError(f"{remote.url}: not a versioned dataset: no version in it")
    if not where.upload_bytes(layout.tag_json(manifest.version), if_absent=not replace):
        held = tagged_version(remote, name)
        if held != manifest.version:
            raise ValueError(f"{remote.url}: tag {name!r} names version {held}; replace=True moves it")
    _write_tag_list(remote)
    return manifest.version


def untag(folder: Any, name: str, *, storage_options: dict[str, Any] | None = None) -> None:
    """Remove the tag ``name`` of the dataset folder ``folder`` (a path or a URL); its version stays until a
    vacuum removes it."""
    if not is_url(folder):
        _local_only(storage_options)
        return layout.untag(folder, name)
    remote = writable(str(folder).rstrip("/"), storage_options)
    tagged_version(remote, name)  # there is such a tag
    remote.child(f"{layout.TAGS}/{name}.json").remove()
    _write_tag_list(remote)
    return None


def _write_tag_list(remote: Remote) -> None:
    """Upload the ``tags.json`` hint from the tags the store lists (as :func:`embfile.folder.write_tag_list`)."""
    layout.settle_tag_list(lambda: remote_tags(remote), remote.child(layout.TAG_LIST).upload_bytes)


def tags(folder: Any, *, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """The tags of the dataset folder ``folder`` (a path or a URL) and the versions they name, by name."""
    if not is_url(folder):
        _local_only(storage_options)
        return layout.tags(folder)
    return remote_tags(Remote(str(folder).rstrip("/"), storage_options))


def _local_only(storage_options: dict[str, Any] | None) -> None:
    if storage_options is not None:
        raise ValueError("storage_options= applies to a URL, not to a local folder")


def _folder(
    folder: Any, cache_dir: Any, storage_options: dict[str, Any] | None
) -> contextlib.AbstractContextManager[Any]:
    """The folder itself if local, else a staged copy of the dataset at the URL."""
    if is_url(folder):
        return staged_folder(folder, cache_dir, storage_options)
    if (cache_dir, storage_options) != (None, None):
        raise ValueError("cache_dir= and storage_options= apply to a URL, not to a local folder")
    return contextlib.nullcontext(folder)


def _new(dst: Any, cache_dir: Any, storage_options: dict[str, Any] | None) -> contextlib.AbstractContextManager[Any]:
    """Where to write a new .emb file (``dst`` ending in ``.emb``) or dataset folder: ``dst`` itself if local,
    else a staged one, uploaded."""
    if not is_url(dst):
        return contextlib.nullcontext(dst)
    if str(dst).endswith(".emb"):
        return staged_file(str(dst), storage_options)
    return staged_folder(str(dst), cache_dir, storage_options)


def _documented(local: Any, wrapper: Any, where: str) -> None:
    """Give ``wrapper`` the local function's documentation, and say what a URL does."""
    wrapper.__doc__ = (local.__doc__ or "").rstrip() + (
        f"\n\n    A URL (``s3://``, ``gs://``, ``hdfs://``) as {where} is written locally first, then uploaded"
        " (see :doc:`/guide/remote`); ``storage_options`` go to fsspec"
        + (", ``cache_dir`` names the cache holding the dataset's files." if where == "the folder" else ".")
        + "\n"
    )


for _local, _wrapper, _where in (
    (writer.write, write, "the path"),
    (formats.convert, convert, "``dst``"),
    (dataset_writer.write_shards, write_shards, "the folder"),
    (operations.merge, merge, "``dst``"),
    (operations.subset, subset, "``dst``"),
    (operations.append, append, "the folder"),
    (operations.remove, remove, "the folder"),
    (operations.compact, compact, "the folder"),
):
    _documented(_local, _wrapper, _where)
vacuum.__doc__ = (layout.vacuum.__doc__ or "").rstrip() + (
    "\n\n    At a URL (``s3://``, ``gs://``, ``hdfs://``; ``storage_options`` go to fsspec) the versions and files go"
    "\n    from the store.  No lock there tells of a writer in flight: ``grace`` alone keeps its files (an object"
    "\n    no version names, a killed upload's among them, is removed once it is older than ``grace``).\n"
)

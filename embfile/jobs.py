"""Writes by many tasks, committed once: what the Spark and Dask writers share, and any other engine can use.

A :class:`Job` is started on the driver; each task writes its partition's records with :func:`write_part`
into the dataset's ``shards/`` under names that start with the job's token and the task's own attempt id,
and returns a :class:`PartResult` naming its files; the driver passes the results of the tasks that succeeded
to :func:`commit_job`, which builds the key index of their shards and commits one version, or to
:func:`abort_job`.  Either way every other file of the job (a failed attempt's, a speculative duplicate's, a
killed task's half-written one) is removed, so each record is in the committed version exactly once, from
exactly one attempt, and a job that fails commits nothing.

The dataset is a folder on a file system every task can write and the driver can read (a shared POSIX
mount), or a URL (``s3://``, ``gs://``, ``hdfs://``): then each task writes its shards on local disk and
uploads each one as it is done; the driver reads only the keys sections of those it commits (range reads),
and of the dataset only what the commit reads (its key index for an append, a shard a replaced record is
removed from), then uploads the new version's other files and its manifest as ``embfile.remote.upload``
does.  Nothing of the job is visible until the manifest is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from embfile import errors
from embfile import folder as layout
from embfile._format import disk_dtype
from embfile._keys import EncodedKeys
from embfile._stream import Chunk, RaggedChunk
from embfile.dataset_writer import MODES, operation_name
from embfile.remote.cache import Cache
from embfile.remote.dataset import read_manifest
from embfile.remote.store import Remote, is_url
from embfile.remote.upload import staged_commit, writable
from embfile.segments import commit_shards, entry
from embfile.writer import Writer

PathLike = str | os.PathLike[str]
COMMIT_ATTEMPTS = 5  # at a URL, when other writers keep publishing the version this commit was to be


@dataclasses.dataclass(frozen=True)
class Job:
    """What every task of one write needs to know (picklable: it travels to the workers)."""

    folder: str
    token: str
    dim: int | None  # None: each task takes its data's (the commit checks they agree)
    dtype: str
    metadata: dict[str, Any]
    shard_bytes: int
    mode: str
    on_duplicate: str
    created: bool  # the job made the folder: an abort removes it
    ragged: bool = False  # records of their own length: chunks are (keys, rows, lengths)
    storage_options: dict[str, Any] | None = None  # a URL's, for fsspec (on every task)
    cache_dir: str | None = None  # a URL's: where the driver's commit keeps what it reads of the dataset


@dataclasses.dataclass(frozen=True)
class PartResult:
    """What one task wrote: its partition's number and its shard files, in order."""

    part: int
    dim: int | None
    shards: tuple[layout.FileEntry, ...]


def start_job(
    folder: PathLike,
    dim: int | None = None,
    dtype: object = "float32",
    metadata: dict[str, Any] | None = None,
    *,
    shard_bytes: int = 1 << 30,
    mode: str = "error",
    on_duplicate: str = "error",
    ragged: bool = False,
    storage_options: dict[str, Any] | None = None,
    cache_dir: PathLike | None = None,
) -> Job:
    """Prepare ``folder`` for a write by many tasks (on the driver, before any task runs).

    ``mode`` is as for :class:`~embfile.ShardWriter`: ``"error"`` (a new dataset), ``"overwrite"`` or
    ``"append"``; ``"overwrite"`` and ``"append"`` also create a dataset that does not exist yet.  ``dim=None``
    takes the data's (an append: the dataset's).  ``ragged``: per-residue records, each task's chunks
    ``(keys, rows, lengths)`` (an append: as the dataset is).  A URL as ``folder`` (see the module) takes
    ``storage_options`` (fsspec's) and ``cache_dir`` (the cache the driver's commit uses).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, not {mode!r}")
    if on_duplicate not in ("error", "replace"):
        raise ValueError(f"on_duplicate must be 'error' or 'replace', not {on_duplicate!r}")
    if is_url(folder):
        path = str(folder).rstrip("/")
        base, exists = _remote_dataset(writable(path, storage_options))
    else:
        if (storage_options, cache_dir) != (None, None):
            raise ValueError("storage_options= and cache_dir= apply to a URL, not to a local folder")
        path = os.fspath(folder).rstrip(os.sep) or os.sep
        exists = os.path.isdir(path) and bool(os.listdir(path))
        base = layout.read_manifest(path) if exists and layout.is_versioned(path) else None
    if exists and (mode == "error" or base is None):
        raise errors.WriterError(
            f"{path} exists and is "
            + ("a dataset: use mode 'append' or 'overwrite'" if base is not None else "not a dataset")
        )
    meta = dict(metadata or {})
    if base is not None and mode == "append":
        if dim not in (None, base.dim):
            raise errors.WriterError(f"{path} holds vectors of dim {base.dim}, not {dim}")
        if base.ragged != ragged:
            what = "ragged records" if base.ragged else "one row per record"
            raise errors.WriterError(f"{path} holds {what}; ragged={ragged} does not fit it")
        dim, dtype, meta = base.dim, base.dtype, base.metadata if metadata is None else meta
    if not exists and not is_url(path):
        layout.make_layout(path)
    return Job(
        folder=path,
        token=f"job{secrets.token_hex(6)}",
        dim=None if dim is None else int(dim),
        dtype=disk_dtype(dtype).name,
        metadata=meta,
        shard_bytes=int(shard_bytes),
        mode=mode,
        on_duplicate=on_duplicate,
        created=not exists,
        ragged=bool(ragged),
        storage_options=storage_options,
        cache_dir=None if cache_dir is None else os.fspath(cache_dir),
    )


def _remote_dataset(remote: Remote) -> tuple[layout.Manifest | None, bool]:
    """The latest manifest of the dataset at ``remote`` (None if there is none), and whether anything is there."""
    if remote.url.endswith(".emb"):
        raise errors.WriterError(f"{remote.url}: a job writes a dataset folder, not one .emb file")
    base = read_manifest(remote)
    return base, base is not None or bool(remote.names())


def write_part(job: Job, part: int, chunks: Iterable[Chunk | RaggedChunk]) -> PartResult:
    """Write one partition's ``(keys, matrix)`` chunks (of a ragged job ``(keys, rows, lengths)``) as shards
    of the job (on a worker), each of about ``shard_bytes`` of rows, a record never split.

    A new attempt id per call: a retried or speculative attempt writes files of its own, and only the files
    of the result the driver commits survive.  On an error the files of this attempt are removed.
    """
    prefix = f"{layout.SHARDS}/{job.token}-{part:06d}-{secrets.token_hex(4)}-"
    remote = _store(job)
    local, staged = job.folder, contextlib.ExitStack()
    if remote:  # a URL's shards are written here first (a killed task's are removed by a later one)
        local = staged.enter_context(Cache().staging_folder())
        os.makedirs(os.path.join(local, layout.SHARDS))
    dim = job.dim
    names: list[str] = []
    entries: list[layout.FileEntry] = []
    writer: Writer | None = None

    def close() -> None:  # the shard being written is done
        assert writer is not None
        writer.close()
        entries.append(entry(local, names[-1]))
        if remote:
            remote.child(names[-1]).upload(os.path.join(local, names[-1]))
            _unlink(os.path.join(local, names[-1]))

    try:
        for keys, matrix, *ragged in chunks:  # ragged: [lengths]
            if not len(keys):
                continue
            dim = dim or matrix.shape[1]
            per_shard = max(1, job.shard_bytes // (dim * disk_dtype(job.dtype).itemsize))  # rows
            ends = np.cumsum(ragged[0]) if ragged else np.arange(1, len(keys) + 1)  # each record's last row + 1
            lo = 0
            while lo < len(keys):
                first = int(ends[lo - 1]) if lo else 0
                room = per_shard - writer.rows if writer is not None else 0
                hi = int(np.searchsorted(ends, first + room, "right"))  # the records that fit
                if hi == lo:  # none: a new shard (of one record alone, if it is longer than a shard)
                    if writer is not None:
                        close()
                    names.append(f"{prefix}{len(names):05d}.emb")
                    path = os.path.join(local, names[-1])
                    writer = Writer(path, dim, job.dtype, job.metadata or None, ragged=job.ragged)
                    hi = max(lo + 1, int(np.searchsorted(ends, first + per_shard, "right")))
                assert writer is not None
                if ragged:
                    writer.add_batch(keys[lo:hi], matrix[first : ends[hi - 1]], ragged[0][lo:hi])
                else:
                    writer.add_batch(keys[lo:hi], matrix[lo:hi])
                lo = hi
        if writer is not None:
            close()
    except BaseException as e:
        if writer is not None:
            writer.abort()
        for name in names:
            _unlink(os.path.join(local, name))
            if remote:
                with contextlib.suppress(Exception):  # else the commit's (or abort's) sweep removes it
                    remote.child(name).remove()
        if isinstance(e, errors.DuplicateKeyError):  # rows of the shard being written: say the partition's
            before = sum(s.count for s in entries)
            a, b = (before + r for r in e.rows)
            raise errors.DuplicateKeyError(
                f"key {e.key!r} is twice in partition {part} (rows {a} and {b})", e.key, (a, b)
            ) from None
        raise
    finally:
        staged.close()
    return PartResult(part, dim, tuple(entries))


def arrow_chunk(keys: Any, vectors: Any, dim: int | None) -> Chunk:
    """Arrow arrays of keys and of list vectors (an engine's batch) as ``(keys, matrix)``.  A null, or a
    vector of another length than ``dim`` (default: the first one's), is a WriterError naming the key."""
    keys = text_keys(keys)
    _refuse_nulls(keys, vectors, "vector")
    return EncodedKeys.of_arrow(keys), _matrix(vectors, dim, lambda i: keys[i].as_py())


def arrow_records(keys: Any, records: Any, dim: int | None) -> RaggedChunk:
    """Arrow arrays of keys and of per-residue records (lists of list vectors: an engine's batch) as ``(keys,
    rows, lengths)``.  A null, a record of no rows, or a vector of another length than ``dim`` (default: the
    first one's), is a WriterError naming the key."""
    keys = text_keys(keys)
    _refuse_nulls(keys, records, "record")
    lengths = np.diff(np.asarray(records.offsets))
    if (lengths == 0).any():
        i = int(np.flatnonzero(lengths == 0)[0])
        raise errors.WriterError(f"key {keys[i].as_py()!r}: record has no rows; a ragged record has at least one")
    owner = np.repeat(np.arange(len(keys)), lengths)  # the record of each row, to name it
    rows = records.flatten()
    if rows.null_count:
        raise errors.WriterError(f"key {keys[int(owner[rows.is_null().index(True).as_py()])].as_py()!r}: a null row")
    return EncodedKeys.of_arrow(keys), _matrix(rows, dim, lambda i: keys[int(owner[i])].as_py()), lengths


def text_keys(keys: Any) -> Any:
    """An Arrow key column as strings: integer ids as their decimal text, as the Parquet reader takes them."""
    import pyarrow as pa  # an engine's batch is Arrow: pyarrow is there

    if pa.types.is_integer(keys.type):
        return keys.cast(pa.string())
    if not (pa.types.is_string(keys.type) or pa.types.is_large_string(keys.type)):
        raise errors.WriterError(f"keys are {keys.type}, not strings or integers")
    return keys


def _refuse_nulls(keys: Any, values: Any, what: str) -> None:
    """A WriterError for a null key (saying which record of the batch) or a null value (naming its key)."""
    if keys.null_count:
        first = keys.is_null().index(True).as_py()
        raise errors.WriterError(f"a null key (record {first} of a batch of {len(keys)})")
    if values.null_count:
        raise errors.WriterError(f"key {keys[values.is_null().index(True).as_py()].as_py()!r}: a null {what}")


def _matrix(vectors: Any, dim: int | None, key_of: Callable[[int], Any]) -> np.ndarray:
    """Arrow list vectors, none null, as an ``(n, dim)`` matrix: a vector of another length than ``dim``
    (default: the first one's) is a WriterError naming its key (``key_of(i)``: vector ``i``'s)."""
    if hasattr(vectors.type, "list_size"):  # fixed_size_list
        lengths = np.full(len(vectors), vectors.type.list_size)
    else:
        lengths = np.diff(np.asarray(vectors.offsets))
    dim = dim or (int(lengths[0]) if len(lengths) else 0)
    if (lengths != dim).any():
        i = int(np.flatnonzero(lengths != dim)[0])
        raise errors.WriterError(f"key {key_of(i)!r}: vector of {lengths[i]} elements, not {dim}")
    values = vectors.flatten()
    if values.null_count:
        raise errors.WriterError(f"key {key_of(values.is_null().index(True).as_py() // dim)!r}: a null element")
    matrix: np.ndarray = values.to_numpy(zero_copy_only=False).reshape(len(vectors), dim)
    return matrix


def commit_job(job: Job, results: Sequence[PartResult | None]) -> layout.Manifest:
    """Commit the shards of ``results`` (one per partition; None for a partition with no result) as one new
    version, then remove every other file of the job.  A key in two partitions is an error, and then nothing
    is committed."""
    chosen: dict[int, PartResult] = {}
    for r in results:
        if r is not None:
            chosen.setdefault(r.part, r)  # one result per partition, whatever the engine sent
    shards = [s for part in sorted(chosen) for s in chosen[part].shards]
    sources = [str(part) for part in sorted(chosen) for _ in chosen[part].shards]  # each shard's partition
    dims = {r.part: r.dim for r in chosen.values() if r.dim is not None}
    try:
        if len(set(dims.values())) > 1:
            (a, da), (b, db) = sorted(dims.items(), key=lambda item: item[1])[:: len(dims) - 1]
            raise errors.WriterError(f"{job.folder}: partition {a} has vectors of dim {da}, partition {b} of dim {db}")
        dim = job.dim or next(iter(dims.values()), None)
        if dim is None:
            raise errors.WriterError(f"{job.folder}: no records to write, and no dim to make an empty dataset of")
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                manifest = _commit(job, shards, dim, sources)
                break
            except errors.CommitConflictError:  # at a URL: another writer published this version first
                if attempt == COMMIT_ATTEMPTS - 1:
                    raise
    except BaseException:
        abort_job(job)
        raise
    _sweep(job, manifest.files())
    return manifest


def _commit(job: Job, shards: list[layout.FileEntry], dim: int, sources: list[str]) -> layout.Manifest:
    """Commit ``shards`` (of the partitions ``sources``) as the next version of the dataset: its latest
    version's successor (an append: plus them; else them alone)."""
    transaction: contextlib.AbstractContextManager[layout.Transaction] = (
        staged_commit(job.folder, shards, job.mode == "append", job.cache_dir, job.storage_options)
        if is_url(job.folder)
        else layout.Transaction(job.folder)  # its commit plans again on a newer version itself
    )
    with transaction as tx:
        if not shards:  # no records at all: one empty shard, as every version has
            name = tx.new_name(layout.SHARDS)
            Writer(tx.path(name), dim, job.dtype, ragged=job.ragged).close()
            shards = [entry(tx.folder, name)]
        return commit_shards(
            tx,
            shards,
            append=job.mode == "append",
            replace=job.on_duplicate == "replace",
            dim=dim,
            dtype=job.dtype,
            metadata=job.metadata,
            operation=operation_name(job.mode),
            ragged=job.ragged,
            sources=sources,
        )


def abort_job(job: Job) -> None:
    """Remove every file of the job (and the folder, if the job made it and nothing was committed)."""
    _sweep(job, set())
    if job.created and not is_url(job.folder) and os.path.isdir(job.folder) and not layout.versions(job.folder):
        shutil.rmtree(job.folder, ignore_errors=True)


def _sweep(job: Job, keep: set[str]) -> None:
    """Remove the job's files not in ``keep``, and what a killed task's writer staged."""
    remote = _store(job)
    if remote is not None:
        shards = remote.child(layout.SHARDS)
        for name in shards.names():
            if name.startswith(job.token) and f"{layout.SHARDS}/{name}" not in keep:
                shards.child(name).remove()
        return
    shards_dir = os.path.join(job.folder, layout.SHARDS)
    if not os.path.isdir(shards_dir):  # swept already (an engine may abort a job whose commit failed)
        return
    for name in os.listdir(shards_dir):
        if name.lstrip(".").startswith(job.token) and f"{layout.SHARDS}/{name}" not in keep:
            path = os.path.join(shards_dir, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else _unlink(path)


def _store(job: Job) -> Remote | None:
    """The job's dataset at its URL; None for a folder."""
    return Remote(job.folder, job.storage_options) if is_url(job.folder) else None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

"""Writers of versioned dataset folders: all at once (:class:`ShardWriter`), or shard by shard
(:class:`DatasetWriter`, for jobs that run for days and may die).

Both write shards of at most ``shard_bytes`` of records straight into the dataset's ``shards/`` under their
operation's token (:class:`~embfile.folder.Transaction`), invisible until a version names them.
"""

from __future__ import annotations

import collections.abc
import errno
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from embfile import _format as F
from embfile import errors
from embfile import folder as layout
from embfile._staging import Staging
from embfile._stream import array_of, source_of, unpadded
from embfile.remote.store import is_url
from embfile.segments import KeyIndex, commit_shards, entry
from embfile.writer import Writer, write_source

PathLike = str | os.PathLike[str]
MODES = ("error", "overwrite", "append")


def operation_name(mode: str) -> str:
    """What a manifest calls a write in ``mode``."""
    return "write" if mode == "error" else mode


class ShardWriter:
    """Write a versioned sharded dataset: like :class:`~embfile.Writer` (``dtype`` defaults to float32), but
    starts a new shard every ``shard_bytes`` of records (default 1 GiB), and commits everything written as one
    version at close.

    ``mode`` says what ``folder`` may be:

    - ``"error"`` (the default): nothing, or an empty folder.  The dataset (shards, key index, version 1) is
      built beside it and renamed into place on a clean close: it appears complete or not at all.
    - ``"overwrite"``: also a dataset, whose next version is the records written (earlier versions stay).
    - ``"append"``: a dataset, whose next version is its records and then those written (of its dim; its
      dtype, which ``dtype=None`` takes, and its metadata are kept).  A key it holds already is a
      :class:`DuplicateKeyError` at close, or with ``on_duplicate="replace"`` replaces the old record.

    A key written twice is found at close (a :class:`ShardError` naming both shards).  On any error nothing
    is committed, and what was written is removed.
    """

    def __init__(
        self,
        folder: PathLike,
        dim: int,
        dtype: object = None,
        metadata: dict[str, Any] | None = None,
        *,
        shard_bytes: int = 1 << 30,
        mode: str = "error",
        on_duplicate: str = "error",
        **options: Any,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, not {mode!r}")
        if on_duplicate not in ("error", "replace"):
            raise ValueError(f"on_duplicate must be 'error' or 'replace', not {on_duplicate!r}")
        self.folder = os.fspath(folder).rstrip(os.sep) or os.sep
        self._mode, self._replace = mode, on_duplicate == "replace"
        exists = os.path.exists(self.folder) and (not os.path.isdir(self.folder) or bool(os.listdir(self.folder)))
        into = exists and mode != "error" and layout.is_versioned(self.folder)
        if exists and not into:
            what = (
                "a dataset: mode='append' (embfile append) adds to it, "
                "mode='overwrite' (--overwrite) writes its next version"
                if layout.is_versioned(self.folder)
                else "not an empty folder or a versioned dataset"
            )
            raise errors.WriterError(f"{self.folder} exists and is {what}")
        if mode == "append" and not into:
            raise layout.nothing_to_append_to(self.folder)
        self.ragged = bool(options.get("ragged", False))
        self._staging: Staging | None = None
        self._writer: Writer | None = None
        self._finished: list[str] = []  # shards written and not yet committed
        self.version: int | None = None  # the version last committed
        root = self.folder
        if not into:  # a new dataset: built whole beside the destination
            self._staging = Staging(self.folder, folder=True)
            root = self._staging.path
            layout.make_layout(root)
        try:
            self._tx = layout.Transaction(root)
            if mode == "append":
                dim, dtype, metadata = self._fit(layout.read_manifest(root), dim, dtype, metadata)
            dtype = "float32" if dtype is None else dtype
            record_bytes = int(dim) * F.disk_dtype(dtype).itemsize
            if shard_bytes < record_bytes:
                raise ValueError(f"shard_bytes {shard_bytes} is less than one record ({record_bytes} bytes)")
            self._per_shard = int(shard_bytes) // record_bytes  # rows: of a ragged dataset, a record has several
            self._args = (dim, dtype, metadata)
            self._metadata = dict(metadata or {})
            self._options = options
            self._writer = self._next_writer()
        except BaseException:
            self.abort()
            raise
        self.dim, self.dtype = self._writer.dim, self._writer.dtype

    def _fit(self, base: layout.Manifest, dim: int, dtype: object, metadata: Any) -> tuple[int, Any, Any]:
        """The dim, dtype and metadata of records appended to ``base``: its own."""
        if self.ragged != base.ragged:
            what = "ragged records" if base.ragged else "one row per record"
            raise errors.WriterError(f"{self.folder} holds {what}; ragged={self.ragged} does not fit it")
        if dim != base.dim:
            raise errors.WriterError(f"{self.folder} holds vectors of dim {base.dim}, not {dim}")
        if dtype is not None and F.disk_dtype(dtype) != F.disk_dtype(base.dtype):
            raise errors.WriterError(f"{self.folder} holds {base.dtype} vectors, not {F.disk_dtype(dtype).name}")
        return base.dim, base.dtype, base.metadata if metadata is None else metadata

    def _next_writer(self) -> Writer:
        name = self._tx.new_name(layout.SHARDS)
        return Writer(self._tx.path(name), *self._args, **self._options)

    def _current(self) -> Writer:
        if self._writer is None:
            raise errors.ClosedFileError(f"{self.folder}: operation on a closed {type(self).__name__}")
        return self._writer

    def _room(self) -> int:
        """Rows the current shard still takes, after finishing it and starting a new one if it is full."""
        if self._current().rows >= self._per_shard:
            self._finish_shard()
            self._writer = self._next_writer()
        return int(self._per_shard - self._current().rows)

    def _finish_shard(self) -> None:
        writer = self._current()
        writer.close()
        self._writer = None
        self._finished.append(os.path.relpath(writer.path, self._tx.folder))

    def add(self, key: str, vector: Any) -> None:
        """Append one record (see :meth:`Writer.add`)."""
        self._room()
        self._current().add(key, vector)
        self._added([key])

    def add_batch(self, keys: Sequence[str] | np.ndarray, matrix: Any, lengths: Any = None) -> None:
        """Append one record per row of ``matrix``, or of a ragged dataset ``lengths[i]`` rows per key (of
        ``matrix`` or of a padded ``matrix[i]``: see :meth:`Writer.add_batch`)."""
        keys = keys.tolist() if isinstance(keys, np.ndarray) else list(keys)
        m = array_of(matrix)
        if self.ragged and m.ndim == 3 and lengths is not None:
            m, lengths = unpadded(m, lengths, keys)
        if lengths is None:  # one row per key (a ragged writer says what is missing)
            ends = np.arange(1, len(keys) + 1)
        else:
            ends = np.cumsum(np.asarray(lengths)) if len(keys) else np.zeros(0, np.int64)
        rows = int(ends[-1]) if len(ends) else 0
        mismatched = (
            len(ends) != len(keys) or (lengths is not None and not self.ragged) or m.ndim != 2 or len(m) != rows
        )
        if mismatched or (len(keys) and rows > self._room()):  # slices would drop rows; a batch cut over shards
            self._current()._check_batch(keys, m, lengths)  # is checked whole first, so added all or none
        lo = 0
        while lo < len(keys):
            first = int(ends[lo - 1]) if lo else 0
            hi = max(lo + 1, int(np.searchsorted(ends, first + self._room(), "right")))  # a long record alone
            last = int(ends[hi - 1])
            if lengths is None:
                self._current().add_batch(keys[lo:hi], m[lo:hi])
            else:
                self._current().add_batch(keys[lo:hi], m[first:last], lengths[lo:hi])
            self._added(keys[lo:hi])
            lo = hi

    def _added(self, keys: list[str]) -> None:
        """``keys`` are in the shard in progress."""

    def close(self) -> None:
        """Finish the last shard and commit the records written as one version."""
        if self._writer is None:
            return
        try:
            self._finish_shard()
            self._commit()
        except BaseException:
            self.abort()
            raise
        self._tx.close()
        if self._staging is not None:
            self._staging.commit()  # replaces an empty folder (checked at the start)

    def _commit(self) -> layout.Manifest:
        """Commit the finished shards as a version: after the latest one (append), or alone."""
        names, self._finished = self._finished, []
        manifest = commit_shards(
            self._tx,
            [entry(self._tx.folder, name) for name in names],
            append=self._mode == "append",
            replace=self._replace,
            dim=self.dim,
            dtype=self.dtype.name,
            metadata=self._metadata,
            operation=self._operation(),
            ragged=self.ragged,
        )
        self.version = manifest.version
        return manifest

    def _operation(self) -> str:
        return operation_name(self._mode)

    def abort(self) -> None:
        """Discard what was written and not committed; ``folder`` is left as it was."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        if hasattr(self, "_tx"):
            self._tx.close()
        if self._staging is not None:
            self._staging.discard()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class DatasetWriter(ShardWriter):
    """Write a dataset over a long job: every shard is committed as a new version as soon as it is full, so a
    crash loses at most the shard in progress.

    ``folder`` is created (an empty version 1, of ``dtype``, float32 by default) if it does not exist.  If it
    is a dataset already, ``resume=True`` continues it (of its dim and dtype) and :meth:`done_keys` says which
    keys it holds, so the job can skip them; without ``resume`` that is an error.  A key the dataset holds, or
    one written twice, is a :class:`DuplicateKeyError` when it is added (nothing is added then).  Leaving a
    ``with`` block by an exception commits every record added before it, then lets the exception go on.

    ``folder`` may be a URL (``s3://``, ``gs://``; ``cache_dir=`` and ``storage_options=`` then apply): each
    version is published there as it is committed (on a thread, while the next shard fills), its shard first,
    its manifest last, so a job on a machine that can vanish (a spot instance) loses at most the shard in
    progress and the one being published, and resumes on another machine from what the URL holds (see
    :doc:`/guide/remote`).

    Examples
    --------
    >>> with embfile.DatasetWriter("esm2/", dim=1280, resume=True) as w:   # doctest: +SKIP
    ...     done = w.done_keys()
    ...     for seqid, seq in fasta:
    ...         if seqid not in done:
    ...             w.add(seqid, embed(seq))
    """

    _at_url: type[DatasetWriter] | None = None  # what writes one at a URL (embfile.remote.upload sets it)

    def __new__(cls, folder: PathLike, *args: Any, **kwargs: Any) -> DatasetWriter:
        if cls is DatasetWriter and is_url(folder) and cls._at_url is not None:
            return super().__new__(cls._at_url)
        return super().__new__(cls)

    def __init__(
        self,
        folder: PathLike,
        dim: int,
        dtype: object = None,
        metadata: dict[str, Any] | None = None,
        *,
        shard_bytes: int = 1 << 30,
        resume: bool = False,
        **options: Any,
    ) -> None:
        if not layout.is_versioned(folder):
            try:
                with ShardWriter(folder, dim, dtype, metadata, **options):
                    pass  # an empty version 1
            except (errors.WriterError, OSError) as e:  # another writer created it first: continue that one
                if not (layout.is_versioned(folder) and (isinstance(e, errors.WriterError) or _exists(e))):
                    raise
        elif not resume:
            raise errors.WriterError(f"{os.fspath(folder)} is a dataset already: resume=True continues it")
        self._pending: dict[str, None] = {}  # keys of the shard in progress, in order
        self._index: KeyIndex | None = None
        super().__init__(folder, dim, dtype, None, shard_bytes=shard_bytes, mode="append", **options)
        manifest = layout.read_manifest(self._tx.folder)
        self._index = KeyIndex(self._tx.folder, manifest.segments, manifest.version)

    def add(self, key: str, vector: Any) -> None:
        """Append one record (see :meth:`Writer.add`); a key already there is a :class:`DuplicateKeyError`."""
        self._refuse_present([key])
        super().add(key, vector)

    def add_batch(self, keys: Sequence[str] | np.ndarray, matrix: Any, lengths: Any = None) -> None:
        """Append one record per row of ``matrix`` (ragged: per ``lengths``); a key already there is a
        :class:`DuplicateKeyError`."""
        keys = keys.tolist() if isinstance(keys, np.ndarray) else list(keys)
        self._refuse_present(keys)
        super().add_batch(keys, matrix, lengths)

    def _refuse_present(self, keys: list[str]) -> None:
        index = self._current_index()
        stored = index.find_rows(keys) >= 0
        if not stored.any() and self._pending.keys().isdisjoint(keys) and len(set(keys)) == len(keys):
            return
        seen: set[str] = set()  # the first key at fault, in the batch's order
        for key, there in zip(keys, stored.tolist()):
            if there or key in self._pending or key in seen:
                where = f"version {index.version}" if there else "the records added"
                raise errors.DuplicateKeyError(f"key {key!r} is already in the dataset ({where})", key, (-1, -1))
            seen.add(key)

    def _current_index(self) -> KeyIndex:
        if self._index is None:
            raise errors.ClosedFileError(f"{self.folder}: operation on a closed DatasetWriter")
        return self._index

    def _added(self, keys: list[str]) -> None:
        self._pending.update(dict.fromkeys(keys))

    def _finish_shard(self) -> None:
        super()._finish_shard()
        self._commit()

    def _commit(self) -> layout.Manifest:
        if not self._finished or not self._pending:  # nothing added since the last commit
            self._tx.forget(self._finished)
            self._finished = []
            return layout.read_manifest(self._tx.folder)
        manifest = super()._commit()
        self._pending = {}
        self._current_index().close()
        self._index = KeyIndex(self._tx.folder, manifest.segments, manifest.version)
        return manifest

    def _operation(self) -> str:
        return "write-shard"

    def done_keys(self) -> collections.abc.Set[str]:
        """The keys stored: those of the latest version this writer committed or resumed, and those added
        since.  A live view: a lookup per ``in``, nothing copied."""
        return _DoneKeys(self)

    def close(self) -> None:
        """Commit the shard in progress (if it holds records) and release the dataset."""
        super().close()
        self._close_index()

    def abort(self) -> None:
        """Discard the shard in progress; the versions committed stay."""
        super().abort()
        self._close_index()

    def _close_index(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close()  # on an exception too: what was added is kept


def _exists(e: OSError) -> bool:
    return e.errno in (errno.EEXIST, errno.ENOTEMPTY)


class _DoneKeys(collections.abc.Set[str]):
    def __init__(self, writer: DatasetWriter) -> None:
        self._writer = writer

    def __contains__(self, key: object) -> bool:
        w = self._writer
        return key in w._pending or key in w._current_index()

    def __len__(self) -> int:
        w = self._writer
        return w._current_index().count + len(w._pending)

    def __iter__(self) -> Iterator[str]:
        w = self._writer
        yield from w._current_index().keys()
        yield from list(w._pending)


def write_shards(
    folder: PathLike,
    data: Any,
    shard_bytes: int = 1 << 30,
    dtype: object = None,
    metadata: dict[str, Any] | None = None,
    *,
    mode: str = "error",
    on_duplicate: str = "error",
    **options: Any,
) -> None:
    """Write ``data`` into a versioned sharded dataset in ``folder`` (see :class:`ShardWriter` for ``mode``).

    ``data`` is an open dataset (streamed; its user metadata is kept unless ``metadata`` is given), another
    mapping ``{key: vector}`` or a ``(keys, matrix)`` pair.
    """
    source = source_of(data, "write_shards()", options.pop("ragged", None))
    meta = source.metadata if metadata is None and mode != "append" else metadata  # appended: the dataset's

    def open_sink(dim: int, dt: object, ragged: bool) -> ShardWriter:
        dt = dtype if mode == "append" else dt  # appended: the dataset's, unless given
        return ShardWriter(
            folder,
            dim,
            dt,
            meta or None,
            shard_bytes=shard_bytes,
            mode=mode,
            on_duplicate=on_duplicate,
            ragged=ragged,
            **options,
        )

    write_source(source, open_sink, dtype)

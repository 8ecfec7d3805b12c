"""Sharded datasets: one Mapping over a folder (or a list) of .emb files.

A folder of shards carries an index, ``_index.emb``: itself an .emb file whose
keys are all the shards' keys in dataset row order, each with its shard number
as a one-element uint32 record.  A lookup is one binary search in it and then
a direct read from the shard, however many shards there are.  The index lists
each shard's name, count and key checksum and is checked against them at
open.  Files whose names start with ``_`` or ``.`` are not shards.

Without an index (a list of paths, or a folder assembled by hand) ``open``
builds one in a temporary file, reading every key once and refusing a key
found in two shards; :func:`write_index` writes it into the folder for good.
"""
import bisect
import os
import tempfile

import numpy as np

from embfile import _core, epochs, errors
from embfile._staging import Staging
from embfile.reader import EmbFile, RowOrderMapping
from embfile.writer import Writer, feed

INDEX_NAME = "_index.emb"
_META_KEY = "embfile.shards"
_KEY_CHUNK = 1 << 16  # keys read from a shard at a time while indexing


def shard_paths(folder):
    """The shard files of ``folder`` in name order: ``*.emb`` not starting with ``_`` or ``.``."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(".emb") and n[0] not in "_.")
    return [os.path.join(folder, n) for n in names]


def _identity(db):
    return {"name": os.path.basename(db.path), "count": len(db), "keys_crc": db._stored_crc("keys")}


def _build_index(path, shards):
    """Write the index of ``shards`` (open EmbFiles) to ``path``; a key in two shards is a ShardError."""
    bounds = np.cumsum([0] + [len(db) for db in shards])
    try:
        with Writer(path, 1, "uint32", {_META_KEY: [_identity(db) for db in shards]}) as w:
            for s, db in enumerate(shards):
                for lo in range(0, len(db), _KEY_CHUNK):
                    keys = db.keys_between(lo, lo + _KEY_CHUNK)
                    w.add_batch(keys, np.full((len(keys), 1), s, np.uint32))
    except errors.DuplicateKeyError as e:
        where = [f"{shards[s].path} (row {r - bounds[s]})"
                 for r in e.rows for s in [int(np.searchsorted(bounds, r, side="right")) - 1]]
        raise errors.ShardError(f"key {e.key!r} is in two shards: {where[0]} and {where[1]}") from None


def write_index(folder):
    """Write (or rewrite) ``folder/_index.emb`` for the shards in ``folder``.

    Reads every key once; a key found in two shards is a :class:`ShardError`
    naming both files, and then nothing is written.
    """
    shards = [EmbFile(p) for p in shard_paths(folder)]
    try:
        _check_shards(shards, folder)
        _build_index(os.path.join(folder, INDEX_NAME), shards)
    finally:
        for db in shards:
            db.close()


def _check_shards(shards, where):
    if not shards:
        raise errors.ShardError(f"{where}: no .emb shards")
    first = shards[0]
    for db in shards[1:]:
        if (db.dim, db.dtype) != (first.dim, first.dtype):
            raise errors.ShardError(f"{db.path} has dim {db.dim} and dtype {db.dtype.name}, "
                                    f"{first.path} dim {first.dim} and dtype {first.dtype.name}")


class ShardedEmbFile(epochs.BatchSource, RowOrderMapping):
    """A read-only ``Mapping[str, ndarray]`` over several .emb files (see the module).

    Rows are numbered across the shards in order (shard 0's rows first); keys,
    values and items iterate in that order.  ``db[key]``, ``get_batch``,
    ``rows``, ``iter_batches`` and the rest behave as on an :class:`EmbFile`.
    ``shards`` lists the open files.
    """

    def __init__(self, source):
        self._source = source
        if isinstance(source, (str, os.PathLike)):
            folder = os.fspath(source)
            paths, index = shard_paths(folder), os.path.join(folder, INDEX_NAME)
            where = folder
        else:
            paths, index, where = [os.fspath(p) for p in source], None, "shard list"
        self.shards, self._index, self._layout_cache = [], None, None
        try:
            for p in paths:
                self.shards.append(EmbFile(p))
            _check_shards(self.shards, where)
            self._index = self._open_index(index if index and os.path.exists(index) else None)
        except BaseException:
            self.close()
            raise
        self.dim, self.dtype = self.shards[0].dim, self.shards[0].dtype
        self._bounds = np.cumsum([0] + [len(db) for db in self.shards]).tolist()

    def _open_index(self, path):
        if path is None:
            with tempfile.TemporaryDirectory(prefix="embfile-index-") as tmp:
                _build_index(os.path.join(tmp, INDEX_NAME), self.shards)
                return EmbFile(os.path.join(tmp, INDEX_NAME))  # stays mapped once unlinked
        index = EmbFile(path)
        want = [_identity(db) for db in self.shards]
        if index.metadata.get(_META_KEY) != want or len(index) != sum(len(db) for db in self.shards):
            index.close()
            raise errors.ShardError(f"{path} does not describe the shards beside it (a shard was "
                                    "added, removed or rewritten): rebuild it with "
                                    "embfile.write_index(folder) or `embfile index FOLDER`")
        return index

    # -- lookups: one search in the index, then the shard's record ------------------------

    def _locate(self, row):
        s = bisect.bisect_right(self._bounds, row) - 1
        return self.shards[s], row - self._bounds[s]

    def __getitem__(self, key):
        self._require_open()
        db, local = self._locate(self._index.row(key))
        return db.record(local)

    def record(self, row):
        """The vector at dataset row ``row``, a read-only view."""
        self._require_open()
        db, local = self._locate(_core.row_number(row, len(self)))
        return db.record(local)

    def __contains__(self, key):
        self._require_open()
        return key in self._index

    def __len__(self):
        self._require_open()
        return len(self._index)

    def __iter__(self):
        self._require_open()
        return iter(self._index)

    def row(self, key):
        """The dataset row of one key (``KeyError`` if absent)."""
        self._require_open()
        return self._index.row(key)

    def rows(self, keys):
        """Dataset rows of ``keys``, as int64."""
        self._require_open()
        return self._index.rows(keys)

    def key(self, row):
        """The key at dataset row ``row``."""
        self._require_open()
        return self._index.key(row)

    def keys_between(self, start, stop):
        """The keys of dataset rows ``start`` to ``stop``, as a list."""
        self._require_open()
        return self._index.keys_between(start, stop)

    def get_batch(self, keys):
        """A new ``(len(keys), dim)`` array of the vectors of ``keys``, in that order."""
        return self.take(self.rows(keys))

    def _layout(self):
        if self._layout_cache is None:  # built once: it maps every shard
            parts = [db._layout() for db in self.shards]
            self._layout_cache = (np.concatenate([p[0] for p in parts]), np.array(self._bounds, np.uint64),
                                  parts[0][2], [p[3] for p in parts])
        return self._layout_cache

    def _read_into(self, out):
        for db, lo, hi in zip(self.shards, self._bounds, self._bounds[1:]):
            db._read_into(out[lo:hi])

    def _keys_at(self, rows):
        return self._index.keys_at(rows)

    @property
    def metadata(self):
        """The first shard's metadata (a :class:`ShardWriter` gives every shard the same user keys)."""
        self._require_open()
        return self.shards[0].metadata if self.shards else {}

    def verify(self):
        """Verify every shard and the index, and that the index matches the shards record for record."""
        self._require_open()
        problems = []
        for db in [*self.shards, self._index]:
            try:
                db.verify()
            except errors.ChecksumError as e:
                problems += [f"{db.path}: {p}" for p in e.problems]
        numbers = self._index.matrix[:, 0]
        for s, db in enumerate(self.shards):
            lo, hi = self._bounds[s], self._bounds[s + 1]
            if (numbers[lo:hi] != s).any():
                problems.append(f"index: rows {lo}-{hi} do not all point at shard {s}")
            for a in range(lo, hi, _KEY_CHUNK):
                b = min(a + _KEY_CHUNK, hi)
                if self._index.keys_between(a, b) != db.keys_between(a - lo, b - lo):
                    problems.append(f"index: keys of rows {a}-{b} differ from {db.path}")
                    break
        if problems:
            raise errors.ChecksumError("; ".join(problems), problems)

    def close(self):
        """Close every shard and the index."""
        for db in [*self.shards, *([self._index] if self._index is not None else [])]:
            db.close()
        self._index = self._layout_cache = None

    def _require_open(self):
        if self._index is None:
            raise errors.ClosedFileError(f"{os.fspath(self._source) if isinstance(self._source, (str, os.PathLike)) else 'dataset'}: operation on a closed ShardedEmbFile")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __reduce__(self):
        return (ShardedEmbFile, (self._source,))

    def __eq__(self, other):
        return self is other

    __hash__ = object.__hash__

    def __repr__(self):
        where = self._source if isinstance(self._source, (str, os.PathLike)) else f"{len(self.shards)} files"
        state = "closed" if self._index is None else f"{len(self.shards)} shards"
        return f"<ShardedEmbFile {where!r}: {state}>"


class ShardWriter:
    """Write a sharded dataset: like :class:`~embfile.Writer`, but starts a new
    shard every ``shard_bytes`` of records (default 1 GiB).

    The shards (``part-00000.emb``, ...) and the index are written into a hidden
    folder beside ``folder`` and renamed into place on a clean close, so
    ``folder`` appears complete or not at all.  ``folder`` must not exist yet,
    or be empty.  A key in two shards is found at close (a :class:`ShardError`).
    """

    def __init__(self, folder, dim, dtype="float32", metadata=None, *, shard_bytes=1 << 30, **options):
        self.folder = os.fspath(folder).rstrip(os.sep) or os.sep
        if os.path.exists(self.folder) and (not os.path.isdir(self.folder) or os.listdir(self.folder)):
            raise errors.WriterError(f"{self.folder} exists and is not an empty folder")
        record_bytes = int(dim) * np.dtype(dtype).itemsize
        if shard_bytes < record_bytes:
            raise ValueError(f"shard_bytes {shard_bytes} is less than one record ({record_bytes} bytes)")
        self._per_shard = int(shard_bytes) // record_bytes
        parent, name = os.path.split(os.path.abspath(self.folder))
        self._staging = Staging(self.folder, folder=True)
        self._tmp = self._staging.path
        self._args = (dim, dtype, metadata)
        self._options = options
        self._shards = 0
        self._writer = self._next_writer()
        self.dim, self.dtype = self._writer.dim, self._writer.dtype

    def _next_writer(self):
        path = os.path.join(self._tmp, f"part-{self._shards:05d}.emb")
        self._shards += 1
        return Writer(path, *self._args, **self._options)

    def _room(self):
        """Records the current shard still takes, after starting a new one if it is full."""
        if len(self._writer) >= self._per_shard:
            self._writer.close()
            self._writer = self._next_writer()
        return self._per_shard - len(self._writer)

    def add(self, key, vector):
        self._room()
        self._writer.add(key, vector)

    def add_batch(self, keys, matrix):
        keys = keys.tolist() if isinstance(keys, np.ndarray) else list(keys)
        lo = 0
        while lo < len(keys):
            hi = lo + self._room()
            self._writer.add_batch(keys[lo:hi], matrix[lo:hi])
            lo = hi

    def close(self):
        """Finish the last shard, write the index and move the folder into place."""
        if self._writer is None:
            return
        try:
            self._writer.close()
            self._writer = None
            write_index(self._tmp)
            self._staging.commit()  # replaces an empty folder (checked at the start)
        except BaseException:
            self.abort()
            raise

    def abort(self):
        """Discard everything; ``folder`` is left as it was."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._staging.discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shards(folder, data, shard_bytes=1 << 30, dtype=None, metadata=None, **options):
    """Split ``data`` into a sharded dataset in ``folder`` (see :class:`ShardWriter`).

    ``data`` is an open .emb file (streamed; its metadata is kept unless
    ``metadata`` is given), another mapping ``{key: vector}`` or a ``(keys,
    matrix)`` pair.
    """
    if metadata is None and isinstance(data, EmbFile):
        metadata = {k: v for k, v in data.metadata.items() if k != "embfile"}
    feed(lambda dim, dt: ShardWriter(folder, dim, dt, metadata, shard_bytes=shard_bytes, **options),
         data, dtype, "write_shards()")

"""Writing .emb files: :class:`Writer` (streaming), :func:`write` (a whole mapping), and
:func:`write_source`, the one path from any input into a writer.

Vectors go to a temporary file beside the target as they come; only the keys are kept in memory
(compactly, about 8 bytes plus the key's UTF-8 each).  A clean close sorts the keys, appends the index,
keys, metadata and checksums, writes the header, fsyncs and renames into place, so the target path only
ever holds a complete file: the old one or the new one.
"""

from __future__ import annotations

import array
import contextlib
import datetime
import errno
import functools
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from embfile import _core, errors
from embfile import _format as F
from embfile._keys import EncodedKeys
from embfile._staging import DISK_FULL, Flusher, Staging, disk_full
from embfile._stream import Source, array_of, as_matrix, as_vector, prefetched, progress_bar, source_of, unpadded
from embfile._version import __version__

_CHUNK_BYTES = 4 << 20  # vectors are converted and written this many bytes at a time
_WRITEBACK_BYTES = 32 << 20  # start writing back to disk every this many bytes, not all at the fsync
_FLUSH_BYTES = 64 << 20  # past this size, have the storage flush the file as it grows (Flusher)
# Record writes end on multiples of this in the file (the rest is carried to the next write), so
# the page cache can hold the records in huge folios: a file cached in 4 KiB pages, once evicted,
# leaves memory fragmented, and the next big read pays for that.
_FOLIO_BYTES = 2 << 20


class Writer:
    """Write an .emb file record by record.

    Parameters
    ----------
    path : str or os.PathLike
        Destination.  Replaced atomically on a clean close; untouched otherwise.
    dim : int
        Elements per vector.
    dtype : str or numpy.dtype
        Stored element type: float16, float32, float64, (u)int8/16/32/64.
        Vectors are converted on the way in; a value the type cannot hold is an
        error naming the key, never a silent ``inf``.
    metadata : dict, optional
        JSON-serialisable user metadata (model name, layer, pooling, source, ...).
    ragged : bool
        Each record a ``(length, dim)`` matrix of its own length, at least one row (per-residue embeddings,
        FORMAT.md "Ragged records"), instead of one ``(dim,)`` vector.

    Examples
    --------
    >>> with embfile.Writer("db.emb", dim=1024, dtype="float16") as w:   # doctest: +SKIP
    ...     for seqid, vec in embeddings:
    ...         w.add(seqid, vec)
    >>> with embfile.Writer("residues.emb", dim=1024, dtype="float16", ragged=True) as w:   # doctest: +SKIP
    ...     w.add("P69905", per_residue)  # (142, 1024)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        dim: int,
        dtype: object = "float32",
        metadata: dict[str, Any] | None = None,
        *,
        block_bytes: int = F.DEFAULT_BLOCK_BYTES,
        bucket_keys: int = F.DEFAULT_BUCKET_KEYS,
        ragged: bool = False,
    ) -> None:
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool):
            raise TypeError(f"dim must be an int, not {type(dim).__name__}")
        if not 1 <= dim <= F.MAX_DIM:
            raise ValueError(f"dim must be from 1 to {F.MAX_DIM}, not {dim}")
        try:
            self.dtype = F.disk_dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype {dtype!r} is not a numpy dtype") from None
        if self.dtype.name not in F.DTYPE_CODES:
            names = ", ".join(sorted(F.DTYPES.values()))
            raise TypeError(f"dtype {self.dtype.name} is not supported; use one of {names}")
        if not F.valid_block_bytes(block_bytes):
            raise ValueError(f"block_bytes must be a power of two from {F.MIN_BLOCK_BYTES}, not {block_bytes}")
        if not 1 <= bucket_keys <= 4096:
            raise ValueError(f"bucket_keys must be from 1 to 4096, not {bucket_keys}")
        self._meta = _metadata_json(metadata)
        self.path = os.fspath(path)
        self.dim = int(dim)
        self._record_bytes = self.dim * self.dtype.itemsize
        self._block_bytes = block_bytes
        self._bucket_keys = bucket_keys
        self._heap = bytearray()
        self._offsets = array.array("Q", [0])
        self.ragged = bool(ragged)
        self._ranges = array.array("Q", [0])  # of a ragged file: each record's first row, then the rows
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._block_crcs = array.array("I")
        self._crc, self._crc_fill = 0, 0
        self._flusher: Flusher | None = None  # started once the file is worth flushing as it grows
        if os.path.isdir(self.path):  # found before any record is written, not at the rename
            what = "a folder is there; write_shards() (embfile shard) writes a dataset folder"
            raise IsADirectoryError(errno.EISDIR, what, self.path)
        self._staging = Staging(self.path)
        self._file: Any = open(self._staging.path, "wb", buffering=0)
        self._carry = bytearray(F.PAGE)  # not yet in the file; starts with room for the header, written last
        self._written, self._synced = F.PAGE, 0  # bytes added so far; the file's bytes sent to the disk

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @property
    def rows(self) -> int:
        """Rows added so far: one per record, or of a ragged file each record's own."""
        return self._ranges[-1] if self.ragged else len(self)

    def add(self, key: str, vector: Any) -> None:
        """Append one record: a ``(dim,)`` vector, or to a ragged writer a ``(length, dim)`` matrix.  On an
        error nothing is added and the writer stays usable."""
        v = as_matrix(key, vector, self.dim) if self.ragged else as_vector(key, vector, self.dim)
        _check_kind(v.dtype, self.dtype, key)
        encoded = _encode_key(key)
        v = _convert(v if self.ragged else v[None], self.dtype, lambda i: key)  # overflow named by key here
        self._heap += encoded
        self._offsets.append(len(self._heap))
        self._pending.append(v)
        self._pending_rows += len(v)
        if self.ragged:
            self._ranges.append(self._ranges[-1] + len(v))
        if self._pending_rows * self._record_bytes >= _CHUNK_BYTES:
            with _disk_errors(self):
                self._flush()

    def add_batch(self, keys: Sequence[str] | np.ndarray | EncodedKeys, matrix: Any, lengths: Any = None) -> None:
        """Append ``len(keys)`` records, one per row of ``matrix``: all of them, or on an error none.

        To a ragged writer, ``matrix`` holds the records' rows one record after another and ``lengths`` how
        many rows each record has (key ``i`` owns the ``lengths[i]`` rows after those of the keys before); or
        ``matrix`` is a zero-padded batch ``(len(keys), longest, dim)``, as a model gives it for a batch of
        sequences, and key ``i`` owns the first ``lengths[i]`` rows of ``matrix[i]``.
        ``keys`` may be :class:`~embfile._keys.EncodedKeys` (UTF-8 bytes as an Arrow array or a keys section
        holds them): then no Python ``str`` is made of any key.
        """
        keys, m, ranges = self._batch(keys, matrix, lengths)
        encoded = _encoded(keys)
        self._flush()
        mark = (
            len(self._offsets),
            len(self._heap),
            len(self._ranges),
            len(self._block_crcs),
            self._crc,
            self._crc_fill,
            self._written,
        )
        try:
            with _disk_errors(self):
                for block in self._converted(keys, m, ranges):
                    self._write_records(block)
            if ranges is not None:
                self._ranges.frombytes((ranges[1:] + self._ranges[-1]).astype(np.uint64).tobytes())
        except BaseException:
            self._rollback(*mark)
            raise
        first, last = int(encoded.offsets[0]), int(encoded.offsets[-1])
        ends = encoded.offsets[1:] - first + len(self._heap)
        self._heap += encoded.heap[first:last].data
        self._offsets.frombytes(ends.astype(np.uint64).tobytes())

    def _check_batch(self, keys: Sequence[str] | np.ndarray | EncodedKeys, matrix: Any, lengths: Any = None) -> None:
        """Raise what :meth:`add_batch` would raise of these records (not of the disk), adding none: a caller
        that cuts a batch over several files checks it whole first, so that it is added all or not at all."""
        keys, m, ranges = self._batch(keys, matrix, lengths)
        _encoded(keys)
        for _ in self._converted(keys, m, ranges):
            pass

    def _batch(
        self, keys: Sequence[str] | np.ndarray | EncodedKeys, matrix: Any, lengths: Any
    ) -> tuple[list[str] | EncodedKeys, np.ndarray, np.ndarray | None]:
        """``(keys, matrix, ranges)`` of a batch checked for its shape, lengths and kind (see :meth:`add_batch`)."""
        m = array_of(matrix)
        if F.kind(m.dtype) not in "biufc" and not isinstance(matrix, np.ndarray):
            raise TypeError(f"add_batch() takes a matrix of numbers, not {type(matrix).__name__}")
        if not isinstance(keys, EncodedKeys):
            keys = keys.tolist() if isinstance(keys, np.ndarray) else list(keys)
        if self.ragged and m.ndim == 3 and lengths is not None:
            m, lengths = unpadded(m, lengths, keys)
        ranges = self._batch_ranges(keys, lengths, len(m) if m.ndim == 2 else -1)
        rows = len(keys) if ranges is None else int(ranges[-1])
        if m.ndim != 2 or m.shape != (rows, self.dim):
            what = f"{len(keys)} keys" if ranges is None else f"{len(keys)} keys of {rows} rows in all"
            raise errors.WriterError(f"matrix has shape {m.shape}, expected ({rows}, {self.dim}) for {what}")
        _check_kind(m.dtype, self.dtype, keys[0] if len(keys) else None)
        return keys, m, ranges

    def _converted(
        self, keys: list[str] | EncodedKeys, m: np.ndarray, ranges: np.ndarray | None
    ) -> Iterator[np.ndarray]:
        """The batch's rows in the stored type, a chunk at a time; a value that does not fit, named by its key."""

        def key_of(lo: int) -> Callable[[int], object]:  # the key of row lo + i
            if ranges is None:
                return lambda i: keys[lo + i]
            return lambda i: keys[int(np.searchsorted(ranges, lo + i, "right")) - 1]

        step = max(1, _CHUNK_BYTES // self._record_bytes)
        for lo in range(0, len(m), step):
            yield _convert(m[lo : lo + step], self.dtype, key_of(lo))

    def _batch_ranges(self, keys: Sequence[object] | EncodedKeys, lengths: Any, rows: int) -> np.ndarray | None:
        """The row offsets of a ragged batch (``len(keys) + 1``, from 0) given its ``lengths``; None for a
        fixed-width writer.  A WriterError names the first key whose length is wrong."""
        if not self.ragged:
            if lengths is not None:
                raise errors.WriterError("lengths= given to a fixed-width writer; Writer(..., ragged=True) stores them")
            return None
        if lengths is None:
            raise errors.WriterError("a ragged writer's add_batch() needs lengths= (rows of each key)")
        n = np.asarray(lengths)
        if n.shape != (len(keys),) or not (n.dtype.kind in "iu" or n.size == 0):
            raise errors.WriterError(f"lengths must be {len(keys)} integers, one per key, not {n.dtype} {n.shape}")
        bad = np.flatnonzero((n < 1) | (n >= 1 << 40))
        if bad.size:
            i = int(bad[0])
            raise errors.WriterError(f"key {keys[i]!r}: length {n[i]}; a ragged record has from 1 to 2**40 rows")
        ranges = np.zeros(len(keys) + 1, np.int64)
        np.cumsum(n, out=ranges[1:])
        if rows >= 0 and ranges[-1] != rows:
            raise errors.WriterError(f"lengths add up to {ranges[-1]} rows, the matrix has {rows}")
        return ranges

    def _rollback(
        self, n_offsets: int, n_heap: int, n_ranges: int, n_crcs: int, crc: int, crc_fill: int, written: int
    ) -> None:
        """Undo a partly written batch: keys, checksum state, carry and file back to the mark."""
        if self._file is None:  # aborted (the disk is full)
            return
        del self._offsets[n_offsets:], self._heap[n_heap:], self._ranges[n_ranges:], self._block_crcs[n_crcs:]
        in_file = min(written, self._written - len(self._carry))
        self._carry = self._carry[: written - in_file]  # a copy: a failed write's traceback may pin the old one
        self._crc, self._crc_fill, self._written = crc, crc_fill, written
        self._synced = min(self._synced, in_file)
        self._file.truncate(in_file)
        self._file.seek(in_file)

    def _flush(self) -> None:
        if self._pending:  # already converted and checked by add()
            block = np.concatenate(self._pending) if self.ragged else np.stack(self._pending)
            self._pending, self._pending_rows = [], 0
            self._write_records(block)

    def _write_records(self, block: np.ndarray) -> None:
        data = np.ascontiguousarray(block).reshape(-1).view(np.uint8).data
        end = self._written + len(data)
        cut = end - end % _FOLIO_BYTES - self._written  # bytes of data that fill the file up to a boundary
        if cut >= 0:
            self._write_all(self._carry, data[:cut])
            self._carry = bytearray(data[cut:])
        else:
            self._carry += data
        self._written = end
        in_file = end - len(self._carry)
        if in_file - self._synced >= _WRITEBACK_BYTES:
            # Send the file's new pages to the disk now, so the disk works while we go on and dirty
            # memory stays bounded: past _FLUSH_BYTES a helper thread fdatasyncs them (see Flusher;
            # a writeback call of ours would then wait behind its flush), before that the kernel
            # starts writing them back.  Nothing is evicted: memory freed in the middle of a write
            # is what a VM hands back to its host, and the next big allocation pays to fault it back in.
            if self._flusher is None and in_file >= _FLUSH_BYTES:
                self._flusher = Flusher(self._file.fileno(), _FLUSH_BYTES)
            if self._flusher is not None:
                self._flusher.grown(in_file)
            else:
                _core.start_writeback(self._file.fileno(), self._synced, in_file - self._synced)
            self._synced = in_file
        while len(data):  # running CRC per checksum block
            take = min(len(data), self._block_bytes - self._crc_fill)
            self._crc = _core.crc32c(data[:take], self._crc)
            self._crc_fill += take
            data = data[take:]
            if self._crc_fill == self._block_bytes:
                self._block_crcs.append(self._crc)
                self._crc, self._crc_fill = 0, 0

    def close(self) -> None:
        """Finish the file: index, keys, metadata, checksums, header; fsync; rename into place."""
        if self._file is None:
            return
        try:
            with _disk_errors(self):
                self._finish()
        except BaseException:
            self.abort()
            raise

    def _finish(self) -> None:
        self._flush()
        if self._crc_fill:
            self._block_crcs.append(self._crc)
        n = len(self)
        offsets = np.frombuffer(self._offsets, dtype=np.uint64)
        heap = np.frombuffer(self._heap, dtype=np.uint8)
        perm = _core.sort_keys(heap, offsets)  # a DuplicateKeyError names the key and both rows
        index, n_buckets, lcp_len = _core.build_index(heap, offsets, perm, self._bucket_keys)
        del perm
        # The sections are written from the buffers they are in, not joined into new ones: the keys are the
        # bulk of what a writer holds, and a copy of them at the end would double its peak memory.
        keys = (_little_endian_bytes(offsets), heap)
        meta = (json.dumps({**self._meta, "embfile": self._writer_record(n)}, ensure_ascii=False).encode(),)
        rows = self._ranges[-1] if self.ragged else n
        sections: list[tuple[str, tuple[Any, ...], int]] = [("index", (index,), F.PAGE), ("keys", keys, 8)]
        if self.ragged:
            sections.append(("ranges", (_little_endian_bytes(np.frombuffer(self._ranges, np.uint64)),), 8))
        sections.append(("meta", meta, 1))
        crc = {name: functools.reduce(lambda c, b: _core.crc32c(b, c), data, 0) for name, data, _ in sections}
        crcs = [crc[name] for name in ("index", "keys", "meta", "ranges") if name in crc]  # the format's order
        sections.append(("sums", (np.array([*self._block_crcs, *crcs], dtype="<u4").tobytes(),), 4))
        parts: list[Any] = [self._carry]  # the carry, then the sections after the records
        pos = self._written
        where = {"records": (F.PAGE, rows * self._record_bytes)}
        for name, data, align in sections:
            parts.append(bytes(-pos % align))
            pos += len(parts[-1])
            size = sum(len(b) for b in data)
            where[name] = (pos, size)
            parts.extend(data)
            pos += size
        self._write_all(*parts)
        header = F.Header(
            magic=F.MAGIC,
            major=self._version[0],
            minor=self._version[1],
            header_size=F.HEADER_SIZE,
            file_size=pos,
            count=n,
            dim=self.dim,
            dtype_code=F.DTYPE_CODES[self.dtype.name],
            flags=F.RAGGED if self.ragged else 0,
            **{
                f"{name}_{part}": value
                for name, (off, size) in where.items()
                for part, value in (("offset", off), ("size", size))
            },
            block_bytes=self._block_bytes,
            n_buckets=n_buckets,
            lcp_len=lcp_len,
            rows=rows if self.ragged else 0,
        )
        self._file.seek(0)
        self._write_all(header.pack())
        self._stop_flusher()
        self._file.close()
        self._file = None
        self._staging.commit()

    def _write_all(self, *buffers: Any) -> None:
        """Write the buffers at the file's position in one ``writev`` (more only if the kernel
        takes part of them)."""
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        try:
            while views:
                done = os.writev(self._file.fileno(), views)
                while views and done >= len(views[0]):
                    done -= len(views.pop(0))
                if views:
                    views[0] = views[0][done:]
        finally:
            views.clear()  # release the buffers even if a traceback keeps this frame

    def _writer_record(self, n: int) -> dict[str, Any]:
        """What the writer records in the metadata ("Metadata").  ``SOURCE_DATE_EPOCH``, the
        reproducible-builds convention, fixes the creation time."""
        epoch, utc = os.environ.get("SOURCE_DATE_EPOCH"), datetime.UTC
        when = datetime.datetime.fromtimestamp(int(epoch), utc) if epoch else datetime.datetime.now(utc)
        record = {
            "format_version": "{}.{}".format(*self._version),
            "dtype": self.dtype.name,
            "dim": self.dim,
            "count": n,
            "created": when.isoformat(),
            "embfile_version": __version__,
        }
        return {**record, "ragged": True, "rows": self._ranges[-1]} if self.ragged else record

    @property
    def _version(self) -> tuple[int, int]:
        """The format version the file needs: 1.1 for ragged records or bfloat16, else 1.0 (every 1.x reader
        reads it)."""
        return F.VERSION if self.ragged or self.dtype.name in F.NEW_DTYPES else F.FIXED_VERSION

    def _stop_flusher(self) -> None:
        if self._flusher is not None:
            flusher, self._flusher = self._flusher, None
            flusher.close()

    def abort(self) -> None:
        """Discard everything written; the destination path is left as it was."""
        if self._file is not None:
            with contextlib.suppress(OSError):  # what a flush met: nothing is kept anyway
                self._stop_flusher()
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:  # nothing to keep anyway
                pass
        self._staging.discard()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None:
            warnings.warn(
                f"embfile.Writer({self.path!r}) was never closed: nothing was written (close() or a with block "
                "writes the file)",
                ResourceWarning,
                stacklevel=2,
            )
            try:
                self.abort()  # never leave a partial file behind
            except Exception:
                pass


class Sink(Protocol):
    """What :func:`write_source` writes into: a :class:`Writer`, or a writer of shards."""

    dim: int
    dtype: np.dtype

    def add_batch(self, keys: Sequence[str] | np.ndarray, matrix: Any, lengths: Any = None) -> None: ...
    def __enter__(self) -> Any: ...
    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None: ...


def write_source(
    source: Source,
    open_sink: Callable[[int, Any, bool], Sink],
    dtype: object = None,
    *,
    progress: bool | str | os.PathLike[str] = False,
    prefetch: bool = False,
) -> None:
    """Write every chunk of ``source`` into the sink ``open_sink(dim, dtype, ragged)`` returns, and close it.

    ``dtype=None`` keeps the source's.  ``prefetch`` reads the next chunks on a thread while one is
    written (for inputs read from disk).  ``progress`` shows a bar (a path names it).  On any error the
    sink is aborted: nothing appears at its destination.
    """
    chunks: Iterator[Any] = prefetched(source.chunks) if prefetch else source.chunks
    name = progress if isinstance(progress, (str, os.PathLike)) else None
    sink = open_sink(source.dim, dtype or source.dtype, source.ragged)
    with progress_bar(source.count, bool(progress), name) as bar, sink as w:
        for keys, *records in chunks:
            w.add_batch(keys, *records)
            bar.update(len(keys))
        bar.set_postfix_str("sorting keys, writing the index")


def write(
    path: str | os.PathLike[str],
    data: Any,
    dtype: object = None,
    metadata: dict[str, Any] | None = None,
    **options: Any,
) -> None:
    """Write a whole mapping ``{key: vector}``, a ``(keys, matrix)`` pair or an open dataset to ``path``.

    ``dtype=None`` keeps the dtype of the data.  ``ragged=True`` writes a mapping ``{key: (length, dim)
    matrix}`` (per-residue embeddings; a ragged dataset stays ragged).  Other options (``block_bytes``,
    ``bucket_keys``) go to :class:`Writer`.  Atomic: on any error nothing appears at ``path`` (and a file there
    is untouched).

    Examples
    --------
    >>> embfile.write("db.emb", {"P69905": v1, "P68871": v2}, metadata={"model": "esm2"})  # doctest: +SKIP
    >>> embfile.write("residues.emb", {"P69905": m1, "P68871": m2}, ragged=True)  # (L, D) each  # doctest: +SKIP
    """
    source = source_of(data, "write()", options.pop("ragged", None))
    write_source(source, lambda dim, dt, ragged: Writer(path, dim, dt, metadata, ragged=ragged, **options), dtype)


def _encode_key(key: object) -> bytes:
    if not isinstance(key, str):
        raise TypeError(f"embfile keys are str, not {type(key).__name__}: {key!r}")
    try:
        b = key.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.WriterError(f"key {key!r} cannot be encoded as UTF-8") from None
    if len(b) > F.MAX_KEY_BYTES:
        raise errors.WriterError(f"key {key[:40]!r}... is {len(b)} bytes; the limit is {F.MAX_KEY_BYTES}")
    return b


def _little_endian_bytes(a: np.ndarray) -> np.ndarray:
    """The bytes of uint64 ``a`` in the file's order: a view of it on a little-endian machine."""
    return a.astype("<u8", copy=False).view(np.uint8)


def _encoded(keys: list[str] | EncodedKeys) -> EncodedKeys:
    """The keys' UTF-8 back to back, each checked against the format's limit."""
    if not isinstance(keys, EncodedKeys):
        try:
            utf8 = list(map(str.encode, keys))
        except (TypeError, UnicodeEncodeError):
            for key in keys:
                _encode_key(key)  # raises, naming the key
            raise
        offsets = np.zeros(len(utf8) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, utf8), np.int64, len(utf8)), out=offsets[1:])
        keys = EncodedKeys(offsets, np.frombuffer(b"".join(utf8), np.uint8))
    lengths = np.diff(keys.offsets)
    too_long = np.flatnonzero((lengths > F.MAX_KEY_BYTES) | (lengths < 0))
    if too_long.size:
        i = int(too_long[0])
        raise errors.WriterError(f"key {keys[i][:40]!r}... is {lengths[i]} bytes; the limit is {F.MAX_KEY_BYTES}")
    return keys


def _check_kind(src: np.dtype, dst: np.dtype, key: object) -> None:
    """Refuse conversions that change what the numbers mean (float to int, complex, text)."""
    if F.kind(src) not in "iuf" or (F.kind(src) == "f" and dst.kind in "iu"):
        raise errors.WriterError(f"key {key!r}: cannot store {src} vectors as {dst}")


def _convert(block: np.ndarray, dtype: np.dtype, key_of: Callable[[int], object]) -> np.ndarray:
    """``block`` as ``dtype``, or a WriterError naming the key (``key_of(row)``) of the first row whose values
    do not fit."""
    if block.dtype == dtype or np.can_cast(block.dtype, dtype, "safe"):
        return block.astype(dtype, copy=False)
    if F.kind(dtype) == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            out = block.astype(dtype)
        lost = ~np.isfinite(out) & np.isfinite(block)
    else:
        info = np.iinfo(dtype)
        lost = (block < info.min) | (block > info.max)
        out = block if lost.any() else block.astype(dtype)
    bad = np.flatnonzero(lost.any(axis=1))
    if bad.size:
        i = int(bad[0])
        value = block[i][lost[i]][0]
        raise errors.WriterError(f"key {key_of(i)!r}: value {value} does not fit in {dtype.name}")
    return out


def _metadata_json(metadata: object) -> dict[str, Any]:
    meta = {} if metadata is None else metadata
    if not isinstance(meta, dict):
        raise TypeError(f"metadata must be a dict, not {type(meta).__name__}")
    meta = {k: v for k, v in meta.items() if k != "embfile"}  # the writer's own record: this writer writes its own
    try:
        text = json.dumps(meta, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise errors.WriterError(f"metadata is not JSON-serialisable: {e}") from None
    if len(text.encode()) > F.MAX_META_BYTES - 4096:
        raise errors.WriterError("metadata is too large")
    copy: dict[str, Any] = json.loads(text)
    return copy


@contextlib.contextmanager
def _disk_errors(writer: Writer) -> Iterator[None]:
    """A full disk (or quota, or file size limit) aborts the write with a :class:`DiskFullError`."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        writer.abort()
        raise disk_full(writer.path, e.errno, f" after writing {writer._written} bytes") from e

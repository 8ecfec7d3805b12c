"""What every embfile dataset offers, in one place: lookups, gathers, iteration, epochs, full reads, exports.

A :class:`Dataset` is built from open .emb files (:class:`~embfile.file.MappedFile`): one whose index and
keys sections map keys to rows, and one or more whose records hold the rows, part after part.  A single
file (:class:`EmbFile`) is both; a sharded folder (:class:`~embfile.ShardedEmbFile`) has an index file and
its shards.  Everything here is written once over those two roles.

The lookups themselves (``db[key]``, ``in``, ``rows``, ``get_batch``, ``key``) are the native
:class:`embfile._core.Table` this class extends, not a member it delegates to: a lookup then runs without a
Python frame, which would otherwise be a large part of its cost.
"""

from __future__ import annotations

import bisect
import collections.abc
import contextlib
import dataclasses
import itertools
import json
import mmap
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from embfile import _core, errors, search
from embfile import _format as F
from embfile._extras import require
from embfile._format import Header
from embfile._keys import key_list
from embfile._pages import Layout, ReadAhead, WindowReader, aligned_empty, faulted_in_ahead
from embfile._stream import POOLINGS, pool_rows, record_cuts
from embfile.epochs import OPTIONS, Batches, EpochOptions, Fetch, aligned_targets, refuse_unknown
from embfile.file import MappedFile, attach
from embfile.writer import Writer

if TYPE_CHECKING:
    from embfile.folder import Manifest

KEY_CHUNK = 4096  # keys decoded at a time by an iteration: fast, and bounded in memory
KEYS_AHEAD = 1 << 16  # keys asked of the disk ahead of an iteration
ARROW_METADATA_KEY = b"embfile.metadata"  # schema metadata where Arrow and Parquet exports keep the metadata


@dataclasses.dataclass(frozen=True)
class ReadPart:
    """What one task of an engine's read reads: records ``[lo, hi)`` of the one file at ``path`` (a path or a
    URL), which the planning driver found holding ``count`` records of keys CRC ``keys_crc``.  The task opens
    that file alone (:func:`embfile.shards.open_part`), so its cost does not grow with the dataset's files."""

    path: str
    lo: int
    hi: int
    count: int
    keys_crc: int


class Dataset(_core.Table, collections.abc.Mapping[str, np.ndarray]):
    """A read-only ``Mapping[str, ndarray]`` of embedding vectors, over one or more .emb files.

    ``db[key]`` is a read-only view of shape ``(dim,)`` into the mapped file: no copy is made, and the
    view stays valid after :meth:`close` (the mapping is released when the last view is gone).
    :meth:`get_batch`, :meth:`take` and :meth:`to_numpy` return new arrays.  Keys, values and items
    iterate in row order, which is the order the vectors were written in.

    A dataset pickles by path, so it can be handed to worker processes; a forked child may keep using
    the parent's object.

    Attributes
    ----------
    path : str or None
        The file or folder opened (None for a list of files).
    dim : int
        Elements per vector.
    dtype : numpy.dtype
        The stored element type (little-endian).
    files : tuple of MappedFile
        The files holding the records, in row order.
    version : int or None
        Of a versioned dataset folder, the version this handle reads (it keeps reading it while later
        versions are committed); None for a single file, a list of files or a folder in 0.1's layout.
    manifest : Manifest or None
        Of a versioned dataset folder, that version's manifest (its files and how it came to be); else None.
    """

    path: str | None = None
    dim: int
    dtype: np.dtype
    files: tuple[MappedFile, ...] = ()  # empty until opened (and so after a failed open)
    _segments: tuple[MappedFile, ...] = ()
    version: int | None = None
    manifest: Manifest | None = None
    # search: by how many leading values they are over, each row's norm and which are known
    _norms: dict[int, tuple[np.ndarray, np.ndarray]] | None = None

    def _open_files(
        self, index: MappedFile | Sequence[MappedFile], parts: Sequence[MappedFile], path: str | None
    ) -> None:
        """Attach the lookup table to ``index`` (the files of the key index, in row order) and ``parts``
        (the files of the records)."""
        segments = [index] if isinstance(index, MappedFile) else list(index)
        self.path, self._segments, self.files = path, tuple(segments), tuple(parts)
        self.dim, self.dtype = parts[0].dim, parts[0].dtype
        self._layout_cache: Layout | None = None
        attach(self, segments, parts)
        self._starts = [0, *itertools.accumulate(p.count for p in parts)]  # each part's first record
        self._row_starts = [0, *itertools.accumulate(p.rows for p in parts)]  # and first row (ragged: differ)

    # -- iteration: keys in row order, values and items read by row ----------------------------------

    def __iter__(self) -> Iterator[str]:
        """The keys, in row order (decoded a few thousand at a time, the next ones read ahead)."""
        self._require_open()
        return itertools.chain.from_iterable(self._key_chunks())  # no Python frame per key

    def _key_chunks(self) -> Iterator[list[str]]:
        first = 0
        for segment in self._segments:  # each covers the next rows, in row order
            for local in range(0, segment.count, KEY_CHUNK):
                if local % KEYS_AHEAD == 0:  # the next stretch of keys is read while this one is decoded
                    segment.prefetch_keys(local and local + KEYS_AHEAD, local + 2 * KEYS_AHEAD)
                yield self.keys_between(first + local, first + min(local + KEY_CHUNK, segment.count))
            first += segment.count

    def values(self) -> collections.abc.ValuesView[np.ndarray]:
        """The vectors in row order, read by row: no lookup per key (so none a damaged index could fail)."""
        return _ValuesByRow(self)

    def items(self) -> collections.abc.ItemsView[str, np.ndarray]:
        """``(key, vector)`` pairs in row order, read by row."""
        return _ItemsByRow(self)

    # -- reading rows in bulk -----------------------------------------------------------------------

    def _layout(self) -> Layout:
        """Where the rows are in the bulk mappings (built once: it maps every part)."""
        if self._layout_cache is None:
            self._require_open()
            self._layout_cache = self._layout_of(self.files)
        return self._layout_cache

    def _layout_of(self, files: Sequence[MappedFile]) -> Layout:
        """Where the rows are in the bulk mappings of ``files`` (this dataset's, in row order)."""
        matrices = [p.matrix for p in files]
        bases = np.array([m.ctypes.data for m in matrices], np.uintp)
        return Layout(bases, np.array(self._row_starts, np.uint64), self.dim * self.dtype.itemsize, matrices)

    def _epoch_reads(self) -> tuple[Layout, Fetch | None]:
        """Where an epoch gathers its batches from, and what it must first call with the record ranges
        ``(lo, hi)`` of each window: nothing here, every record is at hand (a dataset at a URL fetches them)."""
        return self._layout(), None

    def _reading(self, rows: np.ndarray, windows: Sequence[str] = ()) -> contextlib.AbstractContextManager[Layout]:
        """Where to gather the records at ``rows`` from, while they are read: at hand here (a dataset at a URL
        fetches them, as a batch of the map-style epoch's ``windows`` or as a lookup)."""
        return contextlib.nullcontext(self._layout())

    def _read_ahead(self) -> WindowReader:
        """A reader of the windows a map-style epoch reads next, on a thread of this process."""
        return ReadAhead(self._layout())

    def _direct_parts(self) -> list[tuple[str, int, int, int]]:
        """Each file's ``(path, records offset, first row, rows)``, for reads around the mapping."""
        return [
            (p.path, p.header.records_offset, int(first), int(last - first))
            for p, first, last in zip(self.files, self._row_starts, self._row_starts[1:])
        ]

    def take(self, rows: Sequence[int] | np.ndarray, pad: bool = True) -> Any:
        """A new ``(len(rows), dim)`` array of the records at ``rows`` (ints), in that order.

        Of a ragged dataset, padded or packed as :meth:`get_batch` says for ``pad``.
        """
        self._require_open()
        rows = self._row_numbers(rows)
        if self.ragged:
            return self._gather_ragged(rows, pad)
        out = np.empty((len(rows), self.dim), self.dtype)
        self._layout().gather_random(rows, out)
        return out

    # -- ragged records (per-residue embeddings) ----------------------------------------------------

    def lengths(self, keys: Sequence[str] | None = None) -> np.ndarray:
        """Rows of each record (of ``keys``, else of every record in row order), as int64: of a ragged
        dataset the records' own lengths, else ones."""
        self._require_open()
        if keys is not None:
            rows = self.rows(keys).view(np.uint64)
            return self._extents(rows)[1].view(np.int64) if self.ragged else np.ones(len(rows), np.int64)
        if not self.ragged:
            return np.ones(len(self), np.int64)
        return np.concatenate([np.diff(p.ranges().astype(np.int64)) for p in self.files])

    def ragged_chunks(self, rows: int) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """``(lo, hi, block, offsets)`` for consecutive records ``[lo, hi)`` of about ``rows`` rows in all (a
        longer record alone), none across two files: ``block`` a read-only view of their rows, record ``lo + i``
        being ``block[offsets[i]:offsets[i + 1]]``.  For passes over every row (pooling, exports)."""
        self._require_open()
        for part, first in zip(self.files, self._starts):
            ranges = part.ranges().astype(np.int64) if part.ragged else np.arange(part.count + 1)
            matrix, lo = part.matrix, 0
            while lo < part.count:
                hi = max(lo + 1, int(np.searchsorted(ranges, ranges[lo] + rows, "right")) - 1)
                hi = min(hi, part.count)
                offsets = ranges[lo : hi + 1] - ranges[lo]
                if offsets[-1] > len(matrix) - ranges[lo] or (np.diff(offsets) <= 0).any():
                    raise errors.CorruptFileError(f"{part.path}: ranges of records {lo}-{hi} are out of order")
                yield first + lo, first + hi, matrix[ranges[lo] : ranges[hi]], offsets
                lo = hi

    def pool(
        self, how: str = "mean", out: str | os.PathLike[str] | None = None, dtype: object = None, **options: Any
    ) -> Any:
        """One vector per record, pooled over its rows: ``"mean"``, ``"max"``, ``"first"`` or ``"last"``.

        With ``out``, written there as a per-protein .emb file (its metadata the user's and ``"pooling"``),
        else returned as a new ``(n, dim)`` array in row order.  ``dtype`` defaults to the stored one (a mean
        of integers to float32); a mean is summed in float64.
        ``options`` go to :class:`~embfile.Writer`.
        """
        self._require_open()
        if how not in POOLINGS:
            raise ValueError(f"pool must be one of {', '.join(map(repr, POOLINGS))}, not {how!r}")
        out_dtype = np.dtype(np.float32) if how == "mean" and self.dtype.kind in "iu" else self.dtype
        if dtype is not None:
            out_dtype = F.disk_dtype(dtype)
        step = max(1, (64 << 20) // (self.dim * self.dtype.itemsize))
        if out is None:
            result = np.empty((len(self), self.dim), out_dtype)
            for lo, hi, block, offsets in self.ragged_chunks(step):
                result[lo:hi] = pool_rows(block, offsets, how)
            return result
        meta = {k: v for k, v in self.metadata.items() if k != "embfile"}
        with Writer(out, self.dim, out_dtype, {**meta, "pooling": how}, **options) as w:
            for lo, hi, block, offsets in self.ragged_chunks(step):
                w.add_batch(self.keys_between(lo, hi), pool_rows(block, offsets, how))
        return None

    def keys_at(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """The keys of the records at ``rows`` (ints), in that order."""
        return super().keys_at(self._row_numbers(rows, "keys_at()"))

    def _row_numbers(self, rows: Sequence[int] | np.ndarray, caller: str = "take()") -> np.ndarray:
        """``rows`` as uint64 row numbers, or the TypeError / IndexError that says what is wrong with them."""
        rows = np.asarray(rows)
        if rows.ndim != 1 or not (rows.dtype.kind in "iu" or rows.size == 0):
            raise TypeError(f"{caller} needs a 1-d sequence of row numbers, not {rows.dtype} {rows.shape}")
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows must be from 0 to {len(self) - 1}")
        return rows.astype(np.uint64, copy=False)

    def to_numpy(self) -> Any:
        """All vectors as a new in-memory ``(n, dim)`` array, in row order (of a ragged dataset, all rows
        packed and ``n + 1`` offsets, as ``get_batch(keys, pad=False)``).

        Read with large ``pread`` calls, at the disk's sequential speed on a cold file (copying
        ``db.matrix`` faults its pages in a little at a time).  When the records are mostly in the page
        cache already, a helper thread also faults in the new array's pages ahead of the copy.  The
        array's data starts on a page boundary.
        """
        self._require_open()
        out = aligned_empty((self._row_starts[-1], self.dim), self.dtype)
        with faulted_in_ahead(out) if self._layout().first_part_cached() else contextlib.nullcontext():
            for part, lo, hi in zip(self.files, self._row_starts, self._row_starts[1:]):
                part.read_into(out[lo:hi])
        if self.ragged:
            return out, np.concatenate([[0], np.cumsum(self.lengths())])
        return out

    def chunks(self, rows: int, release: bool = True) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(lo, hi, block)`` for consecutive row ranges of at most ``rows`` rows, ``block`` a read-only
        view of rows ``[lo, hi)``, for exports.

        With ``release`` (the default) each range's pages leave this process's memory once the next is asked
        for (they stay in the page cache), so a pass over a dataset larger than RAM keeps a bounded resident
        size; without, they stay mapped, for passes repeated over data that fits (a search).
        """
        self._refuse_ragged("chunks() reads one row per record", "ragged_chunks() reads their rows")
        layout = self._layout()
        for part, first, last in zip(self.files, self._starts, self._starts[1:]):
            matrix = part.matrix
            for lo in range(first, last, rows):
                hi = min(lo + rows, last)
                yield lo, hi, matrix[lo - first : hi - first]
                if release:
                    layout.advise(lo, hi, mmap.MADV_DONTNEED)

    def slices(self, rows: int, runs: Iterable[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
        """Ranges ``[lo, hi)`` of records, of at most ``rows`` rows each (of ragged records, about that many, cut
        between records) and none across two files, that cover the dataset, or the ``runs`` of records given:
        the partitions of a Spark or Dask read."""
        lengths = self.lengths() if self.ragged else None
        files = list(zip(self._starts, self._starts[1:]))
        out = []
        for lo, hi in files if runs is None else runs:
            for first, last in files[bisect.bisect_right(self._starts, lo) - 1 :]:  # the run cut at files' ends
                a, b = max(lo, first), min(hi, last)
                if a >= hi:
                    break
                cuts = range(0, b - a, rows) if lengths is None else record_cuts(lengths[a:b], rows)
                edges = [*(a + c for c in cuts), b]
                out += [(x, y) for x, y in zip(edges, edges[1:]) if x < y]
        return out

    def read_parts(self, rows: int, runs: Iterable[tuple[int, int]] | None = None) -> list[ReadPart]:
        """:meth:`slices` as the tasks of an engine's read, each of the one file holding it; at least one (of no
        records, an empty one)."""
        parts = []
        for lo, hi in self.slices(rows, runs) or [(0, 0)]:
            i = bisect.bisect_right(self._starts, lo) - 1 if hi > lo else 0
            f, first = self.files[i], self._starts[i]
            parts.append(ReadPart(self._file_location(i), lo - first, hi - first, f.count, f.stored_crc("keys")))
        return parts

    def _file_location(self, i: int) -> str:
        """Where ``files[i]`` is, for another process to open it."""
        return os.path.abspath(self.files[i].path)

    @staticmethod
    def _open_part(part: ReadPart, storage_options: dict[str, Any] | None) -> Dataset:
        """The file of ``part`` opened alone, checked (:func:`checked_part`); a dataset at a URL has its own."""
        return checked_part(EmbFile(part.path), part)

    def _storage_options(self) -> dict[str, Any] | None:
        """What a task needs to open this dataset's files (a URL's fsspec options)."""
        return None

    def to_dask_array(self) -> Any:
        """The vectors as an ``(n, dim)`` Dask Array chunked along the files (and slices of about 128 MiB).

        Its graph holds where each chunk's rows are (:meth:`read_parts`), never the data: a task opens the one
        file its chunk is in and reads the rows (at a URL, the checksum blocks holding them, checked).  Needs
        dask (``pip install "embfile[dask]"``).
        """
        da = require("dask.array", "dask")
        delayed = require("dask", "dask").delayed
        self._refuse_ragged("an array holds one vector per key", "db.pool('mean', out=...) makes them")
        parts = self.read_parts(max(1, (128 << 20) // (self.dim * self.dtype.itemsize)))
        read = delayed(_part_rows, pure=True)
        options = self._storage_options()
        return da.concatenate(
            [
                da.from_delayed(read(self._open_part, part, options), (part.hi - part.lo, self.dim), self.dtype)
                for part in parts
            ]
        )

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        """What identifies the contents: the path, the version and the files (never changed in place)."""
        return (
            type(self).__name__,
            self.path,
            self.version,
            *((f.path, f.count, f.stored_crc("keys")) for f in self.files),
        )

    def search(
        self,
        queries: Any,
        k: int = 10,
        metric: str = "cosine",
        exclude: Iterable[str] | None = None,
        pool: str | None = None,
        query_keys: Sequence[str] | None = None,
        among: Iterable[str] | None = None,
        dims: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` stored vectors nearest each query, exactly: ``(scores, keys)``, best first.

        ``queries`` is one vector ``(dim,)`` (then both results are ``(k,)``) or ``(Q, dim)`` (then ``(Q, k)``).
        ``metric``: ``"cosine"`` and ``"ip"`` give similarities (highest first), ``"l2"`` Euclidean distances
        (smallest first), ``"hamming"`` the bits that differ (smallest first), for records of packed bits
        (uint8 or int8, as ``np.packbits`` and embedding models' binary quantization give them) and queries
        packed alike; equal scores come in row order.  ``exclude``: keys never returned.  ``query_keys``:
        the key each query stands for, its own record (where stored) left out of its hits, as
        :meth:`search_keys` leaves it out (queries from another file of the same proteins).  ``among``: the keys
        of the only records searched (the annotated proteins, one species' records; each must be stored),
        gathered a block at a time.  ``dims``: compare the leading ``dims`` values of each record alone (of
        packed bits, bytes), the prefix that Matryoshka embeddings (OpenAI's text-embedding-3, nomic-embed, ...)
        train to stand for the whole; queries of the whole length are cut to it, and the cosine is of the
        prefixes.  Fewer than ``k`` results if the dataset (or ``among``) holds fewer.  A record holding NaN
        scores NaN and ranks last; a query holding NaN or infinity is a ``ValueError`` (it would score every
        record alike); a zero vector has cosine similarity 0.  A streaming scan of the mapping: memory stays
        flat.

        ``pool``, for a ragged dataset (and only there): how a record's rows make the one vector compared,
        ``"mean"``, ``"max"``, ``"first"`` or ``"last"``, in float32, pooled as the scan reaches the records:
        every search reads every row, so for many searches write the pooled file once with :meth:`pool`.
        """
        self._require_open()
        searched = self._searched(pool, "search()")
        own = None if query_keys is None else searched.find_rows(key_list(query_keys, "query_keys"))
        return search.search(searched, queries, k, metric, exclude, own, among, dims)

    def search_keys(
        self,
        keys: Sequence[str],
        k: int = 10,
        metric: str = "cosine",
        exclude_self: bool = True,
        pool: str | None = None,
        among: Iterable[str] | None = None,
        dims: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` with the stored vectors of ``keys`` as queries, each key's own record left out
        (by identity: an equal vector under another key is still found); ``pool``, ``among`` and ``dims`` as
        there."""
        self._require_open()
        searched = self._searched(pool, "search_keys()")
        return search.search_keys(searched, keys, k, metric, exclude_self, among, dims)

    def _searched(self, pool: str | None, what: str) -> Any:
        """What a search reads: the dataset, or for a ragged one its records pooled ``pool``."""
        if not self.ragged:
            if pool is not None:
                raise ValueError(
                    f"{self.path or 'this dataset'} has one vector per key; pool= is for per-residue (ragged) records"
                )
            return self
        if pool is None:
            raise self._ragged_error(
                f"{what} compares one vector per record", "pass pool='mean' (or 'max', 'first', 'last')"
            )
        return search.Pooled(self, pool)

    def iter_batches(
        self,
        batch_size: int | None = None,
        *,
        transform: Callable[[Any], Any] | None = None,
        targets: Any = None,
        **options: Any,
    ) -> Batches:
        """Batches of one epoch: every record once, in a block-shuffled order.

        Yields ``(keys, matrix)`` (``matrix`` alone with ``keys=False``; with ``targets``, theirs after it),
        ``matrix`` a new ``(b, dim)`` array passed through ``transform`` if given.  Blocks of ``block_size``
        consecutive records (default: about 1 MiB) are shuffled, and each window of ``buffer_blocks`` blocks
        is shuffled as a whole, so reads stay sequential while batches mix records from all over the dataset.
        The order depends only on ``(seed, epoch)``; without ``shuffle`` it is row order.  ``rank`` of
        ``world_size`` reads its own part (every record once across ranks; with ``drop_last`` every rank
        gets the same number of whole batches).

        Parameters
        ----------
        batch_size : int, optional
            Records per batch (default 100); with a ``token_budget``, at most this many (default: no limit).
        transform : callable, optional
            Applied to each batch.
        targets : dict or array_like, optional
            What to train on (labels): one number, or one array of a shape all share, per record, as a mapping
            from key or in row order (of per-residue records, or one per residue); each batch then has its
            records' targets after the vectors, batched as they are.
        **options
            Any other field of :class:`~embfile.epochs.EpochOptions`: ``shuffle``, ``seed``, ``epoch``,
            ``block_size``, ``buffer_blocks``, ``rank``, ``world_size``, ``drop_last``, ``keys``, and of
            per-residue records ``unit``, ``token_budget``, ``pad``.

        Returns
        -------
        Batches
            An iterator with ``len`` and ``state_dict()`` / ``load_state_dict()`` for resuming.

        Examples
        --------
        >>> for keys, x in db.iter_batches(256, seed=1, epoch=e):   # doctest: +SKIP
        ...     loss = model(torch.from_numpy(x))
        """
        self._require_attached()  # at a URL an epoch fetches its windows as it goes: no download
        refuse_unknown(options, OPTIONS, "iter_batches()")
        lengths = self.lengths() if self.ragged and targets is not None else None
        aligned = None if targets is None else aligned_targets(targets, self.keys(), lengths)
        return Batches(self, EpochOptions(batch_size, **options), transform=transform, targets=aligned)

    def to_arrow(self, key_column: str = "key", vector_column: str = "vector") -> Any:
        """A ``pyarrow.Table`` of ``(key: large_string, vector: fixed_size_list<dtype>[dim])``, not null; of
        ragged records ``vector: large_list<fixed_size_list<dtype>[dim]>``.

        It shares memory with the mapped files (the keys section has Arrow's ``large_string`` layout, the
        records its ``fixed_size_list`` layout and the ranges ``large_list`` offsets): nothing is copied, and
        the table stays valid after :meth:`close`.  Arrow trusts the offsets and the UTF-8 of what it is
        given, so they are checked first, Arrow's full validation reading every offset and key once (a
        damaged file: :class:`CorruptFileError`).  One record batch per file.  Needs pyarrow
        (``pip install "embfile[parquet]"``).
        """
        self._require_open()
        return self._arrow(self.files, key_column, vector_column)

    def _arrow_rows(self, lo: int, hi: int) -> Any:
        """Rows ``[lo, hi)`` as :meth:`to_arrow` gives them, made of (and checking) only the files that hold
        them: a read task of an engine, whose partition is a slice of one file, costs that file alone."""
        if hi <= lo:  # a schema: no file need be read
            return self._arrow([])
        self._require_open()
        first, last = self._files_holding(lo, hi)
        return self._arrow(self.files[first:last]).slice(lo - self._starts[first], hi - lo)

    def fetch_records(self, lo: int, hi: int) -> None:
        """Have records ``[lo, hi)`` at hand: nothing to do for local files (a dataset at a URL fetches them)."""

    def _files_holding(self, lo: int, hi: int) -> tuple[int, int]:
        """The files (``files[first:last]``) holding records ``[lo, hi)``, at least one."""
        first = bisect.bisect_right(self._starts, lo) - 1
        return first, max(first + 1, bisect.bisect_left(self._starts, hi))

    def _arrow(self, files: Sequence[MappedFile], key_column: str = "key", vector_column: str = "vector") -> Any:
        """:meth:`to_arrow` of ``files`` (of this dataset's, open), one record batch each."""
        pa = require("pyarrow", "parquet")
        if self.dtype.name == "bfloat16":
            raise errors.ConversionError(
                f"{self.path}: Arrow has no bfloat16 type; export a float32 copy (convert with dtype='float32')"
            )
        value_type = pa.from_numpy_dtype(self.dtype)
        list_type = pa.list_(pa.field("item", value_type, nullable=False), self.dim)
        column_type = pa.large_list(pa.field("item", list_type, nullable=False)) if self.ragged else list_type
        schema = pa.schema(
            [
                pa.field(key_column, pa.large_string(), nullable=False),
                pa.field(vector_column, column_type, nullable=False),
            ],
            metadata={ARROW_METADATA_KEY: json.dumps(self.metadata, ensure_ascii=False)},
        )
        batches = []
        for part in files:
            h, n = part.header, part.count
            mapped = pa.py_buffer(part.mappings()[1])
            offsets = mapped.slice(h.keys_offset, 8 * (n + 1))
            keys = pa.LargeStringArray.from_buffers(n, offsets, mapped.slice(h.keys_offset + 8 * (n + 1)))
            values = pa.Array.from_buffers(
                value_type, h.n_rows * self.dim, [None, mapped.slice(h.records_offset, h.records_size)]
            )
            vectors = pa.FixedSizeListArray.from_arrays(values, type=list_type)
            if h.ragged:  # u64 row offsets, read as Arrow's int64 ones (below 2**63: the file's rows fit)
                ranges = mapped.slice(h.ranges_offset, h.ranges_size)
                vectors = pa.Array.from_buffers(column_type, n, [None, ranges], children=[vectors])
            batch = pa.RecordBatch.from_arrays([keys, vectors], schema=schema)
            try:
                batch.validate(full=True)
            except pa.ArrowInvalid as e:
                raise errors.CorruptFileError(f"{part.path}: keys or ranges section damaged: {e}") from None
            batches.append(batch)
        return pa.Table.from_batches(batches, schema=schema)

    # -- the files ----------------------------------------------------------------------------------

    @property
    def metadata(self) -> dict[str, Any]:
        """The metadata object, a dict of the writer's record under ``"embfile"`` and the user's keys (of the
        first file, for a sharded dataset: every shard a writer makes has the same user keys)."""
        self._require_open()
        return self.files[0].metadata

    def verify(self) -> None:
        """Check every checksum and index, reading everything once; raise :class:`ChecksumError` naming
        each damaged part.  Returns ``None`` when everything holds."""
        self._require_open()
        if self.files == self._segments and len(self.files) == 1:
            problems = self.files[0].problems()
            if problems:
                raise errors.ChecksumError(f"{self.files[0].path}: " + "; ".join(problems), problems)
            return
        problems = [f"{f.path}: {p}" for f in [*self.files, *self._segments] for p in f.problems()]
        problems += self._consistency_problems()
        if problems:
            raise errors.ChecksumError("; ".join(problems), problems)

    def _consistency_problems(self) -> list[str]:
        """What does not fit between the files (for datasets of several)."""
        return []

    def close(self) -> None:
        """Release the files.  Arrays already returned stay valid.  Closing twice is fine."""
        self._detach()
        for f in [*self.files, *self._segments]:
            f.close()
        self._layout_cache = None

    def _refuse_ragged(self, what: str, instead: str) -> None:
        if self.ragged:
            raise self._ragged_error(what, instead)

    def _ragged_error(self, what: str, instead: str) -> TypeError:
        return TypeError(f"{self.path or 'this dataset'} holds per-residue (ragged) records; {what}: {instead}")

    def _require_open(self) -> None:
        """Before a read of every record (a dataset at a URL first downloads its files)."""
        self._require_attached()

    def _require_attached(self) -> None:
        if not self.files or self.files[0].closed:
            raise errors.ClosedFileError(f"{self.path or 'dataset'}: operation on a closed {type(self).__name__}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        if not self.files or self.files[0].closed:
            state = "closed"
        else:
            state = f"{len(self)} x {self.dim} {self.dtype.name}"
            if len(self.files) > 1:
                state += f" in {len(self.files)} files"
        return f"<{type(self).__name__} {self.path!r}: {state}>"


class EmbFile(Dataset):
    """One .emb file as a dataset (see :class:`Dataset`): the file holds its own keys and records.

    Parameters
    ----------
    path : str or os.PathLike
        The file to open.

    Raises
    ------
    FormatError
        If the file is not a readable .emb file (with a subclass saying why).
    OSError
        If the file cannot be opened.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        file = MappedFile(path)
        try:
            self._open_files(file, [file], file.path)
        except BaseException:
            file.close()
            raise

    @property
    def header(self) -> Header:
        """The file's header (:class:`embfile._format.Header`): format version, sections, sizes."""
        return self.files[0].header

    @property
    def matrix(self) -> np.ndarray:
        """All vectors as a read-only ``(n, dim)`` view, in row order."""
        self._require_open()
        return self.files[0].matrix

    def __reduce__(self) -> tuple[Any, ...]:
        return (EmbFile, (self.path,))


def checked_part(ds: Dataset, part: ReadPart) -> Dataset:
    """``ds``, the file of ``part`` opened alone, if it is the file the read was planned with (else closed)."""
    try:
        f = ds.files[0]
        if (f.count, f.stored_crc("keys")) != (part.count, part.keys_crc):
            raise errors.ShardError(
                f"{part.path} is not the file the read was planned with ({f.count} records, keys CRC "
                f"{f.stored_crc('keys'):#x}; planned {part.count} and {part.keys_crc:#x}): it was replaced"
            )
    except BaseException:
        ds.close()
        raise
    return ds


def _part_rows(
    open_part: Callable[[ReadPart, dict[str, Any] | None], Dataset], part: ReadPart, options: dict[str, Any] | None
) -> np.ndarray:
    """A chunk of :meth:`Dataset.to_dask_array`: the records of ``part``, read from its file alone."""
    with open_part(part, options) as ds:
        ds.fetch_records(part.lo, part.hi)
        rows: np.ndarray = ds.take(np.arange(part.lo, part.hi))
        return rows


class _ValuesByRow(collections.abc.ValuesView[np.ndarray]):
    _mapping: Dataset

    def __iter__(self) -> Iterator[np.ndarray]:
        for row in range(len(self._mapping)):
            yield self._mapping.record(row)


class _ItemsByRow(collections.abc.ItemsView[str, np.ndarray]):
    _mapping: Dataset

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for row, key in enumerate(self._mapping):
            yield key, self._mapping.record(row)

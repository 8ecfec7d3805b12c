"""The versioned dataset folder: manifests, the commit that publishes one, and finding the latest.

A dataset is a folder of immutable .emb files plus one manifest per version (FORMAT.md "Versioned datasets"),
and tags that name versions.
A commit creates the manifest of the next version with a hard link, which fails if the name exists: of two
committers exactly one wins, on any POSIX file system, without locks.  Readers never list the folder; files
that no manifest names are invisible.

Every operation that writes into a dataset is a :class:`Transaction`: it holds an ``flock`` on its own folder
in ``_embfile/staging/`` for as long as it runs, and names every file it writes after that folder (its
*token*).  The kernel drops the lock when the process dies, however it dies, so the next operation can tell
the files of a killed one (unlocked token, named by no version) from those of a live one, and removes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import posixpath
import re
import secrets
import shutil
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Any

from embfile import errors
from embfile._format import NEW_DTYPES
from embfile._staging import Staging, fsync_path, lock

FORMAT = "embfile-dataset"
FORMAT_VERSION = (1, 1)  # 1.1: "ragged", and dtype "bfloat16"
FIXED_FORMAT_VERSION = (1, 0)  # a dataset without either: what every 1.x reader reads
META = "_embfile"
SHARDS = "shards"
INDEX = f"{META}/index"
VERSIONS = f"{META}/versions"
LATEST = f"{META}/LATEST"
STAGING = f"{META}/staging"
TAGS = f"{META}/tags"
TAG_LIST = f"{META}/tags.json"  # a hint of every tag, for readers that cannot list a folder (plain http)
TAG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # not all digits: a version's number is that


def is_versioned(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is in the versioned layout (as against 0.1's ``part-*.emb`` + ``_index.emb``)."""
    return os.path.isdir(os.path.join(folder, META))


def not_versioned(folder: str | os.PathLike[str]) -> errors.ShardError:
    """The error for a path that is not a versioned dataset folder, saying what it is instead."""
    return errors.ShardError(f"{os.fspath(folder)}: not a versioned dataset: {_what_is(folder)}")


def nothing_to_append_to(folder: str | os.PathLike[str]) -> errors.WriterError:
    """The error for an append to a path that is not a versioned dataset folder, saying what it is instead."""
    return errors.WriterError(
        f"{os.fspath(folder)}: no dataset to append to: {_what_is(folder)} (write_shards or embfile merge make one)"
    )


def _what_is(path: str | os.PathLike[str]) -> str:
    """What a path that is not a versioned dataset folder is, for an error saying so."""
    if not os.path.exists(path):
        return "nothing there"
    if not os.path.isdir(path):
        return "a file, not a folder"
    if any(name.endswith(".emb") for name in os.listdir(path)):
        return "a folder in 0.1's layout (embfile shard writes it anew)"
    return "no version in it"


def unique_name(prefix: str = "") -> str:
    """A file name no other writer will choose: ``PREFIX`` and 16 random hex digits."""
    return f"{prefix}{secrets.token_hex(8)}"


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One file a manifest names: its path in the folder, its record count and its stored keys CRC; for a
    key-index segment also the dataset rows ``[lo, hi)`` it covers."""

    path: str
    count: int
    keys_crc: int
    rows: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "count": self.count, "keys_crc": self.keys_crc}
        if self.rows is not None:
            out["rows"] = list(self.rows)
        return out


@dataclasses.dataclass(frozen=True)
class Manifest:
    """One version of a dataset: the files it is made of and how it came to be."""

    version: int
    parent: int | None
    dim: int
    dtype: str
    count: int
    shards: tuple[FileEntry, ...]
    segments: tuple[FileEntry, ...]
    operation: dict[str, Any]
    metadata: dict[str, Any]
    created: str = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    )
    ragged: bool = False  # records of their own length (FORMAT.md "Ragged records"); manifest 1.1

    def successor(
        self, shards: Iterable[FileEntry], segments: Iterable[FileEntry], operation: dict[str, Any]
    ) -> Manifest:
        """The next version: these shards (the empty ones left out, unless all are) and segments (their rows
        placed one after another)."""
        shards = tuple(shards)
        shards = tuple(s for s in shards if s.count) or shards[:1]
        return Manifest(
            version=self.version + 1,
            parent=self.version,
            dim=self.dim,
            dtype=self.dtype,
            count=sum(s.count for s in shards),
            shards=shards,
            segments=placed(segments),
            operation=operation,
            metadata=self.metadata,
            ragged=self.ragged,
        )

    def files(self) -> set[str]:
        """The paths of every file this version needs."""
        return {e.path for e in (*self.shards, *self.segments)}

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "format_version": "{}.{}".format(
                *(FORMAT_VERSION if self.ragged or self.dtype in NEW_DTYPES else FIXED_FORMAT_VERSION)
            ),
            "version": self.version,
            "parent": self.parent,
            "created": self.created,
            "operation": self.operation,
            "dim": self.dim,
            "dtype": self.dtype,
            "count": self.count,
            **({"ragged": True} if self.ragged else {}),
            "metadata": self.metadata,
            "shards": [s.to_json() for s in self.shards],
            "segments": [s.to_json() for s in self.segments],
        }
        return (json.dumps(body, ensure_ascii=False, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """Parse and check a manifest read from ``where``; every problem is a :class:`CorruptFileError`."""

        def bad(what: str) -> errors.CorruptFileError:
            return errors.CorruptFileError(f"{where}: {what}")

        try:
            body = json.loads(data)
        except ValueError as e:
            raise bad(f"not valid JSON: {e}") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise bad("not an embfile dataset manifest")
        major = str(body.get("format_version", "")).split(".")[0]
        if major != str(FORMAT_VERSION[0]):
            raise errors.UnsupportedVersionError(
                f"{where}: dataset format {body.get('format_version')}; this embfile reads {FORMAT_VERSION[0]}.x"
            )
        try:
            manifest = cls(
                version=_int(body["version"], 1),
                parent=None if body["parent"] is None else _int(body["parent"], 1),
                created=str(body["created"]),
                operation=dict(body["operation"]),
                dim=_int(body["dim"], 1),
                dtype=str(body["dtype"]),
                count=_int(body["count"], 0),
                ragged=_bool(body.get("ragged", False)),
                metadata=dict(body["metadata"]),
                shards=tuple(_entry(e) for e in body["shards"]),
                segments=tuple(_entry(e, segment=True) for e in body["segments"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"malformed manifest ({type(e).__name__}: {e})") from None
        if sum(s.count for s in manifest.shards) != manifest.count:
            raise bad(f"its shards hold {sum(s.count for s in manifest.shards)} records, not {manifest.count}")
        if not manifest.shards:
            raise bad("it names no shards")
        if manifest.segments != placed(manifest.segments) or sum(s.count for s in manifest.segments) != manifest.count:
            raise bad("its key-index segments do not cover its rows one after another")
        return manifest


def placed(segments: Iterable[FileEntry]) -> tuple[FileEntry, ...]:
    """``segments`` with their ``rows`` set to cover the dataset's rows one after another, in order."""
    out, lo = [], 0
    for s in segments:
        out.append(dataclasses.replace(s, rows=(lo, lo + s.count)))
        lo += s.count
    return tuple(out)


def _int(value: object, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{value!r} is not an integer >= {low}")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def _entry(raw: Any, segment: bool = False) -> FileEntry:
    path = str(raw["path"])
    norm = posixpath.normpath(path)
    if path.startswith("/") or norm.startswith("..") or norm != path or "\\" in path or "\0" in path:
        raise ValueError(f"path {path!r} is not inside the folder")
    rows = None
    if segment:
        lo, hi = (_int(v, 0) for v in raw["rows"])
        rows = (lo, hi)
    return FileEntry(path, _int(raw["count"], 0), _int(raw["keys_crc"], 0), rows)


def version_path(folder: str | os.PathLike[str], version: int) -> str:
    return os.path.join(folder, VERSIONS, f"{version:020d}.json")


def latest_version(folder: str | os.PathLike[str]) -> int:
    """The number of the latest committed version: ``LATEST``'s hint, then the next numbers while they exist."""
    version = _latest(folder)
    if version == 0:
        raise errors.CorruptFileError(f"{os.fspath(folder)}: a dataset folder with no committed version")
    return version


def _latest(folder: str | os.PathLike[str]) -> int:
    """:func:`latest_version`, or 0 if none is committed yet."""
    try:
        with open(os.path.join(folder, LATEST), "rb") as f:
            hint = int(f.read(32).strip() or b"0")
    except (OSError, ValueError):
        hint = 0
    version = max(hint, 0)
    while os.path.exists(version_path(folder, version + 1)):
        version += 1
    if version and os.path.exists(version_path(folder, version)):
        return version
    listed = versions(folder)  # the hint names a version vacuum removed (or is damaged): list, only then
    if not listed:
        return 0
    version = listed[-1]
    while os.path.exists(version_path(folder, version + 1)):
        version += 1
    return version


def read_manifest(folder: str | os.PathLike[str], version: int | str | None = None) -> Manifest:
    """The manifest of ``version`` (a number, or a tag's name; default: the latest)."""
    if isinstance(version, str):
        version = tagged_version(folder, version)
    elif version is None:
        version = latest_version(folder)
    path = version_path(folder, version)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        present = versions(folder)
        raise errors.VersionNotFoundError(
            f"{os.fspath(folder)}: no version {version}; its versions are {_spans(present)}"
        ) from None
    manifest = Manifest.from_json(data, path)
    if manifest.version != version:
        raise errors.CorruptFileError(f"{path}: it says it is version {manifest.version}")
    return manifest


def _spans(numbers: Sequence[int]) -> str:
    """``1 to 3, 7``: runs of consecutive numbers (a vacuum keeps the newest versions and the tagged ones)."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a} to {b}" if a != b else f"{a}" for a, b in runs) or "none"


# -- tags: names of versions, kept by every vacuum ---------------------------------------------------------


def tag_name(name: object) -> str:
    """``name`` if it may name a tag (letters, digits, ``.``, ``_``, ``-``; not all digits), else a ValueError."""
    if not isinstance(name, str) or not TAG_NAME.fullmatch(name) or name.isdigit():
        raise ValueError(
            f"{name!r} cannot name a tag: up to 128 letters, digits, '.', '_' and '-', starting with a letter or a "
            "digit, and not all digits"
        )
    return name


def tag_of(file: str) -> str | None:
    """The tag a file of ``_embfile/tags/`` is, by its name (None: not a tag's file)."""
    stem, ext = os.path.splitext(file)
    return stem if ext == ".json" and TAG_NAME.fullmatch(stem) and not stem.isdigit() else None


def tag_path(folder: str | os.PathLike[str], name: str) -> str:
    return os.path.join(folder, TAGS, f"{tag_name(name)}.json")


def tag_json(version: int) -> bytes:
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return (json.dumps({"version": version, "created": created}) + "\n").encode()


def tag_list_json(found: dict[str, int]) -> bytes:
    return (json.dumps({"tags": dict(sorted(found.items()))}) + "\n").encode()


def tag_list(data: bytes, where: str) -> dict[str, int]:
    """The tags a ``tags.json`` hint names; anything else in it is a :class:`CorruptFileError`."""
    try:
        raw = json.loads(data)["tags"]
        return {tag_name(name): _int(version, 1) for name, version in raw.items()}
    except (ValueError, TypeError, KeyError, AttributeError, errors.CorruptFileError):
        raise errors.CorruptFileError(f"{where}: not a list of tags (a JSON object naming versions)") from None


def tag_version(data: bytes, where: str) -> int:
    """The version a tag file names; anything else in it is a :class:`CorruptFileError`."""
    try:
        raw = json.loads(data)
        return _int(raw["version"], 1)
    except (ValueError, TypeError, KeyError, errors.CorruptFileError):
        raise errors.CorruptFileError(f"{where}: not a tag (a JSON object naming a version)") from None


def tags(folder: str | os.PathLike[str]) -> dict[str, int]:
    """Every tag of the folder and the version it names, by name."""
    if not os.path.isdir(os.path.join(folder, VERSIONS)):
        raise not_versioned(folder)
    try:
        names = sorted(os.listdir(os.path.join(folder, TAGS)))
    except FileNotFoundError:
        return {}
    found = {}
    for file in names:
        name = tag_of(file)
        if name is not None:
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                with open(os.path.join(folder, TAGS, file), "rb") as f:
                    found[name] = tag_version(f.read(), os.path.join(folder, TAGS, file))
    return found


def tagged_version(folder: str | os.PathLike[str], name: str) -> int:
    """The version the tag ``name`` names."""
    path = tag_path(folder, name)
    try:
        with open(path, "rb") as f:
            return tag_version(f.read(), path)
    except FileNotFoundError:
        known = ", ".join(sorted(tags(folder))) or "none"
        raise errors.VersionNotFoundError(f"{os.fspath(folder)}: no tag {name!r}; its tags are {known}") from None


def tag(folder: str | os.PathLike[str], name: str, version: int | str | None = None, replace: bool = False) -> int:
    """Name ``version`` (default: the latest; a tag's name: the version it names) ``name``; returns its number.
    A tag naming another version is an error unless ``replace``."""
    path = tag_path(folder, name)
    number = read_manifest(folder, version).version  # the version is there
    os.makedirs(os.path.join(folder, TAGS), exist_ok=True)
    tmp = os.path.join(folder, TAGS, f".{unique_name()}.tmp")
    with open(tmp, "wb") as f:
        f.write(tag_json(number))
        f.flush()
        os.fsync(f.fileno())
    try:
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # create-if-absent, as a commit
            except FileExistsError:
                held = tagged_version(folder, name)
                if held != number:
                    raise ValueError(
                        f"{os.fspath(folder)}: tag {name!r} names version {held}; replace=True moves it"
                    ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_path(os.path.join(folder, TAGS))
    write_tag_list(folder)
    return number


def untag(folder: str | os.PathLike[str], name: str) -> None:
    """Remove the tag ``name`` (its version stays, until a vacuum removes it)."""
    try:
        os.unlink(tag_path(folder, name))
    except FileNotFoundError:
        tagged_version(folder, name)  # says there is no such tag
        raise
    fsync_path(os.path.join(folder, TAGS))
    write_tag_list(folder)


def write_tag_list(folder: str | os.PathLike[str]) -> None:
    """Write the ``tags.json`` hint from the tags there are (see :func:`settle_tag_list`)."""
    settle_tag_list(lambda: tags(folder), lambda data: _replace(folder, TAG_LIST, data))


def settle_tag_list(listing: Callable[[], dict[str, int]], write: Callable[[bytes], object]) -> None:
    """Write the tag list hint of the tags ``listing()`` finds, then list again, until two listings agree.  The
    last hint written, by whichever writer, was then listed after every tag change that writers finished (each
    lists after its own change): once they are done, it names every tag."""
    found = listing()
    while True:  # again only while others change tags: they finish
        write(tag_list_json(found))
        listed = listing()
        if listed == found:
            return
        found = listed


def commit(folder: str | os.PathLike[str], manifest: Manifest) -> None:
    """Publish ``manifest`` as version ``manifest.version``: the files it names are in place and fsynced.

    Raises :class:`CommitConflictError` if another writer committed that version first (nothing is changed
    then: the caller may rebuild its manifest on the new latest version and commit again).
    """
    versions = os.path.join(folder, VERSIONS)
    tmp = os.path.join(versions, f".{unique_name()}.tmp")
    with open(tmp, "wb") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, version_path(folder, manifest.version))  # create-if-absent: exactly one committer wins
    except FileExistsError:
        raise errors.CommitConflictError(
            f"{os.fspath(folder)}: version {manifest.version} was committed by another writer"
        ) from None
    finally:
        os.unlink(tmp)
    fsync_path(versions)
    write_latest(folder, manifest.version)


def write_latest(folder: str | os.PathLike[str], version: int) -> None:
    """Point ``LATEST`` at ``version`` (atomically: a reader sees the old hint or the new one)."""
    _replace(folder, LATEST, f"{version}\n".encode())


def _replace(folder: str | os.PathLike[str], name: str, data: bytes) -> None:
    """Replace the file ``name`` of the folder by one holding ``data``, atomically."""
    tmp = os.path.join(folder, META, f".{unique_name()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, name))
    fsync_path(os.path.join(folder, META))


def make_layout(folder: str | os.PathLike[str]) -> None:
    """Create the folders of an empty dataset in ``folder``."""
    for sub in (SHARDS, INDEX, VERSIONS, STAGING):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)


def versions(folder: str | os.PathLike[str]) -> list[int]:
    """The numbers of the versions in the folder (vacuum removes old ones), oldest first: a listing."""
    try:
        names = os.listdir(os.path.join(folder, VERSIONS))
    except (FileNotFoundError, NotADirectoryError):
        raise not_versioned(folder) from None
    found = []
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext == ".json" and stem.isdigit() and len(stem) == 20:
            found.append(int(stem))
    return sorted(found)


def history(folder: str | os.PathLike[str]) -> Sequence[Manifest]:
    """Every version still in the folder, oldest first."""
    return [read_manifest(folder, v) for v in versions(folder)]


_STAND_INS: dict[str, Callable[[str], None]] = {}  # folder -> how to fetch a committed file it lacks


@contextlib.contextmanager
def stand_in(folder: str, fetch: Callable[[str], None]) -> Iterator[None]:
    """Within the block, ``folder`` stands in for a dataset elsewhere (at a URL): it holds the latest manifest
    and some of its files, and ``fetch(name)`` brings the others there (whole) when a :class:`Transaction`
    on it reads them.  Operations run on it unchanged, and fetch only the files they read."""
    _STAND_INS[folder] = fetch
    try:
        yield
    finally:
        del _STAND_INS[folder]


class Transaction:
    """One operation on a dataset folder: a token for the files it writes, and the commit that publishes them.

    Opening one first removes what killed operations left (:func:`clean_leftovers`).  Files are written
    straight into ``shards/`` and ``_embfile/index/`` under names starting with the token (a reader sees none
    of them until a manifest names them).  :meth:`commit` builds the next manifest from the latest one and
    publishes it, again on a conflict; :meth:`close` (or leaving a ``with``) releases the token, removing the
    files of an operation that committed nothing.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = os.fspath(folder)
        self._fetch = _STAND_INS.get(self.folder)
        if not is_versioned(self.folder):
            raise not_versioned(self.folder)
        clean_leftovers(self.folder)
        self._staging = Staging(os.path.join(self.folder, STAGING, OPERATION), folder=True)
        self.token = _token(os.path.basename(self._staging.path))
        self._serial = 0
        self._attempt: list[str] = []  # files of the commit being tried (removed if it loses)
        self._unpublished: list[str] = []  # every file written and not yet named by a committed version

    def new_name(self, sub: str) -> str:
        """The folder-relative path of a new file in ``sub`` (``SHARDS`` or ``INDEX``), owned by this operation."""
        self._serial += 1
        name = f"{sub}/{self.token}-{self._serial:06d}.emb"
        self._attempt.append(name)
        self._unpublished.append(name)
        return name

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def committed(self, name: str) -> str:
        """The path to read the committed file ``name`` at.  In a folder standing in for a remote dataset
        (:func:`stand_in`), the file is fetched first: the stand-in holds only what its operation reads."""
        path = self.path(name)
        if self._fetch is not None and not os.path.exists(path):
            self._fetch(name)
        return path

    def commit(self, plan: Callable[[Manifest | None], Manifest | None]) -> Manifest | None:
        """Commit ``plan(latest)`` (``latest`` None in a folder with no version yet); if another writer commits
        first, call ``plan`` again on the new latest.  A plan returning None commits nothing (it returns
        ``latest``).

        Files ``plan`` makes (with :meth:`new_name`) are fsynced with their folders before the commit and
        removed if it loses.  Exceptions from ``plan`` (a duplicate key, say) propagate; nothing is committed.
        """
        while True:
            latest = _latest(self.folder)
            base = read_manifest(self.folder, latest) if latest else None
            self._attempt = []
            try:
                manifest = plan(base)
                if manifest is None:
                    self._remove(self._attempt)
                    return base
                for sub in (SHARDS, INDEX):
                    fsync_path(os.path.join(self.folder, sub))
                commit(self.folder, manifest)
            except BaseException as e:
                self._remove(self._attempt)
                if isinstance(e, errors.CommitConflictError):
                    continue
                raise
            self._unpublished = [n for n in self._unpublished if n not in manifest.files()]
            return manifest

    def forget(self, names: Iterable[str]) -> None:
        """Remove files this operation wrote that no version will name."""
        self._remove(list(names))

    def _remove(self, names: list[str]) -> None:
        for name in names:
            try:
                os.unlink(self.path(name))
            except FileNotFoundError:
                pass
        self._unpublished = [n for n in self._unpublished if n not in names]

    def close(self) -> None:
        """Release the token; files written and never committed are removed."""
        self._remove(self._unpublished)
        self._staging.discard()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


OPERATION = "op"  # a transaction's staging folder is _embfile/staging/.op.TOKEN.tmp
STALE_TEMPORARY = 3600.0  # seconds: a manifest's, tag's or hint's temporary file lives for the milliseconds of a write


def _token(staging_name: str) -> str:
    return staging_name[len(f".{OPERATION}.") : -len(".tmp")]


def clean_leftovers(folder: str | os.PathLike[str]) -> None:
    """Remove what killed operations left in a dataset folder: their staging folders, and the files of their
    tokens that no version names.  Files of live operations (their token still locked) are left alone."""
    folder = os.fspath(folder)
    staging = os.path.join(folder, STAGING)
    dead: dict[str, int] = {}  # token -> the lock held on its staging folder while its files go
    try:
        for name in os.listdir(staging):
            if name.startswith(f".{OPERATION}.") and name.endswith(".tmp"):
                fd = lock(os.path.join(staging, name))
                if fd is not None:
                    dead[_token(name)] = fd
        if not dead:
            return
        named = set().union(*(m.files() for m in history(folder)))
        for sub in (SHARDS, INDEX):
            for name in os.listdir(os.path.join(folder, sub)):
                path = f"{sub}/{name}"
                token = name.lstrip(".").split("-")[0]
                if token in dead and path not in named:
                    if os.path.isdir(os.path.join(folder, path)):  # a killed Writer's staging folder
                        shutil.rmtree(os.path.join(folder, path), ignore_errors=True)
                    else:
                        os.unlink(os.path.join(folder, path))
        for token in dead:
            shutil.rmtree(os.path.join(staging, f".{OPERATION}.{token}.tmp"), ignore_errors=True)
    finally:
        for fd in dead.values():
            os.close(fd)


def vacuum(folder: str | os.PathLike[str], keep: int = 1, grace: float = 86400.0) -> list[int]:
    """Remove versions older than the ``keep`` newest but the tagged ones, and the files no remaining version
    names.

    A version goes only once it has been superseded for ``grace`` seconds.  On a local file system a handle
    that is open keeps reading its files after they are removed (they stay mapped); the grace period is for
    handles that open a version again by number (pickled into DataLoader workers or DDP ranks) and for
    network file systems, where a removed file can fail a reader that mapped it.  Files of live operations
    are never touched, nor files no version names that are younger than ``grace`` (those of a Spark or Dask
    job still writing).  Returns the versions removed.
    """
    folder = os.fspath(folder)
    if not is_versioned(folder):
        raise not_versioned(folder)
    clean_leftovers(folder)
    now = time.time()
    gone = superseded(history(folder), keep, grace, now, set(tags(folder).values()))
    for version in gone:  # oldest first: what remains is always whole versions
        os.unlink(version_path(folder, version))
    fsync_path(os.path.join(folder, VERSIONS))
    # In this order, a file an operation is writing is either not listed yet or its token is still locked,
    # and one it committed since is named by a version read after.
    files = [f"{sub}/{n}" for sub in (SHARDS, INDEX) for n in os.listdir(os.path.join(folder, sub)) if n[0] != "."]
    staging = os.path.join(folder, STAGING)
    live = {_token(n) for n in os.listdir(staging) if _held(os.path.join(staging, n))}
    named = set().union(*(m.files() for m in history(folder)))
    for path in files:
        if path not in named and os.path.basename(path).split("-")[0] not in live:
            with contextlib.suppress(FileNotFoundError):  # another vacuum got there first
                if now - os.stat(os.path.join(folder, path)).st_mtime >= grace:
                    os.unlink(os.path.join(folder, path))
    for sub in (META, VERSIONS, TAGS):
        _remove_stale_temporaries(os.path.join(folder, sub), now)
    return gone


def _remove_stale_temporaries(path: str, now: float) -> None:
    """Remove the temporary files in ``path`` of writers killed between writing a manifest, tag or hint and
    linking it into place: those older than :data:`STALE_TEMPORARY`."""
    with contextlib.suppress(FileNotFoundError):  # no tags folder yet
        names = [n for n in os.listdir(path) if n[0] == "." and n.endswith(".tmp")]
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # another vacuum got there first
                if now - os.stat(os.path.join(path, name)).st_mtime >= STALE_TEMPORARY:
                    os.unlink(os.path.join(path, name))


def superseded(
    present: Sequence[Manifest], keep: int, grace: float, now: float, tagged: Collection[int] = ()
) -> list[int]:
    """The versions a vacuum removes of ``present`` (oldest first): the oldest ones beyond the ``keep``
    newest, each superseded for ``grace`` seconds, but the ``tagged`` ones."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    gone = []
    for old, newer in zip(present[:-keep], present[1:]):
        if now - datetime.datetime.fromisoformat(newer.created).timestamp() < grace:
            break
        if old.version not in tagged:
            gone.append(old.version)
    return gone


def _held(path: str) -> bool:
    """Whether a live process holds the lock on ``path``."""
    fd = lock(path)
    if fd is None:
        return True
    os.close(fd)
    return False

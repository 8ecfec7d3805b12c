"""The versioned dataset folder: manifests, the commit that publishes one, and finding the latest.

A dataset is a folder of immutable .emb files plus one manifest per version (FORMAT.md "Versioned datasets").
A commit creates the manifest of the next version with a hard link, which fails if the name exists: of two
committers exactly one wins, on any POSIX file system, without locks.  Readers never list the folder; files
that no manifest names are invisible.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import posixpath
import secrets
from collections.abc import Sequence
from typing import Any

from embfile import errors
from embfile._staging import fsync_path

FORMAT = "embfile-dataset"
FORMAT_VERSION = (1, 0)
META = "_embfile"
SHARDS = "shards"
INDEX = f"{META}/index"
VERSIONS = f"{META}/versions"
LATEST = f"{META}/LATEST"
STAGING = f"{META}/staging"


def is_versioned(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is in the versioned layout (as against 0.1's ``part-*.emb`` + ``_index.emb``)."""
    return os.path.isdir(os.path.join(folder, META))


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

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "format_version": "{}.{}".format(*FORMAT_VERSION),
            "version": self.version,
            "parent": self.parent,
            "created": self.created,
            "operation": self.operation,
            "dim": self.dim,
            "dtype": self.dtype,
            "count": self.count,
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
        return manifest


def _int(value: object, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{value!r} is not an integer >= {low}")
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
    try:
        with open(os.path.join(folder, LATEST), "rb") as f:
            hint = int(f.read(32).strip() or b"0")
    except (OSError, ValueError):
        hint = 0
    version = max(hint, 0)
    while os.path.exists(version_path(folder, version + 1)):
        version += 1
    if version == 0 or not os.path.exists(version_path(folder, version)):
        raise errors.CorruptFileError(f"{os.fspath(folder)}: a dataset folder with no committed version")
    return version


def read_manifest(folder: str | os.PathLike[str], version: int | None = None) -> Manifest:
    """The manifest of ``version`` (default: the latest)."""
    if version is None:
        version = latest_version(folder)
    path = version_path(folder, version)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        latest = latest_version(folder)
        raise errors.VersionNotFoundError(
            f"{os.fspath(folder)}: no version {version}; its versions are 1 to {latest}"
        ) from None
    manifest = Manifest.from_json(data, path)
    if manifest.version != version:
        raise errors.CorruptFileError(f"{path}: it says it is version {manifest.version}")
    return manifest


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
    path = os.path.join(folder, LATEST)
    tmp = os.path.join(folder, META, f".{unique_name()}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{version}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.join(folder, META))


def make_layout(folder: str | os.PathLike[str]) -> None:
    """Create the folders of an empty dataset in ``folder``."""
    for sub in (SHARDS, INDEX, VERSIONS, STAGING):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)


def history(folder: str | os.PathLike[str]) -> Sequence[Manifest]:
    """Every version still in the folder, oldest first."""
    out = []
    for v in range(1, latest_version(folder) + 1):
        if os.path.exists(version_path(folder, v)):
            out.append(read_manifest(folder, v))
    return out

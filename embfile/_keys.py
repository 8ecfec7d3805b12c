"""Keys as UTF-8 bytes back to back, the way an .emb keys section and an Arrow string array hold them."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class EncodedKeys:
    """Keys already encoded as UTF-8, back to back: key ``i`` is ``heap[offsets[i]:offsets[i + 1]]``.

    The layout of an .emb file's keys section and of an Arrow string array: a writer takes the bytes as they
    are, where a list of ``str`` costs a Python object and an encode per key.  The bytes must be valid UTF-8
    (as they are in both).  Slicing gives the keys of a range of rows; an index, one key as ``str``.
    """

    offsets: np.ndarray  # (n + 1,) int64, ascending; need not start at 0
    heap: np.ndarray  # uint8

    @classmethod
    def of_arrow(cls, array: Any) -> EncodedKeys:
        """The keys of an Arrow ``string`` or ``large_string`` array without nulls (no copy)."""
        width = np.int64 if str(array.type) in ("large_string", "large_utf8") else np.int32
        _, offsets, data = array.buffers()
        raw = np.frombuffer(offsets, width)[array.offset : array.offset + len(array) + 1]
        heap = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
        return cls(raw.astype(np.int64), heap)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @typing.overload
    def __getitem__(self, index: int) -> str: ...
    @typing.overload
    def __getitem__(self, index: slice) -> EncodedKeys: ...
    def __getitem__(self, index: int | slice) -> str | EncodedKeys:
        if isinstance(index, slice):
            lo, hi, _ = index.indices(len(self))
            return EncodedKeys(self.offsets[lo : max(lo, hi) + 1], self.heap)
        lo, hi = self.offsets[index : index + 2] if index >= 0 else self.offsets[index - 1 : index + 1 or None]
        return bytes(self.heap[lo:hi]).decode("utf-8", "replace")

    def tolist(self) -> list[str]:
        """The keys as ``str``."""
        return [self[i] for i in range(len(self))]


def key_list(keys: Iterable[str], what: str) -> list[str]:
    """``keys`` as a list; one ``str`` refused (its characters would pass for keys), ``what`` naming the
    argument in the message."""
    if isinstance(keys, (str, bytes)):
        raise TypeError(f"{what} takes an iterable of keys, not a single key")
    try:
        return keys.to_pylist() if hasattr(keys, "to_pylist") else list(keys)  # Arrow's items are its scalars
    except TypeError:
        raise TypeError(f"{what} takes an iterable of keys, not {type(keys).__name__}") from None

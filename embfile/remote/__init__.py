"""Datasets at a URL (``s3://``, ``gs://``, ``https://``, ``hdfs://``), read through fsspec and a local cache.

:func:`embfile.open` hands URLs here.  Lookups fetch only the index pages and records they need
(:mod:`embfile.remote.dataset`); bulk reads download whole files into the cache (:mod:`embfile.remote.cache`);
every request goes through :class:`~embfile.remote.store.Remote`, which retries what is transient and refuses
bytes that are not the ones asked for.  Needs ``pip install "embfile[remote]"``.
"""

from __future__ import annotations

import os
from typing import Any

from embfile.remote.cache import Cache
from embfile.remote.dataset import RemoteDataset
from embfile.remote.store import is_url


def prefetch(
    url: str,
    version: int | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_limit: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Download every file of the dataset at ``url`` into the cache ahead of use (those not there yet), each
    checked against its checksums; returns the cache folder.  ``embfile cache fetch URL`` does the same."""
    if not is_url(url):
        raise ValueError(f"{os.fspath(url)} is a local path: the cache holds datasets at a URL (s3://, https://...)")
    with RemoteDataset(url, version, cache_dir, cache_limit, storage_options) as db:
        db.download()
        return db.cache.root


__all__ = ["Cache", "RemoteDataset", "is_url", "prefetch"]

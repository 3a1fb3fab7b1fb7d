"""Blob store for job inputs and outputs, with a TTL on everything.

RQ job arguments carry keys; bytes live here. Redis is the default (one moving part); a shared
folder suits large outputs. Both sides open the store from the same :class:`Settings`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, cast

from redis import Redis

#: Downloads are sent in pieces of this size, so a gateway holds a piece or so per download, not a
#: whole result (a 16-megapixel PNG is tens of MB). 256 KiB: 32 downloads of a 10.8 MB result
#: peaked at +49 MB of gateway memory (+125 MB with 1 MiB pieces), equally fast
#: (benchmarks/download_memory.py).
CHUNK_BYTES = 1 << 18


class BlobGone(Exception):
    """The blob expired or was deleted while it was being streamed."""


class BlobStore(Protocol):
    def put(self, key: str, data: bytes, ttl_s: int) -> None: ...
    def get(self, key: str) -> bytes | None: ...
    def delete(self, *keys: str) -> None: ...
    def stream(self, key: str, chunk: int | None = None) -> tuple[int, Iterator[bytes]] | None:
        """``(size, pieces)`` of a blob, read ``chunk`` bytes (default CHUNK_BYTES) at a time; None if
        there is none."""
        ...


class RedisBlobStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def put(self, key: str, data: bytes, ttl_s: int) -> None:
        self.redis.set(key, data, ex=ttl_s)

    def get(self, key: str) -> bytes | None:
        return cast("bytes | None", self.redis.get(key))  # bytes: the store's clients never decode responses

    def delete(self, *keys: str) -> None:
        if keys:
            self.redis.delete(*keys)

    def stream(self, key: str, chunk: int | None = None) -> tuple[int, Iterator[bytes]] | None:
        size, chunk = self.redis.strlen(key), chunk or CHUNK_BYTES
        if not size:
            return None

        def pieces() -> Iterator[bytes]:
            for start in range(0, size, chunk):
                piece = cast(bytes, self.redis.getrange(key, start, min(start + chunk, size) - 1))  # not decoded
                if len(piece) != min(chunk, size - start):  # expired (or replaced) mid-download
                    raise BlobGone(key)
                yield piece

        return size, pieces()


class FileBlobStore:
    """Blobs as files named by a hash of the key; the expiry time is the file's mtime.

    Expired files read as missing and are removed by :meth:`sweep` (run by every worker's
    maintenance, every ``CTSR_MAINTENANCE_INTERVAL_S``).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.folder / hashlib.sha256(key.encode()).hexdigest()

    def put(self, key: str, data: bytes, ttl_s: int) -> None:
        path = self._path(key)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        expires = time.time() + ttl_s
        os.utime(tmp, (expires, expires))
        tmp.replace(path)

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            if path.stat().st_mtime < time.time():
                path.unlink(missing_ok=True)
                return None
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, *keys: str) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def stream(self, key: str, chunk: int | None = None) -> tuple[int, Iterator[bytes]] | None:
        try:
            file = self._path(key).open("rb")  # an open file stays readable if the sweep removes it
        except FileNotFoundError:
            return None
        stat = os.fstat(file.fileno())
        if stat.st_mtime < time.time():
            file.close()
            return None

        def pieces(chunk: int = chunk or CHUNK_BYTES) -> Iterator[bytes]:
            with file:
                while piece := file.read(chunk):
                    yield piece

        return stat.st_size, pieces()

    def sweep(self) -> int:
        """Remove expired blobs; returns how many."""
        now, removed = time.time(), 0
        for path in self.folder.iterdir():
            try:
                if path.stat().st_mtime < now - 60 or (path.suffix != ".tmp" and path.stat().st_mtime < now):
                    path.unlink(missing_ok=True)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


def open_blob_store(kind: str, redis: Redis, folder: Path | None) -> BlobStore:
    if kind == "file":
        if folder is None:
            raise ValueError("CTSR_BLOB_STORE=file needs CTSR_BLOB_DIR")
        return FileBlobStore(folder)
    return RedisBlobStore(redis)

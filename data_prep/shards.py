"""Deterministic, atomic WebDataset tar shards.

Same samples in the same order -> byte-identical shards: every tar header field that could
depend on the machine or the clock (mtime, uid/gid, user/group names, mode) is fixed, and the
format is plain ustar. A shard is written under a hidden ``.partial`` name and renamed to
``<prefix>-NNNNNN.tar`` only when complete, so an interrupted build never leaves a shard that
looks finished (and ``energon prepare``, which globs ``*.tar``, never sees a partial one).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

BLOCK = tarfile.BLOCKSIZE  # 512
FIXED_MTIME = 0
SHARD_PATTERN = "{prefix}-{index:06d}.tar"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str
    first_key: str
    last_key: str

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "samples": self.samples,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "first_key": self.first_key,
            "last_key": self.last_key,
        }


class _HashingFile:
    """A write-only file wrapper that hashes and counts what goes through it."""

    def __init__(self, raw):
        self._raw = raw
        self._sha = hashlib.sha256()
        self._pos = 0

    def write(self, data) -> int:
        self._raw.write(data)
        self._sha.update(data)
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._raw.flush()

    @property
    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def member_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = FIXED_MTIME
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def sample_tar_bytes(members: list[tuple[str, bytes]]) -> int:
    """Bytes a sample occupies inside a tar (headers plus data padded to 512)."""
    return sum(BLOCK + -(-len(data) // BLOCK) * BLOCK for _, data in members)


class ShardWriter:
    """Writes samples in order, starting a new shard when a limit would be crossed.

    A shard holds at most ``max_samples`` samples and at most ``max_bytes`` bytes, except that
    a single sample larger than ``max_bytes`` gets a shard of its own.
    """

    def __init__(
        self, directory: Path, prefix: str = "shard", max_samples: int = 10_000, max_bytes: int = 1 << 30
    ):
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("shard limits must be positive")
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._hasher: _HashingFile | None = None
        self._count = 0
        self._bytes = 0
        self._first_key = ""
        self._last_key = ""

    def _final_path(self, index: int) -> Path:
        return self.directory / SHARD_PATTERN.format(prefix=self.prefix, index=index)

    def _partial_path(self, index: int) -> Path:
        return self.directory / ("." + SHARD_PATTERN.format(prefix=self.prefix, index=index) + ".partial")

    def _open(self) -> None:
        index = len(self.shards)
        self._file = open(self._partial_path(index), "wb")
        self._hasher = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hasher, mode="w", format=tarfile.USTAR_FORMAT)
        self._count = 0
        self._bytes = 0

    def _finish(self) -> None:
        """Close the current shard, fsync it and give it its final name."""
        assert self._tar is not None and self._file is not None and self._hasher is not None
        index = len(self.shards)
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        size = self._hasher.tell()
        os.replace(self._partial_path(index), self._final_path(index))
        self.shards.append(
            ShardInfo(
                self._final_path(index).name,
                self._count,
                size,
                self._hasher.hexdigest,
                self._first_key,
                self._last_key,
            )
        )
        self._tar = self._file = self._hasher = None

    def write(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Append one sample; ``members`` are (suffix, data) pairs such as ("json", b"{...}")."""
        size = sample_tar_bytes(members)
        end_blocks = 2 * BLOCK
        if self._tar is not None and (
            self._count + 1 > self.max_samples or self._bytes + size + end_blocks > self.max_bytes
        ):
            self._finish()
        if self._tar is None:
            self._open()
            self._first_key = key
        assert self._tar is not None
        for suffix, data in members:
            self._tar.addfile(member_info(f"{key}.{suffix}", len(data)), io.BytesIO(data))
        self._count += 1
        self._bytes += size
        self._last_key = key

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (complete shards stay; the build has no manifest)."""
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._partial_path(len(self.shards)).unlink(missing_ok=True)
        self._tar = self._file = self._hasher = None

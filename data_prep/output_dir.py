"""The output directory's life cycle: refuse to clobber a build, clean up only what we own.

A build writes into an empty (or new) directory. If the directory already holds a build (or
the leftovers of an interrupted one) it refuses unless --overwrite, and even then it deletes
only names that data_prep writes; a directory holding anything else is refused outright,
because deleting a user's files on a mistyped --output is not recoverable.

``tokenizer/`` is special: the trainer looks for the tokenizer next to the shards by default, so a
user may put one there before building. A ``build`` never writes it, so it keeps it (with or
without --overwrite) and says so; ``synthetic`` writes its own tokenizer there, so for it the
directory is a build output like the shards (``keep=()``).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Collection
from pathlib import Path

OWNED_PATTERNS = (
    "*.tar",
    "*.tar.idx",
    ".*.partial",
    "manifest.json",
    "rejects.jsonl",
    ".nv-meta",
    "tokenizer",
    ".tokenizer.*",
)
# Names a build accepts in its output directory and leaves alone: the user's, not the build's.
USER_FILES = ("tokenizer",)


class OutputDirError(Exception):
    pass


def _owned(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OWNED_PATTERNS)


def _check_writable(path: Path) -> None:
    """Create and remove a file in ``path``: the only check that also holds for root, read-only
    mounts and immutable directories (os.access answers for permission bits alone)."""
    probe = path / f".write-check.{os.getpid()}.partial"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise OutputDirError(
            f"cannot write to {path} ({exc.strerror or exc}); choose a directory you can write to"
        ) from None


def prepare_output(path: Path, overwrite: bool, keep: Collection[str] = USER_FILES) -> list[str]:
    """Make ``path`` a writable directory ready for a build, or raise OutputDirError.

    Entries named in ``keep`` are left in place (not counted as a build, never deleted); their
    names are returned, so that the caller can say what it kept.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{path} exists and is not a directory; choose a directory for --output")
    if not path.exists():
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise OutputDirError(
                f"cannot create {path} ({exc.strerror or exc}); choose a directory you can write to"
            ) from None
        return []
    try:
        entries = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        raise OutputDirError(
            f"cannot list {path} ({exc.strerror or exc}); choose another directory"
        ) from None
    kept = [name for name in entries if name in keep]
    entries = [name for name in entries if name not in keep]
    foreign = [name for name in entries if not _owned(name)]
    if foreign:
        raise OutputDirError(
            f"{path} holds files data_prep did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); choose an empty or new directory"
        )
    if entries and not overwrite:
        raise OutputDirError(f"{path} already holds a data_prep build; pass --overwrite to replace it")
    _check_writable(path)
    for name in entries:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    return kept

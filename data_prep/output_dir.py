"""The output directory's life cycle: refuse to clobber a build, clean up only what we own.

A build writes into an empty (or new) directory. If the directory already holds a build (or
the leftovers of an interrupted one) it refuses unless --overwrite, and even then it deletes
only names that data_prep writes; a directory holding anything else is refused outright,
because deleting a user's files on a mistyped --output is not recoverable.
"""

from __future__ import annotations

import fnmatch
import shutil
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


class OutputDirError(Exception):
    pass


def _owned(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OWNED_PATTERNS)


def prepare_output(path: Path, overwrite: bool) -> None:
    """Make ``path`` an empty directory ready for a build, or raise OutputDirError."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{path} exists and is not a directory")
    if not path.exists():
        path.mkdir(parents=True)
        return
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    foreign = [name for name in entries if not _owned(name)]
    if foreign:
        raise OutputDirError(
            f"{path} holds files data_prep did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); choose an empty or new directory"
        )
    if not overwrite:
        raise OutputDirError(f"{path} already holds a data_prep build; pass --overwrite to replace it")
    for name in entries:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()

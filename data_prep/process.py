"""The per-record work done in worker processes: load images, process them, build the sample.

Pure with respect to its input: the same Item and options give the same bytes in any process,
which is what makes `--workers 1` and `--workers N` produce identical shards.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any

from data_prep.images import ImageOptions, StoredImage, max_image_file_bytes, process_image
from data_prep.records import ImageRef, Item, Rejected
from data_prep.rejects import Reject
from data_prep.schema import dumps, image_entry, image_member
from data_prep.tokenizer import text_segments


@dataclass(frozen=True)
class ProcessConfig:
    image: ImageOptions
    image_root: str | None = None  # image paths must resolve inside it (None: no file is read)
    tokenizer: str | None = None  # tokenizer dir for text-token counts


@dataclass
class Written:
    """A finished sample: tar members (suffix, bytes) plus the numbers the manifest aggregates."""

    index: int
    key: str
    kind: str
    members: list[tuple[str, bytes]]
    image_tokens: list[int]
    text_tokens: int | None
    text_chars: int
    input_bytes: int
    tag_inserted: bool


_config: ProcessConfig | None = None
_counter = None


def init_worker(config: ProcessConfig) -> None:
    """Per-process setup (also called in-process for --workers 1)."""
    global _config, _counter
    _config = config
    _counter = None
    if config.tokenizer:
        from data_prep.tokenizer import TextTokenCounter

        _counter = TextTokenCounter(config.tokenizer)


# Untrusted paths. Annotations are untrusted input, so a path they name is read only when it
# resolves (symlinks followed) to a regular file inside the image root: an absolute path, a '..'
# or a symlink that leaves the root is refused (``image_outside_root``) before anything outside is
# opened, with one message whatever is (or is not) there, so the report is no existence oracle.
# FIFOs, sockets and devices are refused (``not_a_regular_file``) from a stat, before any open
# (opening a FIFO blocks), and the open itself is non-blocking and re-checked with fstat, so a
# file swapped for a FIFO in between cannot hang the build. At most
# images.max_image_file_bytes() bytes (+1) are read. Directories keep their historical code,
# ``unreadable_image``. With no image root (image_root=None: the library default; the CLI always
# sets one, the first annotation file's directory) no image file is read at all: every path is
# refused as outside the root. Embedded bytes and synthetic scenes are not paths and are unchanged.
_OUTSIDE = "the path leaves the image root (absolute paths, '..' and symlinks must resolve inside it)"
_O_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _root_forms(image_root: str) -> tuple[str, str]:
    """The root as given (absolute, normalised) and with its symlinks resolved."""
    return os.path.abspath(image_root), os.path.realpath(image_root)


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _check_regular(ref: str, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    raise Reject("not_a_regular_file", f"{ref}: {_file_kind(mode)}, not a regular file; it was not opened")


def _os_error(ref: str, exc: OSError) -> Reject:
    if isinstance(exc, FileNotFoundError):
        return Reject("missing_image", f"{ref}: no such file")
    if isinstance(exc, PermissionError):
        return Reject("unreadable_image", f"{ref}: permission denied")
    return Reject("unreadable_image", f"{ref}: {os.strerror(exc.errno) if exc.errno else type(exc).__name__}")


def resolve_image_path(ref: str, image_root: str | None) -> str:
    """The real path of ``ref`` when it stays inside ``image_root``; else Reject(image_outside_root).

    Absolute paths are accepted only when they lie inside the root. Paths that leave the root on
    their face (absolute elsewhere, too many '..') are refused from the string alone, before
    anything outside the root is looked at; the rest are resolved (symlinks followed) and the
    result must still be inside the real root.
    """
    if "\0" in ref:
        raise Reject("missing_image", f"{ref!r}: a path cannot contain a NUL character")
    if image_root is None:
        raise Reject("image_outside_root", f"{ref}: no image root is set, so no image file is read")
    root_abs, root_real = _root_forms(image_root)
    joined = os.path.join(root_abs, ref)  # an absolute ref replaces the root here
    lexical = os.path.normpath(joined)
    if not (_inside(lexical, root_abs) or _inside(lexical, root_real)):
        raise Reject("image_outside_root", f"{ref}: {_OUTSIDE}")
    try:
        real = os.path.realpath(joined)
    except OSError as exc:  # realpath is lenient, but a symlink loop may still surface here
        raise _os_error(ref, exc) from None
    if not _inside(real, root_real):
        raise Reject("image_outside_root", f"{ref}: {_OUTSIDE}")
    return real


def read_image_file(ref: str, image_root: str | None, max_bytes: int) -> bytes:
    """The bytes of the regular file ``ref`` names inside ``image_root``, at most ``max_bytes``."""
    path = resolve_image_path(ref, image_root)
    try:
        before = os.stat(path)
    except OSError as exc:
        raise _os_error(ref, exc) from None
    _check_regular(ref, before.st_mode)  # never open a FIFO or a device: the open may block
    too_large = Reject(
        "image_too_large", f"{ref}: the file is over the {max_bytes}-byte limit for image files"
    )
    if before.st_size > max_bytes:
        raise too_large
    try:
        fd = os.open(path, _O_FLAGS)  # non-blocking: a FIFO swapped in since the stat cannot hang
    except OSError as exc:
        raise _os_error(ref, exc) from None
    with os.fdopen(fd, "rb", closefd=True) as f:
        try:
            now = os.fstat(fd)
            _check_regular(ref, now.st_mode)
            if (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
                raise Reject("unreadable_image", f"{ref}: the file was replaced while being opened")
            if now.st_size > max_bytes:
                raise too_large
            data = f.read(max_bytes + 1)  # +1: a file whose reported size lies is still caught
        except OSError as exc:
            raise _os_error(ref, exc) from None
    if len(data) > max_bytes:
        raise too_large
    return data


def read_image(ref: ImageRef, image_root: str | None, max_bytes: int | None = None) -> bytes:
    """Raw encoded bytes of one image reference (path, embedded bytes or synthetic scene).

    ``max_bytes`` bounds a file read (default: images.max_image_file_bytes() for the default
    pixel limit); paths follow the rules above.
    """
    if isinstance(ref, bytes):
        return ref
    if isinstance(ref, dict):
        from data_prep.synthetic import render_scene

        return render_scene(ref)
    if not isinstance(ref, str):
        kind = type(ref).__name__
        raise Reject("malformed_record", f"an image must be a path, bytes or a scene, not {kind}")
    return read_image_file(ref, image_root, max_image_file_bytes() if max_bytes is None else max_bytes)


def sample_json(item: Item, stored: list[StoredImage], text_tokens: int | None) -> dict[str, Any]:
    """The sample's JSON object, fields in a fixed order (see data_prep/__init__.py)."""
    obj: dict[str, Any] = {"id": item.id, "source": item.source, "kind": item.kind}
    if item.kind == "conversation":
        obj["conversations"] = item.conversations
    else:
        obj["text"] = item.text
    obj["images"] = [image_entry(s.orig_size, s.size, s.factor) for s in stored]
    obj["num_image_tokens"] = sum(s.num_tokens for s in stored)
    if text_tokens is not None:
        obj["text_tokens"] = text_tokens
    for name in sorted(item.extra):
        obj[name] = item.extra[name]
    return obj


def process_item(item: Item | Rejected) -> Written | Rejected:
    """Item -> Written sample, or Rejected with the reason. Never raises for bad data."""
    if isinstance(item, Rejected):
        return item
    config = _config
    assert config is not None, "init_worker() was not called"
    try:
        stored: list[StoredImage] = []
        input_bytes = 0
        max_pixels = config.image.max_pixels_for(len(item.images))
        max_bytes = max_image_file_bytes(config.image.max_image_pixels)
        for i, ref in enumerate(item.images):
            try:
                data = read_image(ref, config.image_root, max_bytes)
                input_bytes += len(data)
                try:
                    stored.append(process_image(data, config.image, max_pixels))
                except Reject:
                    raise
                except Exception as exc:  # one odd file must not stop a multi-hour build
                    raise Reject(
                        "corrupt_image", f"unexpected {type(exc).__name__} while processing: {exc}"
                    ) from None
            except Reject as rej:
                if len(item.images) > 1:
                    raise Reject(rej.code, f"image {i}: {rej.message}") from None
                raise
        obj = sample_json(item, stored, None)
        text_tokens = _counter.count(obj) if _counter is not None else None
        if text_tokens is not None:
            obj = sample_json(item, stored, text_tokens)
    except Reject as rej:
        return Rejected(item.index, item.source, item.id, rej.code, rej.message, item.record)
    members = [("json", dumps(obj))]
    members += [(image_member(i, config.image.extension), s.data) for i, s in enumerate(stored)]
    return Written(
        index=item.index,
        key=item.key,
        kind=item.kind,
        members=members,
        image_tokens=[s.num_tokens for s in stored],
        text_tokens=text_tokens,
        text_chars=sum(len(seg) for seg in text_segments(obj)),
        input_bytes=input_bytes,
        tag_inserted=bool(item.extra.get("image_tag_inserted")),
    )


def process_chunk(items: list[Item | Rejected]) -> list[Written | Rejected]:
    return [process_item(item) for item in items]

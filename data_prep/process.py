"""The per-record work done in worker processes: load images, process them, build the sample.

Pure with respect to its input: the same Item and options give the same bytes in any process,
which is what makes `--workers 1` and `--workers N` produce identical shards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.images import ImageOptions, StoredImage, process_image
from data_prep.records import ImageRef, Item, Rejected
from data_prep.rejects import Reject
from data_prep.schema import dumps, image_entry, image_member
from data_prep.tokenizer import text_segments


@dataclass(frozen=True)
class ProcessConfig:
    image: ImageOptions
    image_root: str | None = None  # relative image paths are resolved against it
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


def read_image(ref: ImageRef, image_root: str | None) -> bytes:
    """Raw encoded bytes of one image reference (path, embedded bytes or synthetic scene)."""
    if isinstance(ref, bytes):
        return ref
    if isinstance(ref, dict):
        from data_prep.synthetic import render_scene

        return render_scene(ref)
    path = Path(ref)
    if image_root is not None and not path.is_absolute():
        path = Path(image_root) / path
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise Reject("missing_image", f"{ref}: no such file") from None
    except IsADirectoryError:
        raise Reject("unreadable_image", f"{ref}: is a directory") from None
    except PermissionError:
        raise Reject("unreadable_image", f"{ref}: permission denied") from None
    except OSError as exc:
        raise Reject("unreadable_image", f"{ref}: {os.strerror(exc.errno) if exc.errno else exc}") from None


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
        for i, ref in enumerate(item.images):
            try:
                data = read_image(ref, config.image_root)
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

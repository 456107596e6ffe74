"""Reject reasons and the rejects report.

A record that cannot become a training sample is never dropped silently and never crashes the
build: it becomes one line of ``rejects.jsonl`` (input index, id, reason code, human message and
the record itself) and one count in the manifest, so that ``inputs == written + rejected`` holds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from typing import IO, Any

# Reason code -> one-line description (the manifest lists every code, zero counts included, so a
# dashboard can rely on the keys).
REASONS: dict[str, str] = {
    "malformed_json": "an annotation line or entry is not valid JSON",
    "invalid_utf8": "text that is not valid UTF-8",
    "malformed_record": "the record is not an object or a field has the wrong type / is missing",
    "empty_conversation": "the conversation list is empty",
    "malformed_conversation": (
        "turn structure is wrong (bad turn, system not first, no assistant turn, empty turn)"
    ),
    "unknown_role": "a turn's role is not human/user, gpt/assistant or system",
    "empty_text": "caption or text is empty",
    "image_tag_mismatch": "the number of <image> tags differs from the number of images",
    "reserved_token": "text contains a special token of the tokenizer (<|im_end|>, <ref>, ...), which would become a control token",
    "duplicate_key": "an earlier input already produced this sample key",
    "image_outside_root": (
        "the image path resolves outside the image root (absolute path, '..' or symlink), or no root is set"
    ),
    "missing_image": "the image file does not exist",
    "unreadable_image": "the image file exists but cannot be read (permissions, I/O error)",
    "not_a_regular_file": "the image path names a directory, FIFO, socket or device, not a regular file",
    "image_too_large": "the image file is over the byte limit derived from --max-image-pixels",
    "zero_size": "the image file is empty or the image has a zero dimension",
    "corrupt_image": "not an image, an unsupported container, or truncated/corrupt data",
    "unsupported_image": "a pixel mode that cannot be converted to RGB without guessing (e.g. float)",
    "decompression_bomb": "more pixels than --max-image-pixels",
    "aspect_ratio": "long side / short side over the limit (200)",
}


class Reject(Exception):
    """Raised anywhere in the data path to reject the current record with a reason code."""

    def __init__(self, code: str, message: str):
        if code not in REASONS:
            raise ValueError(f"unknown reject reason {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# Nesting below this depth is summarised in the report (a record nested hundreds of levels deep is
# rejected as malformed; its report must not recurse as deep as the record does).
MAX_REPORT_DEPTH = 64


def finite(value: float) -> float | str:
    """A float JSON can hold: NaN and the infinities become the strings Python's json would write
    bare (``"NaN"``, ``"Infinity"``, ``"-Infinity"``), which no JSON parser is obliged to accept."""
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def jsonable(value: Any, _depth: int = 0) -> Any:
    """A strict-JSON-safe copy of a record for the report: bytes are summarised, not dumped,
    non-finite floats become strings, and nesting deeper than MAX_REPORT_DEPTH is cut."""
    if isinstance(value, (dict, list, tuple)) and _depth >= MAX_REPORT_DEPTH:
        return f"<{type(value).__name__} nested deeper than {MAX_REPORT_DEPTH} levels, not shown>"
    if isinstance(value, dict):
        return {str(k): jsonable(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, _depth + 1) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return {
            "__bytes__": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "head_b64": base64.b64encode(data[:16]).decode("ascii"),
        }
    if isinstance(value, float):
        return finite(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return repr(value)


def reject_line(index: int, sample_id: str | None, source: str, code: str, message: str, record: Any) -> str:
    """One rejects.jsonl line: strict JSON (no bare NaN), ASCII-escaped so that records holding
    invalid UTF-8 still serialise."""
    entry = {
        "index": index,
        "id": sample_id,
        "source": source,
        "reason": code,
        "message": message,
        "record": jsonable(record),
    }
    return json.dumps(entry, ensure_ascii=True, sort_keys=True, allow_nan=False) + "\n"


class RejectLog:
    """Appends reject lines in input order and counts them by reason."""

    def __init__(self, stream: IO[str]):
        self._stream = stream
        self.counts: dict[str, int] = {code: 0 for code in REASONS}

    def add(
        self, index: int, sample_id: str | None, source: str, code: str, message: str, record: Any
    ) -> None:
        self._stream.write(reject_line(index, sample_id, source, code, message, record))
        self.counts[code] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

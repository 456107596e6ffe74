"""What one input record becomes: validated, normalised work items (or a Reject).

Each source format (NEO/LLaVA JSON, caption tables, text JSONL, synthetic) ends in the same
`Item`, so everything downstream (image processing, shard writing, stats) has one code path.
Text is kept exactly as given; the only edit ever made is the reference's rule that a
single-image record without any `<image>` tag gets `<image>\\n` in front of its first user turn,
and that edit is flagged in the sample and counted in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from data_prep.rejects import Reject
from data_prep.schema import IMAGE_TAG, make_key
from data_prep.tokenizer import SPECIAL_TOKENS, reserved_pattern

# An image reference: a file path (str), the encoded bytes themselves (parquet tables often embed
# them), or a synthetic scene description (dict) that the worker renders.
ImageRef = str | bytes | dict

ROLE_MAP = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class Item:
    """A record that passed structural validation, ready for image work in a worker process."""

    index: int  # position among all inputs (0-based), the order of the output
    source: str  # annotation file name (no directories) or "synthetic/<split>"
    id: str
    kind: str  # caption | conversation | text
    images: list[ImageRef]
    text: str | None = None  # caption / text kinds
    conversations: list[dict[str, str]] | None = None  # conversation kind, roles normalised
    extra: dict[str, Any] = field(default_factory=dict)  # extra JSON fields (qa_type, ...)
    record: Any = None  # the original record, for the rejects report
    key: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            self.key = make_key(self.id)


@dataclass
class Rejected:
    """An input that will not become a sample; written to rejects.jsonl in input order."""

    index: int
    source: str
    id: str | None
    code: str
    message: str
    record: Any


# Every one of NEO's special tokens (the list the tokenizer is built from), as one alternation
# compiled once per process. A build given --tokenizer also refuses that tokenizer's whole added
# vocabulary, in its workers (data_prep.tokenizer.TextTokenCounter.check).
_RESERVED = reserved_pattern(SPECIAL_TOKENS)


def check_text(value: str, what: str) -> None:
    """Reject text that is not valid UTF-8 or that would smuggle control tokens into training.

    Any special token at all is refused, grounding markup (``<ref>``, ``<box>``, ...) included:
    a tokenizer would turn it into a control id, so data text must not carry it.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Reject("invalid_utf8", f"{what} is not valid UTF-8") from None
    match = _RESERVED.search(value)
    if match:
        raise Reject("reserved_token", f"{what} contains the special token {match.group()!r}")


# Deepest nesting of objects / lists a record may have. Real records are a few levels deep
# (record -> conversations -> turn); a deeper one is rejected (malformed_record) before any
# recursive code (validation, pickling to a worker, the rejects report) meets it.
MAX_RECORD_DEPTH = 64


def nested_deeper_than(value: Any, limit: int) -> bool:
    """True if ``value`` nests dicts / lists more than ``limit`` levels deep (iterative: any depth)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _bad_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def has_invalid_utf8(value: Any) -> bool:
    """True if any string inside a decoded JSON value carries undecodable bytes (lone surrogates).
    Iterative, so that no nesting depth can exhaust the stack."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _bad_utf8(item):
                return True
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and _bad_utf8(key):
                    return True
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
    return False


def record_id(record: dict[str, Any], field_name: str | None, default: str) -> str:
    """The record's own id when it has one (str or int), else the positional default."""
    if field_name is None or field_name not in record or record[field_name] is None:
        return default
    value = record[field_name]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Reject(
            "malformed_record",
            f"id field {field_name!r} must be a string or an integer, got {type(value).__name__}",
        )
    value = str(value)
    if not value:
        raise Reject("malformed_record", f"id field {field_name!r} is empty")
    check_text(value, "id")
    return value


def normalise_conversation(turns: Any, num_images: int) -> tuple[list[dict[str, str]], bool]:
    """Validate turns and map roles to system/user/assistant.

    Returns the normalised turns and whether an `<image>` tag was inserted (reference rule).
    Rules: a non-empty list of {from|role, value|content} objects; system only first; the first
    other turn is the user's; at least one assistant turn; no empty user/assistant turn;
    `<image>` tags only in user turns and exactly one per image.
    """
    if not isinstance(turns, list):
        raise Reject("malformed_conversation", f"'conversations' must be a list, got {type(turns).__name__}")
    if not turns:
        raise Reject("empty_conversation", "'conversations' is empty")
    out: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise Reject("malformed_conversation", f"turn {i} is a {type(turn).__name__}, not an object")
        raw_role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if not isinstance(raw_role, str):
            raise Reject("malformed_conversation", f"turn {i} has no 'from'/'role' string")
        if not isinstance(content, str):
            raise Reject("malformed_conversation", f"turn {i} has no 'value'/'content' string")
        role = ROLE_MAP.get(raw_role.strip().lower())
        if role is None:
            raise Reject(
                "unknown_role",
                f"turn {i} has role {raw_role!r} (expected human/user, gpt/assistant or system)",
            )
        check_text(content, f"turn {i}")
        out.append({"role": role, "content": content})

    for i, turn in enumerate(out):
        if turn["role"] == "system" and i != 0:
            raise Reject(
                "malformed_conversation",
                f"system turn at position {i}; only the first turn may be a system turn",
            )
    dialogue = out[1:] if out[0]["role"] == "system" else out
    if not dialogue or dialogue[0]["role"] != "user":
        raise Reject("malformed_conversation", "the first non-system turn must be a user turn")
    if not any(t["role"] == "assistant" for t in dialogue):
        raise Reject("malformed_conversation", "no assistant turn: nothing to learn from")

    for turn in out:
        if turn["role"] != "user" and IMAGE_TAG in turn["content"]:
            raise Reject("image_tag_mismatch", f"an {IMAGE_TAG} tag appears in a {turn['role']} turn")
    num_tags = sum(t["content"].count(IMAGE_TAG) for t in out)
    inserted = False
    if num_tags == 0 and num_images == 1:
        first_user = dialogue[0]
        first_user["content"] = IMAGE_TAG + "\n" + first_user["content"]
        inserted = True
        num_tags = 1
    if num_tags != num_images:
        raise Reject("image_tag_mismatch", f"{num_tags} {IMAGE_TAG} tag(s) for {num_images} image(s)")
    for i, turn in enumerate(out):
        if turn["role"] != "system" and not turn["content"].strip():
            raise Reject("malformed_conversation", f"{turn['role']} turn {i} is empty")
    return out, inserted


def _image_list(record: dict[str, Any]) -> list[str]:
    has_image = "image" in record and record["image"] is not None
    has_images = "images" in record and record["images"] is not None
    if has_image and has_images:
        raise Reject("malformed_record", "record has both 'image' and 'images'")
    value = record["image"] if has_image else record.get("images") if has_images else []
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise Reject("malformed_record", "'image'/'images' must be a non-empty path string or a list of them")
    return list(paths)


def conversation_item(
    index: int, source: str, record: Any, default_id: str, id_field: str | None = "id"
) -> Item:
    """A NEO / LLaVA conversation record -> Item (raises Reject)."""
    if not isinstance(record, dict):
        raise Reject("malformed_record", f"a record must be a JSON object, got {type(record).__name__}")
    sample_id = record_id(record, id_field, default_id)
    images = _image_list(record)
    if "conversations" not in record:
        raise Reject("malformed_record", "record has no 'conversations'")
    turns, inserted = normalise_conversation(record["conversations"], len(images))
    extra = {"image_tag_inserted": True} if inserted else {}
    return Item(
        index,
        source,
        sample_id,
        "conversation",
        list(images),
        conversations=turns,
        extra=extra,
        record=record,
    )


def caption_item(
    index: int,
    source: str,
    record: dict[str, Any],
    image: Any,
    caption: Any,
    default_id: str,
    id_field: str | None = None,
) -> Item:
    """One caption-table row -> Item (raises Reject). ``image`` is a path or the encoded bytes."""
    sample_id = record_id(record, id_field, default_id)
    if isinstance(image, dict):  # HF datasets' Image feature: {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytearray, memoryview)):
        image = bytes(image)
    if not (isinstance(image, bytes) or (isinstance(image, str) and image)):
        raise Reject("malformed_record", "the image column is empty or not a path / bytes")
    if not isinstance(caption, str):
        raise Reject("malformed_record", f"the caption is a {type(caption).__name__}, not a string")
    check_text(caption, "caption")
    if not caption.strip():
        raise Reject("empty_text", "the caption is empty")
    if IMAGE_TAG in caption:
        raise Reject(
            "image_tag_mismatch", f"a caption must not contain {IMAGE_TAG} (its one image is implicit)"
        )
    return Item(index, source, sample_id, "caption", [image], text=caption, record=record)


def text_item(
    index: int,
    source: str,
    record: Any,
    default_id: str,
    text_field: str = "text",
    id_field: str | None = "id",
) -> Item:
    """A text-only record -> Item (raises Reject)."""
    if not isinstance(record, dict):
        raise Reject("malformed_record", f"a record must be a JSON object, got {type(record).__name__}")
    sample_id = record_id(record, id_field, default_id)
    if text_field not in record:
        raise Reject("malformed_record", f"record has no {text_field!r} field")
    text = record[text_field]
    if not isinstance(text, str):
        raise Reject("malformed_record", f"{text_field!r} is a {type(text).__name__}, not a string")
    check_text(text, text_field)
    if not text.strip():
        raise Reject("empty_text", f"{text_field!r} is empty")
    if IMAGE_TAG in text:
        raise Reject("image_tag_mismatch", f"a text-only sample must not contain {IMAGE_TAG}")
    return Item(index, source, sample_id, "text", [], text=text, record=record)

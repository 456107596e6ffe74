"""The sample contract between data_prep and the trainer, in code.

`data_prep/__init__.py` documents it for people; this module is what the writer uses to build
samples and what `verify` (and the tests) use to check them, so both sides cannot drift.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

SCHEMA_VERSION = 1
IMAGE_TAG = "<image>"
KINDS = ("caption", "conversation", "text")
ROLES = ("system", "user", "assistant")

# NEO's added special tokens, in the reference's order, then the end-of-text token.
NEO_SPECIAL_TOKENS = (
    "<IMG_CONTEXT>",
    "<img>",
    "</img>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<|im_start|>",
    "<|im_end|>",
    "<|action_start|>",
    "<|action_end|>",
    "<|plugin|>",
    "<|interpreter|>",
)
EOS_TOKEN = "<|endoftext|>"

_KEY_OK = re.compile(r"[A-Za-z0-9_-]+")
_KEY_BAD_CHAR = re.compile(r"[^A-Za-z0-9_-]")
MAX_KEY_LEN = 64


def make_key(sample_id: str) -> str:
    """WebDataset key for a source id: deterministic, safe in tar names, injective in practice.

    Keys may not contain '.' (WebDataset splits the extension at the first dot) or '/', and must
    fit a ustar name. Ids that are already safe are used as they are; others are sanitised and
    get a short hash of the original id so that two different ids cannot meet on one key.
    """
    if _KEY_OK.fullmatch(sample_id) and len(sample_id) <= MAX_KEY_LEN:
        return sample_id
    digest = hashlib.blake2b(sample_id.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()
    stem = _KEY_BAD_CHAR.sub("_", sample_id)[: MAX_KEY_LEN - len(digest) - 1]
    return f"{stem}-{digest}"


def image_member(index: int, extension: str) -> str:
    """Name of the index-th image inside a sample ('img0.jpg', ...)."""
    return f"img{index}.{extension}"


def image_entry(orig_size: tuple[int, int], size: tuple[int, int], factor: int) -> dict[str, Any]:
    gh, gw = size[0] // factor, size[1] // factor
    return {
        "orig_size": [orig_size[0], orig_size[1]],
        "size": [size[0], size[1]],
        "grid": [gh, gw],
        "num_tokens": gh * gw,
    }


def dumps(obj: dict[str, Any]) -> bytes:
    """Canonical UTF-8 JSON for a sample (stable key order, no whitespace): byte-identical builds."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def count_image_tags(sample: dict[str, Any]) -> int:
    if sample.get("kind") == "conversation":
        return sum(turn["content"].count(IMAGE_TAG) for turn in sample["conversations"])
    return 0


def validate_sample(sample: Any, image_extension: str | None = None) -> list[str]:
    """Problems with one decoded sample JSON (empty list when it honours the contract)."""
    errors: list[str] = []
    if not isinstance(sample, dict):
        return [f"sample JSON is a {type(sample).__name__}, not an object"]
    for field, typ in (
        ("id", str),
        ("source", str),
        ("kind", str),
        ("images", list),
        ("num_image_tokens", int),
    ):
        if not isinstance(sample.get(field), typ):
            errors.append(f"field {field!r} missing or not {typ.__name__}")
    if errors:
        return errors
    kind = sample["kind"]
    if kind not in KINDS:
        errors.append(f"unknown kind {kind!r}")
    if kind in ("caption", "text"):
        if not isinstance(sample.get("text"), str) or not sample["text"]:
            errors.append(f"kind {kind!r} needs a non-empty 'text'")
        if "conversations" in sample:
            errors.append(f"kind {kind!r} must not carry 'conversations'")
    if kind == "conversation":
        turns = sample.get("conversations")
        if not isinstance(turns, list) or not turns:
            errors.append("kind 'conversation' needs a non-empty 'conversations' list")
        else:
            for i, turn in enumerate(turns):
                if not (
                    isinstance(turn, dict)
                    and set(turn) == {"role", "content"}
                    and turn["role"] in ROLES
                    and isinstance(turn["content"], str)
                ):
                    errors.append(f"turn {i} is not {{'role': system|user|assistant, 'content': str}}")
        if "text" in sample:
            errors.append("kind 'conversation' must not carry 'text'")
    if errors:
        return errors
    images = sample["images"]
    if kind == "text" and images:
        errors.append("kind 'text' must have no images")
    if kind == "caption" and len(images) != 1:
        errors.append(f"kind 'caption' must have exactly one image, has {len(images)}")
    if kind == "conversation" and count_image_tags(sample) != len(images):
        errors.append(f"{count_image_tags(sample)} <image> tags but {len(images)} images")
    total = 0
    for i, img in enumerate(images):
        try:
            h, w = img["size"]
            gh, gw = img["grid"]
            oh, ow = img["orig_size"]
            n = img["num_tokens"]
        except (KeyError, TypeError, ValueError):
            errors.append(f"image {i} entry is malformed: {img!r}")
            continue
        if min(h, w, oh, ow) <= 0 or h % gh or w % gw or h // gh != w // gw or gh * gw != n:
            errors.append(f"image {i}: size {h}x{w}, grid {gh}x{gw} and num_tokens {n} disagree")
        total += n
    if total != sample["num_image_tokens"]:
        errors.append(f"num_image_tokens {sample['num_image_tokens']} != sum over images {total}")
    if "text_tokens" in sample and not isinstance(sample["text_tokens"], int):
        errors.append("text_tokens must be an int")
    return errors

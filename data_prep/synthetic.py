"""The embedded synthetic data set: coloured shapes, captions, one-word-answer questions, text.

Made for the demo and the tests: small images (2..4 tokens of 32x32 px per side, many aspect
ratios: 4 to 16 tokens) so a tiny model on CPU sees few image tokens, a handful of clearly distinct
colours and shapes, and questions whose one-word answers need the image (colour, shape, count,
left/right, top/bottom, and a two-image comparison), so a later evaluation can score exact matches.

Every object (1..3 of them, 21..25 px wide) sits in its own cell of the 32-px token grid, centred
up to 2 px off the cell's centre. Why the grid: NEO's patch embedding is one 16x16 linear patch
filter, a GELU and a 2x2 merge, so it tells shapes apart by fixed templates, and translation
inside a patch is what it learns slowest (the reference has 345M images to learn it; the demo
has minutes of CPU). Measured by training the tiny preset's patch embedding (256 channels) directly
as a shape classifier on one-object images (attention pooling, 64 images per step, AdamW 1e-3):
objects placed freely (33..57 px, the previous generator) reach 54-63% after 100 steps and
67-71% after 200; objects in cells with 2 px of jitter 99% after 100 steps (5 px: 95%; none: 100%
after 50). In the whole demo the grid lifts shape less (40-73% held-out in recipe variants, was
30-39%): one-object questions are answered (94-100% in the best runs), two or three objects 54-73%.
The rest was the LLM finding the asked object among several: each object's token carries its shape
(a linear probe reads 94-99%), yet with " Answer with one word." after every SFT question no head
of the demo's model puts more weight on the asked object than its 1/n share (3 objects: 0.33 of
the image's attention), and 2-3 object shape questions stay at 67-74%. Without that hint in SFT,
a post-LLM head gives the asked object 0.65 of it and they reach 95-97% (see ANSWER_HINT).

Determinism and splits: sample i of (split, seed) draws from its own RNG seeded from
(split, seed, i), so any sample can be regenerated alone. Train and heldout never share an
image or a text: every scene (and text sentence) is hashed and belongs to exactly one split
(1 in 8 of the space is heldout), and generation redraws until it lands in the requested split.

Samples go through the real build path: each image is a scene description that the worker
renders to PNG bytes and then decodes, validates, smart-resizes (a no-op: the sides are already
multiples of 32) and re-encodes like any file.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from typing import Any

from PIL import Image, ImageDraw

from data_prep.records import Item
from data_prep.schema import IMAGE_TAG

GENERATOR_VERSION = 4
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 205, 20),
    "purple": (135, 45, 175),
}
SHAPES = ("circle", "square", "triangle", "diamond")
BACKGROUNDS = {"white": (255, 255, 255), "gray": (200, 200, 200)}
ASPECTS = ((1, 1), (4, 3), (3, 4), (2, 1), (1, 2), (16, 9), (9, 16), (3, 1), (1, 3))
QA_TYPES = ("color", "shape", "count", "position", "compare")  # compare (two images) last
QA_WEIGHTS = (0.23, 0.23, 0.23, 0.23, 0.08)
DEFAULT_MIX = {"caption": 0.35, "conversation": 0.5, "text": 0.15}
MAX_OBJECTS = 3
CELL = 32  # px: one LLM token (two 16-px patches per side)
GRID_CELLS = (2, 4)  # cells per image side
OBJECT_RADIUS = (10, 12)  # px
JITTER = 2  # px off the cell centre; 12 + 2 leaves at least 4 px between objects in adjacent cells
SYNTHETIC_MIN_PIXELS = 4 * 32 * 32
SYNTHETIC_MAX_PIXELS = 256 * 256
HELDOUT_ONE_IN = 8
SPLITS = ("train", "heldout")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _digest_int(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def split_of(fingerprint: str) -> str:
    """The one split a scene or sentence belongs to."""
    return "heldout" if _digest_int("split:" + fingerprint) % HELDOUT_ONE_IN == 0 else "train"


def scene_fingerprint(scene: dict[str, Any]) -> str:
    return json.dumps(scene, sort_keys=True, separators=(",", ":"))


# ----------------------------------------------------------------------------- scenes


def _random_scene(rng: random.Random) -> dict[str, Any]:
    aw, ah = rng.choice(ASPECTS)
    long_cells = rng.randint(*GRID_CELLS)
    short_cells = max(GRID_CELLS[0], round(long_cells * min(aw, ah) / max(aw, ah)))
    cols, rows = (long_cells, short_cells) if aw >= ah else (short_cells, long_cells)
    objects = []
    for cell in rng.sample(range(cols * rows), rng.randint(1, MAX_OBJECTS)):
        cx = CELL * (cell % cols) + CELL // 2 + rng.randint(-JITTER, JITTER)
        cy = CELL * (cell // cols) + CELL // 2 + rng.randint(-JITTER, JITTER)
        objects.append({"shape": rng.choice(SHAPES), "color": rng.choice(sorted(COLORS)), "cx": cx, "cy": cy,
                        "r": rng.randint(*OBJECT_RADIUS)})
    return {
        "v": GENERATOR_VERSION,
        "w": cols * CELL,
        "h": rows * CELL,
        "bg": rng.choice(sorted(BACKGROUNDS)),
        "objects": objects,
    }


def scene_in_split(rng: random.Random, split: str) -> dict[str, Any]:
    while True:
        scene = _random_scene(rng)
        if scene["objects"] and split_of(scene_fingerprint(scene)) == split:
            return scene


def render_scene(scene: dict[str, Any]) -> bytes:
    """Scene description -> PNG bytes (no anti-aliasing: exact, deterministic pixels)."""
    img = Image.new("RGB", (scene["w"], scene["h"]), BACKGROUNDS[scene["bg"]])
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        cx, cy, r, fill = o["cx"], o["cy"], o["r"], COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ----------------------------------------------------------------------------- language


def _where(o: dict[str, Any], scene: dict[str, Any]) -> str:
    col = ("left", "center", "right")[min(2, 3 * o["cx"] // scene["w"])]
    row = ("top", "middle", "bottom")[min(2, 3 * o["cy"] // scene["h"])]
    if row == "middle" and col == "center":
        return "in the center"
    if row == "middle":
        return f"on the {col}"
    if col == "center":
        return f"at the {row}"
    return f"at the {row} {col}"


def caption_for(scene: dict[str, Any]) -> str:
    parts = [f"a {o['color']} {o['shape']} {_where(o, scene)}" for o in scene["objects"]]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed[0].upper()}{listed[1:]}, on a {scene['bg']} background."


def _unique(objects: list[dict[str, Any]], field: str) -> list[dict[str, Any]]:
    return [o for o in objects if sum(p[field] == o[field] for p in objects) == 1]


def _question(rng: random.Random, qa_type: str, scene: dict[str, Any]) -> tuple[str, str] | None:
    """(question, one-word answer) or None when this scene cannot answer this type unambiguously."""
    objs = scene["objects"]
    if qa_type == "color":
        pick = _unique(objs, "shape")
        if not pick:
            return None
        o = rng.choice(pick)
        return rng.choice(("What color is the {s}?", "Which color does the {s} have?")).format(
            s=o["shape"]
        ), o["color"]
    if qa_type == "shape":
        pick = _unique(objs, "color")
        if not pick:
            return None
        o = rng.choice(pick)
        return rng.choice(("What shape is the {c} object?", "Which shape is {c}?")).format(c=o["color"]), o[
            "shape"
        ]
    if qa_type == "count":
        what = rng.random()
        if what < 0.4:
            return "How many shapes are in the image?", str(len(objs))
        if what < 0.7:
            color = rng.choice(sorted(COLORS))
            return f"How many {color} shapes are there?", str(sum(o["color"] == color for o in objs))
        shape = rng.choice(SHAPES)
        return f"How many {shape}s are there?", str(sum(o["shape"] == shape for o in objs))
    if qa_type == "position":
        # Only objects entirely inside one half, named by a description that is unique.
        candidates = []
        for o in objs:
            if sum(p["color"] == o["color"] and p["shape"] == o["shape"] for p in objs) != 1:
                continue
            if o["cx"] + o["r"] < scene["w"] / 2 or o["cx"] - o["r"] > scene["w"] / 2:
                candidates.append((o, "h"))
            if o["cy"] + o["r"] < scene["h"] / 2 or o["cy"] - o["r"] > scene["h"] / 2:
                candidates.append((o, "v"))
        if not candidates:
            return None
        o, axis = rng.choice(candidates)
        name = f"{o['color']} {o['shape']}"
        if axis == "h":
            return f"Is the {name} on the left or on the right?", "left" if o["cx"] < scene[
                "w"
            ] / 2 else "right"
        return f"Is the {name} at the top or at the bottom?", "top" if o["cy"] < scene["h"] / 2 else "bottom"
    raise ValueError(qa_type)


# Ends every question of the pre-training mix; the demo's SFT and held-out questions go without it
# (``answer_hint=False``). Measured from one stage-2 checkpoint: SFT questions with the hint leave
# shape binding unlearnt (shape on 2-3 objects 67-74% of 1000 held-out questions, final SFT loss
# 0.21), without it 95-97% (loss 0.09-0.11), over two pre-training draws. The six hint tokens
# stand between the asked word and the answer position.
ANSWER_HINT = " Answer with one word."

TEXT_FACTS = (
    "A triangle has three corners.",
    "A square has four equal sides.",
    "A circle has no corners.",
    "A diamond is a square turned on one corner.",
    "Red, green, blue, yellow and purple are colors.",
    "Circles, squares, triangles and diamonds are shapes.",
    "Left and right are opposite directions.",
    "The top of a picture is opposite its bottom.",
)


def _text_sentence(rng: random.Random) -> str:
    """Facts, sums, counting and scene descriptions: the language the captions and answers use, so
    a text-only pre-trained LLM (the demo's stand-in for Qwen3) already speaks it before stage 1."""
    roll = rng.random()
    if roll < 0.4:
        return caption_for(_random_scene(rng))
    if roll < 0.55:
        return rng.choice(TEXT_FACTS)
    if roll < 0.75:
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        words = NUMBER_WORDS
        return f"{words[a].capitalize()} plus {words[b]} is {words[a + b]}, written {a + b}."
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    n = rng.randint(1, 4)
    plural = "s" if n > 1 else ""
    return f"Counting {n} {color} {shape}{plural} gives the answer {n}."


# ----------------------------------------------------------------------------- samples


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    names = sorted(weights)
    return rng.choices(names, weights=[weights[n] for n in names])[0]


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(_digest_int(f"neo-synthetic/v{GENERATOR_VERSION}/{split}/{seed}/{index}"))


def make_item(seed: int, split: str, index: int, mix: dict[str, float], answer_hint: bool = True) -> Item:
    """The index-th synthetic sample of (split, seed) as a build Item."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    hint = ANSWER_HINT if answer_hint else ""
    rng = sample_rng(seed, split, index)
    source = f"synthetic/{split}"
    sample_id = f"synthetic-{split}-s{seed}-{index:07d}"
    kind = _pick(rng, mix)
    if kind == "text":
        while True:
            text = _text_sentence(rng)
            if split_of("text:" + text) == split:
                break
        return Item(
            index, source, sample_id, "text", [], text=text, record={"generator": "synthetic", "text": text}
        )
    if kind == "caption":
        scene = scene_in_split(rng, split)
        return Item(
            index,
            source,
            sample_id,
            "caption",
            [scene],
            text=caption_for(scene),
            extra={"scenes": [scene]},
            record={"generator": "synthetic", "scenes": [scene]},
        )
    qa_type = rng.choices(QA_TYPES, weights=QA_WEIGHTS)[0]
    if qa_type == "compare":
        while True:
            first, second = scene_in_split(rng, split), scene_in_split(rng, split)
            if len(first["objects"]) != len(second["objects"]):
                break
        answer = "first" if len(first["objects"]) > len(second["objects"]) else "second"
        question = f"{IMAGE_TAG}\n{IMAGE_TAG}\nWhich image has more shapes, the first or the second?{hint}"
        scenes = [first, second]
    else:
        while True:
            scene = scene_in_split(rng, split)
            qa = _question(rng, qa_type, scene)
            if qa is not None:
                break
        question = f"{IMAGE_TAG}\n{qa[0]}{hint}"
        answer = qa[1]
        scenes = [scene]
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return Item(
        index,
        source,
        sample_id,
        "conversation",
        list(scenes),
        conversations=turns,
        extra={"qa_type": qa_type, "answer": answer, "scenes": scenes},
        record={"generator": "synthetic", "conversations": turns, "scenes": scenes},
    )


def parse_mix(text: str | None) -> dict[str, float]:
    """'caption=0.35,conversation=0.5,text=0.15' -> weights (kinds left out get 0)."""
    if not text:
        return dict(DEFAULT_MIX)
    mix: dict[str, float] = {k: 0.0 for k in DEFAULT_MIX}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in mix:
            raise ValueError(f"unknown kind {name!r} in --mix; kinds are {sorted(mix)}")
        mix[name] = float(value)
    if any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError("--mix weights must be non-negative and not all zero")
    return mix


def make_items(num: int, seed: int, split: str, mix: dict[str, float], answer_hint: bool = True) -> list[Item]:
    return [make_item(seed, split, i, mix, answer_hint) for i in range(num)]

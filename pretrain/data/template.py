"""One sample (the data_prep JSON) -> token ids, next-token labels, loss mask and image layout.

Rendering, per ``kind`` (see data_prep/__init__.py for the sample contract):

* ``conversation``: ChatML, ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn (system, user,
  assistant), no end-of-text token after the last turn. Supervised: the content of every
  assistant turn and its closing ``<|im_end|>\\n`` (the model learns to end its turn).
* ``caption``: ``<img>`` block of the single image, then the caption text, then
  ``<|endoftext|>``. No chat template and no separator: a caption is plain image-conditioned
  language modelling, as in the pre-training stage. Supervised: the caption and the end-of-text
  token (so the model learns to stop).
* ``text``: the text, then ``<|endoftext|>``; all of it supervised.

Every ``<image>`` tag (conversations) and the caption's image become ``<img>``, then
``num_tokens`` x ``<IMG_CONTEXT>``, then ``</img>``, with ``num_tokens`` and the token grid taken
from the sample's ``images`` entry (recorded by data_prep after smart-resize).

Tokenisation: each text piece is tokenised on its own (role headers ``"{role}\\n"``, each content
segment between ``<image>`` tags, the ``"\\n"`` after ``<|im_end|>``) and the pieces are
concatenated. This makes the supervised span exact by construction; it equals tokenising the
rendered string wherever the tokenizer's pre-tokenizer splits at a newline that follows a role
name (it does for byte-level BPE and Qwen's pre-tokenizer unless the content itself starts with
whitespace) and the text holds no special-token string (see below).

Control tokens (``<|im_start|>``, ``<|im_end|>``, ``<img>``, ``<IMG_CONTEXT>``, ``</img>``,
``<|endoftext|>``) are only ever placed by the template, by id. Data text is tokenised with
special tokens *split* (``split_special_tokens=True``, transformers 4.x and 5.x), so a sample whose
text says ``<|im_end|>`` or ``<ref>`` (a shard written by an older data_prep, or by hand) trains
on those characters as plain text, never on a control id. As a last guard, text that still
yields an id of the tokenizer's added vocabulary (only an added token that is not marked special
can, e.g. a Qwen tokenizer's ``<think>``) refuses the sample with ``ControlTokenError``, which
the loader logs, counts and skips like any other bad sample.

Labels and mask are on the *target* side: ``labels[i] = tokens[i + 1]`` inside a document and
``loss_mask[i]`` is True iff ``tokens[i + 1]`` is a supervised token. The last token of a
document predicts nothing (its label is the pad id, masked), so packed documents never learn
across their boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.config import ConfigError

IMAGE_TAG = "<image>"
IMG_CONTEXT = "<IMG_CONTEXT>"
IMG_START = "<img>"
IMG_END = "</img>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EOS = "<|endoftext|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = (IMG_CONTEXT, IMG_START, IMG_END, IM_START, IM_END, EOS)  # placed by the template, by id


class ControlTokenError(ValueError):
    """Sample text that would tokenise to a control (added/special) token id: refused."""


def control_token_ids(tokenizer) -> dict[int, str]:
    """Id -> string of every added or special token of an HF tokenizer (4.x and 5.x APIs)."""
    out: dict[int, str] = {}
    for tid, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        out[int(tid)] = getattr(token, "content", str(token))
    for token in getattr(tokenizer, "all_special_tokens", None) or ():
        tid = tokenizer.convert_tokens_to_ids(str(token))
        if tid is not None and tid != getattr(tokenizer, "unk_token_id", None):
            out.setdefault(int(tid), str(token))
    return out


def missing_special_tokens(tokenizer) -> list[str]:
    """The template's special tokens (``SPECIAL_TOKENS``) that ``tokenizer`` does not have."""
    unk = getattr(tokenizer, "unk_token_id", None)
    missing = []
    for token in SPECIAL_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == unk:
            missing.append(token)
    return missing


def check_tokenizer(path: str | Path, what: str = "tokenizer.path"):
    """The tokenizer at ``path``; ConfigError (one line) unless it is an HF tokenizer directory with
    NEO's special tokens: the trainer checks this before it starts, not when the first batch is drawn."""
    path = Path(path)
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise ConfigError(f"no tokenizer at {path} ({what}): set tokenizer.path to an HF tokenizer directory")
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"the tokenizer at {path} does not load: {' '.join(str(err).split())[:300]}") from None
    ChatTemplate(tokenizer)  # names every missing special token
    return tokenizer


def load_tokenizer(path: str | Path):
    """An HF tokenizer directory (``AutoTokenizer``), e.g. data_prep's ``OUTPUT/tokenizer``."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path} is not an HF tokenizer directory (no tokenizer.json / tokenizer_config.json)"
        )
    return AutoTokenizer.from_pretrained(str(path))


@dataclass
class Rendered:
    """One document laid out as tokens, before images are decoded.

    ``supervised`` is on the token side (True for tokens the model must learn to produce);
    ``labels`` / ``loss_mask`` shift it to the target side.
    """

    tokens: np.ndarray  # [n] int64
    supervised: np.ndarray  # [n] bool
    image_ids: np.ndarray  # [n] int64: image index within the document for <IMG_CONTEXT>, else -1
    image_grids: np.ndarray  # [k, 2] int64 token grids, in image order

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def labels(self, pad_id: int) -> np.ndarray:
        labels = np.empty_like(self.tokens)
        labels[:-1] = self.tokens[1:]
        labels[-1:] = pad_id
        return labels

    def loss_mask(self) -> np.ndarray:
        mask = np.zeros_like(self.supervised)
        mask[:-1] = self.supervised[1:]
        return mask


class ChatTemplate:
    """Renders samples with one tokenizer. Special-token ids are looked up once and checked."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        missing = missing_special_tokens(tokenizer)
        if missing:
            raise ConfigError(
                f"the tokenizer at {getattr(tokenizer, 'name_or_path', '?')} lacks NEO's special tokens "
                f"{', '.join(missing)}: use the tokenizer data_prep writes next to its shards (<data>/tokenizer) "
                "or add them to this one as special tokens"
            )
        ids = {token: int(tokenizer.convert_tokens_to_ids(token)) for token in SPECIAL_TOKENS}
        self.img_context_id = ids[IMG_CONTEXT]
        self.img_start_id = ids[IMG_START]
        self.img_end_id = ids[IMG_END]
        self.im_start_id = ids[IM_START]
        self.im_end_id = ids[IM_END]
        # Captions and text end with <|endoftext|> whatever the tokenizer calls its eos (an
        # instruct tokenizer may say <|im_end|>); padding uses the tokenizer's pad token.
        self.eos_id = ids[EOS]
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        # Ids that text must never produce: the whole added vocabulary plus the template's own.
        self.control_tokens = control_token_ids(tokenizer)
        for token, tid in ids.items():
            self.control_tokens.setdefault(tid, token)
        self.control_ids = np.array(sorted(self.control_tokens), dtype=np.int64)
        # Lookup table id -> is control (one index per token instead of np.isin); ids past the
        # table land on its last entry, a False sentinel (no control id is that large).
        size = max(len(tokenizer), int(self.control_ids.max()) + 1) + 1
        self._is_control = np.zeros(size, dtype=bool)
        self._is_control[self.control_ids] = True
        # Constant pieces of the template, tokenised once.
        self._headers = {role: self._ids([role + "\n"])[0] for role in ROLES}
        self._newline = self._ids(["\n"])[0]

    # -- tokenisation -------------------------------------------------------------------------

    def _ids(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of several texts in one call: special-token strings in them are tokenised as
        plain text (never a control id), nothing is added. Raises ``ControlTokenError`` if a text
        still yields an added-token id (an added token not marked special)."""
        if not texts:
            return []
        encoded = self.tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)
        pieces = [np.asarray(ids, dtype=np.int64) for ids in encoded["input_ids"]]
        flat = np.concatenate(pieces)
        bad = self._is_control.take(flat, mode="clip")
        if bad.any():
            tid = int(flat[np.argmax(bad)])
            raise ControlTokenError(
                f"sample text tokenises to the control token {self.control_tokens[tid]!r} (id {tid}); "
                "special tokens are not allowed in data text"
            )
        return pieces

    # -- rendering ----------------------------------------------------------------------------

    def image_block(self, num_tokens: int, image_index: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.full(num_tokens + 2, self.img_context_id, dtype=np.int64)
        tokens[0], tokens[-1] = self.img_start_id, self.img_end_id
        image_ids = np.full(num_tokens + 2, image_index, dtype=np.int64)
        image_ids[0] = image_ids[-1] = -1
        return tokens, image_ids

    def render(self, sample: dict) -> Rendered:
        """Tokens, supervision and image layout of one data_prep sample JSON."""
        kind = sample.get("kind")
        images = sample.get("images", [])
        if kind == "conversation":
            return self._render_turns(sample["conversations"], images, generation_prompt=False)
        if kind == "caption":
            if len(images) != 1:
                raise ValueError(f"caption sample has {len(images)} images, expected 1")
            return self._assemble([("image", 0), ("text", sample["text"], True), ("eos", True)], images)
        if kind == "text":
            if images:
                raise ValueError("text sample carries images")
            return self._assemble([("text", sample["text"], True), ("eos", True)], images)
        raise ValueError(f"unknown sample kind {kind!r}")

    def render_prompt(self, sample: dict) -> Rendered:
        """The generation prompt of a sample: for a conversation every turn up to and including
        the last user turn, then ``<|im_start|>assistant\\n``; for a caption the image block."""
        kind = sample.get("kind")
        images = sample.get("images", [])
        if kind == "conversation":
            turns = sample["conversations"]
            last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=None)
            if last_user is None:
                raise ValueError("conversation has no user turn to answer")
            kept = turns[: last_user + 1]
            used = sum(t["content"].count(IMAGE_TAG) for t in kept)
            return self._render_turns(kept, images[:used], generation_prompt=True)
        if kind == "caption":
            return self._assemble([("image", 0)], images)
        raise ValueError(f"no generation prompt for a sample of kind {kind!r}")

    def _render_turns(self, turns: list[dict], images: list[dict], generation_prompt: bool) -> Rendered:
        parts: list[tuple] = []
        for turn in turns:
            role, content = turn["role"], turn["content"]
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r}")
            sup = role == "assistant"
            parts += [("special", self.im_start_id, False), ("header", role)]
            segments = content.split(IMAGE_TAG)
            for j, segment in enumerate(segments):
                if j:
                    parts.append(("image", None))  # numbered in order below
                if segment:
                    parts.append(("text", segment, sup))
            parts += [("special", self.im_end_id, sup), ("newline", sup)]
        if generation_prompt:
            parts += [("special", self.im_start_id, False), ("header", "assistant")]
        return self._assemble(parts, images)

    def _assemble(self, parts: list[tuple], images: list[dict]) -> Rendered:
        texts = [p[1] for p in parts if p[0] == "text"]
        encoded = iter(self._ids(texts))
        tok_pieces: list[np.ndarray] = []
        sup_pieces: list[np.ndarray] = []
        img_pieces: list[np.ndarray] = []
        grids = []
        next_image = 0

        def add(tokens: np.ndarray, supervised: bool, image_ids: np.ndarray | None = None) -> None:
            tok_pieces.append(tokens)
            sup_pieces.append(np.full(tokens.shape[0], supervised, dtype=bool))
            img_pieces.append(
                image_ids if image_ids is not None else np.full(tokens.shape[0], -1, dtype=np.int64)
            )

        for part in parts:
            what = part[0]
            if what == "text":
                add(next(encoded), part[2])
            elif what == "special":
                add(np.array([part[1]], dtype=np.int64), part[2])
            elif what == "header":
                add(self._headers[part[1]], False)
            elif what == "newline":
                add(self._newline, part[1])
            elif what == "eos":
                add(np.array([self.eos_id], dtype=np.int64), part[1])
            elif what == "image":
                if next_image >= len(images):
                    raise ValueError(f"more <image> tags than images ({len(images)})")
                entry = images[next_image]
                gh, gw = (int(v) for v in entry["grid"])
                n = int(entry["num_tokens"])
                if n != gh * gw or n <= 0:
                    raise ValueError(f"image {next_image}: num_tokens {n} does not match grid {gh}x{gw}")
                tokens, image_ids = self.image_block(n, next_image)
                add(tokens, False, image_ids)
                grids.append((gh, gw))
                next_image += 1
        if next_image != len(images):
            raise ValueError(f"{next_image} image tags but {len(images)} images")
        if not tok_pieces:
            raise ValueError("empty sample")
        return Rendered(
            tokens=np.concatenate(tok_pieces),
            supervised=np.concatenate(sup_pieces),
            image_ids=np.concatenate(img_pieces),
            image_grids=np.asarray(grids, dtype=np.int64).reshape(-1, 2),
        )

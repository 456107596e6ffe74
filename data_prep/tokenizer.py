"""A small byte-level BPE tokenizer for the demo, and text-token counting for the manifest.

Real runs use a Qwen3 tokenizer directory; the demo and the tests need a self-contained one,
trained here on a data set's own text with HF `tokenizers` and saved as an HF
`PreTrainedTokenizerFast` directory. `<|endoftext|>` gets id 0 (eos and pad), then NEO's special
tokens follow in the spec's order (ids 1..15), then the learned byte-level vocabulary.

`SPECIAL_TOKENS` is the one list of NEO's special tokens: the tokenizer is trained with it and
data_prep refuses text that contains any of them (`records.check_text`). A build given a
tokenizer directory also refuses every added/special token of *that* tokenizer
(`TextTokenCounter.check`, in the workers), so a Qwen tokenizer's extra control tokens cannot be
smuggled in either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from data_prep.rejects import Reject
from data_prep.schema import EOS_TOKEN, IMAGE_TAG, NEO_SPECIAL_TOKENS

# ChatML, as the spec's template: <|im_start|>{role}\n{content}<|im_end|>\n
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = (EOS_TOKEN, *NEO_SPECIAL_TOKENS)  # what the demo tokenizer's ids 0..15 are


def special_token_strings(tokenizer) -> tuple[str, ...]:
    """Every added or special token of a tokenizer, in id order: its whole added vocabulary.

    ``tokenizer`` is an HF ``tokenizers.Tokenizer`` (a tokenizer.json) or a transformers
    tokenizer (4.x or 5.x: ``added_tokens_decoder`` plus ``all_special_tokens``). Special or not,
    an added token is matched in text before the model sees it, so text holding one would
    become that token's id. ``<image>`` is left out: it is data_prep's image tag, split off
    before any text is tokenised.
    """
    if hasattr(tokenizer, "added_tokens_decoder"):  # transformers
        decoder = tokenizer.added_tokens_decoder or {}
    else:  # tokenizers.Tokenizer
        decoder = tokenizer.get_added_tokens_decoder()
    specials = list(getattr(tokenizer, "all_special_tokens", None) or [])
    found = [getattr(decoder[i], "content", str(decoder[i])) for i in sorted(decoder)]
    found += [str(t) for t in specials]
    return tuple(dict.fromkeys(t for t in found if t and t != IMAGE_TAG))


def reserved_pattern(tokens: Iterable[str]) -> re.Pattern[str]:
    """One compiled alternation that finds any of ``tokens`` in a string (build it once).

    Longest first, so the match names the whole token when one token is a prefix of another.
    """
    unique = sorted({t for t in tokens if t and t != IMAGE_TAG}, key=lambda t: (-len(t), t))
    if not unique:
        return re.compile(r"(?!)")  # matches nothing
    return re.compile("|".join(re.escape(t) for t in unique))


def text_segments(sample: dict) -> list[str]:
    """The text a sample contributes, split at `<image>` tags (the trainer tokenises around them)."""
    if sample.get("kind") == "conversation":
        pieces = [turn["content"] for turn in sample["conversations"]]
    else:
        pieces = [sample.get("text", "")]
    return [seg for piece in pieces for seg in piece.split(IMAGE_TAG) if seg]


def training_texts(sample: dict) -> list[str]:
    """Text for tokenizer training: contents plus the role names the chat template will write."""
    texts = text_segments(sample)
    if sample.get("kind") == "conversation":
        texts += [turn["role"] + "\n" for turn in sample["conversations"]]
    return texts


def train_tokenizer(
    texts: Iterable[str], output: Path, vocab_size: int = 1024, overwrite: bool = False
) -> Path:
    """Train byte-level BPE on ``texts`` and save an HF tokenizer directory atomically.

    Deterministic for the same text in the same order (single-threaded training), so the demo
    data set and its tokenizer are reproducible from the seed.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; pass --overwrite to replace it")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # determinism and fork safety
    try:
        tok.train_from_iterator(texts, trainer=trainer)
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=list(NEO_SPECIAL_TOKENS),
        model_max_length=1 << 20,
    )
    fast.chat_template = CHAT_TEMPLATE
    for i, token in enumerate(SPECIAL_TOKENS):  # ids are part of the contract; fail loudly if not
        got = fast.convert_tokens_to_ids(token)
        if got != i:
            raise RuntimeError(f"special token {token!r} got id {got}, expected {i}")

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        fast.save_pretrained(str(tmp))
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def shard_samples(data_dir: Path) -> Iterator[dict]:
    """Sample JSONs of a built data set, in shard and member order (no images decoded)."""
    shards = sorted(Path(data_dir).glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no .tar shards in {data_dir}")
    for shard in shards:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    yield json.loads(tar.extractfile(member).read().decode("utf-8"))


def texts_from_data(data_dirs: Iterable[Path]) -> Iterator[str]:
    for data_dir in data_dirs:
        for sample in shard_samples(data_dir):
            yield from training_texts(sample)


def _named_texts(sample: dict) -> Iterator[tuple[str, str]]:
    """(what, text) for every piece of text a sample carries (turn contents, caption, text)."""
    if sample.get("kind") == "conversation":
        for i, turn in enumerate(sample["conversations"]):
            yield f"turn {i}", turn["content"]
    else:
        yield sample.get("kind") or "text", sample.get("text", "")


class TextTokenCounter:
    """Counts text tokens per sample with a tokenizer dir's tokenizer.json (no transformers import).

    Built once per build worker. It also refuses text that holds any added/special token of
    this tokenizer (``check``, called by ``count``): the worker turns that ``Reject`` into a
    ``reserved_token`` reject, so a build given ``--tokenizer`` refuses that tokenizer's whole
    added vocabulary, beyond NEO's own list that ``records.check_text`` refuses everywhere.
    """

    def __init__(self, tokenizer_dir: str | Path):
        from tokenizers import Tokenizer

        path = Path(tokenizer_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (an HF fast tokenizer directory is required)")
        self._tok = Tokenizer.from_file(str(path))
        # Count text as the trainer tokenises it: special-token strings as plain text.
        self._tok.encode_special_tokens = True
        self.special_tokens = special_token_strings(self._tok)
        self._reserved = reserved_pattern((*SPECIAL_TOKENS, *self.special_tokens))

    def check(self, sample: dict) -> None:
        """Raise ``Reject("reserved_token")`` if any text of the sample holds a special token."""
        for what, text in _named_texts(sample):
            match = self._reserved.search(text)
            if match:
                raise Reject("reserved_token", f"{what} contains the special token {match.group()!r}")

    def count(self, sample: dict) -> int:
        self.check(sample)
        segments = text_segments(sample)
        if not segments:
            return 0
        return sum(len(self._tok.encode(seg, add_special_tokens=False).ids) for seg in segments)

"""A small byte-level BPE tokenizer for the demo, and text-token counting for the manifest.

Real runs use a Qwen3 tokenizer directory; the demo and the tests need a self-contained one,
trained here on a data set's own text with HF `tokenizers` and saved as an HF
`PreTrainedTokenizerFast` directory. `<|endoftext|>` gets id 0 (eos and pad), then NEO's special
tokens follow in the spec's order (ids 1..15), then the learned byte-level vocabulary.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from data_prep.schema import EOS_TOKEN, IMAGE_TAG, NEO_SPECIAL_TOKENS

# ChatML, as the spec's template: <|im_start|>{role}\n{content}<|im_end|>\n
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = (EOS_TOKEN, *NEO_SPECIAL_TOKENS)


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


class TextTokenCounter:
    """Counts text tokens per sample with a tokenizer dir's tokenizer.json (no transformers import)."""

    def __init__(self, tokenizer_dir: str | Path):
        from tokenizers import Tokenizer

        path = Path(tokenizer_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (an HF fast tokenizer directory is required)")
        self._tok = Tokenizer.from_file(str(path))

    def count(self, sample: dict) -> int:
        segments = text_segments(sample)
        if not segments:
            return 0
        return sum(len(self._tok.encode(seg, add_special_tokens=False).ids) for seg in segments)

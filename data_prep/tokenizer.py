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

Every tokenizer directory the pipeline writes (this trainer, the checkpoint's ``tokenizer/``,
``to-hf``'s export) goes through ``save_tokenizer`` / ``make_tokenizer_dir_compatible``: files that
transformers 4.57 (the version the reference NEO code pins) and 5.x both load to the same
tokenizer. transformers 5.x's own ``save_pretrained`` writes ``tokenizer_class``
``"TokenizersBackend"`` (a class 4.57 does not have) and ``extra_special_tokens`` as a list
(4.57 reads that key as a dict of named tokens and fails on a list).
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
        save_tokenizer(fast, tmp)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


# -- tokenizer files both transformers 4.57 and 5.x load ---------------------------------------

# The class written to tokenizer_config.json whenever the directory has a tokenizer.json: both
# versions know it (5.x as an alias of TokenizersBackend) and build the tokenizer from
# tokenizer.json verbatim. A model-specific class is not kept: 5.x's Qwen2Tokenizer, for one,
# rebuilds its normalizer and pre-tokenizer in code instead of reading tokenizer.json's, so any
# tokenizer.json that is not Qwen's own (the demo's byte-level BPE) would encode differently.
COMPAT_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# from_pretrained's own arguments, which 5.x's save_pretrained writes back into the config (seen:
# is_local, local_files_only): where and how a copy was loaded, never a property of the tokenizer.
LOADER_KEYS = ("is_local", "local_files_only", "cache_dir", "force_download", "proxies", "token",
               "revision", "subfolder", "_commit_hash", "trust_remote_code")


def _token_content(token) -> str:
    """A special token as saved: a string or an AddedToken dict (``{"content": ..., ...}``)."""
    return token.get("content", "") if isinstance(token, dict) else str(token)


def compatible_tokenizer_config(config: dict, has_tokenizer_json: bool = True) -> dict:
    """``config`` (tokenizer_config.json or special_tokens_map.json content) in the form
    transformers 4.57 and 5.x both read the same way. Pure: returns a new dict.

    * ``extra_special_tokens`` as a list (5.x's spelling) becomes ``additional_special_tokens``
      (4.x's; 5.x reads it as a synonym), appended to any already there, duplicates dropped. The
      dict form (named model-specific tokens, which 4.57 introduced) is left as it is.
    * ``tokenizer_class`` becomes ``COMPAT_TOKENIZER_CLASS`` when there is a tokenizer.json (for a
      special_tokens_map.json, which has no class, nothing is added).
    * ``LOADER_KEYS`` (loading arguments 5.x saves as if they were settings) are dropped.
    """
    out = {k: v for k, v in config.items() if k not in LOADER_KEYS}
    extra = out.pop("extra_special_tokens", None)
    if isinstance(extra, dict):
        if extra:
            out["extra_special_tokens"] = extra
    elif extra:
        merged, seen = [], set()
        for token in [*(out.get("additional_special_tokens") or []), *extra]:
            content = _token_content(token)
            if content not in seen:
                seen.add(content)
                merged.append(token)
        out["additional_special_tokens"] = merged
    if has_tokenizer_json and "tokenizer_class" in out:
        out["tokenizer_class"] = COMPAT_TOKENIZER_CLASS
    return out


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def make_tokenizer_dir_compatible(directory: str | Path) -> Path:
    """Rewrite an HF tokenizer directory in place so that transformers 4.57 and 5.x load it to the
    same tokenizer (same ids, special tokens and chat template). JSON only: tokenizer.json is not
    touched and transformers is not imported, so it is cheap enough to run after every copy.

    tokenizer_config.json (and a special_tokens_map.json if one is there) go through
    ``compatible_tokenizer_config``; a ``tokenizer_class`` is written if missing. The chat template
    is also written into tokenizer_config.json (``chat_template``), taken from chat_template.jinja
    when that file exists (both versions prefer the file; the copy in the config, which every
    version reads, then says the same). Idempotent.
    """
    directory = Path(directory)
    config_path = directory / TOKENIZER_CONFIG
    has_json = (directory / "tokenizer.json").is_file()
    if not config_path.is_file():
        if not has_json:
            raise FileNotFoundError(
                f"{directory} is not an HF tokenizer directory (no {TOKENIZER_CONFIG} / tokenizer.json)"
            )
        config = {}
    else:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    config = compatible_tokenizer_config(config, has_json)
    if has_json:
        config["tokenizer_class"] = COMPAT_TOKENIZER_CLASS
    template = directory / CHAT_TEMPLATE_FILE
    if template.is_file():
        config["chat_template"] = template.read_text(encoding="utf-8")
    _write_json_atomic(config_path, config)
    special_map = directory / SPECIAL_TOKENS_MAP
    if special_map.is_file():
        _write_json_atomic(special_map, compatible_tokenizer_config(
            json.loads(special_map.read_text(encoding="utf-8")), has_tokenizer_json=False))
    return directory


def save_tokenizer(tokenizer, directory: str | Path) -> Path:
    """Save a transformers tokenizer (or copy the tokenizer directory ``tokenizer`` names) into
    ``directory`` in the form transformers 4.57 and 5.x both load to the same ids: the one way the
    pipeline writes tokenizer files (``make_tokenizer_dir_compatible`` says what it changes).

    A directory is copied file by file (tokenizer.json byte for byte), not loaded and re-saved.
    Files already in ``directory`` that the tokenizer does not write are left alone.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, (str, os.PathLike)):
        source = Path(tokenizer)
        if not (source / TOKENIZER_CONFIG).is_file() and not (source / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{source} is not an HF tokenizer directory (no {TOKENIZER_CONFIG} / tokenizer.json)"
            )
        for f in source.iterdir():
            if f.is_file():
                shutil.copy2(f, directory / f.name)
            elif f.is_dir():  # additional_chat_templates/
                shutil.copytree(f, directory / f.name, dirs_exist_ok=True)
    else:
        tokenizer.save_pretrained(str(directory))
    return make_tokenizer_dir_compatible(directory)


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

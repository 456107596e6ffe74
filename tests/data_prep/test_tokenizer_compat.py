"""Tokenizer files load to the same tokenizer under transformers 4.57.1 (the version the reference
NEO code pins) and the 5.x this project runs: same ids for plain text, special tokens, split
special tokens and chat-template renderings, same special/added tokens, same decode.

The 4.57.1 side runs in a second virtual environment (transformers 4.57.1, its tokenizers, jinja2;
no torch), made on first use and reused after: ``build/venv-tf457`` (``/build/`` is git-ignored;
``NEO_TF457_VENV`` names another place), or ahead of time with ``make venv-tf457``. Creating it
needs PyPI (or the configured pip index); without it the cross-version tests are SKIPPED with
pip's reason. Once it exists the whole file takes a few seconds.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.schema import EOS_TOKEN, NEO_SPECIAL_TOKENS
from data_prep.tokenizer import (
    COMPAT_TOKENIZER_CLASS,
    compatible_tokenizer_config,
    make_tokenizer_dir_compatible,
    save_tokenizer,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parents[2]
TF457 = "4.57.1"
VENV = Path(os.environ.get("NEO_TF457_VENV") or ROOT / "build" / "venv-tf457")
REQUIREMENTS = [f"transformers=={TF457}", "tokenizers", "jinja2"]
STAMP = ".neo-ready"  # written last into the venv: its content is REQUIREMENTS, so a change rebuilds
NETWORK_HINTS = ("NewConnectionError", "Max retries", "Temporary failure in name resolution",
                 "Network is unreachable", "ProxyError", "ConnectTimeout", "ReadTimeout",
                 "from versions: none", "No matching distribution")

TEXTS = [f"The {c} {s} number {i} is here." for i in range(40) for c in ("red", "blue") for s in ("circle", "square")]

STRINGS = [
    "The red circle number 3 is here.",
    "  leading spaces, trailing spaces  ",
    "line one\nline two\n\n\tindented\r\n",
    "Unicode: café naïve Ærø 東京 🙂 — ½",
    "<|im_start|>user\nWhat is <img><IMG_CONTEXT><IMG_CONTEXT></img>?<|im_end|>\n",
    "<|endoftext|>",
    "<ref>a box</ref><box>[[1, 2, 3, 4]]</box><quad>q</quad>",
    "<|action_start|><|plugin|><|interpreter|><|action_end|>",
    "<|im_st half a token <|im_end",
    "<image> is data_prep's image tag, not a token",
    "<think>added, not special</think>",
    "",
]
CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which shape?"},
     {"role": "assistant", "content": "A red circle."}],
    [{"role": "user", "content": "<img><IMG_CONTEXT></img> Describe."}],
]

# Run unchanged under both versions (in this process for 5.x, in the second venv for 4.57):
# everything the pipeline reads from a tokenizer, per directory; a load error is reported as such.
PROBE = r'''
import json, sys

def probe(directory, strings, conversations):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # reported, compared by the test
        return {"error": f"{type(exc).__name__}: {exc}"}

    def ids(x):
        return list(x["input_ids"] if hasattr(x, "keys") else x)

    added = {int(i): [getattr(t, "content", str(t)), bool(getattr(t, "special", False))]
             for i, t in (tok.added_tokens_decoder or {}).items()}
    out = {
        "len": len(tok),
        "vocab_size": tok.vocab_size,
        "eos": [tok.eos_token, tok.eos_token_id],
        "pad": [tok.pad_token, tok.pad_token_id],
        "bos": [tok.bos_token, tok.bos_token_id],
        "all_special": sorted(str(t) for t in tok.all_special_tokens),
        "all_special_ids": sorted(int(i) for i in tok.all_special_ids),
        "added": {str(k): v for k, v in sorted(added.items())},
        "encode": [ids(tok(s)) for s in strings],
        "encode_plain": [ids(tok(s, add_special_tokens=False)) for s in strings],
        "encode_split": [ids(tok(s, add_special_tokens=False, split_special_tokens=True)) for s in strings],
        "batch_split": ids(tok(strings, add_special_tokens=False, split_special_tokens=True)),
        "decode": [tok.decode(ids(tok(s, add_special_tokens=False))) for s in strings],
        "decode_skip": [tok.decode(ids(tok(s, add_special_tokens=False)), skip_special_tokens=True) for s in strings],
        "chat_template": tok.chat_template,
    }
    if tok.chat_template:
        out["chat_text"] = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=g)
                            for c in conversations for g in (False, True)]
        out["chat_ids"] = [ids(tok.apply_chat_template(c, tokenize=True, add_generation_prompt=g))
                           for c in conversations for g in (False, True)]
    return out

if __name__ == "__main__":
    spec = json.load(sys.stdin)
    import transformers
    result = {"version": transformers.__version__,
              "dirs": {d: probe(d, spec["strings"], spec["conversations"]) for d in spec["dirs"]}}
    json.dump(result, sys.stdout)
'''


class VenvUnavailable(RuntimeError):
    """The 4.57 venv cannot be made here (no package index)."""


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_tf457_venv(venv: Path = VENV, log=print) -> Path:
    """The python of a venv with transformers 4.57.1: reused when ready, else made (under a file
    lock, so concurrent sessions build it once). Raises ``VenvUnavailable`` when pip cannot reach
    its index; any other pip failure raises ``RuntimeError`` with pip's output."""
    python, stamp = _python(venv), venv / STAMP
    wanted = "\n".join(REQUIREMENTS)
    if stamp.is_file() and stamp.read_text() == wanted and python.is_file():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == wanted and python.is_file():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        t0 = time.monotonic()
        base = getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True)
        pip = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--timeout", "30", "--retries", "1", *REQUIREMENTS],
            capture_output=True, text=True,
        )
        if pip.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            tail = (pip.stderr or pip.stdout).strip().splitlines()[-6:]
            message = f"pip install {' '.join(REQUIREMENTS)} failed: " + " | ".join(tail)
            if any(h in (pip.stderr + pip.stdout) for h in NETWORK_HINTS):
                raise VenvUnavailable(message)
            raise RuntimeError(message)
        stamp.write_text(wanted)
        log(f"made {venv} (transformers {TF457}) in {time.monotonic() - t0:.0f} s")
    return python


@pytest.fixture(scope="module")
def tf457():
    try:
        return ensure_tf457_venv()
    except VenvUnavailable as exc:
        pytest.skip(f"no transformers {TF457} venv at {VENV} and no package index to make one: {exc}")


def run_probe(python: Path | None, dirs: list[Path]) -> dict:
    """The probe under ``python`` (None: this interpreter, i.e. transformers 5.x), in a child
    process either way so no state of this session leaks in."""
    spec = json.dumps({"dirs": [str(d) for d in dirs], "strings": STRINGS, "conversations": CONVERSATIONS})
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    proc = subprocess.run([str(python or sys.executable), "-c", PROBE], input=spec, capture_output=True,
                          text=True, env=env, cwd=str(dirs[0].parent), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


# ------------------------------------------------------------------------------------ directories


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """The directories the pipeline writes, each made the way the pipeline makes it."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, Qwen2Tokenizer

    root = tmp_path_factory.mktemp("toks")
    dirs = {}
    # data_prep tokenizer / the demo: train_tokenizer (calls save_tokenizer)
    dirs["demo"] = train_tokenizer(TEXTS, root / "demo", vocab_size=360)
    # from-hf: load, add special tokens the way _grow_vocab does, plus a plain added token, save
    tok = AutoTokenizer.from_pretrained(dirs["demo"])
    tok.add_special_tokens({"additional_special_tokens": ["<extra_special>"]}, replace_extra_special_tokens=False)
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    dirs["grown"] = save_tokenizer(tok, root / "grown")
    # to-hf: the checkpoint's tokenizer directory copied next to a model config.json
    (root / "export").mkdir()
    model_config = {"model_type": "neo_chat", "architectures": ["NEOChatModel"]}
    (root / "export" / "config.json").write_text(json.dumps(model_config))
    dirs["export"] = save_tokenizer(dirs["grown"], root / "export")
    # a checkpoint written before this fix (5.x save_pretrained as is), then made compatible
    legacy = root / "legacy"
    tok.save_pretrained(str(legacy))
    raw = root / "legacy-raw"
    shutil.copytree(legacy, raw)
    dirs["legacy"] = make_tokenizer_dir_compatible(legacy)
    dirs["raw"] = raw
    # a Qwen2 tokenizer class (what from-hf of a Qwen3 download re-saves), built in 5.x from the
    # demo vocabulary: Qwen's normalizer and pre-tokenizer, NEO's tokens
    demo_json = json.loads((dirs["demo"] / "tokenizer.json").read_text())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in demo_json["model"]["merges"]]
    qwen = Qwen2Tokenizer(vocab=demo_json["model"]["vocab"], merges=merges)
    qwen.add_special_tokens({"additional_special_tokens": list(NEO_SPECIAL_TOKENS)}, replace_extra_special_tokens=False)
    qwen.chat_template = tok.chat_template
    dirs["qwen2"] = save_tokenizer(qwen, root / "qwen2")
    dirs["_in_memory"] = {"grown": tok, "qwen2": qwen}  # before saving
    return dirs


# ------------------------------------------------------------------------------------- unit tests


def test_config_rewrite_rules():
    five = {"tokenizer_class": "TokenizersBackend", "eos_token": EOS_TOKEN, "is_local": True, "local_files_only": False,
            "extra_special_tokens": ["<a>", {"content": "<b>", "special": True, "__type": "AddedToken"}, "<a>"],
            "additional_special_tokens": ["<b>", "<c>"]}
    out = compatible_tokenizer_config(five)
    assert out["tokenizer_class"] == COMPAT_TOKENIZER_CLASS and "extra_special_tokens" not in out
    assert "is_local" not in out and "local_files_only" not in out and out["eos_token"] == EOS_TOKEN
    assert out["additional_special_tokens"] == ["<b>", "<c>", "<a>"]
    assert five["tokenizer_class"] == "TokenizersBackend"  # pure
    named = compatible_tokenizer_config(
        {"tokenizer_class": "Qwen2Tokenizer", "extra_special_tokens": {"image_token": "<i>"}})
    assert named == {"tokenizer_class": COMPAT_TOKENIZER_CLASS, "extra_special_tokens": {"image_token": "<i>"}}
    slow = {"tokenizer_class": "T5Tokenizer"}
    assert compatible_tokenizer_config(slow, has_tokenizer_json=False) == slow
    assert compatible_tokenizer_config(out) == out  # idempotent


def test_written_files_have_the_compatible_form(tokenizer_dirs):
    for name in ("demo", "grown", "export", "legacy", "qwen2"):
        d = tokenizer_dirs[name]
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        assert cfg["tokenizer_class"] == COMPAT_TOKENIZER_CLASS, name
        assert not isinstance(cfg.get("extra_special_tokens"), list), name
        assert not set(cfg) & {"is_local", "local_files_only"}, name
        assert set(NEO_SPECIAL_TOKENS) <= {t if isinstance(t, str) else t["content"]
                                           for t in cfg["additional_special_tokens"]}, name
        if (d / "chat_template.jinja").is_file():
            assert cfg["chat_template"] == (d / "chat_template.jinja").read_text(), name
        before = (d / "tokenizer_config.json").read_bytes()
        assert make_tokenizer_dir_compatible(d) and (d / "tokenizer_config.json").read_bytes() == before, name
    raw = json.loads((tokenizer_dirs["raw"] / "tokenizer_config.json").read_text())
    assert raw["tokenizer_class"] == "TokenizersBackend" and isinstance(raw["extra_special_tokens"], list), (
        "transformers 5.x no longer writes the form 4.57 cannot read: the legacy case tests nothing")


# ------------------------------------------------------------------------------ 4.57 against 5.x


def test_both_versions_load_the_same_tokenizer(tf457, tokenizer_dirs):
    names = ["demo", "grown", "export", "legacy", "qwen2"]
    dirs = [tokenizer_dirs[n] for n in names]
    old = run_probe(tf457, [*dirs, tokenizer_dirs["raw"]])
    new = run_probe(None, dirs)
    assert old["version"] == TF457 and new["version"].startswith("5.")
    for name, d in zip(names, dirs):
        a, b = old["dirs"][str(d)], new["dirs"][str(d)]
        assert "error" not in a, (name, a)
        assert "error" not in b, (name, b)
        for key in b:
            assert a[key] == b[key], f"{name}: {key} differs: 4.57 {a[key]!r} vs 5.x {b[key]!r}"
        # NEO's contract, both versions: <|endoftext|> then NEO's tokens at ids 0..15, all special
        assert [a["added"][str(i)] for i in range(16)] == [[t, True] for t in (EOS_TOKEN, *NEO_SPECIAL_TOKENS)], name
        assert {EOS_TOKEN, *NEO_SPECIAL_TOKENS} <= set(a["all_special"]), name
        assert a["chat_text"][0] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhich shape?"
                                     "<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n"), name
    # the point of the fix: a 5.x save_pretrained directory as is does not load the same in 4.57
    raw = old["dirs"][str(tokenizer_dirs["raw"])]
    legacy = new["dirs"][str(tokenizer_dirs["legacy"])]
    assert "error" in raw or raw != legacy, "4.57 loads 5.x's own files unchanged: the rewrite may be unneeded"


def test_saving_changes_nothing_for_5x(tokenizer_dirs):
    """The tokenizers as they were in memory before saving, and their saved (rewritten, copied)
    directories loaded back by 5.x, encode and render alike."""
    from transformers import AutoTokenizer

    for name, sources in (("grown", ("grown", "export", "legacy")), ("qwen2", ("qwen2",))):
        before = tokenizer_dirs["_in_memory"][name]
        for source in sources:
            after = AutoTokenizer.from_pretrained(tokenizer_dirs[source])
            for s in STRINGS:
                for split in (False, True):
                    want = before(s, split_special_tokens=split)["input_ids"]
                    assert after(s, split_special_tokens=split)["input_ids"] == want, (source, s)
            assert sorted(before.all_special_tokens) == sorted(after.all_special_tokens), source
            assert before.chat_template == after.chat_template, source

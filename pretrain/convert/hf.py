"""Checkpoint conversion between HF directories and our checkpoints.

Our checkpoint (what training writes and reads): ``CKPT/model/`` (megatron dist_checkpointing,
reshardable to any TP/PP layout), ``CKPT/config.yaml`` (the resolved config; its ``model`` section
is the NEO shape) and ``CKPT/tokenizer/``. Conversion runs in one process at TP1PP1: resharding
from or to any layout is dist_checkpointing's job at load time.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from pretrain.checkpoint.checkpointer import CheckpointError
from pretrain.convert import hf_config, mapping
from pretrain.model.config import NeoModelConfig

from data_prep.schema import NEO_SPECIAL_TOKENS  # NEO's added tokens, in the reference's order
from data_prep.tokenizer import save_tokenizer
VOCAB_MULTIPLE = 128  # embedding rows are padded to this (divisible by any TP size we use)
SHARD_BYTES = 5 * 1024**3


# ---------------------------------------------------------------------------------------- files


def read_safetensors(src: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory (its index's files, or every *.safetensors). A damaged index
    or file, a file the index names that is not there, or a tensor stored twice is a CheckpointError."""
    src = Path(src)
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index} is damaged ({type(err).__name__}: {err}); "
                                  f"re-download the checkpoint") from None
        for name in files:
            if not isinstance(name, str) or Path(name).name != name or not (src / name).is_file():
                raise CheckpointError(f"{index} names {name!r}, which is not a file in {src}; "
                                      f"re-download the checkpoint")
    else:
        files = sorted(p.name for p in src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src} holds no .safetensors weights")
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            part = load_file(src / name)
        except Exception as err:  # safetensors' own error type for a truncated or foreign file
            raise CheckpointError(f"{src / name} is not a readable safetensors file ({err}); "
                                  f"re-download the checkpoint") from None
        twice = sorted(sd.keys() & part.keys())
        if twice:
            raise CheckpointError(f"{src / name} repeats {len(twice)} tensor(s) of another file "
                                  f"({', '.join(twice[:3])}); re-download the checkpoint")
        sd.update(part)
    return sd


def check_tensors(sd: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], what: str,
                  optional: dict[str, tuple[int, ...]] | None = None) -> None:
    """Every tensor of ``shapes`` present with that shape, nothing else but ``optional`` ones (of
    their shape): else one CheckpointError line with the counts and first names of what is wrong."""
    optional = optional or {}
    missing, unexpected = mapping.key_mismatch(sd, list(shapes), list(optional))
    want = {**optional, **shapes}
    wrong = [f"{k} {list(sd[k].shape)} not {list(want[k])}" for k in want
             if k in sd and tuple(sd[k].shape) != tuple(want[k])]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{what}: {mapping.describe_mismatch(missing, unexpected, wrong)}; "
                              f"re-download it or point at the right directory")


def write_safetensors(sd: dict[str, torch.Tensor], out: Path) -> None:
    """One file, or shards of at most SHARD_BYTES with HF's index, like save_pretrained."""
    shards, current, size = [], {}, 0
    for key in sorted(sd):
        nbytes = sd[key].numel() * sd[key].element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[key], size = sd[key].contiguous(), size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def read_model_config(ckpt: str | Path) -> NeoModelConfig:
    path = Path(ckpt) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt} is not one of our checkpoints (no config.yaml)")
    return NeoModelConfig(**yaml.safe_load(path.read_text())["model"])


# ------------------------------------------------------------------------------ model in-process


@contextlib.contextmanager
def single_process_model(neo: NeoModelConfig, init: bool = True, seed: int = 1234):
    """A TP1PP1 NeoModel in this process (joins a 1-rank group if none exists)."""
    from pretrain.distributed import runtime, spawn
    from pretrain.model.neo import NeoModel, transformer_config

    own_group = not torch.distributed.is_initialized()
    if own_group:
        # A group of its own, whatever the environment says: a conversion started by a training
        # rank inherits that rank's RANK/WORLD_SIZE/MASTER_PORT, which are not ours to join.
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spawn.free_port()), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # else we would wait for torchrun's store
        runtime.init_distributed()
    try:
        with runtime.model_parallel(1, 1, seed=seed):
            yield NeoModel(transformer_config(neo, init_weights=init), neo)
    finally:
        if own_group:
            runtime.shutdown()


def load_full_state_dict(model, sd: dict[str, torch.Tensor]) -> None:
    """Load every weight of a TP1PP1 model from ``sd``; megatron's ``_extra_state`` entries (empty
    TransformerEngine hooks) are the only keys allowed to be absent."""
    own = model.state_dict()
    wrong = [f"{k} {list(v.shape)} not {list(own[k].shape)}" for k, v in sd.items()
             if k in own and torch.is_tensor(own[k]) and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ValueError(f"state dict does not fit the model: {len(wrong)} tensor(s) of the wrong shape "
                         f"({', '.join(wrong[:3])})")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state")]
    if missing or unexpected:
        raise ValueError(f"state dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def save_model_checkpoint(model, neo: NeoModelConfig, out: str | Path, tokenizer=None) -> None:
    """Weights + model config (+ tokenizer): a checkpoint training can start from. Collective."""
    from pretrain.checkpoint.weights import save_weights

    from pretrain.checkpoint.checkpointer import write_manifest

    out = Path(out)
    save_weights(model, out / "model")
    if torch.distributed.get_rank() == 0:
        (out / "config.yaml").write_text(yaml.safe_dump({"model": asdict(neo)}, sort_keys=False))
        if tokenizer is not None:
            save_tokenizer(tokenizer, out / "tokenizer")
        write_manifest(out, step=0)  # every load checks it (checkpointer.resolve)
    torch.distributed.barrier()


# ------------------------------------------------------------------------------------ from HF


def write_random_qwen3(neo: NeoModelConfig, out: str | Path, tokenizer_dir: str | Path | None = None,
                       seed: int = 0) -> Path:
    """A randomly initialised HF Qwen3 (transformers) of ``neo``'s post-LLM shape: what a Qwen3
    download looks like, for the demo's stage 0 and for tests of ``init.hf_llm``."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    Qwen3ForCausalLM(Qwen3Config(
        vocab_size=neo.vocab_size, hidden_size=neo.hidden_size, intermediate_size=neo.ffn_hidden_size,
        num_hidden_layers=neo.post_llm_layers, num_attention_heads=neo.num_attention_heads,
        num_key_value_heads=neo.num_kv_heads, head_dim=neo.head_dim, rope_theta=neo.rope_theta,
        tie_word_embeddings=neo.tie_word_embeddings, rms_norm_eps=neo.norm_eps)).save_pretrained(out)
    if tokenizer_dir is not None:
        save_tokenizer(AutoTokenizer.from_pretrained(tokenizer_dir), out)
    return Path(out)



def _load_tokenizer(src: Path):
    """The HF directory's tokenizer, or None if it has none; one that does not load is an error."""
    from transformers import AutoTokenizer

    if not ((src / "tokenizer_config.json").is_file() or (src / "tokenizer.json").is_file()):
        return None
    try:
        return AutoTokenizer.from_pretrained(src)
    except Exception as err:  # transformers raises many kinds for a damaged tokenizer
        raise CheckpointError(f"{src}: the tokenizer does not load ({type(err).__name__}: {err}); "
                              f"re-download the checkpoint") from None


def _grow_vocab(tokenizer, neo: NeoModelConfig, sd: dict[str, torch.Tensor]) -> None:
    """Add NEO's special tokens; grow the embedding (and untied LM head) rows if they no longer
    fit, new rows at the mean embedding (a neutral start), padded to VOCAB_MULTIPLE."""
    missing = [t for t in NEO_SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    needed = len(tokenizer)
    if needed <= neo.vocab_size:
        return
    new_size = -(-needed // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in sd:
            old = sd[key]
            extra = old.mean(dim=0, keepdim=True).expand(new_size - old.shape[0], -1)
            sd[key] = torch.cat([old, extra.to(old.dtype)], dim=0)
    neo.vocab_size = new_size


def from_hf(src: str | Path, out: str | Path, pre_buffer_layers: int = 0, seed: int = 1234,
            vision_hidden_size: int | None = None) -> NeoModelConfig:
    """HF Qwen3 (as the post-LLM, spec init of the new weights) or reference NEO -> our checkpoint.

    The source is checked before anything is written: config.json must give every field the
    shape needs, and the weights must be exactly the tensors that shape has (a missing one would
    otherwise keep its random init, silently), else CheckpointError (one line)."""
    src, out = Path(src), Path(out)
    try:
        cfg = hf_config.read_config(src)
        is_neo = cfg.get("model_type") == "neo_chat"
        vision = {"vision_hidden_size": vision_hidden_size} if vision_hidden_size else {}
        neo = hf_config.from_neo(cfg) if is_neo else hf_config.from_qwen3(cfg, pre_buffer_layers, **vision)
    except hf_config.HFConfigError as err:
        if str(err).startswith(str(src)):  # read_config's own errors name the file
            raise CheckpointError(str(err)) from None
        raise CheckpointError(f"{src}: {err}; fix it or re-download the checkpoint") from None
    sd = {k: v.float() for k, v in read_safetensors(src).items()}
    if is_neo:  # every tensor the mapping needs, and nothing it would drop (shapes: against the model)
        optional = ["language_model.lm_head.weight"] if neo.tie_word_embeddings else []
        missing, unexpected = mapping.key_mismatch(sd, mapping.neo_hf_keys(neo), optional)
        if missing or unexpected:
            raise CheckpointError(f"{src} is not a complete NEO checkpoint of the shape its config.json gives "
                                  f"({neo.pre_buffer_layers} pre-Buffer + {neo.post_llm_layers} post-LLM layers): "
                                  f"{mapping.describe_mismatch(missing, unexpected)}; "
                                  f"re-download it or point at the right directory")
    else:  # before anything reads a tensor: a missing one would otherwise keep its random init
        shapes = mapping.qwen3_shapes(neo)
        tied_copy = {"lm_head.weight": shapes["model.embed_tokens.weight"]} if neo.tie_word_embeddings else {}
        check_tensors(sd, shapes, f"{src} is not a complete Qwen3 of the shape its config.json gives "
                                  f"({neo.post_llm_layers} layers, hidden {neo.hidden_size})", tied_copy)
    tokenizer = _load_tokenizer(src)

    if is_neo:
        with single_process_model(neo, init=False) as model:
            expected = {k: tuple(v.shape) for k, v in mapping.ours_to_neo_hf(model.state_dict(), neo).items()}
            tied_copy = ({"language_model.lm_head.weight": expected[mapping.LM + "embed_tokens.weight"]}
                         if neo.tie_word_embeddings else {})
            check_tensors(sd, expected, f"{src} does not fit the NEO shape its config.json gives", tied_copy)
            load_full_state_dict(model, mapping.neo_hf_to_ours(sd, neo))
            save_model_checkpoint(model, neo, out, tokenizer)
        return neo

    if tokenizer is not None:
        _grow_vocab(tokenizer, neo, sd)
    post_llm = mapping.qwen3_to_neo_hf(sd, neo)
    with single_process_model(neo, init=True, seed=seed) as model:
        fresh = mapping.ours_to_neo_hf(model.state_dict(), neo)  # pre-Buffer + vision: spec init
        for key, value in post_llm.items():
            if key not in fresh or fresh[key].shape != value.shape:
                raise CheckpointError(f"{src}: {key} does not fit the NEO shape its config.json gives")
        load_full_state_dict(model, mapping.neo_hf_to_ours({**fresh, **post_llm}, neo))
        save_model_checkpoint(model, neo, out, tokenizer)
    return neo


# -------------------------------------------------------------------------------------- to HF


def to_hf(ckpt: str | Path, out: str | Path, qwen3: bool = False, dtype: str = "float32") -> None:
    """Our checkpoint (any layout it was saved at; a step directory or a checkpoint directory,
    whose newest complete one is taken) -> reference NEO HF dir, or plain Qwen3."""
    from pretrain.checkpoint.weights import load_weights

    from pretrain.checkpoint.checkpointer import resolve

    ckpt, out = resolve(ckpt), Path(out)
    neo = read_model_config(ckpt)
    torch_dtype = getattr(torch, dtype)
    with single_process_model(neo, init=False) as model:
        load_weights(model, ckpt / "model")
        hf = mapping.ours_to_neo_hf({k: v.detach() for k, v in model.state_dict().items() if torch.is_tensor(v)}, neo)
    hf = {k: v.to(torch_dtype) for k, v in hf.items()}
    special = {}
    if (ckpt / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
        vocab = tok.get_vocab()
        special = {f"{name}_token_id": vocab[token] for name, token in
                   (("img_context", "<IMG_CONTEXT>"), ("img_start", "<img>"), ("img_end", "</img>")) if token in vocab}
    out.mkdir(parents=True, exist_ok=True)
    if qwen3:
        hf, config = mapping.neo_hf_to_qwen3(hf, neo), hf_config.to_qwen3(neo, dtype)
    else:
        config = hf_config.to_neo(neo, dtype, special)
    write_safetensors(hf, out)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if (ckpt / "tokenizer").is_dir():
        save_tokenizer(ckpt / "tokenizer", out)

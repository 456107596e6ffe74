"""config.json of HF checkpoints <-> NeoModelConfig.

Reference NEO layout (model_type ``neo_chat``): ``llm_config`` is a Qwen3 config whose
``num_hidden_layers`` counts ALL decoder layers and ``extra_num_layers`` the pre-Buffer, plus
``rope_theta_hw``; ``vision_config`` describes the patch embedding.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.model.config import NeoModelConfig

PRETRAIN_MIN_PIXELS, PRETRAIN_MAX_PIXELS = 65_536, 4_194_304


class HFConfigError(ValueError):
    """config.json is damaged: not JSON, or a field the conversion needs is missing or mistyped."""


def read_config(src: str | Path) -> dict:
    path = Path(src) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{src} is not an HF checkpoint directory (no config.json)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HFConfigError(f"{path} is not valid JSON ({err}); re-download the checkpoint") from None
    if not isinstance(cfg, dict):
        raise HFConfigError(f"{path} holds a JSON {type(cfg).__name__}, not an object; "
                            f"re-download the checkpoint")
    return cfg


def _int(cfg: dict, key: str, where: str, minimum: int = 1) -> int:
    """A required integer field (an int >= minimum), or HFConfigError naming it."""
    if cfg.get(key) is None:
        raise HFConfigError(f"config.json has no {where}{key!r}")
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise HFConfigError(f"config.json {where}{key!r} is {value!r}, not an integer >= {minimum}")
    return value


def _number(cfg: dict, key: str, where: str, default: float) -> float:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise HFConfigError(f"config.json {where}{key!r} is {value!r}, not a positive number")
    return float(value)


def _qwen3_fields(cfg: dict, where: str = "") -> dict:
    """NeoModelConfig fields of a Qwen3 config (``where``: the key path to it, for messages)."""
    hidden = _int(cfg, "hidden_size", where)
    heads = _int(cfg, "num_attention_heads", where)
    kv_heads = _int(cfg, "num_key_value_heads", where)
    if heads % kv_heads:
        raise HFConfigError(f"config.json {where}num_attention_heads={heads} is not a multiple of "
                            f"num_key_value_heads={kv_heads}")
    head_dim = _int(cfg, "head_dim", where) if cfg.get("head_dim") else hidden // heads
    rope = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    return dict(
        hidden_size=hidden,
        post_llm_layers=_int(cfg, "num_hidden_layers", where),
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=_int(cfg, "intermediate_size", where),
        vocab_size=_int(cfg, "vocab_size", where),
        rope_theta=_number(cfg, "rope_theta", where,
                           _number(rope, "rope_theta", where + "rope_parameters.", 1e6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        norm_eps=_number(cfg, "rms_norm_eps", where, 1e-6),
    )


def from_qwen3(cfg: dict, pre_buffer_layers: int, **vision) -> NeoModelConfig:
    if cfg.get("model_type") != "qwen3":
        raise ValueError(f"expected a Qwen3 config.json, got model_type={cfg.get('model_type')!r}")
    return NeoModelConfig(pre_buffer_layers=pre_buffer_layers, **_qwen3_fields(cfg), **vision)


def from_neo(cfg: dict) -> NeoModelConfig:
    if cfg.get("model_type") != "neo_chat":
        raise ValueError(f"expected a NEO config.json (model_type neo_chat), got {cfg.get('model_type')!r}")
    llm, vis = cfg.get("llm_config"), cfg.get("vision_config")
    for name, section in (("llm_config", llm), ("vision_config", vis)):
        if not isinstance(section, dict):
            raise HFConfigError(f"config.json has no {name!r} object")
    extra = _int(llm, "extra_num_layers", "llm_config.", minimum=0) if "extra_num_layers" in llm else 0
    fields = _qwen3_fields(llm, "llm_config.")
    if fields["post_llm_layers"] < extra:
        raise HFConfigError(f"config.json llm_config.num_hidden_layers={fields['post_llm_layers']} is less "
                            f"than llm_config.extra_num_layers={extra} (it counts all decoder layers)")
    fields["post_llm_layers"] -= extra
    neo = NeoModelConfig(pre_buffer_layers=extra, **fields)
    neo.rope_theta_hw = _number(llm, "rope_theta_hw", "llm_config.", 10_000.0)
    neo.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", llm.get("tie_word_embeddings", False)))
    neo.vision_hidden_size = 1024 if vis.get("hidden_size") is None else _int(vis, "hidden_size", "vision_config.")
    neo.patch_size = 16 if vis.get("patch_size") is None else _int(vis, "patch_size", "vision_config.")
    neo.downsample_ratio = _number(vis, "downsample_ratio", "vision_config.",
                                   _number(cfg, "downsample_ratio", "", 0.5))
    neo.rope_theta_vision = _number(vis, "rope_theta_vision", "vision_config.", 1_000.0)
    return neo


def to_qwen3(neo: NeoModelConfig, dtype: str) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": neo.hidden_size,
        "num_hidden_layers": neo.post_llm_layers,
        "num_attention_heads": neo.num_attention_heads,
        "num_key_value_heads": neo.num_kv_heads,
        "head_dim": neo.head_dim,
        "intermediate_size": neo.ffn_hidden_size,
        "vocab_size": neo.vocab_size,
        "rope_theta": neo.rope_theta,
        "rms_norm_eps": neo.norm_eps,
        "tie_word_embeddings": neo.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": 40_960,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def to_neo(neo: NeoModelConfig, dtype: str, special_ids: dict[str, int] | None = None) -> dict:
    llm = to_qwen3(neo, dtype)
    llm.update(
        num_hidden_layers=neo.num_layers,
        extra_num_layers=neo.pre_buffer_layers,
        rope_theta_hw=neo.rope_theta_hw,
        max_position_embeddings_hw=10_000,
    )
    return {
        "architectures": ["NEOChatModel"],
        "model_type": "neo_chat",
        "llm_config": llm,
        "vision_config": {
            "architectures": ["NEOVisionModel"],
            "model_type": "neo_vision",
            "hidden_size": neo.vision_hidden_size,
            "llm_hidden_size": neo.hidden_size,
            "patch_size": neo.patch_size,
            "num_channels": 3,
            "downsample_ratio": neo.downsample_ratio,
            "rope_theta_vision": neo.rope_theta_vision,
            "max_position_embeddings_vision": 10_000,
            "min_pixels": PRETRAIN_MIN_PIXELS,
            "max_pixels": PRETRAIN_MAX_PIXELS,
        },
        "downsample_ratio": neo.downsample_ratio,
        "tie_word_embeddings": neo.tie_word_embeddings,
        "template": "neo1_0",
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "torch_dtype": dtype,
        **(special_ids or {}),
    }

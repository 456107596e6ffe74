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


def read_config(src: str | Path) -> dict:
    path = Path(src) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{src} is not an HF checkpoint directory (no config.json)")
    return json.loads(path.read_text())


def from_qwen3(cfg: dict, pre_buffer_layers: int, **vision) -> NeoModelConfig:
    if cfg.get("model_type") != "qwen3":
        raise ValueError(f"expected a Qwen3 config.json, got model_type={cfg.get('model_type')!r}")
    return NeoModelConfig(
        hidden_size=cfg["hidden_size"],
        pre_buffer_layers=pre_buffer_layers,
        post_llm_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"],
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        ffn_hidden_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        rope_theta=float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        **vision,
    )


def from_neo(cfg: dict) -> NeoModelConfig:
    if cfg.get("model_type") != "neo_chat":
        raise ValueError(f"expected a NEO config.json (model_type neo_chat), got {cfg.get('model_type')!r}")
    llm, vis = cfg["llm_config"], cfg["vision_config"]
    extra = llm.get("extra_num_layers", 0)
    neo = from_qwen3({**llm, "model_type": "qwen3", "num_hidden_layers": llm["num_hidden_layers"] - extra}, extra)
    neo.rope_theta_hw = float(llm.get("rope_theta_hw", 10_000.0))
    neo.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", llm.get("tie_word_embeddings", False)))
    neo.vision_hidden_size = vis.get("hidden_size", 1024)
    neo.patch_size = vis.get("patch_size", 16)
    neo.downsample_ratio = vis.get("downsample_ratio", cfg.get("downsample_ratio", 0.5))
    neo.rope_theta_vision = float(vis.get("rope_theta_vision", 1_000.0))
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

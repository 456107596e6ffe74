"""Weight mappings between our megatron layout and the HF layouts, on full (unsharded) tensors.

Three name spaces:
  ours     the TP1PP1 state dict of ``NeoModel`` (fused q|k|v and q_hw|k_hw per KV group,
           fused gate|up), as dist_checkpointing stores it once resharded to one rank;
  neo_hf   the reference NEO HF checkpoint (``language_model.model.layers.N.self_attn.q_proj``...,
           ``vision_model.embeddings.*``), shared/spec/NEO_MODEL.md "Reference checkpoint layout";
  qwen3    a plain HF Qwen3 checkpoint (``model.layers.N.self_attn.q_proj``...).
All functions are pure: dicts of tensors in, dicts of tensors out, nothing dropped silently.
"""

from __future__ import annotations

import torch

from pretrain.model.config import NeoModelConfig

LM = "language_model.model."
VISION = "vision_model.embeddings."

# Per-layer tensors that map one to one (ours -> neo_hf suffix).
_LAYER_SAME = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "self_attention.q_layernorm_h.weight": "self_attn.q_norm_h.weight",
    "self_attention.q_layernorm_w.weight": "self_attn.q_norm_w.weight",
    "self_attention.k_layernorm_h.weight": "self_attn.k_norm_h.weight",
    "self_attention.k_layernorm_w.weight": "self_attn.k_norm_w.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_GLOBAL_SAME = {
    "embedding.word_embeddings.weight": LM + "embed_tokens.weight",
    "decoder.final_layernorm.weight": LM + "norm.weight",
    "output_layer.weight": "language_model.lm_head.weight",
    "vision.patch_embedding.weight": VISION + "patch_embedding.weight",
    "vision.patch_embedding.bias": VISION + "patch_embedding.bias",
    "vision.dense_embedding.weight": VISION + "dense_embedding.weight",
    "vision.dense_embedding.bias": VISION + "dense_embedding.bias",
}


def _groups(cfg: NeoModelConfig) -> tuple[int, int, int]:
    return cfg.num_kv_heads, cfg.num_attention_heads // cfg.num_kv_heads, cfg.head_dim


def _split_grouped(w: torch.Tensor, cfg: NeoModelConfig, parts: int) -> list[torch.Tensor]:
    """[n_kv * (G + parts) * d, h] -> G query-head rows then ``parts`` single-head rows, each
    re-flattened over KV groups: [q (n_kv*G*d, h), x1 (n_kv*d, h), ...]."""
    nkv, g, d = _groups(cfg)
    view = w.view(nkv, g + parts, d, -1)
    q = view[:, :g].reshape(nkv * g * d, -1)
    return [q] + [view[:, g + i].reshape(nkv * d, -1) for i in range(parts)]


def _join_grouped(q: torch.Tensor, others: list[torch.Tensor], cfg: NeoModelConfig) -> torch.Tensor:
    nkv, g, d = _groups(cfg)
    h = q.shape[-1]
    blocks = [q.view(nkv, g, d, h)] + [o.view(nkv, 1, d, h) for o in others]
    return torch.cat(blocks, dim=1).reshape(-1, h)


def ours_to_neo_hf(sd: dict[str, torch.Tensor], cfg: NeoModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    rest = {k: v for k, v in sd.items() if not k.endswith("._extra_state")}  # megatron's TE hooks
    for ours, theirs in _GLOBAL_SAME.items():
        if ours in rest:
            out[theirs] = rest.pop(ours)
    for n in range(cfg.num_layers):
        src, dst = f"decoder.layers.{n}.", f"{LM}layers.{n}."
        for ours, theirs in _LAYER_SAME.items():
            out[dst + theirs] = rest.pop(src + ours)
        q, k, v = _split_grouped(rest.pop(src + "self_attention.linear_qkv.weight"), cfg, 2)
        q_hw, k_hw = _split_grouped(rest.pop(src + "self_attention.linear_qk_hw.weight"), cfg, 1)
        gate, up = rest.pop(src + "mlp.linear_fc1.weight").chunk(2, dim=0)
        out.update({
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v, dst + "self_attn.q_proj_hw.weight": q_hw,
            dst + "self_attn.k_proj_hw.weight": k_hw, dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
        })
    if rest:
        raise ValueError(f"unmapped weights: {sorted(rest)[:5]}")
    return {k: v.contiguous() for k, v in out.items()}


def neo_hf_to_ours(sd: dict[str, torch.Tensor], cfg: NeoModelConfig) -> dict[str, torch.Tensor]:
    out, rest = {}, dict(sd)
    for ours, theirs in _GLOBAL_SAME.items():
        if theirs in rest:
            out[ours] = rest.pop(theirs)
    if cfg.tie_word_embeddings:
        rest.pop("language_model.lm_head.weight", None)  # HF may materialise the tied copy
    for n in range(cfg.num_layers):
        src, dst = f"{LM}layers.{n}.", f"decoder.layers.{n}."
        for ours, theirs in _LAYER_SAME.items():
            out[dst + ours] = rest.pop(src + theirs)
        attn = lambda name: rest.pop(src + "self_attn." + name)  # noqa: E731
        out[dst + "self_attention.linear_qkv.weight"] = _join_grouped(
            attn("q_proj.weight"), [attn("k_proj.weight"), attn("v_proj.weight")], cfg)
        out[dst + "self_attention.linear_qk_hw.weight"] = _join_grouped(
            attn("q_proj_hw.weight"), [attn("k_proj_hw.weight")], cfg)
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [rest.pop(src + "mlp.gate_proj.weight"), rest.pop(src + "mlp.up_proj.weight")], dim=0)
    if rest:
        raise ValueError(f"weights not part of a NEO model of this shape: {sorted(rest)[:5]}")
    return {k: v.contiguous() for k, v in out.items()}


def q_proj_hw_from_q_proj(q_proj: torch.Tensor, cfg: NeoModelConfig) -> torch.Tensor:
    """The spec's init: per head, keep quarters 1 and 3 of q_proj's d output channels (the
    highest-frequency rotary pairs of the T part), concatenate (d/2), repeat twice (d)."""
    heads, d = cfg.num_attention_heads, cfg.head_dim
    per_head = q_proj.view(heads, d, -1)
    quarter = d // 4
    half = torch.cat([per_head[:, 0:quarter], per_head[:, 2 * quarter:3 * quarter]], dim=1)
    return torch.cat([half, half], dim=1).reshape(heads * d, -1)


def qwen3_to_neo_hf(sd: dict[str, torch.Tensor], cfg: NeoModelConfig) -> dict[str, torch.Tensor]:
    """A Qwen3 checkpoint as the post-LLM of a NEO model (layer i -> i + pre_buffer_layers), with
    the spec's init of the new H/W weights. Pre-Buffer and vision weights are NOT produced: the
    caller takes them from a freshly initialised model."""
    out, rest = {}, dict(sd)
    out[LM + "embed_tokens.weight"] = rest.pop("model.embed_tokens.weight")
    out[LM + "norm.weight"] = rest.pop("model.norm.weight")
    lm_head = rest.pop("lm_head.weight", None)
    if not cfg.tie_word_embeddings:
        if lm_head is None:
            raise ValueError("untied Qwen3 checkpoint without lm_head.weight")
        out["language_model.lm_head.weight"] = lm_head
    nkv, d = cfg.num_kv_heads, cfg.head_dim
    for i in range(cfg.post_llm_layers):
        src, dst = f"model.layers.{i}.", f"{LM}layers.{i + cfg.pre_buffer_layers}."
        for key in [k for k in rest if k.startswith(src)]:
            out[dst + key[len(src):]] = rest.pop(key)
        q_proj = out[dst + "self_attn.q_proj.weight"]
        out[dst + "self_attn.q_proj_hw.weight"] = q_proj_hw_from_q_proj(q_proj, cfg)
        out[dst + "self_attn.k_proj_hw.weight"] = torch.zeros(nkv * d, q_proj.shape[1], dtype=q_proj.dtype)
        for norm in ("q_norm_h", "q_norm_w", "k_norm_h", "k_norm_w"):
            out[dst + f"self_attn.{norm}.weight"] = torch.ones(d // 2, dtype=q_proj.dtype)
    if rest:
        raise ValueError(f"Qwen3 weights left over (more layers than post_llm_layers?): {sorted(rest)[:5]}")
    return out


def neo_hf_to_qwen3(sd: dict[str, torch.Tensor], cfg: NeoModelConfig) -> dict[str, torch.Tensor]:
    """The post-LLM as a plain Qwen3 checkpoint. Exact only when there is no pre-Buffer and the
    H/W branch contributes nothing (k_proj_hw == 0): otherwise refuse rather than mislead."""
    if cfg.pre_buffer_layers:
        raise ValueError(f"--qwen3 export needs a model without pre-Buffer layers (it has {cfg.pre_buffer_layers})")
    out = {}
    for key, value in sd.items():
        if key.startswith(VISION):
            continue
        if "_hw." in key or any(f".{n}." in key for n in ("q_norm_h", "q_norm_w", "k_norm_h", "k_norm_w")):
            if key.endswith("k_proj_hw.weight") and value.abs().max() > 0:
                raise ValueError(f"{key} is not zero: the H/W attention branch is in use, so the model is not a Qwen3")
            continue
        out[key.replace("language_model.", "", 1)] = value
    return out

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


# Per-layer tensors of a plain HF Qwen3 (attention without biases), in checkpoint order.
_QWEN3_LAYER = (
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
# Per-layer tensors of the reference NEO layout besides _LAYER_SAME's.
_NEO_LAYER_FUSED = (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.q_proj_hw.weight", "self_attn.k_proj_hw.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
)


def qwen3_shapes(cfg: NeoModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a plain HF Qwen3 of the post-LLM's shape holds, with its shape (lm_head only
    when untied). ``cfg.vocab_size`` is the checkpoint's own (before NEO's tokens are added)."""
    h, d, f, v = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size
    nq, nkv = cfg.num_attention_heads * d, cfg.num_kv_heads * d
    shapes = [(h,), (nq, h), (nkv, h), (nkv, h), (h, nq), (d,), (d,), (h,), (f, h), (f, h), (h, f)]
    layer = dict(zip(_QWEN3_LAYER, shapes, strict=True))
    out = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg.post_llm_layers):
        out.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    out["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    return out


def neo_hf_keys(cfg: NeoModelConfig) -> list[str]:
    """Every tensor of a reference NEO HF checkpoint of this shape (lm_head only when untied)."""
    keys = [theirs for ours, theirs in _GLOBAL_SAME.items()
            if ours != "output_layer.weight" or not cfg.tie_word_embeddings]
    for n in range(cfg.num_layers):
        keys += [f"{LM}layers.{n}.{name}" for name in (*_LAYER_SAME.values(), *_NEO_LAYER_FUSED)]
    return keys


def key_mismatch(present, expected, optional=()) -> tuple[list[str], list[str]]:
    """(expected keys absent, in ``expected``'s order; present keys neither expected nor optional, sorted)."""
    present, wanted = set(present), set(expected)
    return [k for k in expected if k not in present], sorted(present - wanted - set(optional))


def describe_mismatch(missing: list[str], unexpected: list[str], wrong_shape: list[str] = (),
                      few: int = 3) -> str:
    """One line: counts and the first few names of missing, unexpected and misshapen tensors."""
    def some(keys) -> str:
        return ", ".join(keys[:few]) + (", ..." if len(keys) > few else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) it should not have ({some(unexpected)})")
    if wrong_shape:
        parts.append(f"{len(wrong_shape)} tensor(s) of the wrong shape ({some(list(wrong_shape))})")
    return "; ".join(parts)


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
    optional = ["language_model.lm_head.weight"] if cfg.tie_word_embeddings else []
    missing, unexpected = key_mismatch(sd, neo_hf_keys(cfg), optional)
    if missing or unexpected:
        raise ValueError(f"not a NEO checkpoint of this shape ({cfg.pre_buffer_layers} pre-Buffer + "
                         f"{cfg.post_llm_layers} post-LLM layers): {describe_mismatch(missing, unexpected)}")
    out, rest = {}, dict(sd)
    if cfg.tie_word_embeddings:
        rest.pop("language_model.lm_head.weight", None)  # HF may materialise the tied copy
    for ours, theirs in _GLOBAL_SAME.items():
        if theirs in rest:
            out[ours] = rest.pop(theirs)
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
    caller takes them from a freshly initialised model. Every tensor of the Qwen3 must be there
    and nothing else (a tied checkpoint may carry lm_head.weight, the embedding's copy)."""
    optional = ["lm_head.weight"] if cfg.tie_word_embeddings else []
    missing, unexpected = key_mismatch(sd, list(qwen3_shapes(cfg)), optional)
    if missing or unexpected:
        raise ValueError(f"not a Qwen3 checkpoint of {cfg.post_llm_layers} layers: "
                         f"{describe_mismatch(missing, unexpected)}")
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

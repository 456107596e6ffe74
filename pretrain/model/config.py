"""The NEO model's shape: one dataclass, presets in conf/model/*.yaml.

A NEO model is a Qwen3 decoder (the post-LLM) with ``pre_buffer_layers`` fresh decoder layers in
front of it, native attention in every layer and a patch embedding for pixels
(shared/spec/NEO_MODEL.md). Everything the model, the converters and the FLOP counter need to know
about the architecture lives here; parallel layout and training settings do not.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class NeoModelConfig:
    hidden_size: int = 2048
    pre_buffer_layers: int = 12
    post_llm_layers: int = 28
    num_attention_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    ffn_hidden_size: int = 6144
    vocab_size: int = 151936
    rope_theta: float = 1_000_000.0
    rope_theta_hw: float = 10_000.0
    rope_theta_vision: float = 1_000.0
    vision_hidden_size: int = 1024
    patch_size: int = 16
    downsample_ratio: float = 0.5
    tie_word_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02

    @property
    def num_layers(self) -> int:
        return self.pre_buffer_layers + self.post_llm_layers

    @property
    def token_pixels(self) -> int:
        """Side in pixels of the square one LLM token covers (16 / 0.5 = 32)."""
        return round(self.patch_size / self.downsample_ratio)

    def layer_parameters(self) -> tuple[int, int]:
        """(tensor-parallel-sharded, replicated) parameter counts of one decoder layer."""
        h, d, f = self.hidden_size, self.head_dim, self.ffn_hidden_size
        nq, nkv = self.num_attention_heads, self.num_kv_heads
        sharded = h * (nq * d + 2 * nkv * d) + h * (nq * d + nkv * d) + nq * d * h + 3 * h * f
        replicated = 2 * d + 4 * (d // 2) + 2 * h  # QK-norms (t, h, w) + the two layer norms
        return sharded, replicated

    def vision_parameters(self) -> int:
        p, v = self.patch_size, self.vision_hidden_size
        merge = round(1 / self.downsample_ratio)
        return 3 * p * p * v + v + v * merge * merge * self.hidden_size + self.hidden_size

    def num_parameters(self) -> int:
        """All parameters of the model (tied embeddings counted once)."""
        sharded, replicated = self.layer_parameters()
        heads = 1 if self.tie_word_embeddings else 2
        return (self.num_layers * (sharded + replicated) + heads * self.vocab_size * self.hidden_size
                + self.hidden_size + self.vision_parameters())

    def check(self) -> None:
        """Internal consistency of the shape, independent of any parallel layout."""
        from pretrain.config import ConfigError

        if self.num_attention_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_kv_heads={self.num_kv_heads} (GQA needs whole query groups)"
            )
        if self.head_dim % 4:
            raise ConfigError(
                f"model.head_dim={self.head_dim} must be divisible by 4 (the H and W rotary parts "
                "are head_dim/2 wide each and rotate pairs)"
            )
        if self.num_layers < 1:
            raise ConfigError("model needs at least one decoder layer")
        if (1 / self.downsample_ratio) % 1:
            raise ConfigError(f"model.downsample_ratio={self.downsample_ratio} must be 1/k for an integer k")

"""Native-RoPE and the vision 2D RoPE against per-channel-pair loops written from the spec
(spec/NEO_MODEL.md, "Native attention" step 3 and "Pixels to tokens"), plus bitwise parity of
the rotate_half part with HF Qwen3 (the reference builds its rotary embeddings from it).

Tolerances: the brute force works in float64, the code forms angles in float32 (as the
reference does). Pair 0 has inv_freq exactly 1, so its angle (an integer position) is exact;
every other angle here is below 32 * base^(-2/m) < 7 rad with a float32 error under
7 * 2^-22 ~ 1.7e-6 rad, so randn inputs (pair norms < 5) agree to 1e-5 (fp32 cos/sin add ~1e-7).
"""

import math

import torch
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb

from pretrain.model.native_rope import (
    apply_native_rope,
    native_rope,
    native_rope_cos_sin,
    rope_cos_sin,
    vision_rope_2d,
)

ATOL = 1e-5  # see module docstring
MAX_POS = 32


def rotate_pair(a, b, angle):
    """The rotation of one channel pair (a, b) by angle."""
    return a * math.cos(angle) - b * math.sin(angle), b * math.cos(angle) + a * math.sin(angle)


def brute_rotate_half(vector, position, base):
    """rotate_half RoPE of one vector of width m: channel i pairs with i + m/2, frequency
    base^(-2i/m)."""
    m = len(vector)
    out = list(vector)
    for i in range(m // 2):
        angle = position * base ** (-2 * i / m)
        out[i], out[i + m // 2] = rotate_pair(vector[i], vector[i + m // 2], angle)
    return out


def brute_native_rope(x, positions, d, theta, theta_hw):
    """x [s, b, heads, 2d] = concat(t [d], h [d/2], w [d/2]) per head; T with theta over d
    channels, H and W with theta_hw over d/2 channels each."""
    s, b, heads, _ = x.shape
    out = torch.empty_like(x, dtype=torch.float64)
    for i in range(s):
        for j in range(b):
            t, h, w = (int(positions[axis, j, i]) for axis in range(3))
            for head in range(heads):
                v = x[i, j, head].double().tolist()
                out[i, j, head] = torch.tensor(
                    brute_rotate_half(v[:d], t, theta)
                    + brute_rotate_half(v[d : d + d // 2], h, theta_hw)
                    + brute_rotate_half(v[d + d // 2 :], w, theta_hw),
                    dtype=torch.float64,
                )
    return out


def test_rope_cos_sin_formula():
    torch.manual_seed(4)
    positions = torch.randint(0, MAX_POS, (2, 7))
    cos, sin = rope_cos_sin(positions, 12, 10_000.0)
    assert cos.dtype == torch.float32 and cos.shape == (2, 7, 12)
    for p, c, s in zip(positions.flatten().tolist(), cos.reshape(-1, 12), sin.reshape(-1, 12)):
        angles = [p * 10_000.0 ** (-2 * i / 12) for i in range(6)] * 2  # emb = cat(freqs, freqs)
        expected_cos = torch.tensor([math.cos(a) for a in angles], dtype=torch.float64)
        expected_sin = torch.tensor([math.sin(a) for a in angles], dtype=torch.float64)
        torch.testing.assert_close(c.double(), expected_cos, atol=ATOL, rtol=0)
        torch.testing.assert_close(s.double(), expected_sin, atol=ATOL, rtol=0)


def test_native_rope_matches_brute_force():
    torch.manual_seed(0)
    s, b, heads, d = 5, 2, 3, 8
    x = torch.randn(s, b, heads, 2 * d)
    positions = torch.randint(0, MAX_POS, (3, b, s))
    cos, sin = native_rope_cos_sin(positions, d, 1_000_000.0, 10_000.0)
    assert cos.shape == (s, b, 1, 2 * d) and cos.dtype == torch.float32
    got = apply_native_rope(x, cos, sin, d)
    torch.testing.assert_close(got.double(), brute_native_rope(x, positions, d, 1e6, 1e4), atol=ATOL, rtol=0)
    assert torch.equal(native_rope(x, positions, d, 1_000_000.0, 10_000.0), got)


def test_scores_depend_only_on_relative_positions():
    # Shifting every T, H and W of q and k by constants leaves all q.k scores unchanged.
    torch.manual_seed(1)
    s, b, heads, d = 6, 1, 2, 8
    q, k = torch.randn(2, s, b, heads, 2 * d).double()
    positions = torch.randint(0, MAX_POS, (3, b, s))
    shift = torch.tensor([7, 3, 5]).view(3, 1, 1)

    def scores(pos):
        rq, rk = (native_rope(v, pos, d, 1e6, 1e4) for v in (q, k))
        return torch.einsum("qbhc,kbhc->bhqk", rq, rk)

    torch.testing.assert_close(scores(positions), scores(positions + shift), atol=1e-4, rtol=0)


def test_t_part_matches_hf_qwen3_bitwise():
    # The reference uses HF's Qwen3RotaryEmbedding / apply_rotary_pos_emb for each part.
    torch.manual_seed(5)
    d = 128
    config = Qwen3Config(head_dim=d, hidden_size=256, num_attention_heads=2, rope_theta=1_000_000.0)
    positions = torch.randint(0, 32_768, (1, 50))
    hf_cos, hf_sin = Qwen3RotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = rope_cos_sin(positions, d, 1_000_000.0)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)

    q = torch.randn(1, 2, 50, d)  # HF layout [b, heads, s, d]
    hf_q, _ = apply_rotary_pos_emb(q, q, hf_cos, hf_sin)
    x = torch.cat([q, torch.zeros(1, 2, 50, d)], dim=-1).permute(2, 0, 1, 3)  # [s, b, heads, 2d]
    cos_n, sin_n = native_rope_cos_sin(torch.stack([positions] * 3), d, 1_000_000.0, 10_000.0)
    ours = apply_native_rope(x, cos_n, sin_n, d)[..., :d].permute(1, 2, 0, 3)
    assert torch.equal(ours, hf_q)


def test_hw_parts_match_hf_rotary_at_half_dim():
    # The reference builds the H/W rotary as Qwen3RotaryEmbedding with head_dim d/2, theta_hw.
    torch.manual_seed(6)
    d = 128
    config = Qwen3Config(head_dim=d // 2, hidden_size=256, num_attention_heads=2, rope_theta=10_000.0)
    positions = torch.randint(0, 100, (1, 40))
    hf_cos, hf_sin = Qwen3RotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
    thw = torch.stack([torch.zeros_like(positions), positions, positions])
    cos, sin = native_rope_cos_sin(thw, d, 1e6, 1e4)
    # Our sine carries rotate_half's sign: -sin on the first half of each part.
    signed = torch.cat([-hf_sin[0, :, : d // 4], hf_sin[0, :, d // 4 :]], dim=-1)
    for part in (slice(d, d + d // 2), slice(d + d // 2, 2 * d)):
        assert torch.equal(cos[:, 0, 0, part], hf_cos[0]) and torch.equal(sin[:, 0, 0, part], signed)


def test_bf16_input_keeps_dtype():
    torch.manual_seed(2)
    x = torch.randn(4, 2, 2, 16)
    positions = torch.randint(0, MAX_POS, (3, 2, 4))
    cos, sin = native_rope_cos_sin(positions, 8, 1e6, 1e4)
    out = apply_native_rope(x.bfloat16(), cos, sin, 8)
    assert out.dtype == torch.bfloat16
    # float32 rotation of bf16-rounded inputs, then one bf16 rounding: within bf16's 2^-8.
    torch.testing.assert_close(out.float(), apply_native_rope(x, cos, sin, 8), atol=0.03, rtol=2**-7)


def brute_vision_rope(features, rows, cols, base):
    """First C/2 channels rotated by the column x, last C/2 by the row y; pairs are channels
    (2i, 2i+1) within a half; rotary dim C/2, so pair i has frequency base^(-2i/(C/2))."""
    n, c = features.shape
    half = c // 2
    out = features.double().clone()
    for p in range(n):
        for start, position in ((0, int(cols[p])), (half, int(rows[p]))):
            for i in range(half // 2):
                a, b = start + 2 * i, start + 2 * i + 1
                angle = position * base ** (-2 * i / half)
                out[p, a], out[p, b] = rotate_pair(float(features[p, a]), float(features[p, b]), angle)
    return out


def test_vision_rope_2d_matches_brute_force():
    torch.manual_seed(3)
    features = torch.randn(12, 16)
    rows, cols = torch.randint(0, MAX_POS, (2, 12))
    got = vision_rope_2d(features, rows, cols, 1000.0)
    assert got.dtype == torch.float32
    expected = brute_vision_rope(features, rows, cols, 1000.0)
    torch.testing.assert_close(got.double(), expected, atol=ATOL, rtol=0)
    assert vision_rope_2d(features.bfloat16(), rows, cols, 1000.0).dtype == torch.bfloat16

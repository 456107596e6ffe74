"""A deliberately naive NEO forward pass written from shared/spec/NEO_MODEL.md, on weights in the
reference HF layout: per-token positions, per-pair mask, per-head attention (steps 1-6), per-image
patch embedding. Slow and obviously correct; the megatron model must match it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LM = "language_model.model."
VIS = "vision_model.embeddings."


def rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x, pos: int, base: float):
    """rotate_half RoPE of one vector x [dim] at integer position pos."""
    dim = x.shape[-1]
    out = x.clone()
    for j in range(dim // 2):
        theta = pos * base ** (-2 * j / dim)
        c, s = math.cos(theta), math.sin(theta)
        a, b = x[j].item(), x[j + dim // 2].item()
        out[j], out[j + dim // 2] = a * c - b * s, b * c + a * s
    return out


def positions(doc_ids, image_ids, grids):
    """Per-token state machine: T per document, images cost one step; H/W row/col in the grid."""
    s = len(doc_ids)
    t, h, w = [0] * s, [0] * s, [0] * s
    cur, seen = -1, {}
    for i in range(s):
        if i == 0 or doc_ids[i] != doc_ids[i - 1]:
            cur = -1
        img = image_ids[i]
        if img >= 0:
            if i == 0 or image_ids[i - 1] != img:  # first context token: T of <img> + 1
                cur += 1
                seen[img] = 0
            t[i] = cur
            k = seen[img]
            h[i], w[i] = divmod(k, int(grids[img][1]))
            seen[img] = k + 1
        else:
            cur += 1
            t[i] = cur
    return t, h, w


def allowed(doc_ids, image_ids, q, k):
    if doc_ids[q] != doc_ids[k]:
        return False
    return k <= q or (image_ids[q] >= 0 and image_ids[q] == image_ids[k])


def vision_tokens(sd, patches, grids, cfg):
    """Per image: patches -> conv16 (as a matmul) -> GELU -> 2D RoPE (interleaved pairs, x on the
    first half, y on the second, patch grid) -> dense 2x2 conv -> row-major tokens."""
    pw, pb = sd[VIS + "patch_embedding.weight"], sd[VIS + "patch_embedding.bias"]
    feats = F.gelu(patches @ pw.reshape(pw.shape[0], -1).t() + pb)
    out, start = [], 0
    for gh, gw in grids.tolist():
        ph, pwid = 2 * gh, 2 * gw
        f = feats[start:start + ph * pwid].clone()
        start += ph * pwid
        c = f.shape[1]
        half = c // 2
        for idx in range(ph * pwid):
            y, x = divmod(idx, pwid)
            for part, p in ((0, x), (1, y)):
                for j in range(half // 2):
                    theta = p * cfg.rope_theta_vision ** (-2 * j / half)
                    a_i, b_i = part * half + 2 * j, part * half + 2 * j + 1
                    a, b = f[idx, a_i].item(), f[idx, b_i].item()
                    f[idx, a_i] = a * math.cos(theta) - b * math.sin(theta)
                    f[idx, b_i] = b * math.cos(theta) + a * math.sin(theta)
        grid = f.t().reshape(1, c, ph, pwid)
        dense = F.conv2d(grid, sd[VIS + "dense_embedding.weight"], sd[VIS + "dense_embedding.bias"], stride=2)
        out.append(dense[0].reshape(dense.shape[1], -1).t())
    return torch.cat(out)


def attention(sd, prefix, x, pos, doc_ids, image_ids, cfg):
    """Steps 1-6 of the spec for one sequence x [s, hidden], head by head."""
    s = x.shape[0]
    d, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_kv_heads
    W = lambda name: sd[prefix + "self_attn." + name]  # noqa: E731
    q_all, k_all, v_all = x @ W("q_proj.weight").t(), x @ W("k_proj.weight").t(), x @ W("v_proj.weight").t()
    qhw_all, khw_all = x @ W("q_proj_hw.weight").t(), x @ W("k_proj_hw.weight").t()
    t, h, w = pos
    eps = cfg.norm_eps

    def full(vec_t, vec_hw, norm, norm_h, norm_w, i):
        vt = rope(rms(vec_t, W(norm), eps), t[i], cfg.rope_theta)
        vh = rope(rms(vec_hw[: d // 2], W(norm_h), eps), h[i], cfg.rope_theta_hw)
        vw = rope(rms(vec_hw[d // 2:], W(norm_w), eps), w[i], cfg.rope_theta_hw)
        return torch.cat([vt, vh, vw])

    heads = []
    for head in range(nh):
        kvh = head // (nh // nkv)
        sl, kl = slice(head * d, (head + 1) * d), slice(kvh * d, (kvh + 1) * d)
        q = torch.stack([full(q_all[i, sl], qhw_all[i, sl], "q_norm.weight", "q_norm_h.weight", "q_norm_w.weight", i) for i in range(s)])
        k = torch.stack([full(k_all[i, kl], khw_all[i, kl], "k_norm.weight", "k_norm_h.weight", "k_norm_w.weight", i) for i in range(s)])
        scores = q @ k.t() / math.sqrt(d)
        for qi in range(s):
            for ki in range(s):
                if not allowed(doc_ids, image_ids, qi, ki):
                    scores[qi, ki] = float("-inf")
        heads.append(torch.softmax(scores, dim=-1) @ v_all[:, kl])
    return torch.cat(heads, dim=-1) @ W("o_proj.weight").t()


def forward(sd, cfg, tokens, doc_ids, image_ids, grids, patches):
    """Logits [b, s, vocab] of the reference-layout weights ``sd`` for a packed batch."""
    emb = sd[LM + "embed_tokens.weight"]
    x = emb[tokens].clone()
    if grids.shape[0]:
        img_tokens = vision_tokens(sd, patches, grids, cfg)
        x[image_ids >= 0] = img_tokens  # [b, s]-major order, image by image
    out = []
    for row in range(tokens.shape[0]):
        docs, imgs = doc_ids[row].tolist(), image_ids[row].tolist()
        pos = positions(docs, imgs, grids)
        hdn = x[row]
        for n in range(cfg.num_layers):
            p = f"{LM}layers.{n}."
            hdn = hdn + attention(sd, p, rms(hdn, sd[p + "input_layernorm.weight"], cfg.norm_eps), pos, docs, imgs, cfg)
            a = rms(hdn, sd[p + "post_attention_layernorm.weight"], cfg.norm_eps)
            mlp = F.silu(a @ sd[p + "mlp.gate_proj.weight"].t()) * (a @ sd[p + "mlp.up_proj.weight"].t())
            hdn = hdn + mlp @ sd[p + "mlp.down_proj.weight"].t()
        hdn = rms(hdn, sd[LM + "norm.weight"], cfg.norm_eps)
        head = emb if cfg.tie_word_embeddings else sd["language_model.lm_head.weight"]
        out.append(hdn @ head.t())
    return torch.stack(out)

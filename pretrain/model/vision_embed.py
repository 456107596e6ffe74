"""Pixels to LLM tokens: NEO's patch embedding (first pipeline stage only).

An image of H x W pixels (both multiples of 32) is cut into 16x16 patches, row-major, each
flattened as (c, 16, 16). ``VisionEmbedding`` maps them to LLM tokens:
Conv16 (as a matmul on flattened patches) -> exact GELU -> 2D RoPE on the patch grid ->
2x2 stride-2 ``dense_embedding`` conv, one token per 32x32 pixels, row-major in the token grid.

The reference runs the dense conv image by image in a Python loop. Here the 2x2
neighbourhoods of all images are gathered with one index tensor and merged with one matmul,
so a micro-batch with hundreds of images of different grids costs the same few kernels as
one image, with no host synchronisation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pretrain.model.native_rope import vision_rope_2d

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_image(image: Image.Image | np.ndarray) -> torch.Tensor:
    """float32 [3, H, W]: RGB scaled to [0, 1], then ImageNet mean/std (torchvision's order of ops)."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    array = np.array(image)  # a writable copy
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 HWC image, got {array.dtype} {array.shape}")
    pixels = torch.from_numpy(array).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels - mean) / std


def patchify(pixels: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """[(H/p)*(W/p), C*p*p]: patches in row-major order over the image, each flattened (c, p, p)."""
    c, h, w = pixels.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
    gh, gw = h // patch, w // patch
    return pixels.reshape(c, gh, patch, gw, patch).permute(1, 3, 0, 2, 4).reshape(gh * gw, c * patch * patch)


def grid_starts(grids: torch.Tensor) -> torch.Tensor:
    """Offset of each grid's first cell when row-major grids [n, 2] are laid end to end."""
    counts = grids[:, 0] * grids[:, 1]
    return counts.cumsum(0) - counts


def grid_coordinates(grids: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image, row, col) of every cell of row-major grids [n, 2] laid end to end.

    ``total`` must equal sum(gh * gw); passing it keeps the computation free of host syncs.
    """
    ids = torch.arange(grids.shape[0], device=grids.device)
    image = torch.repeat_interleave(ids, grids[:, 0] * grids[:, 1], output_size=total)
    rank = torch.arange(total, device=grids.device) - grid_starts(grids)[image]
    width = grids[image, 1]
    return image, rank // width, rank % width


class VisionEmbedding(torch.nn.Module):
    """NEO's ``vision_model.embeddings``: submodule names match the reference checkpoint."""

    def __init__(
        self,
        llm_hidden: int,
        vision_hidden: int = 1024,
        patch_size: int = 16,
        downsample_ratio: float = 0.5,
        rope_theta_vision: float = 1000.0,
        num_channels: int = 3,
    ):
        super().__init__()
        self.patch_size = patch_size  # what callers patchify with
        self.merge = round(1 / downsample_ratio)
        self.rope_theta_vision = rope_theta_vision
        self.patch_embedding = torch.nn.Conv2d(num_channels, vision_hidden, patch_size, stride=patch_size)
        self.dense_embedding = torch.nn.Conv2d(vision_hidden, llm_hidden, self.merge, stride=self.merge)

    def reset_parameters(self, std: float = 0.02) -> None:
        for conv in (self.patch_embedding, self.dense_embedding):
            torch.nn.init.normal_(conv.weight, std=std)
            torch.nn.init.zeros_(conv.bias)

    def forward(self, patches: torch.Tensor, token_grids: torch.Tensor) -> torch.Tensor:
        """[N_patches, C*p*p] patches of all images + their token grids [n, 2] -> [N_tokens, llm_hidden].

        Patch grid = merge x token grid; tokens of each image row-major, images in order.
        """
        m = self.merge
        conv = self.patch_embedding
        # A stride-p conv over one p x p patch is a matmul with the flattened (c, p, p) kernel.
        x = F.gelu(F.linear(patches.to(conv.weight.dtype), conv.weight.flatten(1), conv.bias))
        token_grids = token_grids.to(x.device).long()
        patch_grids = token_grids * m
        _, rows, cols = grid_coordinates(patch_grids, x.shape[0])
        x = vision_rope_2d(x, rows, cols, self.rope_theta_vision)

        # Gather each token's m x m patch neighbourhood, lay it out as the dense kernel's
        # [in, a, b] (its own flattened layout: a view of the weight, so no per-micro-batch copy of
        # it is made or kept for backward), then one matmul.
        n_tokens = x.shape[0] // (m * m)
        image, row, col = grid_coordinates(token_grids, n_tokens)
        first = grid_starts(patch_grids)[image]
        width = patch_grids[image, 1]
        offs = torch.arange(m, device=x.device)
        index = (
            first[:, None, None]
            + (m * row[:, None, None] + offs[None, :, None]) * width[:, None, None]
            + m * col[:, None, None]
            + offs[None, None, :]
        )
        neighbourhoods = x[index.reshape(-1)].reshape(n_tokens, m, m, -1).permute(0, 3, 1, 2).flatten(1)
        dense = self.dense_embedding
        return F.linear(neighbourhoods, dense.weight.flatten(1), dense.bias)

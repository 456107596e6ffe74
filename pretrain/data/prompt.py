"""Generation prompts for evaluation, rendered exactly as in training (same template, same images).

``build_prompt`` takes a sample as data_prep stores it (the JSON and the image bytes in image
order) and returns what ``pretrain.model.generate.greedy_generate`` takes: the prompt tokens with
every image expanded into ``<img>`` + context tokens + ``</img>``, the image id of each context
token, the images' token grids and their normalised patches.

- conversation: all turns up to and including the last user turn, then ``<|im_start|>assistant\\n``
  (what follows, e.g. the reference answer, is left out);
- caption: the image block alone (the model continues with the caption).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pretrain.data.images import decode_image, image_patches
from pretrain.data.task_encoder import single_thread
from pretrain.data.template import ChatTemplate


@dataclass
class Prompt:
    tokens: torch.Tensor  # [s] long
    image_ids: torch.Tensor  # [s] long: image index for <IMG_CONTEXT> tokens, else -1
    image_grids: torch.Tensor  # [n, 2] long token grids
    patches: torch.Tensor | None  # [sum 4*gh*gw, 768] float32, None without images


def build_prompt(template: ChatTemplate | object, sample: dict, images: Sequence[bytes]) -> Prompt:
    """Prompt of one sample. ``template`` is a ``ChatTemplate`` or an HF tokenizer."""
    if not isinstance(template, ChatTemplate):
        template = ChatTemplate(template)
    rendered = template.render_prompt(sample)
    n = rendered.image_grids.shape[0]
    entries = sample.get("images", [])[:n]
    if len(images) < n:
        raise ValueError(f"prompt needs {n} images, got {len(images)}")
    patches = None
    if n:
        with single_thread():
            patches = torch.cat(
                [image_patches(decode_image(data, e["size"]), e["grid"]) for e, data in zip(entries, images)]
            )
    return Prompt(
        tokens=torch.from_numpy(rendered.tokens),
        image_ids=torch.from_numpy(rendered.image_ids),
        image_grids=torch.from_numpy(rendered.image_grids),
        patches=patches,
    )

"""The training data path: data_prep shards -> Energon -> chat template -> packing -> NeoBatch.

Modules, in the order data flows through them:

- ``template``: one sample JSON -> tokens, supervision, image blocks (ChatML for conversations;
  ``<img>`` block + caption + ``<|endoftext|>`` for captions; text + ``<|endoftext|>``).
- ``images``: image bytes -> size-checked, normalised 16x16 patches (NEO's patch order).
- ``packing``: first-fit-decreasing selection and rows of exactly ``seq_len`` tokens.
- ``task_encoder``: the Megatron-Energon TaskEncoder that chains the above in loader workers,
  and the error handler that logs and counts bad samples.
- ``loader``: ``NeoDataLoader`` / ``TrainLoader`` (per data-parallel rank, blends, stats,
  savable state).
- ``state``: Energon loader state <-> plain JSON-able data (checkpoints hold no pickles).
- ``prompt``: generation prompts for evaluation, rendered as in training.
"""

from pretrain.data.loader import (
    BatchInfo,
    LoaderConfig,
    LoaderStateError,
    LoaderStats,
    NeoDataLoader,
    TrainLoader,
)
from pretrain.data.prompt import Prompt, build_prompt
from pretrain.data.template import ChatTemplate, load_tokenizer

__all__ = [
    "BatchInfo",
    "ChatTemplate",
    "LoaderConfig",
    "LoaderStateError",
    "LoaderStats",
    "NeoDataLoader",
    "Prompt",
    "TrainLoader",
    "build_prompt",
    "load_tokenizer",
]

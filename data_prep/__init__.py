"""data_prep: raw image-text data -> validated, deterministic WebDataset shards for NEO.

Commands (``python -m data_prep --help``): ``build`` (neo-json | captions | text), ``synthetic``
(the coloured-shapes demo set and its tokenizer), ``verify`` and ``tokenizer``. A large build
can be spread over N jobs (``build ... --parts N --part I`` each, then ``merge OUTPUT``; see
data_prep.parts and data_prep.merge): the result is the single build's data set.

The contract with the trainer
=============================
An output directory holds ``<prefix>-NNNNNN.tar`` shards, ``manifest.json`` (written last: no
manifest, no complete build), ``rejects.jsonl`` and Energon metadata (``.nv-meta/`` and a
``.tar.idx`` per shard, one "train" split), so it loads with
``megatron.energon.get_train_dataset`` as a ``CrudeWebdataset`` (raw bytes per member; the
trainer's cooker decodes them) or with plain ``webdataset``. Never use WebDataset's default
decoders on untrusted shards: they unpickle ``.pyd``/``.pickle`` members; we write none and read
none.

Sample = tar members sharing a key, in this order:
  ``<key>.json``      the sample JSON (UTF-8, compact), described below
  ``<key>.img0.jpg``  first image, ``img1.jpg`` the second, ... (``.png`` with --image-format png),
                      in the order of the ``<image>`` tags; 8-bit RGB, exactly ``images[i].size``.
``__key__`` is the source id when it is already safe (``[A-Za-z0-9_-]``, at most 64 chars),
otherwise the sanitised id plus a 12-hex hash of the original (see schema.make_key); unique
in the directory (duplicates are rejected). Samples are in input order.

The JSON object (fields in this order; absent optional fields are left out, not null):
  ``id``                str. The record's id (``--id-field``/``--id-column``), else a positional
                        one ``<annotation file name>:<entry>[.<sub-record>]``.
  ``source``            str. Annotation file name (no directories), or ``synthetic/<split>``.
  ``kind``              "caption" | "conversation" | "text".
  ``text``              str, kinds caption and text only. For a caption the single image comes
                        first, then the caption; the caption text is what is supervised.
                        For text, all of it is supervised.
  ``conversations``     kind conversation only: ``[{"role": "system"|"user"|"assistant",
                        "content": str}, ...]``; roles normalised from human/gpt/system; an
                        optional system turn first, then user first; ``<image>`` tags appear
                        only in user turns, one per image, in image order. The trainer renders
                        ChatML and supervises assistant contents (plus their ``<|im_end|>\\n``).
  ``images``            ``[{"orig_size": [h, w], "size": [h, w], "grid": [gh, gw],
                        "num_tokens": gh*gw}, ...]``; ``orig_size`` is after EXIF orientation,
                        ``size`` after smart_resize (multiples of 32), ``grid = size / 32`` is the
                        LLM token grid (H/W positions), ``num_tokens`` the ``<IMG_CONTEXT>``
                        count. Empty for kind text; exactly one for kind caption.
  ``num_image_tokens``  int, sum of ``num_tokens``.
  ``text_tokens``       int, optional (builds given ``--tokenizer``): tokens of the raw text
                        segments between ``<image>`` tags, without template or image tokens.
  ``image_tag_inserted`` true, optional: the record had one image and no tag, so ``<image>\\n``
                        was put in front of its first user turn (the reference's rule).
  synthetic only:       ``qa_type`` ("color"|"shape"|"count"|"position"|"compare") and
                        ``answer`` (one word, exact-match) on conversations; ``scenes`` (the
                        drawn objects) on caption and conversation samples.
Text is never edited apart from the tag insertion above. Text containing any special token of
the tokenizer (NEO's 16: ``<|endoftext|>``, ``<|im_start|>``, ``<ref>``, ``<box>``, ...; with
``--tokenizer``, every added token of that tokenizer) is rejected as ``reserved_token``: data text
never becomes a control token. The trainer tokenizes text with special tokens split as plain text
as well (defence in depth for shards built elsewhere).

Images: decoded with PIL (allow-listed containers), EXIF-rotated upright, converted to RGB
(palette, alpha composited on white, CMYK, 16-bit scaled to 8-bit), resized with bicubic
filtering to ``images.smart_resize(h, w, 32, min_pixels, max_pixels)`` and re-encoded.

Tokenizer directories (``synthetic`` writes OUTPUT/tokenizer/, ``tokenizer`` writes any): an HF
fast tokenizer (``AutoTokenizer.from_pretrained``) with ``<|endoftext|>`` = id 0 (eos and pad),
then ``<IMG_CONTEXT> <img> </img> <quad> </quad> <ref> </ref> <box> </box> <|im_start|>
<|im_end|> <|action_start|> <|action_end|> <|plugin|> <|interpreter|>`` = ids 1..15, and a
ChatML chat template.
"""

from data_prep.images import ImageOptions, smart_resize
from data_prep.schema import SCHEMA_VERSION, make_key, validate_sample

__all__ = ["ImageOptions", "SCHEMA_VERSION", "make_key", "smart_resize", "validate_sample"]

"""What the loss weights' n counts: a document's supervised TOKENS (spec, reference), so a text
document's first token counts although nothing in the document predicts it.

The reference (InternVL's packed data set, which NEO trains with) computes, per packed document,
``n = (labels != IGNORE).sum()`` over the labels BEFORE the next-token shift, i.e. on the token
side; a text document supervises every token, the first included. Our ``loss_mask`` is on the
target side (``loss_mask[i]`` = token i+1 supervised), where that first token does not appear.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pretrain.model.loss import token_weights

S5, S3, S2 = 1 / math.sqrt(5), 1 / math.sqrt(3), 1 / math.sqrt(2)


def _row(*docs: tuple[list[int], int]) -> tuple[torch.Tensor, torch.Tensor]:
    mask, ids = [], []
    for m, d in docs:
        mask += m
        ids += [d] * len(m)
    return torch.tensor([mask], dtype=torch.bool), torch.tensor([ids])


def test_hand_computed_example():
    """One packed row, worked by hand (loss_mask[i] = token i+1 supervised; a document's last
    token predicts nothing):

    doc 0, text "a b c d" + <|endoftext|>: 5 tokens, all supervised.
        loss_mask 1 1 1 1 0; n = 5 (4 targets + its first token); w = 1/sqrt(5) on 4 targets.
    doc 1, conversation <|im_start|> user\\n q <|im_end|> \\n <|im_start|> assistant\\n a <|im_end|> \\n:
        supervised tokens: a, <|im_end|>, \\n (3); first token <|im_start|> is not.
        loss_mask 0 0 0 0 0 0 1 1 1 0; n = 3; w = 1/sqrt(3).
    doc 2, caption <img> <IMG_CONTEXT> </img> w1 <|endoftext|>: supervised w1, <|endoftext|> (2).
        loss_mask 0 0 1 1 0; n = 2; w = 1/sqrt(2).
    doc 3, text "x" + <|endoftext|>: 2 tokens, loss_mask 1 0; n = 2 (1 target), w = 1/sqrt(2).
    padding (doc id -1): loss_mask 0 0; w = 0.
    """
    mask, ids = _row(
        ([1, 1, 1, 1, 0], 0),
        ([0, 0, 0, 0, 0, 0, 1, 1, 1, 0], 1),
        ([0, 0, 1, 1, 0], 2),
        ([1, 0], 3),
        ([0, 0], -1),
    )
    square = [S5] * 4 + [0] + [0] * 6 + [S3] * 3 + [0] + [0, 0, S2, S2, 0] + [S2, 0] + [0, 0]
    sample = [1 / 5] * 4 + [0] + [0] * 6 + [1 / 3] * 3 + [0] + [0, 0, 1 / 2, 1 / 2, 0] + [1 / 2, 0] + [0, 0]
    torch.testing.assert_close(token_weights(mask, ids, "square")[0], torch.tensor(square), rtol=1e-6, atol=0)
    torch.testing.assert_close(token_weights(mask, ids, "sample")[0], torch.tensor(sample), rtol=1e-6, atol=0)
    torch.testing.assert_close(token_weights(mask, ids, "token")[0], mask[0].float(), rtol=0, atol=0)


def test_first_token_counted_per_row_and_per_document():
    """The same text document at the start of a row, after another document, and in a second
    row of the batch: n = 5 everywhere (documents are counted per run of equal doc_ids per row)."""
    text = [1, 1, 1, 1, 0]
    conv = [0, 0, 1, 0]
    m0, d0 = _row((text, 0), (conv, 1), (text, 2))
    m1, d1 = _row((conv, 0), (text, 1), ([0] * 5, -1))
    w = token_weights(torch.cat([m0, m1]), torch.cat([d0, d1]), "square")
    assert torch.allclose(w[0, :4], torch.full((4,), S5)) and torch.allclose(w[0, 9:13], torch.full((4,), S5))
    assert w[0, 7].item() == pytest.approx(1.0)  # conversation: one supervised token, n = 1
    assert torch.allclose(w[1, 4:8], torch.full((4,), S5)) and w[1, 2].item() == pytest.approx(1.0)


TEXTS = [f"The {c} {s} number {i} is here." for i in range(30) for c in ("red", "blue") for s in ("circle", "square")]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    from data_prep.tokenizer import train_tokenizer
    from pretrain.data.template import ChatTemplate, load_tokenizer

    path = train_tokenizer(TEXTS, tmp_path_factory.mktemp("tok") / "tok", vocab_size=320)
    return ChatTemplate(load_tokenizer(path))


SAMPLES = [
    {"kind": "text", "text": "The red circle number 3 is here."},
    {"kind": "caption", "text": "A blue square.", "images": [{"grid": [2, 2], "num_tokens": 4}]},
    {"kind": "conversation", "conversations": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "And the number?"},
        {"role": "assistant", "content": "3"},
    ], "images": [{"grid": [1, 3], "num_tokens": 3}]},
    {"kind": "text", "text": "x"},
]


@pytest.mark.parametrize("reduction", ["sample", "square"])
def test_weights_equal_the_reference_count_on_rendered_documents(template, reduction):
    """Real renders of every sample kind, packed into one row by the loader's ``build_row``:
    our weights on the target side equal the reference's, computed its way (n = unshifted labels
    that are not IGNORE per document, weight per token, then shifted with the labels)."""
    from pretrain.data.packing import Document, build_row

    rendered = [template.render(s) for s in SAMPLES]
    docs = [Document(key=str(i), tokens=r.tokens, labels=r.labels(template.pad_id), loss_mask=r.loss_mask(),
                     image_ids=r.image_ids, image_grids=r.image_grids, patches=None)
            for i, r in enumerate(rendered)]
    row = build_row(docs, sum(len(r) for r in rendered) + 3, template.pad_id)
    ours = token_weights(row.loss_mask[None], row.doc_ids[None], reduction)[0]

    expected = []
    for r in rendered:
        n = int(r.supervised.sum())  # reference: (labels != IGNORE).sum(), labels unshifted
        w = {"sample": 1 / n, "square": 1 / math.sqrt(n)}[reduction]
        # reference weight of target i = weight of token i + 1 where that token is supervised
        expected.append(np.where(r.loss_mask(), w, 0.0))
    expected.append(np.zeros(3))
    torch.testing.assert_close(ours, torch.tensor(np.concatenate(expected), dtype=torch.float32), rtol=1e-6, atol=0)
    # Only the text documents differ from counting targets: their first token is supervised.
    first = [bool(r.supervised[0]) for r in rendered]
    assert first == [True, False, False, True]
    assert [int(r.supervised.sum()) - int(r.loss_mask().sum()) for r in rendered] == [1, 0, 0, 1]

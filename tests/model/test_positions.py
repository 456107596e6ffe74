"""Native (T, H, W) positions and the native mask, against per-token / per-pair loops written
from the spec's sentences (spec/NEO_MODEL.md, "Positions" and "Attention mask").

Integer outputs: comparisons are exact.
"""

import itertools
import random

import pytest
import torch

from pretrain.model.positions import native_mask, native_positions

PAD, IMG_START, IMG_END, IMG_CONTEXT = 0, 1, 2, 3
GRIDS = [(1, 1), (1, 4), (4, 1), (2, 3), (3, 2), (2, 2), (1, 6), (5, 1)]


def make_batch(seed: int, rows: int = 3, seq: int = 96):
    """Packed rows of documents (text-only or mixed, images of various grids), then padding (-1)."""
    rng = random.Random(seed)
    tokens, docs, images, grids = [], [], [], []
    for _ in range(rows):
        tok, doc, img = [], [], []
        limit = seq - rng.randint(0, 12)  # what is left over becomes padding
        for n_doc in itertools.count():
            text_only = rng.random() < 0.3
            start = len(tok)
            for _ in range(rng.randint(1, 5)):
                grid = rng.choice(GRIDS)
                n = grid[0] * grid[1]
                is_image = not text_only and rng.random() < 0.5
                if is_image:
                    item_tok = [IMG_START] + [IMG_CONTEXT] * n + [IMG_END]
                    item_img = [-1] + [len(grids)] * n + [-1]
                else:
                    item_tok = [rng.randint(10, 99) for _ in range(rng.randint(1, 6))]
                    item_img = [-1] * len(item_tok)
                if len(tok) + len(item_tok) > limit:
                    break
                if is_image:
                    grids.append(grid)
                tok += item_tok
                img += item_img
            if len(tok) == start:
                break
            doc += [n_doc] * (len(tok) - start)
        tokens.append(tok + [PAD] * (seq - len(tok)))
        docs.append(doc + [-1] * (seq - len(doc)))
        images.append(img + [-1] * (seq - len(img)))
    grid_tensor = torch.tensor(grids, dtype=torch.long).reshape(-1, 2)
    return torch.tensor(tokens), torch.tensor(docs), torch.tensor(images), grid_tensor


def brute_positions(tokens, doc_ids, image_ids, grids):
    """Per token: a text token advances T by 1; all context tokens of an image share
    T(<img>) + 1; the token after them continues at that T + 1; T restarts at 0 in each
    document. H/W = row/col of a context token in its image's row-major token grid."""
    tokens, doc_ids, image_ids, grids = (x.tolist() for x in (tokens, doc_ids, image_ids, grids))
    out = [[[0] * len(tokens[0]) for _ in tokens] for _ in range(3)]
    seen = {}
    for r, row in enumerate(tokens):
        t = None
        for i, token in enumerate(row):
            if i == 0 or doc_ids[r][i] != doc_ids[r][i - 1]:
                t = 0
            elif token == IMG_CONTEXT and row[i - 1] == IMG_CONTEXT:
                pass  # shares the T of the image's first context token
            else:
                t += 1
            out[0][r][i] = t
            image = image_ids[r][i]
            if image >= 0:
                k = seen.get(image, 0)
                seen[image] = k + 1
                out[1][r][i] = k // grids[image][1]
                out[2][r][i] = k % grids[image][1]
    return torch.tensor(out)


def brute_mask(doc_ids, image_ids):
    """Per pair: q may attend k iff same document AND (k <= q OR both are context tokens of the
    same image). Returned with True = masked."""
    doc_ids, image_ids = doc_ids.tolist(), image_ids.tolist()
    s = len(doc_ids[0])
    masked = [[[[True] * s for _ in range(s)]] for _ in doc_ids]
    for r in range(len(doc_ids)):
        for q in range(s):
            for k in range(s):
                same_doc = doc_ids[r][q] == doc_ids[r][k]
                same_image = image_ids[r][q] >= 0 and image_ids[r][q] == image_ids[r][k]
                masked[r][0][q][k] = not (same_doc and (k <= q or same_image))
    return torch.tensor(masked)


def test_hand_written_example():
    # doc 0: a b <img> 2x2 </img> c | doc 1: <img> 1x2 </img> | 2 padding tokens
    C = IMG_CONTEXT
    tokens = torch.tensor([[50, 51, IMG_START, C, C, C, C, IMG_END, 52, IMG_START, C, C, IMG_END, PAD, PAD]])
    docs = torch.tensor([[0] * 9 + [1] * 4 + [-1] * 2])
    images = torch.tensor([[-1, -1, -1, 0, 0, 0, 0, -1, -1, -1, 1, 1, -1, -1, -1]])
    grids = torch.tensor([[2, 2], [1, 2]])
    thw = native_positions(docs, images, grids)
    assert thw.dtype == torch.long and thw.shape == (3, 1, 15)
    assert thw[0, 0].tolist() == [0, 1, 2, 3, 3, 3, 3, 4, 5, 0, 1, 1, 2, 0, 1]
    assert thw[1, 0].tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert thw[2, 0].tolist() == [0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0]

    allowed = ~native_mask(docs, images)[0, 0]
    assert allowed[3, 6] and allowed[6, 3]  # bidirectional inside image 0
    assert allowed[2, 2] and not allowed[2, 3]  # <img> is text: causal
    assert allowed[7, 3] and not allowed[3, 7]  # </img> sees the image, not the reverse
    assert not allowed[9, 8] and not allowed[13, 12]  # documents and padding are isolated
    assert allowed[14, 13]  # padding is one more (causal) document


@pytest.mark.parametrize("seed", range(4))
def test_positions_match_brute_force(seed):
    tokens, docs, images, grids = make_batch(seed)
    assert grids.shape[0] >= 3 and (docs == -1).any()  # the generator covers what it should
    got = native_positions(docs, images, grids)
    assert torch.equal(got, brute_positions(tokens, docs, images, grids))


def test_text_only_batch():
    tokens = torch.randint(10, 99, (2, 20))
    docs = torch.tensor([[0] * 7 + [1] * 13, [0] * 15 + [-1] * 5])
    images = torch.full_like(tokens, -1)
    no_grids = torch.empty(0, 2, dtype=torch.long)
    got = native_positions(docs, images, no_grids)
    assert torch.equal(got, brute_positions(tokens, docs, images, no_grids))
    assert got[1:].eq(0).all()


def test_img_start_does_not_advance_the_next_document():
    # A document truncated right after <img> must not shift T of the following one.
    tokens = torch.tensor([[50, IMG_START, 51, 52]])
    docs = torch.tensor([[0, 0, 1, 1]])
    images = torch.full_like(tokens, -1)
    got = native_positions(docs, images, torch.empty(0, 2, dtype=torch.long))
    assert got[0, 0].tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("seed", range(2))
def test_mask_matches_brute_force(seed):
    _, docs, images, _ = make_batch(seed, seq=64)
    got = native_mask(docs, images)
    assert got.dtype == torch.bool and got.shape == (3, 1, 64, 64)
    assert torch.equal(got, brute_mask(docs, images))

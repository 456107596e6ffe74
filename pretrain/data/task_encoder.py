"""The Megatron-Energon task encoder: raw shard members -> packed rows -> micro-batches.

Pipeline inside each loader worker (Energon calls these in this order):

1. ``cook_raw_sample`` (cooker): the crude WebDataset sample (raw bytes per member) -> ``RawSample``
   (parsed, contract-checked JSON + image bytes in image order). No pixel is decoded yet.
2. ``preencode_sample``: chat template, tokens, labels, loss mask, image blocks (from the JSON's
   recorded grids). A sample longer than ``seq_len`` becomes a zero-length "skipped" record
   (never truncated) carrying its length and the pixel budget per image with which it would fit;
   the loader counts distinct ones and reports them in a line and its summary, not one line each.
3. ``select_samples_to_pack``: first-fit decreasing over the packing buffer; every record,
   including skipped ones, goes into some pack (Energon drops whatever a selector leaves out).
4. ``postencode_sample``: decode the images of the selected documents (size checked against the
   JSON) into normalised patches. Done after selection so the packing buffer holds only tokens
   and compressed bytes, not float pixels.
5. ``pack_selected_samples``: one ``PackedRow`` of exactly ``seq_len`` tokens + its bookkeeping
   (sample keys, real tokens, skipped records, sample errors seen by this worker).
6. ``batch``: ``micro_batch_size`` packs -> ``MicroBatch`` (a collated ``NeoBatch`` + bookkeeping).

All of them are ``@stateless`` (pure functions of their input), so Energon can save the loader
state as sample indices and rebuild buffers on restore.

Errors: a sample that fails in any step (bad JSON, missing or undecodable image, size mismatch,
text that would tokenise to a control token: ``template.ControlTokenError``) is handed by
Energon to ``SampleErrorLog.handle`` (installed as the worker config's ``global_error_handler``):
it is logged with dataset, shard, index and key (once per sample and worker, however often the
data repeats), counted, and skipped. The count and the samples' identities travel to the trainer
inside the next pack of the same worker (the loader counts distinct samples). Energon raises
``FatalSampleError`` after 100 failures in a row, which stops the run (data that broken should).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from megatron.energon import Batch, Cooker, DefaultTaskEncoder, Sample, basic_sample_keys, stateless
from megatron.energon.edataclass import edataclass

from data_prep.schema import validate_sample
from pretrain.data.images import ImageError, decode_image, image_patches
from pretrain.data.packing import Document, build_row, first_fit_decreasing
from pretrain.data.template import ChatTemplate, Rendered
from pretrain.model.batch import NeoBatch, PackedRow, collate

log = logging.getLogger(__name__)

_IMAGE_MEMBER = re.compile(r"img(\d+)\.(jpg|jpeg|png)")
_MAX_ERROR_DETAILS = 16  # per pack; the count is always exact


class SampleFormatError(ValueError):
    """A shard sample that does not honour the data_prep contract."""


# ---------------------------------------------------------------------------------------------
# Sample types flowing through the Energon pipeline


@edataclass
class RawSample(Sample):
    meta: dict  # the sample JSON
    images: list  # bytes of img0, img1, ... in image order


@edataclass
class EncodedSample(Sample):
    """A rendered document; ``rendered`` is None for a record skipped because it is too long."""

    length: int
    rendered: Rendered | None
    image_meta: list  # the JSON's images entries (size, grid)
    image_bytes: list
    document: Document | None = None  # set by postencode_sample (images decoded)
    # Skipped records: the largest pixel count per image (data_prep --max-pixels) with which the
    # sample would fit seq_len; 0 if its text alone does not fit; None if it has no image.
    fit_pixels: int | None = None

    @property
    def skipped(self) -> bool:
        return self.rendered is None


@edataclass
class Pack(Sample):
    row: PackedRow
    keys: tuple  # __key__ of every document in the row, in row order
    real_tokens: int
    skipped: tuple  # ((key, length), ...) of too-long samples that rode along with this pack
    errors: int  # sample errors this worker saw since its previous pack
    error_details: tuple  # a few (where, message) of those errors
    too_long: tuple = ()  # ((identity, length, fit_pixels), ...) of the skipped records
    error_ids: tuple = ()  # identity of every sample behind ``errors``


@edataclass
class MicroBatch(Batch):
    """What the loader workers send to the trainer process."""

    batch: NeoBatch
    keys: list  # per row: tuple of document keys
    real_tokens: list  # per row
    skipped: list  # (key, length) of too-long samples
    errors: int
    error_details: list
    too_long: list | tuple = ()  # (identity, length, fit_pixels) of too-long samples
    error_ids: list | tuple = ()  # identities of the erroneous samples

    def pin_memory(self) -> MicroBatch:
        """Called by the DataLoader's pin-memory thread on GPU machines: pin the tensors only."""
        b = self.batch
        pinned = {f.name: getattr(b, f.name) for f in dataclasses.fields(b)}
        pinned = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in pinned.items()}
        return dataclasses.replace(self, batch=NeoBatch(**pinned))


# ---------------------------------------------------------------------------------------------
# Errors


def _sample_key(sample: Any) -> str | None:
    if isinstance(sample, dict):
        return sample.get("__key__")
    if isinstance(sample, Sample):
        return sample.__key__
    if isinstance(sample, (list, tuple)) and sample:
        keys = [_sample_key(s) for s in sample]
        return ",".join(k for k in keys if k)
    return None


def sample_identity(key: str | None, sources: Any) -> str:
    """What tells one sample from another across repeats of the data and across the data sets of
    a blend: its data set and key (keys are unique within a data_prep directory)."""
    source = next(iter(sources or ()), None)
    dataset = getattr(source, "dataset_path", None)
    if key:
        return f"{dataset}:{key}" if dataset is not None else str(key)
    if source is not None:
        return f"{dataset}:{getattr(source, 'shard_name', '?')}[{getattr(source, 'index', '?')}]"
    return "unknown sample"


class SampleErrorLog:
    """Energon error handler that logs and counts instead of printing and moving on.

    One instance per task encoder; each loader worker has its own copy (fork), and its pending
    errors are drained into the worker's next pack, so the trainer sees every count. A sample is
    logged the first time this worker sees it fail, not again when the data comes round again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._details: list[tuple[str, str]] = []
        self._ids: list[str] = []
        self._logged: set[str] = set()

    def handle(self, exc: Exception, sample: Any, sources: list | None = None) -> None:
        where = []
        for src in sources or ():
            shard = getattr(src, "shard_name", "?")
            where.append(f"{getattr(src, 'dataset_path', '?')}:{shard}[{getattr(src, 'index', '?')}]")
        key = _sample_key(sample)
        location = " ".join(where) or "unknown source"
        message = f"{type(exc).__name__}: {exc}"
        identity = sample_identity(key, sources)
        with self._lock:
            first = identity not in self._logged
            self._logged.add(identity)
            self._count += 1
            self._ids.append(identity)
            if len(self._details) < _MAX_ERROR_DETAILS:
                self._details.append((f"{location} key={key}", message))
        if first:
            log.warning("skipping sample %s (%s): %s", key, location, message)

    def drain(self) -> tuple[int, tuple, tuple]:
        """(errors, a few details, the identity of each erroneous sample) since the last drain."""
        with self._lock:
            count, details, ids = self._count, tuple(self._details), tuple(self._ids)
            self._count, self._details, self._ids = 0, [], []
        return count, details, ids

    # A lock cannot be pickled; Energon copies the worker config (and this handler with it).
    def __getstate__(self):
        return {"_count": self._count, "_details": list(self._details), "_ids": list(self._ids),
                "_logged": set(self._logged)}

    def __setstate__(self, state):
        self.__init__()
        self._count, self._details = state["_count"], state["_details"]
        self._ids, self._logged = list(state.get("_ids", [])), set(state.get("_logged", ()))


# ---------------------------------------------------------------------------------------------
# Cooker


_threads_set_in: int | None = None


def _limit_worker_threads() -> None:
    """torch's default thread count makes the small tensor ops of the loader 10-50x slower
    (PLATFORM.md; 80 ms instead of 1.5 ms to normalise a 224x224 image here): one thread per
    loader worker process. The trainer process is left alone (see ``single_thread``)."""
    global _threads_set_in
    pid = os.getpid()
    if _threads_set_in != pid:
        _threads_set_in = pid
        if torch.utils.data.get_worker_info() is not None:
            torch.set_num_threads(1)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run data work in the trainer process (no loader workers, tools, evaluation) with one torch
    thread, restoring the trainer's setting afterwards (switching costs under a microsecond)."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@stateless
def cook_raw_sample(raw: dict) -> RawSample:
    """Crude WebDataset sample (member suffix -> bytes) -> parsed JSON + ordered image bytes."""
    _limit_worker_threads()
    data = raw.get("json")
    if data is None:
        raise SampleFormatError("sample has no .json member")
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SampleFormatError(f"sample JSON does not parse: {exc}") from None
    problems = validate_sample(meta)
    if problems:
        raise SampleFormatError("sample JSON breaks the data_prep contract: " + "; ".join(problems))
    found: dict[int, bytes] = {}
    for name, value in raw.items():
        match = _IMAGE_MEMBER.fullmatch(name)
        if match:
            found[int(match.group(1))] = value
    n = len(meta["images"])
    if sorted(found) != list(range(n)):
        raise SampleFormatError(f"JSON lists {n} images but the shard holds members {sorted(found)}")
    return RawSample(**basic_sample_keys(raw), meta=meta, images=[found[i] for i in range(n)])


# ---------------------------------------------------------------------------------------------
# Task encoder


class NeoTaskEncoder(DefaultTaskEncoder):
    """Template + packing for NEO; ``seq_len`` is the packed row length."""

    cookers = (Cooker(cook_raw_sample),)
    decoder = None  # cookers get the stored bytes; we decode images ourselves, never pickles

    def __init__(self, tokenizer, seq_len: int, error_log: SampleErrorLog | None = None):
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.template = ChatTemplate(tokenizer)
        self.seq_len = int(seq_len)
        self.pad_id = self.template.pad_id
        self.error_log = error_log if error_log is not None else SampleErrorLog()

    # 2. template ------------------------------------------------------------------------------
    @stateless
    def preencode_sample(self, sample: RawSample) -> EncodedSample:
        rendered = self.template.render(sample.meta)
        length = len(rendered)
        if length > self.seq_len:
            # Counted by the loader (distinct samples, one line and its summary), not logged here:
            # the data repeats, and a too-small seq_len would print a line per sample per pass.
            log.debug("sample %s: %d tokens > seq_len %d, skipped (never truncated)",
                      sample.__key__, length, self.seq_len)
            return EncodedSample.derive_from(
                sample, length=length, rendered=None, image_meta=[], image_bytes=[],
                fit_pixels=self.fit_pixels(length, sample.meta["images"]),
            )
        return EncodedSample.derive_from(
            sample,
            length=length,
            rendered=rendered,
            image_meta=sample.meta["images"],
            image_bytes=sample.images,
        )

    def fit_pixels(self, length: int, images: list[dict]) -> int | None:
        """The largest pixel count per image (what data_prep's ``--max-pixels`` bounds) with which
        a document of ``length`` tokens and these images fits ``seq_len``: each image costs its
        ``num_tokens`` plus ``<img>`` and ``</img>``, and one token covers size/num_tokens pixels
        (32 x 32). 0 when the text alone (with one token per image) does not fit; None without images."""
        if not images:
            return None
        image_tokens = sum(int(e["num_tokens"]) + 2 for e in images)
        room = self.seq_len - (length - image_tokens) - 2 * len(images)
        per_image = room // len(images)
        if per_image < 1:
            return 0
        pixels_per_token = max(int(e["size"][0]) * int(e["size"][1]) // max(1, int(e["num_tokens"])) for e in images)
        return per_image * pixels_per_token

    # 3. selection -----------------------------------------------------------------------------
    def select_samples_to_pack(self, samples: list[EncodedSample]) -> list[list[EncodedSample]]:
        real = [i for i, s in enumerate(samples) if not s.skipped]
        bins = [
            [real[j] for j in b]
            for b in first_fit_decreasing([samples[i].length for i in real], self.seq_len)
        ]
        skipped = [i for i, s in enumerate(samples) if s.skipped]
        if skipped:
            # Skipped records ride along with the first pack so that they are counted. A buffer of
            # nothing but skipped records makes one all-padding pack (no supervised token).
            if bins:
                bins[0] = sorted(bins[0] + skipped)
            else:
                bins = [skipped]
        return [[samples[i] for i in b] for b in bins]

    # 4. pixels --------------------------------------------------------------------------------
    @stateless
    def postencode_sample(self, sample: EncodedSample) -> EncodedSample:
        if sample.skipped:
            return sample
        r = sample.rendered
        patches = None
        if sample.image_meta:
            parts = []
            for entry, data in zip(sample.image_meta, sample.image_bytes, strict=True):
                image = decode_image(data, entry["size"])
                parts.append(image_patches(image, entry["grid"]))
            patches = torch.cat(parts)
            expected = 4 * int((r.image_grids[:, 0] * r.image_grids[:, 1]).sum())
            if patches.shape[0] != expected:
                raise ImageError(f"{patches.shape[0]} patches for grids needing {expected}")
        document = Document(
            key=sample.__key__,
            tokens=r.tokens,
            labels=r.labels(self.pad_id),
            loss_mask=r.loss_mask(),
            image_ids=r.image_ids,
            image_grids=r.image_grids,
            patches=patches,
        )
        return EncodedSample.derive_from(
            sample,
            length=sample.length,
            rendered=r,
            image_meta=sample.image_meta,
            image_bytes=[],
            document=document,
        )

    # 5. row -----------------------------------------------------------------------------------
    @stateless
    def pack_selected_samples(self, samples: list[EncodedSample]) -> Pack:
        documents = [s.document for s in samples if not s.skipped]
        row = build_row(documents, self.seq_len, self.pad_id)
        errors, details, error_ids = self.error_log.drain()
        keys = tuple(d.key for d in documents)
        return Pack(
            __key__=keys[0] if keys else samples[0].__key__,
            __restore_key__=(),
            __sources__=tuple(src for s in samples for src in (s.__sources__ or ())),
            row=row,
            keys=keys,
            real_tokens=sum(len(d) for d in documents),
            skipped=tuple((s.__key__, s.length) for s in samples if s.skipped),
            errors=errors,
            error_details=details,
            too_long=tuple(
                (sample_identity(s.__key__, s.__sources__), s.length, s.fit_pixels) for s in samples if s.skipped
            ),
            error_ids=error_ids,
        )

    # 6. micro-batch ---------------------------------------------------------------------------
    @stateless
    def batch(self, samples: list[Pack]) -> MicroBatch:
        return MicroBatch(
            __key__=[k for p in samples for k in p.keys],
            __restore_key__=(),
            batch=collate([p.row for p in samples]),
            keys=[p.keys for p in samples],
            real_tokens=[p.real_tokens for p in samples],
            skipped=[s for p in samples for s in p.skipped],
            errors=sum(p.errors for p in samples),
            error_details=[d for p in samples for d in p.error_details],
            too_long=[t for p in samples for t in p.too_long],
            error_ids=[i for p in samples for i in p.error_ids],
        )


def encode_document(
    encoder: NeoTaskEncoder, meta: dict, images: list[bytes], key: str = "sample"
) -> Document:
    """Encode one sample outside Energon (tests, tools): template + decoded images, as packed."""
    raw = RawSample(__key__=key, __restore_key__=(), meta=meta, images=list(images))
    with single_thread():
        encoded = encoder.postencode_sample(encoder.preencode_sample(raw))
    if encoded.skipped:
        raise ValueError(f"sample {key} has {encoded.length} tokens > seq_len {encoder.seq_len}")
    return encoded.document


__all__ = [
    "EncodedSample",
    "MicroBatch",
    "NeoTaskEncoder",
    "Pack",
    "RawSample",
    "SampleErrorLog",
    "SampleFormatError",
    "cook_raw_sample",
    "sample_identity",
    "encode_document",
    "single_thread",
]

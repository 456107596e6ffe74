"""Annotation readers: turn files into a stream of Items / Rejected, one per input, in order.

An *input* is one record: a JSONL line, an element of a JSON list, one record inside a
reference "packed" entry (a list of records standing as one entry), one table row. Blank lines
are not inputs. A whole file that cannot be parsed at all (a .json that is not JSON, a table
without the named columns) is a usage error and stops the build before anything is written,
because its records cannot even be counted.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.records import (
    MAX_RECORD_DEPTH,
    Item,
    Rejected,
    caption_item,
    conversation_item,
    has_invalid_utf8,
    nested_deeper_than,
    text_item,
)
from data_prep.rejects import Reject, jsonable

Entry = Item | Rejected
SOURCE_FORMATS = ("neo-json", "captions", "text")
_MAX_REPORTED_LINE = 65536
_BOM = "\ufeff"  # U+FEFF: a UTF-8 byte-order mark once decoded


class SourceError(Exception):
    """An annotation file that cannot be read as a whole (stops the build, nothing is written)."""


@dataclass(frozen=True)
class SourceOptions:
    """Column / field names. Recorded in the manifest."""

    id_field: str | None = "id"  # neo-json and text records
    text_field: str = "text"  # text records
    image_column: str = "image"  # caption tables
    caption_column: str = "caption"
    id_column: str | None = None  # caption tables: positional ids unless set


def load_json_document(path: Path) -> list[Any]:
    """The entries of a whole-file .json annotation (an object is one entry).

    Undecodable bytes are kept as lone surrogates so that they reject only the record holding
    them, not the file. A leading UTF-8 byte-order mark (Windows editors write one) is skipped.
    """
    text = path.read_bytes().decode("utf-8", "surrogateescape").removeprefix(_BOM)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path.name} is not valid JSON ({exc}); use JSONL to isolate bad lines") from None
    except RecursionError:
        raise SourceError(
            f"{path.name} is nested too deeply to parse; use JSONL to isolate bad records"
        ) from None
    return doc if isinstance(doc, list) else [doc]


def _raw_json_entries(path: Path, document: list[Any] | None) -> Iterator[tuple[str, Any, Reject | None]]:
    """(position label, decoded value, parse problem) for each JSON(L) entry of a file."""
    if document is not None:
        for i, entry in enumerate(document):
            yield f"{i}", entry, None
        return
    if path.suffix.lower() == ".jsonl":
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    # A byte-order mark starts the file (or each file of a `cat a.jsonl b.jsonl`).
                    line = raw.decode("utf-8").removeprefix(_BOM)
                except UnicodeDecodeError as exc:
                    text = raw.decode("utf-8", "backslashreplace")[:_MAX_REPORTED_LINE]
                    yield f"{lineno}", text, Reject("invalid_utf8", f"line {lineno}: {exc}")
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    problem = Reject("malformed_json", f"line {lineno}: {exc}")
                except RecursionError:
                    problem = Reject("malformed_json", f"line {lineno}: nested too deeply to parse")
                else:
                    yield f"{lineno}", value, None
                    continue
                yield f"{lineno}", line[:_MAX_REPORTED_LINE], problem
        return
    raise SourceError(f"{path.name}: expected a .json or .jsonl file")


def iter_json_records(
    path: Path, document: list[Any] | None = None
) -> Iterator[tuple[str, Any, Reject | None]]:
    """Flatten packed entries: (default id, record, parse problem) per input."""
    for label, value, problem in _raw_json_entries(path, document):
        default_id = f"{path.name}:{label}"
        if problem is not None:
            yield default_id, value, problem
        elif isinstance(value, list):
            if not value:
                yield (
                    default_id,
                    value,
                    Reject("malformed_record", "an empty packed entry (a list holding no record)"),
                )
            for j, sub in enumerate(value):
                yield f"{default_id}.{j}", sub, None
        else:
            yield default_id, value, None


def _guarded(
    index: int,
    source: str,
    record: Any,
    default_id: str,
    id_field: str | None,
    make: Callable[..., Item],
    *args,
) -> Entry:
    """``make(*args)``, turning any Reject into Rejected with the record kept for the report."""
    try:
        if nested_deeper_than(record, MAX_RECORD_DEPTH):
            # Cut before anything recursive (validation, pickling to a worker, the report) sees it.
            record = jsonable(record)
            raise Reject("malformed_record", f"the record is nested more than {MAX_RECORD_DEPTH} levels deep")
        if has_invalid_utf8(record):
            raise Reject("invalid_utf8", "the record holds bytes that are not valid UTF-8")
        return make(*args)
    except Reject as rej:
        rid = record.get(id_field) if isinstance(record, dict) and id_field else None
        rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else default_id
        return Rejected(index, source, rid, rej.code, rej.message, record)


def _json_entries(paths: list[Path], options: SourceOptions, documents: dict[Path, list[Any]], make,
                  fields: tuple) -> Iterator[Entry]:
    """Records of JSON/JSONL annotation files, each made into an item by ``make`` (or rejected)."""
    index = 0
    for path in paths:
        for default_id, record, problem in iter_json_records(path, documents.get(path)):
            if problem is not None:
                yield Rejected(index, path.name, default_id, problem.code, problem.message, record)
            else:
                args = (index, path.name, record, default_id, *fields)
                yield _guarded(index, path.name, record, default_id, options.id_field, make, *args)
            index += 1


def neo_json_entries(
    paths: list[Path], options: SourceOptions, documents: dict[Path, list[Any]]
) -> Iterator[Entry]:
    return _json_entries(paths, options, documents, conversation_item, (options.id_field,))


def text_entries(
    paths: list[Path], options: SourceOptions, documents: dict[Path, list[Any]]
) -> Iterator[Entry]:
    return _json_entries(paths, options, documents, text_item, (options.text_field, options.id_field))


def _table_rows(path: Path, columns: list[str]) -> Iterator[tuple[dict[str, Any] | list[Any], Reject | None]]:
    """Rows of a .tsv / .csv / .parquet table as dicts (or the raw row with a problem)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        missing = [c for c in columns if c not in names]
        if missing:
            raise SourceError(f"{path.name}: no column(s) {missing}; columns are {names}")
        for batch in pf.iter_batches(batch_size=256, columns=columns):
            for row in batch.to_pylist():
                yield row, None
        return
    if suffix not in (".tsv", ".csv"):
        raise SourceError(f"{path.name}: captions must be .tsv, .csv or .parquet")
    # utf-8-sig: a leading byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name.
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        if suffix == ".tsv":  # plain TSV: tabs split fields, quotes are ordinary characters
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise SourceError(f"{path.name} is empty (a header row naming the columns is required)")
        missing = [c for c in columns if c not in header]
        if missing:
            raise SourceError(f"{path.name}: no column(s) {missing} in header {header}")
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                yield (
                    row,
                    Reject("malformed_record", f"row has {len(row)} fields, the header has {len(header)}"),
                )
            else:
                yield dict(zip(header, row, strict=True)), None


def _caption_columns(options: SourceOptions) -> list[str]:
    return [options.image_column, options.caption_column] + ([options.id_column] if options.id_column else [])


def caption_entries(paths: list[Path], options: SourceOptions) -> Iterator[Entry]:
    columns = _caption_columns(options)
    index = 0
    for path in paths:
        for row_no, (row, problem) in enumerate(_table_rows(path, columns)):
            default_id = f"{path.name}:{row_no}"
            if problem is not None:
                yield Rejected(index, path.name, default_id, problem.code, problem.message, row)
            else:
                image, caption = row.get(options.image_column), row.get(options.caption_column)
                args = (index, path.name, row, image, caption, default_id, options.id_column)
                yield _guarded(index, path.name, row, default_id, options.id_column, caption_item, *args)
            index += 1


def entries_for(fmt: str, paths: list[Path], options: SourceOptions) -> Iterator[Entry]:
    """Dispatch on --format, after the checks that can fail a whole file.

    Missing files, unparseable .json documents and tables without the named columns raise
    SourceError here, before the output directory is touched.
    """
    if fmt not in SOURCE_FORMATS:
        raise SourceError(f"unknown format {fmt!r}; expected one of {SOURCE_FORMATS}")
    for path in paths:
        if not path.is_file():
            raise SourceError(f"annotation file not found: {path}")
        if not os.access(path, os.R_OK):
            raise SourceError(f"annotation file not readable: {path}")
    if fmt == "captions":
        for path in paths:
            next(iter(_table_rows(path, _caption_columns(options))), None)  # header / column check
        return caption_entries(paths, options)
    documents = {}
    for path in paths:
        suffix = path.suffix.lower()
        if suffix == ".json":
            documents[path] = load_json_document(path)
        elif suffix != ".jsonl":
            raise SourceError(f"{path.name}: {fmt} annotations must be .json or .jsonl")
    if fmt == "neo-json":
        return neo_json_entries(paths, options, documents)
    return text_entries(paths, options, documents)


def count_inputs(fmt: str, paths: list[Path], options: SourceOptions) -> int:
    """How many inputs ``entries_for(fmt, paths, options)`` yields (T, from which a part's slice is
    cut), read as it reads them but without validating records: a fraction of the cost.

    Call it after entries_for, which checks the files as wholes."""
    if fmt == "captions":
        total = 0
        for path in paths:
            if path.suffix.lower() == ".parquet":  # one input per row; the rows need not be read
                import pyarrow.parquet as pq

                total += pq.ParquetFile(path).metadata.num_rows
            else:
                total += sum(1 for _ in _table_rows(path, _caption_columns(options)))
        return total
    total = 0
    for path in paths:
        document = load_json_document(path) if path.suffix.lower() == ".json" else None
        total += sum(1 for _ in iter_json_records(path, document))
    return total

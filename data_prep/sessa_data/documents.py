"""Streaming documents from text, JSON-lines and parquet files, plain or gzip/zstd compressed.

Each document has an id that is stable across runs (used for the train/valid split) and a
source name. Rules:
- ``.txt``: the whole file is one document, id = file name, source = file stem.
- ``.jsonl``: one document per line from field ``text``; id from ``doc_id`` (else
  ``<file>:<line>``), source from ``source`` (else the file stem).
- ``.parquet``: the same fields as columns.
Inputs are files, directories (searched recursively) or glob patterns, read in sorted order.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
COMPRESSIONS = ("", ".gz", ".zst")


@dataclass(frozen=True)
class Document:
    doc_id: str
    source: str
    text: str


def _split_suffix(path: Path) -> tuple[str, str]:
    """(format suffix, compression suffix) of a file name such as ``a.jsonl.zst``."""
    name = path.name.lower()
    compression = next((c for c in (".gz", ".zst") if name.endswith(c)), "")
    base = name[: len(name) - len(compression)] if compression else name
    fmt = next((s for s in TEXT_SUFFIXES if base.endswith(s)), "")
    return fmt, compression


def _stem(path: Path) -> str:
    fmt, compression = _split_suffix(path)
    return path.name[: len(path.name) - len(fmt) - len(compression)]


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named by ``inputs`` (files, directories, globs), sorted, duplicates removed."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            candidates = [p for p in sorted(path.rglob("*")) if p.is_file()]
            found.extend(p for p in candidates if _split_suffix(p)[0])
        elif path.is_file():
            if not _split_suffix(path)[0]:
                raise ValueError(
                    f"{path}: unsupported input type; use .txt, .jsonl or .parquet "
                    "(optionally .gz or .zst)"
                )
            found.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            matches = [p for p in matches if p.is_file() and _split_suffix(p)[0]]
            if not matches:
                raise FileNotFoundError(f"input {item!r} matches no .txt/.jsonl/.parquet file")
            found.extend(matches)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise FileNotFoundError(f"no input documents found in {inputs}")
    return unique


def open_text(path: Path) -> IO[str]:
    """Open a possibly compressed file as UTF-8 text."""
    _, compression = _split_suffix(path)
    if compression == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    if compression == ".zst":
        import zstandard

        raw = open(path, "rb")  # noqa: SIM115 - closed through the wrapper
        reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return io.TextIOWrapper(reader, encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_parquet(path: Path, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    _, compression = _split_suffix(path)
    if compression == ".gz":
        source = io.BytesIO(gzip.decompress(path.read_bytes()))
    elif compression == ".zst":
        import zstandard

        with open(path, "rb") as raw:
            source = io.BytesIO(zstandard.ZstdDecompressor().stream_reader(raw).read())
    else:
        source = path  # type: ignore[assignment]
    table = pq.ParquetFile(source)
    columns = set(table.schema_arrow.names)
    if text_field not in columns:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {sorted(columns)})")
    wanted = [text_field] + [c for c in ("doc_id", "id", "source") if c in columns]
    row = 0
    stem = _stem(path)
    for batch in table.iter_batches(columns=wanted):
        data = batch.to_pydict()
        for i, text in enumerate(data[text_field]):
            doc_id = data.get("doc_id", data.get("id", [None] * len(data[text_field])))[i]
            source = data.get("source", [None] * len(data[text_field]))[i]
            yield Document(str(doc_id) if doc_id is not None else f"{path.name}:{row}",
                           source or stem, text or "")
            row += 1


def read_documents(path: Path, text_field: str = "text") -> Iterator[Document]:
    """Documents of one file, in file order."""
    fmt, _ = _split_suffix(path)
    if fmt == ".parquet":
        yield from _read_parquet(path, text_field)
        return
    with open_text(path) as handle:
        if fmt == ".txt":
            yield Document(path.name, _stem(path), handle.read())
            return
        stem = _stem(path)
        for line_no, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no + 1}: invalid JSON ({err})") from err
            if text_field not in record:
                raise ValueError(f"{path}:{line_no + 1}: no field {text_field!r}")
            doc_id = record.get("doc_id", record.get("id"))
            yield Document(str(doc_id) if doc_id is not None else f"{path.name}:{line_no}",
                           str(record.get("source") or stem), record[text_field] or "")


def iter_documents(paths: list[Path], text_field: str = "text") -> Iterator[Document]:
    """Documents of all files in order."""
    for path in paths:
        yield from read_documents(path, text_field)

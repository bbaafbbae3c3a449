"""The sentencepiece model a training run's shards were made with, and how documents were
framed (eos after every document; bos before it only with ``add_bos``), found from the run's
data manifests so that export, sampling and the harness tokenise exactly as training did."""

from __future__ import annotations

import hashlib
import pathlib
from dataclasses import dataclass
from typing import Any


@dataclass
class RunTokenizer:
    path: pathlib.Path          # the .model file
    add_bos: bool               # documents started with bos in the shards
    manifest: pathlib.Path | None   # the manifest it was found from (None: given explicitly)

    def processor(self):
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(self.path))

    def prefix(self, sp) -> list[int]:
        """The ids that start a document as training saw it: bos when the shards put one before
        every document, else the eos that ended the document before (shards are packed
        streams of ``document eos document eos ...``)."""
        if self.add_bos and sp.bos_id() >= 0:
            return [sp.bos_id()]
        return [sp.eos_id()] if sp.eos_id() >= 0 else []


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_manifests(cfg: Any) -> list[pathlib.Path]:
    """The run's valid and train manifests that exist (paths in the config are relative to the
    directory training ran in)."""
    out = []
    for p in (cfg.data.valid, cfg.data.train):
        cand = pathlib.Path(p) if p else None
        if cand is not None and cand.is_dir():
            cand = cand / "manifest.json"
        if cand is not None and cand.is_file():
            out.append(cand)
    return out


def find_run_tokenizer(cfg: Any, explicit: str | None = None) -> RunTokenizer:
    """The run's tokenizer: ``explicit`` (a .model path) or the one its manifests name, checked
    against the shards' tokenizer hash. Raises SystemExit with what to pass when not found."""
    from sessa_pt.data.manifest import read_manifest

    manifests = run_manifests(cfg)
    meta = read_manifest(manifests[0]) if manifests else None
    add_bos = bool(meta.generator.get("add_bos", False)) if meta else False
    if explicit:
        path = pathlib.Path(explicit)
        if not path.is_file():
            raise SystemExit(f"--tokenizer {path}: no such file")
        if meta is not None and meta.tokenizer_sha256 and _sha256(path) != meta.tokenizer_sha256:
            raise SystemExit(f"--tokenizer {path} is not the tokenizer the run's shards were made "
                             f"with ({manifests[0]} records sha256 "
                             f"{meta.tokenizer_sha256[:16]}...)")
        return RunTokenizer(path, add_bos, manifests[0] if manifests else None)
    if meta is None:
        raise SystemExit(f"cannot find the run's data manifests ({cfg.data.valid!r}, "
                         f"{cfg.data.train!r} from the checkpoint's config; paths are relative "
                         "to where training ran): run from that directory or pass --tokenizer")
    if meta.kind != "lm" or not meta.tokenizer.get("path"):
        raise SystemExit(f"{manifests[0]} is a {meta.kind!r} split with no sentencepiece "
                         "tokenizer (synthetic-task runs have none); pass --tokenizer")
    path = pathlib.Path(meta.tokenizer["path"])
    if not path.is_file():
        raise SystemExit(f"the tokenizer {path} named by {manifests[0]} is missing: pass "
                         "--tokenizer PATH to the .model file")
    if _sha256(path) != meta.tokenizer_sha256:
        raise SystemExit(f"{path} changed since the shards were made (sha256 differs from "
                         f"{manifests[0]}): pass --tokenizer with the original .model file")
    return RunTokenizer(path, add_bos, manifests[0])

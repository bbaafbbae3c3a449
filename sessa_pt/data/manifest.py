"""The shard manifest: the JSON file that describes one split of tokenized or task shards.

This module owns the on-disk format shared by the writers in ``sessa_data`` and the loader in
``sessa_pt.data``: the manifest schema, its validation, and the naming of samples inside a
webdataset ``.tar`` shard.

A shard holds samples in order. Sample ``k`` of the split (its global ``sample_id``) is stored
under the webdataset key ``s{k:010d}`` as ``tokens.npy`` (``seq_len + 1`` token ids), an
optional ``mask.npy`` (``seq_len`` uint8 flags aligned with the labels ``tokens[1:]``) and an
optional ``meta.json`` (task metadata such as a class label or a passkey). Every member has one
512-byte ustar header (integer mtime, so no PAX headers).

Beside each ``NAME.tar`` the writer puts ``NAME.index.npy``: an int64 array of shape
``(num_samples, 4)`` holding, per sample, the byte offsets of its token data and mask data and the
offset and size of its meta.json inside the tar (-1 where absent), so readers need no scan of the
tar. The manifest records the sha256 of both files.

Format versions: 1 had no index files and per-member PAX headers; 2 is the layout above.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_NAME = "sessa_pt.shards"
FORMAT_VERSION = 2
TOKENS_EXT = "tokens.npy"
MASK_EXT = "mask.npy"
META_EXT = "meta.json"
INDEX_SUFFIX = ".index.npy"  # NAME.tar -> NAME.index.npy
# columns of a shard index
INDEX_TOKENS, INDEX_MASK, INDEX_META, INDEX_META_SIZE = range(4)
INDEX_COLUMNS = 4


class ManifestError(ValueError):
    """A manifest is missing, malformed, or does not match what the caller expects."""


def sample_key(sample_id: int) -> str:
    """The webdataset key (member basename) of a global sample id."""
    return f"s{sample_id:010d}"


def token_dtype_for_vocab(vocab_size: int) -> str:
    """The smallest unsigned dtype name that holds every id of a vocabulary."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return "uint16" if vocab_size <= 2**16 else "uint32"


def index_name(shard_name: str) -> str:
    """The index file name of a shard file name (``train-000000.tar`` -> ``....index.npy``)."""
    return shard_name.removesuffix(".tar") + INDEX_SUFFIX


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 22) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ShardInfo:
    """One ``.tar`` shard of a split and its index, with the counts and hashes recorded when they
    were written."""

    path: str  # relative to the manifest's directory
    num_samples: int
    num_tokens: int
    bytes: int
    sha256: str
    first_sample_id: int
    index: str  # the shard's index file, relative to the manifest's directory
    index_sha256: str


@dataclass
class Manifest:
    """One split (train, valid, test) of shards; see the module docstring for the layout."""

    kind: str  # "lm" for packed text, "task" for synthetic tasks
    split: str
    seq_len: int
    vocab_size: int
    token_dtype: str
    tokenizer_sha256: str  # sentencepiece model hash, or a task vocabulary's definition hash
    has_mask: bool
    pad_id: int | None
    num_samples: int
    num_tokens: int
    shards: list[ShardInfo]
    tokenizer: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)
    generator: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    path: str = ""  # where it was read from (not serialized)

    @property
    def directory(self) -> Path:
        return Path(self.path).parent

    def shard_path(self, shard: ShardInfo) -> Path:
        return self.directory / shard.path

    def regenerate_command(self) -> str:
        """The command that rewrites this split's shards (see :func:`regenerate_command`)."""
        return regenerate_command({"generator": self.generator, "sources": self.sources,
                                   "tokenizer": self.tokenizer, "seq_len": self.seq_len},
                                  self.path)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("path")
        return json.dumps(data, indent=2, sort_keys=False) + "\n"


def write_manifest(manifest: Manifest, path: str | os.PathLike[str]) -> None:
    """Write a manifest atomically (temporary file, then rename)."""
    _check_consistency(manifest, str(path))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, target)
    manifest.path = str(target)


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate a manifest; a directory means ``<dir>/manifest.json``."""
    target = Path(path)
    if target.is_dir():
        target = target / "manifest.json"
    if not target.is_file():
        raise ManifestError(
            f"no shard manifest at {target}: run `sessa-data tokenize` (or a task generator) "
            "to create the shards, or point the config at the split's manifest.json"
        )
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"manifest {target} is not valid JSON ({err}); regenerate it") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ManifestError(f"{target} is not a {FORMAT_NAME} manifest (format field missing)")
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{target} has shard format_version {data.get('format_version')}, this code reads "
            f"version {FORMAT_VERSION}: regenerate the shards with this version of sessa-data: "
            f"{regenerate_command(data, target)}"
        )
    try:
        shards = [ShardInfo(**s) for s in data.pop("shards")]
        manifest = Manifest(shards=shards, **data)
    except TypeError as err:
        raise ManifestError(f"manifest {target} has missing or unknown fields: {err}") from err
    manifest.path = str(target)
    _check_consistency(manifest, str(target))
    return manifest


def regenerate_command(data: dict[str, Any], manifest_path: str | os.PathLike[str]) -> str:
    """The command that rewrites a split's shards, from a manifest's fields (any version).

    Task generators record it as ``generator.command``. A ``tokenize`` command is rebuilt from
    the recorded settings (so manifests do not depend on where the output was written), and for
    an old task manifest the generator is named with its settings.
    """
    generator = data.get("generator") or {}
    if generator.get("command"):
        return str(generator["command"])
    out = Path(manifest_path).parent.parent
    if generator.get("tool") == "sessa-data tokenize":
        inputs = (data.get("sources") or {}).get("inputs") or ["<inputs>"]
        tokenizer = (data.get("tokenizer") or {}).get("path", "<tokenizer.model>")
        parts = ["sessa-data", "tokenize", "--input", *inputs, "--tokenizer", tokenizer,
                 "--seq-len", str(data.get("seq_len")), "--out", str(out)]
        if generator.get("shard_bytes"):
            parts += ["--shard-bytes", str(generator["shard_bytes"])]
        if generator.get("valid_fraction"):
            parts += ["--valid-fraction", str(generator["valid_fraction"])]
        if generator.get("valid_sources"):
            parts += ["--valid-sources", ",".join(generator["valid_sources"])]
        if generator.get("text_field", "text") != "text":
            parts += ["--text-field", generator["text_field"]]
        if generator.get("add_bos"):
            parts.append("--add-bos")
        return shlex.join([*parts, "--overwrite"])
    task = generator.get("task", "<task>")
    settings = {k: v for k, v in generator.items() if k != "task"}
    return (f"sessa-data {task} --out {shlex.quote(str(out))} with the settings it was made with "
            f"({json.dumps(settings, sort_keys=True)})")


def _check_consistency(manifest: Manifest, where: str) -> None:
    if manifest.seq_len <= 0:
        raise ManifestError(f"{where}: seq_len must be positive, got {manifest.seq_len}")
    if manifest.token_dtype not in ("uint16", "uint32"):
        raise ManifestError(f"{where}: unsupported token_dtype {manifest.token_dtype!r}")
    if sum(s.num_samples for s in manifest.shards) != manifest.num_samples:
        raise ManifestError(f"{where}: shard sample counts do not add up to num_samples")
    expected_first = 0
    for shard in manifest.shards:
        if shard.first_sample_id != expected_first:
            raise ManifestError(
                f"{where}: shard {shard.path} starts at sample {shard.first_sample_id}, "
                f"expected {expected_first}"
            )
        expected_first += shard.num_samples

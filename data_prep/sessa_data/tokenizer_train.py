"""Training a sentencepiece tokenizer (BPE or unigram) and recording its identity.

Special ids are fixed: unk=0, bos=1, eos=2, pad=3; byte fallback is on and whitespace is kept
as is (identity normalization by default), so any UTF-8 text, newlines and indentation included,
round-trips. Training is deterministic: every line of every document is used in input order
(no sampling, no shuffling), and the random generator seed is fixed. ``PREFIX.json`` records the
model's sha256, which manifests carry and the loader checks.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from sessa_data.documents import expand_inputs, iter_documents
from sessa_pt.data.manifest import sha256_file

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MAX_SENTENCE_BYTES = 8192


@dataclass(frozen=True)
class TokenizerInfo:
    model_path: str
    sha256: str
    vocab_size: int
    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int


def tokenizer_info(model_path: str | os.PathLike[str]) -> TokenizerInfo:
    """Identity of a sentencepiece model: its hash, vocab size and special ids."""
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer model {path} not found: train one with `sessa-data train-tokenizer`")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    return TokenizerInfo(str(path), sha256_file(path), sp.get_piece_size(), sp.unk_id(),
                         sp.bos_id(), sp.eos_id(), sp.pad_id())


def _lines(inputs: list[str], text_field: str, max_bytes: int | None) -> Iterator[str]:
    seen = 0
    for doc in tqdm(iter_documents(expand_inputs(inputs), text_field), desc="reading",
                    unit="doc", leave=False):
        for line in doc.text.splitlines():
            line = line.strip()
            if not line:
                continue
            encoded = len(line.encode("utf-8"))
            if encoded > MAX_SENTENCE_BYTES:
                continue
            yield line
            seen += encoded
            if max_bytes is not None and seen >= max_bytes:
                return


def train_tokenizer(inputs: list[str], vocab_size: int, model_type: str, out_prefix: str,
                    text_field: str = "text", character_coverage: float = 0.9999,
                    max_input_bytes: int | None = None, num_threads: int = 2,
                    seed: int = 0, normalization: str = "identity") -> TokenizerInfo:
    """Train a model on all lines of ``inputs``; write PREFIX.model, .vocab and .json."""
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte fallback alone needs 260")
    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()  # no model_prefix: the output path must not end up in the model
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(inputs, text_field, max_input_bytes),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name=normalization,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=MAX_SENTENCE_BYTES,
        num_threads=num_threads,
        minloglevel=2,
    )
    _atomic_write(Path(f"{prefix}.model"), model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n"
                    for i in range(sp.get_piece_size()))
    _atomic_write(Path(f"{prefix}.vocab"), vocab.encode("utf-8"))
    info = tokenizer_info(f"{prefix}.model")
    record = {"model": Path(info.model_path).name, "sha256": info.sha256,
              "vocab_size": info.vocab_size, "model_type": model_type,
              "special_ids": {"unk": info.unk_id, "bos": info.bos_id, "eos": info.eos_id,
                              "pad": info.pad_id},
              "byte_fallback": True, "normalization": normalization, "inputs": [str(p) for p in inputs], "seed": seed}
    _atomic_write(Path(f"{prefix}.json"), (json.dumps(record, indent=2) + "\n").encode())
    return info


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)

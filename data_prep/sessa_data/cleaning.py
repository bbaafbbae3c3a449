"""Turning raw bytes from a package into clean UTF-8 document text.

Rules: decode UTF-8 (falling back to cp1252 for old Gutenberg files), NFC-normalize, unify line
endings, drop control characters other than newline and tab, strip trailing spaces, collapse
runs of blank lines to one blank line, trim. Indentation is kept (code blocks matter).
"""

from __future__ import annotations

import re
import unicodedata

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANKS = re.compile(r"\n{3,}")
_BROWN_TOKEN = re.compile(r"\S+")


def decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def clean_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = text.replace("\ufeff", "")
    text = _CONTROL.sub("", text)
    text = _TRAILING.sub("\n", text + "\n")
    text = _BLANKS.sub("\n\n", text)
    return text.strip("\n").rstrip()


def detokenize_brown(raw: str) -> str:
    """Brown corpus ``word/tag`` tokens -> plain sentences, one paragraph per blank line."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        words = [tok.rsplit("/", 1)[0] for tok in _BROWN_TOKEN.findall(block)]
        if not words:
            continue
        line = " ".join(words)
        line = line.replace("``", '"').replace("''", '"')
        line = re.sub(r" ([,.;:?!)\]])", r"\1", line)
        line = re.sub(r"([(\[]) ", r"\1", line)
        line = re.sub(r'" (.*?) "', r'"\1"', line)
        paragraphs.append(line)
    return "\n".join(paragraphs)

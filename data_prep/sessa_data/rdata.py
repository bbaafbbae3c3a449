"""Reading R's lazy-load data databases (``Rdata.rdb`` + ``Rdata.rdx``) in pure Python.

Enough of R's XDR serialization format (version 2 and 3) to read character vectors, lists,
integer/real/logical vectors, symbols and pairlists with attributes: what an R data package
such as ``janeaustenr`` stores. No R is needed.

Layout: the ``.rdx`` index is a gzip-compressed serialized list whose ``variables`` element maps
each object name to an (offset, length) pair into the ``.rdb`` file; each ``.rdb`` record is a
4-byte big-endian uncompressed length followed by a zlib stream of one serialized object.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from typing import Any

NILVALUE, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = (
    254, 1, 2, 9, 10, 13, 14, 16, 19)
REFSXP = 255
NA_INTEGER = -(2**31)


class RDataError(ValueError):
    """The bytes are not a serialized R object this reader understands."""


class RObject(dict):
    """An R object with attributes: ``.value`` plus attributes as dict items."""

    def __init__(self, value: Any, attributes: dict[str, Any]) -> None:
        super().__init__(attributes)
        self.value = value


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0
        self.refs: list[Any] = []

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def bytes(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RDataError("serialized R object is truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def header(self) -> None:
        if self.bytes(2) != b"X\n":
            raise RDataError("only XDR (binary big-endian) R serialization is supported")
        version = self.int()
        self.int()  # writer R version
        self.int()  # minimal reader version
        if version == 3:
            self.bytes(self.int())  # native encoding name
        elif version != 2:
            raise RDataError(f"unsupported R serialization version {version}")

    def item(self) -> Any:
        flags = self.int()
        kind = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind == NILVALUE:
            return None
        if kind == REFSXP:
            index = flags >> 8
            return self.refs[(index if index else self.int()) - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == CHARSXP:
            length = self.int()
            return None if length == -1 else self.bytes(length).decode("utf-8", "replace")
        if kind == LISTSXP:
            return self._pairlist(has_attr, has_tag)
        if kind in (STRSXP, VECSXP):
            values = [self.item() for _ in range(self.int())]
        elif kind in (INTSXP, LGLSXP):
            n = self.int()
            values = [None if v == NA_INTEGER else v
                      for v in struct.unpack_from(f">{n}i", self.bytes(4 * n))]
        elif kind == REALSXP:
            n = self.int()
            values = list(struct.unpack_from(f">{n}d", self.bytes(8 * n)))
        else:
            raise RDataError(f"unsupported R object type {kind}")
        if has_attr:
            return RObject(values, self._attributes())
        return values

    def _attributes(self) -> dict[str, Any]:
        attrs = self.item()
        return attrs if isinstance(attrs, dict) else {}

    def _pairlist(self, has_attr: bool, has_tag: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            if has_attr:
                self.item()
            tag = self.item() if has_tag else f"_{len(out)}"
            out[str(tag)] = self.item()
            flags = self.int()
            if flags & 0xFF == NILVALUE:
                return out
            if flags & 0xFF != LISTSXP:
                raise RDataError("malformed pairlist")
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))


def unserialize(data: bytes) -> Any:
    """Decode one XDR-serialized R object."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def read_lazyload_db(rdb: bytes, rdx: bytes) -> dict[str, Any]:
    """All variables of an ``.rdb``/``.rdx`` pair, by name."""
    index = unserialize(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx))
    if not isinstance(index, RObject):
        raise RDataError("unexpected .rdx index layout")
    names = index.get("names", [])
    variables = index.value[names.index("variables")]
    if not isinstance(variables, RObject):
        raise RDataError("unexpected .rdx variables layout")
    out: dict[str, Any] = {}
    for name, (offset, length) in zip(variables["names"], variables.value, strict=True):
        record = rdb[offset:offset + length]
        (expected,) = struct.unpack_from(">I", record, 0)
        raw = zlib.decompress(record[4:])
        if len(raw) != expected:
            raise RDataError(f"record {name!r}: {len(raw)} bytes, header says {expected}")
        out[name] = unserialize(raw)
    return out

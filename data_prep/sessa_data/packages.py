"""Downloading registry packages (Debian, PyPI sdists, npm) into a cache, and reading them.

Downloads go through each registry's own client (``apt-get download``, ``pip download``,
``npm pack``); a package already in the cache is never fetched again. Archives are read in pure
Python: a ``.deb`` is an ``ar`` archive whose ``data.tar.*`` member holds the files.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("SESSA_DATA_CACHE",
                                    Path.home() / ".cache" / "sessa_pt" / "packages"))


class PackageDownloadError(RuntimeError):
    """A registry download failed; the message says which package and how to retry."""


@dataclass(frozen=True)
class PackageSpec:
    """A package in a registry. ``kind`` is ``deb``, ``pypi`` (source dist) or ``npm``."""

    kind: str
    name: str
    version: str | None = None
    resolve_prefix: str | None = None  # deb metapackage: use its dependency matching this

    def label(self) -> str:
        return f"{self.kind}:{self.name}" + (f"=={self.version}" if self.version else "")


def _run(cmd: list[str], cwd: Path, spec: PackageSpec, hint: str) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise PackageDownloadError(
            f"could not download {spec.label()}: `{' '.join(cmd)}` failed ({err}). {hint}"
        ) from err
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise PackageDownloadError(
            f"could not download {spec.label()}: `{' '.join(cmd)}` exited {proc.returncode}: "
            f"{' | '.join(tail)}. {hint}"
        )
    return proc.stdout


def resolve_deb_name(spec: PackageSpec) -> str:
    """The concrete package behind a metapackage (e.g. python3-doc -> python3.11-doc)."""
    if spec.resolve_prefix is None:
        return spec.name
    hint = "Run `apt-get update` and retry."
    out = _run(["apt-cache", "depends", spec.name], Path.cwd(), spec, hint)
    for line in out.splitlines():
        match = re.match(r"\s*Depends:\s*(\S+)", line)
        if match and match.group(1).startswith(spec.resolve_prefix):
            return match.group(1)
    return spec.name


def _cached(directory: Path, pattern: str) -> Path | None:
    found = sorted(directory.glob(pattern))
    return found[-1] if found else None


def download(spec: PackageSpec, cache: Path = DEFAULT_CACHE) -> Path:
    """The package file, downloaded into ``cache/<kind>/`` unless already there."""
    directory = cache / spec.kind
    directory.mkdir(parents=True, exist_ok=True)
    retry = (f"Retry the same command once the registry is reachable, or put the package file "
             f"into {directory} by hand.")
    if spec.kind == "deb":
        name = resolve_deb_name(spec)
        pattern = f"{name}_{spec.version or '*'}_*.deb"
        if (hit := _cached(directory, pattern)) is not None:
            return hit
        target = f"{name}={spec.version}" if spec.version else name
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            _run(["apt-get", "download", target], Path(tmp), spec,
                 f"On Debian run `apt-get update` first. {retry}")
            got = _cached(Path(tmp), f"{name}_*.deb")
            if got is None:
                raise PackageDownloadError(f"apt-get download {target} produced no .deb")
            os.replace(got, directory / got.name)
            return directory / got.name
    if spec.kind == "pypi":
        stem = spec.name.replace("-", "_")
        for pattern in (f"{spec.name}-{spec.version or '*'}.tar.gz",
                        f"{stem}-{spec.version or '*'}.tar.gz"):
            if (hit := _cached(directory, pattern)) is not None:
                return hit
        target = f"{spec.name}=={spec.version}" if spec.version else spec.name
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  "--disable-pip-version-check", "-q", "-d", tmp, target], Path(tmp), spec, retry)
            got = _cached(Path(tmp), "*.tar.gz")
            if got is None:
                raise PackageDownloadError(f"pip download {target} produced no source archive")
            os.replace(got, directory / got.name)
            return directory / got.name
    if spec.kind == "npm":
        if (hit := _cached(directory, f"{spec.name}-{spec.version or '*'}.tgz")) is not None:
            return hit
        target = f"{spec.name}@{spec.version}" if spec.version else spec.name
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            _run(["npm", "pack", "--silent", target], Path(tmp), spec,
                 f"npm must be installed (apt-get install npm). {retry}")
            got = _cached(Path(tmp), "*.tgz")
            if got is None:
                raise PackageDownloadError(f"npm pack {target} produced no .tgz")
            os.replace(got, directory / got.name)
            return directory / got.name
    raise ValueError(f"unknown package kind {spec.kind!r}")


def package_version(path: Path, spec: PackageSpec) -> str:
    """The version encoded in a downloaded package's file name."""
    name = path.name
    if spec.kind == "deb":
        return name.split("_")[1]
    if spec.kind == "pypi":
        return name.removesuffix(".tar.gz").rsplit("-", 1)[1]
    return name.removesuffix(".tgz").rsplit("-", 1)[1]


def _deb_data_tar(path: Path) -> tarfile.TarFile:
    """Open the ``data.tar.*`` member of a ``.deb`` (an ``ar`` archive) as a stream."""
    handle = open(path, "rb")  # noqa: SIM115 - kept open for the returned stream
    if handle.read(8) != b"!<arch>\n":
        raise ValueError(f"{path} is not a Debian package (no ar header)")
    while header := handle.read(60):
        if len(header) < 60:
            break
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                import zstandard

                stream = zstandard.ZstdDecompressor().stream_reader(
                    io.BytesIO(handle.read(size)))
                return tarfile.open(fileobj=stream, mode="r|")
            return tarfile.open(fileobj=io.BytesIO(handle.read(size)), mode="r|*")
        handle.seek(size + (size % 2), os.SEEK_CUR)
    raise ValueError(f"{path} has no data.tar member")


def iter_members(path: Path, keep: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in a package whose normalized name passes ``keep``."""
    opened = _deb_data_tar(path) if path.suffix == ".deb" else None
    with opened or tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if member.isfile() and keep(name):
                extracted = tar.extractfile(member)
                if extracted is not None:
                    yield name, extracted.read()


def extract_to(path: Path, keep: Callable[[str], bool], target: Path) -> list[Path]:
    """Write the kept files of a package under ``target`` (for tools that need real files)."""
    written = []
    for name, data in iter_members(path, keep):
        out = target / name
        if not out.resolve().is_relative_to(target.resolve()):
            raise ValueError(f"{path}: member {name!r} escapes the target directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        written.append(out)
    return written

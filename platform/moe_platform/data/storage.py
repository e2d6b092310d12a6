"""Locations: local paths and URIs (s3://, gs://, file://) behind one small API.

Everything in the data layer names files by a *location* string: an absolute
local path or a URI. `pyarrow.fs` resolves both, so the same code reads a
laptop directory and a bucket on a cluster. Relative local paths are made
absolute once, at the entry point, because Ray workers run in other cwds.
"""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs

from moe_platform.data.errors import DataError


def is_uri(location: str) -> bool:
    return "://" in location


def absolute(location: str) -> str:
    """URIs unchanged; local paths expanded (~) and made absolute."""
    if is_uri(location):
        return location
    return os.path.abspath(os.path.expanduser(location))


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a location; DataError for a scheme pyarrow cannot open.

    (An unknown scheme or a missing cloud library would otherwise surface as a pyarrow traceback.)
    """
    if is_uri(location):
        try:
            return pafs.FileSystem.from_uri(location)
        except (pa.ArrowException, OSError) as exc:
            first_line = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise DataError(f"cannot open {location}: {first_line}") from None
    return pafs.LocalFileSystem(), absolute(location)


def join(location: str, *parts: str) -> str:
    """Join with '/', which both local POSIX paths and URIs use."""
    return "/".join([location.rstrip("/"), *parts])


def file_info(location: str) -> pafs.FileInfo:
    fs, path = filesystem(location)
    return fs.get_file_info(path)


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes_atomically(location: str, data: bytes) -> None:
    """Write to a temporary name, then move: readers never see half a file.

    (On object stores the move is a copy, but the name appears only when complete.)
    """
    fs, path = filesystem(location)
    temporary = path + ".tmp"
    with fs.open_output_stream(temporary) as stream:
        stream.write(data)
    fs.move(temporary, path)


def make_dirs(location: str) -> None:
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)


def delete(location: str) -> None:
    """Delete a file or directory tree if it exists."""
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)

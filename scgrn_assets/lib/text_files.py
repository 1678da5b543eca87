"""The one text-file opener and decoder: plain or gzip-compressed text, decoded strictly.

A byte that is not valid in the file's encoding is an error naming the file, the line and the
encoding, never a U+FFFD replacement character: two Latin-1 gene names (``\\xc1poe``, ``\\xc9poe``)
decoded with ``errors="replace"`` both became ``\\ufffdpoe`` and their counts were summed.
"""

from __future__ import annotations

import codecs
import gzip
import io
import os
from pathlib import Path
from typing import IO, Iterator

from scgrn_assets.lib.errors import ScgrnInputError

#: Encodings a study's text files may declare (catalog ``encoding:``). All are ASCII-compatible, so the
#: byte-level parsers (separators, digits, newlines) read them unchanged; only names are decoded.
TEXT_ENCODINGS = ("utf-8", "latin-1", "cp1252")
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def open_text(path: str | os.PathLike) -> io.TextIOBase:
    """Open a plain or gzip-compressed (``.gz``, e.g. STRING's ``.txt.gz``) text file for reading as UTF-8."""
    path = Path(path)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def undecodable_error(data: bytes, error: UnicodeDecodeError, *, encoding: str, study: str | None, file: str | None,
                      first_line: int = 1) -> ScgrnInputError:
    """The :class:`ScgrnInputError` for ``error`` raised decoding ``data``: line, column and byte, and the fix.

    ``first_line`` is the line number of ``data``'s first line in the file.
    """
    start = error.start
    line = first_line + data.count(b"\n", 0, start)
    column = start - (data.rfind(b"\n", 0, start) + 1) + 1
    other = "latin-1" if encoding == "utf-8" else "utf-8"
    return ScgrnInputError(
        f"line {line} is not valid {encoding} (byte 0x{data[start]:02x} at column {column})", study=study, file=file,
        fix=f"declare the study's text encoding in its catalog entry (encoding: {other}; one of "
            f"{', '.join(TEXT_ENCODINGS)}), or convert the file to UTF-8 (iconv -f LATIN1 -t UTF-8)")


def decode_text(data: bytes, *, encoding: str = "utf-8", study: str | None = None, file: str | None = None,
                first_line: int = 1) -> str:
    """``data`` decoded strictly; an undecodable byte is an :class:`ScgrnInputError` naming file, line and encoding."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        raise undecodable_error(data, error, encoding=encoding, study=study, file=file,
                                first_line=first_line) from None


def decode_text_file(data: bytes, *, encoding: str = "utf-8", study: str | None = None,
                     file: str | None = None) -> tuple[str, str]:
    """A whole text file's bytes as (text, the encoding used).

    A byte-order mark decides over ``encoding``: UTF-16 (a table saved as "Unicode text" by Excel)
    and UTF-8 with a BOM are read as such, the BOM removed.
    """
    if data.startswith(_UTF16_BOMS):
        try:
            return data.decode("utf-16"), "utf-16"
        except UnicodeDecodeError as error:
            raise ScgrnInputError(f"starts with a UTF-16 byte-order mark but is not valid UTF-16 ({error.reason} at "
                                  f"byte {error.start})", study=study, file=file,
                                  fix="re-download the file or save it again as UTF-8") from None
    if data.startswith(codecs.BOM_UTF8):
        return decode_text(data[len(codecs.BOM_UTF8):], encoding="utf-8", study=study, file=file), "utf-8"
    return decode_text(data, encoding=encoding, study=study, file=file), encoding


def iter_decoded_lines(stream: IO[bytes], *, encoding: str = "utf-8", study: str | None = None,
                       file: str | None = None) -> Iterator[str]:
    """The lines of a binary stream (ending in ``\\n``), each decoded strictly; a UTF-16 or UTF-8 BOM decides.

    For files too large to hold whole (a GEO series matrix with its expression table); the reader
    may stop early.
    """
    head = stream.read(2)
    if head.startswith(_UTF16_BOMS):
        text = io.TextIOWrapper(io.BufferedReader(_Prefixed(head, stream)), encoding="utf-16", errors="strict",
                                newline="")
        try:
            yield from text
        except UnicodeDecodeError as error:
            raise ScgrnInputError(f"starts with a UTF-16 byte-order mark but is not valid UTF-16 ({error.reason})",
                                  study=study, file=file, fix="re-download the file or save it again as UTF-8") from None
        return
    first = head + stream.readline()
    if first.startswith(codecs.BOM_UTF8):
        first, encoding = first[len(codecs.BOM_UTF8):], "utf-8"
    line_number = 1
    line = first
    while line:
        yield decode_text(line, encoding=encoding, study=study, file=file, first_line=line_number)
        line_number += 1
        line = stream.readline()


class _Prefixed(io.RawIOBase):
    """A raw stream: ``head``, then the rest of ``stream``."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        super().__init__()
        self._head = head
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._stream.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


__all__ = ["TEXT_ENCODINGS", "open_text", "decode_text", "decode_text_file", "iter_decoded_lines",
           "undecodable_error"]

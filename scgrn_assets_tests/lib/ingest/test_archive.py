"""Safe streaming tar reading, on real archives written with tarfile in tmp_path."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import random
import tarfile
import tempfile
import threading
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scgrn_assets.lib.ingest.archive import (
    ExtractionLimits,
    iter_tar_members,
    open_maybe_gzip,
    read_guard,
)
from scgrn_assets.lib.errors import ScgrnInputError

STUDY = "GSE1"


def _regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, member_type: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = member_type
    info.linkname = linkname
    return info, None


def _write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], compression: str = "") -> Path:
    with tarfile.open(path, f"w:{compression}" if compression else "w") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _random_bytes(n_bytes: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n_bytes)


def _read_all(tar_path: Path, **kwargs) -> list[tuple[str, bytes]]:
    return [(name, member.read()) for name, member in iter_tar_members(tar_path, study=STUDY, **kwargs)]


SAMPLE_MEMBERS = [
    ("GSE1_RAW/GSM1_a.txt.gz", gzip.compress(b"gene\tc1\nA\t1\n")),
    ("GSM2_b.txt", _random_bytes(70_000, seed=1)),
    ("GSE1_RAW/deeper/GSM3_c.mtx", b""),
]


def _sample_tar(path: Path, compression: str = "") -> Path:
    directory = tarfile.TarInfo("GSE1_RAW")
    directory.type = tarfile.DIRTYPE
    members = [(directory, None)] + [_regular(name, data) for name, data in SAMPLE_MEMBERS]
    return _write_tar(path, members, compression)


# --- reading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
def test_iter_yields_regular_files_in_order(tmp_path, compression):
    tar_path = _sample_tar(tmp_path / f"GSE1_RAW.tar.{compression or 'plain'}", compression)

    members = _read_all(tar_path)

    with tarfile.open(tar_path) as reference:  # random-access reading as the independent check
        expected = [(info.name, reference.extractfile(info).read()) for info in reference.getmembers() if info.isfile()]
    assert members == expected == SAMPLE_MEMBERS


def test_iter_reads_from_a_named_pipe(tmp_path):
    tar_bytes = _sample_tar(tmp_path / "source.tar").read_bytes()
    pipe_path = tmp_path / "archive.pipe"
    os.mkfifo(pipe_path)

    def write_into_pipe() -> None:
        with open(pipe_path, "wb") as pipe:
            pipe.write(tar_bytes)

    writer = threading.Thread(target=write_into_pipe, daemon=True)
    writer.start()
    members = _read_all(pipe_path)
    writer.join(timeout=5)

    assert members == SAMPLE_MEMBERS


def test_iter_is_lazy_and_fails_only_when_it_reaches_the_damage(tmp_path):
    first_data = _random_bytes(5000, seed=2)
    tar_bytes = _write_tar(tmp_path / "good.tar", [_regular("first.txt", first_data),
                                                  _regular("second.txt", b"x" * 5000)]).read_bytes()
    cut_inside_second = 512 + 5120 + 512 + 100
    damaged_path = tmp_path / "damaged.tar"
    damaged_path.write_bytes(tar_bytes[:cut_inside_second])

    members = iter_tar_members(damaged_path, study=STUDY)
    first_name, first_file = next(members)
    assert (first_name, first_file.read()) == ("first.txt", first_data)
    second_name, second_file = next(members)
    assert second_name == "second.txt"
    with pytest.raises(ScgrnInputError, match="GSE1: damaged.tar member second.txt: truncated or corrupt"):
        second_file.read()


def test_member_file_is_closed_once_the_next_member_is_requested(tmp_path):
    tar_path = _sample_tar(tmp_path / "a.tar")
    members = iter_tar_members(tar_path, study=STUDY)
    _, first_file = next(members)
    next(members)
    with pytest.raises(ValueError, match="closed"):
        first_file.read()


# --- refusals --------------------------------------------------------------------------------------

UNSAFE_MEMBERS = {
    "parent": _regular("../x", b"evil"),
    "absolute": _regular("/etc/x", b"evil"),
    "nested-parent": _regular("a/../../x", b"evil"),
    "symlink": _special("link", tarfile.SYMTYPE, linkname="/etc/passwd"),
    "hardlink": _special("hard", tarfile.LNKTYPE, linkname="GSM2_b.txt"),
    "char-device": _special("tty", tarfile.CHRTYPE),
    "block-device": _special("disk", tarfile.BLKTYPE),
    "fifo": _special("pipe", tarfile.FIFOTYPE),
}


@pytest.mark.parametrize("kind", list(UNSAFE_MEMBERS))
def test_unsafe_member_is_refused(tmp_path, kind):
    unsafe_info, unsafe_data = UNSAFE_MEMBERS[kind]
    tar_path = _write_tar(tmp_path / "GSE1_RAW.tar", [_regular("GSM2_b.txt", b"safe"), (unsafe_info, unsafe_data)])

    with pytest.raises(ScgrnInputError) as caught:
        _read_all(tar_path)

    message = str(caught.value)
    assert message.startswith("GSE1: GSE1_RAW.tar: member ") and repr(unsafe_info.name) in message
    assert "check the catalog" in message
    assert not (tmp_path / "x").exists()


def test_decompression_bomb_is_refused(tmp_path):
    bomb_path = _write_tar(tmp_path / "bomb.tar.gz", [_regular("zeros.bin", bytes(5_000_000))], "gz")
    assert bomb_path.stat().st_size < 50_000  # it really is a bomb: tiny on disk, large when expanded

    with pytest.raises(ScgrnInputError, match="5000000 bytes, over the limit of 1000000.*max_total_bytes"):
        _read_all(bomb_path, limits=ExtractionLimits(max_total_bytes=1_000_000))
    with pytest.raises(ScgrnInputError, match="'zeros.bin' is 5000000 bytes.*max_member_bytes"):
        _read_all(bomb_path, limits=ExtractionLimits(max_member_bytes=4_999_999))


def test_total_size_limit_adds_up_members(tmp_path):
    members = [_regular(f"m{index}.bin", bytes(400)) for index in range(3)]
    tar_path = _write_tar(tmp_path / "a.tar", members)
    assert len(_read_all(tar_path, limits=ExtractionLimits(max_total_bytes=1200))) == 3
    with pytest.raises(ScgrnInputError, match="members up to 'm2.bin' hold 1200 bytes"):
        _read_all(tar_path, limits=ExtractionLimits(max_total_bytes=1199))


def test_member_count_limit(tmp_path):
    tar_path = _write_tar(tmp_path / "a.tar", [_regular(f"m{index}", b"") for index in range(5)])
    with pytest.raises(ScgrnInputError, match="more than 3 members.*max_members"):
        _read_all(tar_path, limits=ExtractionLimits(max_members=3))


# --- truncated and corrupt data ---------------------------------------------------------------------


def test_truncated_tar_inside_member_data_is_refused(tmp_path):
    tar_bytes = _sample_tar(tmp_path / "full.tar").read_bytes()
    truncated = tmp_path / "GSE1_RAW.tar"
    truncated.write_bytes(tar_bytes[: len(tar_bytes) // 2])

    with pytest.raises(ScgrnInputError, match="GSE1: GSE1_RAW.tar.*truncated or corrupt.*re-download"):
        _read_all(truncated)


def test_tar_cut_exactly_between_members_is_refused(tmp_path):
    # tarfile alone would take the missing header for the end of the archive and report success.
    full = _write_tar(tmp_path / "full.tar", [_regular("a.txt", b"a" * 512), _regular("b.txt", b"b" * 512)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full.read_bytes()[: 2 * 512])

    with pytest.raises(ScgrnInputError, match="cut.tar: truncated or corrupt.*end-of-archive"):
        _read_all(cut)


def test_truncated_tar_gz_is_refused(tmp_path):
    compressed = _sample_tar(tmp_path / "full.tar.gz", "gz").read_bytes()
    truncated = tmp_path / "GSE1_RAW.tar.gz"
    truncated.write_bytes(compressed[: len(compressed) * 2 // 3])
    with pytest.raises(ScgrnInputError, match="truncated or corrupt"):
        _read_all(truncated)


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_gz_member_surfaces_through_read_guard(tmp_path, damage):
    payload = gzip.compress(_random_bytes(20_000, seed=4))
    if damage == "truncated":
        damaged = payload[: len(payload) - 30]
    else:
        damaged = payload[:-8] + bytes(8)  # wrong CRC and length trailer
    tar_path = _write_tar(tmp_path / "GSE1_RAW.tar", [_regular("GSM1_a.txt.gz", damaged)])

    with pytest.raises(ScgrnInputError) as caught:
        for name, member in iter_tar_members(tar_path, study=STUDY):
            with read_guard(study=STUDY, file=name), open_maybe_gzip(member, name=name) as text:
                text.read()

    assert str(caught.value).startswith("GSE1: GSM1_a.txt.gz: truncated or corrupt")
    assert "re-download the file" in str(caught.value) and "exclude the sample" in str(caught.value)


@pytest.mark.parametrize("error", [
    EOFError("Compressed file ended"), gzip.BadGzipFile("Not a gzipped file"), zlib.error("invalid distance"),
    tarfile.ReadError("unexpected end of data"), lzma.LZMAError("Corrupt input data"),
])
def test_read_guard_converts_corrupt_data_errors(error):
    with pytest.raises(ScgrnInputError, match="GSE1: x.gz: truncated or corrupt") as caught:
        with read_guard(study=STUDY, file="x.gz"):
            raise error
    assert caught.value.__cause__ is error


def test_read_guard_lets_other_errors_through():
    with pytest.raises(KeyError):
        with read_guard(study=STUDY, file="x.gz"):
            raise KeyError("not a data problem")


# --- open_maybe_gzip -----------------------------------------------------------------------------


class _ReadOnlyStream:
    """Only read(n): not seekable, no peek (like a socket or a pipe wrapper)."""

    def __init__(self, data: bytes):
        self._buffer = io.BytesIO(data)

    def read(self, n_bytes: int = -1) -> bytes:
        return self._buffer.read(n_bytes)


@pytest.mark.parametrize("source_kind", ["path", "buffered", "read-only"])
@pytest.mark.parametrize("compressed", [True, False], ids=["gzip", "plain"])
def test_open_maybe_gzip_is_transparent(tmp_path, source_kind, compressed):
    text = _random_bytes(10_000, seed=5)
    data = gzip.compress(text) if compressed else text
    path = tmp_path / "f"
    path.write_bytes(data)
    source = {"path": path, "buffered": io.BufferedReader(io.BytesIO(data)), "read-only": _ReadOnlyStream(data)}

    with open_maybe_gzip(source[source_kind], name="f") as stream:
        assert stream.read() == text


# --- any input at all ---------------------------------------------------------------------------


def _valid_tar_bytes(compression: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}" if compression else "w") as archive:
        for name, data in SAMPLE_MEMBERS[:2]:
            info = tarfile.TarInfo(name)
            info.size = len(data[:3000])
            archive.addfile(info, io.BytesIO(data[:3000]))
    return buffer.getvalue()


VALID_TARS = [_valid_tar_bytes(compression) for compression in ("", "gz", "bz2", "xz")]
MAGIC_PREFIXES = [b"", b"\x1f\x8b\x08", b"BZh9", b"\xfd7zXZ\x00"]


PAX_KEYWORDS = ["GNU.sparse.map", "GNU.sparse.major", "GNU.sparse.minor", "GNU.sparse.size", "GNU.sparse.name",
                "GNU.sparse.numblocks", "GNU.sparse.offset", "GNU.sparse.numbytes", "size", "path", "linkpath",
                "uid", "mtime", "comment"]


def _tar_with_pax_headers(pax_headers: dict[str, str], data: bytes) -> bytes:
    """A well-formed archive whose one member carries the given (possibly nonsensical) pax headers."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("GSM1.txt")
        info.size = len(data)
        info.pax_headers = pax_headers
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@st.composite
def _archive_like_bytes(draw) -> bytes:
    """Arbitrary bytes, compressor magic followed by junk, a valid archive cut and damaged at random,
    or a valid archive with nonsensical pax headers (their checksums are right, so tarfile parses them)."""
    kind = draw(st.sampled_from(["random", "magic", "damaged", "pax"]))
    if kind == "pax":
        pax_headers = draw(st.dictionaries(st.sampled_from(PAX_KEYWORDS), st.text("0123456789,.-x ", max_size=12),
                                           max_size=4))
        return _tar_with_pax_headers(pax_headers, draw(st.binary(max_size=600)))
    if kind == "random":
        return draw(st.binary(max_size=4096))
    if kind == "magic":
        return draw(st.sampled_from(MAGIC_PREFIXES)) + draw(st.binary(max_size=2048))
    data = bytearray(draw(st.sampled_from(VALID_TARS)))
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@settings(max_examples=300, deadline=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_archive_like_bytes())
def test_any_bytes_give_members_or_our_error(tmp_path, data):
    with tempfile.NamedTemporaryFile(dir=tmp_path, suffix=".tar", delete=False) as handle:
        handle.write(data)
    tar_path = Path(handle.name)
    limits = ExtractionLimits(max_member_bytes=1 << 20, max_total_bytes=1 << 20)
    try:
        for name, member in iter_tar_members(tar_path, study=STUDY, limits=limits):
            assert isinstance(name, str)
            assert len(member.read()) <= limits.max_member_bytes
    except ScgrnInputError as error:
        assert str(error).startswith("GSE1: ")
    finally:
        tar_path.unlink()


@pytest.mark.parametrize("data", [
    b"\x1f\x8b\x08",  # gzip header cut short: tarfile itself raises TypeError
    _tar_with_pax_headers({"GNU.sparse.map": "1,x"}, b"abc"),  # tarfile itself raises ValueError
], ids=["short-gzip-header", "bad-sparse-map"])
def test_inputs_that_break_plain_tarfile_give_our_error(tmp_path, data):
    tar_path = tmp_path / "GSE1_RAW.tar"
    tar_path.write_bytes(data)
    with pytest.raises((TypeError, ValueError)) as plain:
        with tarfile.open(tar_path, mode="r|*") as archive:
            archive.getmembers()
    assert not isinstance(plain.value, ScgrnInputError)
    with pytest.raises(ScgrnInputError, match="GSE1: GSE1_RAW.tar: truncated or corrupt"):
        _read_all(tar_path)


def test_compressors_used_by_the_property_test_produce_what_it_expects():
    # Guards the property test's inputs: each valid archive opens, and each magic is its compressor's.
    assert [len(tarfile.open(fileobj=io.BytesIO(data)).getnames()) for data in VALID_TARS] == [2, 2, 2, 2]
    assert gzip.compress(b"")[:3] == MAGIC_PREFIXES[1]
    assert bz2.compress(b"")[:3] == MAGIC_PREFIXES[2][:3]
    assert lzma.compress(b"")[:6] == MAGIC_PREFIXES[3]

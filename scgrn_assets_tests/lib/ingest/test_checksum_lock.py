"""Trust on first use: the lock file pins, verifies, refuses tampered files and loses no concurrent pin."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import threading
from pathlib import Path

import pytest
import yaml

from scgrn_assets.lib.ingest.checksum_lock import ChecksumLock, fetch_pinned
from scgrn_assets.lib.ingest.download import DownloadPolicy, apply_url_mirrors, parse_url_mirrors
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets_tests.support.http_server import FaultyHTTPServer

FAST = DownloadPolicy(max_attempts=2, backoff_seconds=0.01, timeout_seconds=5.0, chunk_bytes=4096)
GEO = "https://ftp.ncbi.nlm.nih.gov/geo/series/GSE98nnn/GSE98969/suppl"


def _bytes(n_bytes: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n_bytes)


def _serve(server: FaultyHTTPServer, name: str, content: bytes) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Serve ``content`` at the GEO path of ``name``; returns the catalog URL and the mirror rule to reach it."""
    server.serve(f"/geo/series/GSE98nnn/GSE98969/suppl/{name}", content)
    return f"{GEO}/{name}", parse_url_mirrors(f"https://ftp.ncbi.nlm.nih.gov={server.base_url}")


def test_first_download_pins_and_later_downloads_are_verified(http_server, tmp_path):
    content = _bytes(50_000, seed=1)
    url, mirrors = _serve(http_server, "GSE98969_RAW.tar", content)
    lock = ChecksumLock(tmp_path / "catalogs" / "real.lock.yaml")
    lock.path.parent.mkdir()
    destination = tmp_path / "raw" / "GSE98969_RAW.tar"

    first = fetch_pinned(url, destination, sha256=None, lock=lock, study="GSE98969", policy=FAST, mirrors=mirrors)
    assert first.sha256 == hashlib.sha256(content).hexdigest()
    # Keyed by the catalog's URL, not the mirror's: a mirror is held to GEO's pins.
    pinned = yaml.safe_load(lock.path.read_text())["files"]
    assert pinned == {url: {"sha256": first.sha256, "bytes": len(content), "study": "GSE98969",
                            "file": "GSE98969_RAW.tar"}}

    destination.unlink()  # a second machine, or a re-download: verified against the pin, not re-pinned
    second = fetch_pinned(url, destination, sha256=None, lock=lock, study="GSE98969", policy=FAST, mirrors=mirrors)
    assert second.sha256 == first.sha256 and destination.read_bytes() == content
    assert len(http_server.requests_for("/geo/series/GSE98nnn/GSE98969/suppl/GSE98969_RAW.tar")) == 2
    assert lock.pins()[url].sha256 == first.sha256


def test_a_file_that_changed_after_pinning_is_refused_and_nothing_is_left(http_server, tmp_path):
    url, mirrors = _serve(http_server, "GSE98969_RAW.tar", _bytes(20_000, seed=2))
    lock = ChecksumLock(tmp_path / "real.lock.yaml")
    destination = tmp_path / "raw" / "GSE98969_RAW.tar"
    fetch_pinned(url, destination, sha256=None, lock=lock, study="GSE98969", policy=FAST, mirrors=mirrors)
    pinned = lock.path.read_text()

    _serve(http_server, "GSE98969_RAW.tar", _bytes(20_000, seed=3))  # the server's copy is tampered with
    destination.unlink()
    with pytest.raises(ScgrnInputError) as error:
        fetch_pinned(url, destination, sha256=None, lock=lock, study="GSE98969", policy=FAST, mirrors=mirrors)
    message = str(error.value)
    assert "GSE98969" in message and "GSE98969_RAW.tar" in message and "sha256 mismatch" in message
    assert str(lock.path) in error.value.fix and "delete the entry" in error.value.fix
    assert not destination.exists() and not destination.with_name(destination.name + ".part").exists()
    assert lock.path.read_text() == pinned  # a refused file never re-pins


def test_catalog_sha256_wins_and_writes_no_lock(http_server, tmp_path):
    content = _bytes(1000, seed=4)
    url, mirrors = _serve(http_server, "GSE98969_SraRunTable.csv", content)
    lock = ChecksumLock(tmp_path / "demo.lock.yaml")
    fetch_pinned(url, tmp_path / "runs.csv", sha256=hashlib.sha256(content).hexdigest(), lock=lock,
                 study="GSE98969", policy=FAST, mirrors=mirrors)
    assert not lock.path.exists()
    with pytest.raises(ScgrnInputError, match="check the catalog entry"):
        fetch_pinned(url, tmp_path / "other.csv", sha256="0" * 64, lock=lock, study="GSE98969", policy=FAST,
                     mirrors=mirrors)


def _pin_many(path: str, worker: int, n_pins: int) -> None:
    lock = ChecksumLock(Path(path))
    for index in range(n_pins):
        sha = hashlib.sha256(f"{worker}-{index}".encode()).hexdigest()
        lock.pin(f"https://example.org/{worker}/{index}", sha, n_bytes=index, study=f"S{worker}", file=f"f{index}")


def test_concurrent_pins_from_threads_and_processes_lose_nothing(tmp_path):
    path = tmp_path / "real.lock.yaml"
    threads = [threading.Thread(target=_pin_many, args=(str(path), worker, 15)) for worker in range(6)]
    processes = [multiprocessing.get_context("spawn").Process(target=_pin_many, args=(str(path), worker, 15))
                 for worker in range(6, 10)]
    for runner in [*threads, *processes]:
        runner.start()
    for runner in [*threads, *processes]:
        runner.join(timeout=120)
    assert all(p.exitcode == 0 for p in processes)
    pins = ChecksumLock(path).pins()
    assert len(pins) == 10 * 15
    assert pins["https://example.org/7/3"].sha256 == hashlib.sha256(b"7-3").hexdigest()
    assert not list(tmp_path.glob(".tmp-*"))  # every write was renamed into place


def test_a_different_pin_for_the_same_url_is_an_error(tmp_path):
    lock = ChecksumLock(tmp_path / "real.lock.yaml")
    lock.pin("https://example.org/a", "a" * 64, n_bytes=1, study="S", file="a")
    assert lock.pin("https://example.org/a", "a" * 64, n_bytes=1, study="S", file="a").sha256 == "a" * 64
    with pytest.raises(ScgrnInputError, match="changed between two downloads"):
        lock.pin("https://example.org/a", "b" * 64, n_bytes=1, study="S", file="a")


def test_malformed_lock_file_names_itself_and_the_fix(tmp_path):
    path = tmp_path / "real.lock.yaml"
    path.write_text("files:\n  https://example.org/a: {sha256: short}\n")
    with pytest.raises(ScgrnInputError) as error:
        ChecksumLock(path).pins()
    assert str(path) in str(error.value) and "delete it" in error.value.fix


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_catalog_folder_is_refused_before_downloading(http_server, tmp_path):
    url, mirrors = _serve(http_server, "GSE98969_RAW.tar", b"data")
    folder = tmp_path / "catalogs"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ScgrnInputError) as error:
            fetch_pinned(url, tmp_path / "raw" / "x.tar", sha256=None, lock=ChecksumLock(folder / "real.lock.yaml"),
                         study="GSE98969", policy=FAST, mirrors=mirrors)
    finally:
        folder.chmod(0o755)
    assert "not writable" in str(error.value) and "SCGRN_CATALOG" in error.value.fix
    assert http_server.requests_for("/geo/series/GSE98nnn/GSE98969/suppl/GSE98969_RAW.tar") == []


def test_url_mirrors_swap_the_host_only_at_a_boundary():
    mirrors = parse_url_mirrors("https://ftp.ncbi.nlm.nih.gov=http://127.0.0.1:9/ftp,"
                                " https://ftp.ncbi.nlm.nih.gov/geo/series=http://127.0.0.1:9/series")
    assert apply_url_mirrors(f"{GEO}/x.tar", mirrors) == "http://127.0.0.1:9/series/GSE98nnn/GSE98969/suppl/x.tar"
    assert apply_url_mirrors("https://ftp.ncbi.nlm.nih.gov/pub/x", mirrors) == "http://127.0.0.1:9/ftp/pub/x"
    assert apply_url_mirrors("https://ftp.ncbi.nlm.nih.gov.example.org/x", mirrors) == \
        "https://ftp.ncbi.nlm.nih.gov.example.org/x"
    assert apply_url_mirrors("https://www.ncbi.nlm.nih.gov/geo/download/?acc=GSE1", mirrors) == \
        "https://www.ncbi.nlm.nih.gov/geo/download/?acc=GSE1"
    assert parse_url_mirrors("") == ()
    with pytest.raises(ScgrnInputError, match="PREFIX=REPLACEMENT"):
        parse_url_mirrors("ftp.ncbi.nlm.nih.gov")


# --- a pin is of bytes fetched from its own URL ----------------------------------------------------


def test_a_second_catalog_naming_another_url_for_the_same_file_fetches_and_pins_its_own_bytes(http_server, tmp_path):
    content_a, content_b = _bytes(30_000, seed=5), _bytes(31_000, seed=6)
    url_a, mirrors = _serve(http_server, "a.tar", content_a)
    url_b, _ = _serve(http_server, "b.tar", content_b)
    destination = tmp_path / "home" / "assets" / "geo_raw_archive" / "GSE1" / "GSE1_RAW.tar"  # one SCGRN_HOME
    lock_a, lock_b = ChecksumLock(tmp_path / "a.lock.yaml"), ChecksumLock(tmp_path / "b.lock.yaml")
    fetch_pinned(url_a, destination, sha256=None, lock=lock_a, study="GSE1", policy=FAST, mirrors=mirrors)

    result = fetch_pinned(url_b, destination, sha256=None, lock=lock_b, study="GSE1", policy=FAST, mirrors=mirrors)

    assert len(http_server.requests_for("/geo/series/GSE98nnn/GSE98969/suppl/b.tar")) == 1
    assert destination.read_bytes() == content_b and result.sha256 == hashlib.sha256(content_b).hexdigest()
    assert {url: pin.sha256 for url, pin in lock_b.pins().items()} == {url_b: hashlib.sha256(content_b).hexdigest()}
    assert lock_a.pins()[url_a].sha256 == hashlib.sha256(content_a).hexdigest()


def test_deleting_a_pin_fetches_the_file_again_before_pinning_it(http_server, tmp_path):
    """The README's way to accept a deliberate change upstream: delete the entry; the file on disk is not re-pinned."""
    url, mirrors = _serve(http_server, "GSE98969_RAW.tar", _bytes(20_000, seed=7))
    lock = ChecksumLock(tmp_path / "real.lock.yaml")
    destination = tmp_path / "raw" / "GSE98969_RAW.tar"
    fetch_pinned(url, destination, sha256=None, lock=lock, study="GSE98969", policy=FAST, mirrors=mirrors)
    changed = _bytes(21_000, seed=8)
    _serve(http_server, "GSE98969_RAW.tar", changed)  # upstream changes, deliberately
    lock.path.unlink()  # the user deletes the pin (here: the whole lock)

    fetch_pinned(url, destination, sha256=None, lock=lock, study="GSE98969", policy=FAST, mirrors=mirrors)

    assert lock.pins()[url].sha256 == hashlib.sha256(changed).hexdigest() and destination.read_bytes() == changed
    assert len(http_server.requests_for("/geo/series/GSE98nnn/GSE98969/suppl/GSE98969_RAW.tar")) == 2


def test_the_mirror_host_is_allowed_but_a_catalog_url_to_a_local_host_is_not(http_server, tmp_path, monkeypatch):
    monkeypatch.delenv("SCGRN_ALLOW_HOSTS", raising=False)
    url, mirrors = _serve(http_server, "GSE98969_RAW.tar", _bytes(1000, seed=9))
    lock = ChecksumLock(tmp_path / "real.lock.yaml")
    # The user named the mirror (SCGRN_URL_MIRROR): URLs it rewrites may reach its host and port.
    fetch_pinned(url, tmp_path / "a.tar", sha256=None, lock=lock, study="GSE98969", policy=FAST, mirrors=mirrors)
    # A catalog URL naming that host itself, or another port on it, is the catalog's choice, not the user's.
    for local in (http_server.url("/geo/series/GSE98nnn/GSE98969/suppl/GSE98969_RAW.tar"), "http://127.0.0.1:22/"):
        with pytest.raises(ScgrnInputError, match="loopback address") as error:
            fetch_pinned(local, tmp_path / "b.tar", sha256=None, lock=lock, study="GSE98969", policy=FAST,
                         mirrors=mirrors)
        assert "SCGRN_ALLOW_HOSTS=127.0.0.1:" in error.value.fix
    assert len(http_server.requests) == 1 and list(lock.pins()) == [url]

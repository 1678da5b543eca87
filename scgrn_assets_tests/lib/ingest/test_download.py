"""fetch_file against real files and a real HTTP server on 127.0.0.1 with scripted faults."""

from __future__ import annotations

import hashlib
import logging
import random
import socket
import time
from pathlib import Path

import pytest

from scgrn_assets.lib.ingest.download import DownloadPolicy, _backoff_seconds, fetch_file, sha256_of
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets_tests.reliability import ledger
from scgrn_assets_tests.support.http_server import FaultyHTTPServer, Reply

FAST = DownloadPolicy(max_attempts=3, backoff_seconds=0.01, timeout_seconds=5.0, chunk_bytes=4096)
STUDY = "GSE98969"


@pytest.fixture(autouse=True)
def _allow_the_loopback_test_server(monkeypatch):
    """The fault server listens on 127.0.0.1, which catalogs may reach only when the user allows it."""
    monkeypatch.setenv("SCGRN_ALLOW_HOSTS", "127.0.0.1")


def _random_bytes(n_bytes: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n_bytes)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _part_path(destination: Path) -> Path:
    return destination.with_name(destination.name + ".part")


def _assert_nothing_left(destination: Path) -> None:
    assert not destination.exists()
    assert not _part_path(destination).exists()


# --- file:// and argument checks ---------------------------------------------------------------


def test_file_url_is_copied_and_verified(tmp_path):
    content = _random_bytes(50_000)
    source = tmp_path / "mirror" / "GSE98969_RAW.tar"
    source.parent.mkdir()
    source.write_bytes(content)
    destination = tmp_path / "downloads" / "GSE98969_RAW.tar"
    progress_calls = []

    result = fetch_file(source.as_uri(), destination, sha256=_sha256(content), study=STUDY, policy=FAST,
                        progress=lambda done, total: progress_calls.append((done, total)))

    assert destination.read_bytes() == content
    assert result.path == destination and result.sha256 == _sha256(content) and result.n_bytes == len(content)
    assert result.n_attempts == 1 and not result.resumed
    assert not _part_path(destination).exists()
    assert progress_calls[-1] == (len(content), len(content))
    assert [done for done, _ in progress_calls] == sorted(done for done, _ in progress_calls)


def test_file_url_checksum_mismatch_leaves_nothing(tmp_path):
    source = tmp_path / "GSE98969_RAW.tar"
    source.write_bytes(b"the real bytes")
    destination = tmp_path / "out" / "GSE98969_RAW.tar"
    wrong_sha256 = _sha256(b"other bytes")

    with pytest.raises(ScgrnInputError) as caught:
        fetch_file(source.as_uri(), destination, sha256=wrong_sha256, study=STUDY, policy=FAST)

    message = str(caught.value)
    assert message.startswith("GSE98969: GSE98969_RAW.tar: sha256 mismatch")
    assert f"expected {wrong_sha256}" in message and f"got {_sha256(b'the real bytes')}" in message
    assert "check the catalog entry" in message
    _assert_nothing_left(destination)


def test_missing_file_source_is_a_clear_error(tmp_path):
    with pytest.raises(ScgrnInputError, match="GSE98969: a.tar: the source .* does not exist"):
        fetch_file((tmp_path / "absent.tar").as_uri(), tmp_path / "a.tar", sha256=None, study=STUDY, policy=FAST)


def test_unsupported_scheme_names_study_and_url(tmp_path):
    with pytest.raises(ScgrnInputError) as caught:
        fetch_file("ftp://ftp.ncbi.nlm.nih.gov/x.tar", tmp_path / "x.tar", sha256=None, study=STUDY)
    assert "GSE98969" in str(caught.value) and "ftp://ftp.ncbi.nlm.nih.gov/x.tar" in str(caught.value)
    assert "https://" in str(caught.value)


def test_malformed_expected_sha256_is_refused(tmp_path):
    with pytest.raises(ScgrnInputError, match="not 64 hex digits"):
        fetch_file("https://example.org/x", tmp_path / "x", sha256="abc123", study=STUDY)


def test_sha256_of_matches_hashlib(tmp_path):
    content = _random_bytes(3 * (1 << 20) + 17, seed=3)  # spans several read chunks
    path = tmp_path / "blob"
    path.write_bytes(content)
    assert sha256_of(path) == hashlib.sha256(content).hexdigest()


def test_backoff_is_exponential_capped_and_jittered():
    policy = DownloadPolicy(backoff_seconds=1.0)
    for attempt in range(1, 12):
        base_seconds = min(60.0, 2.0 ** (attempt - 1))
        delays = [_backoff_seconds(policy, attempt) for _ in range(50)]
        assert all(0.5 * base_seconds <= delay <= base_seconds for delay in delays)
        assert len(set(delays)) > 1


# --- http: success and retries --------------------------------------------------------------------


def test_http_download_succeeds(http_server: FaultyHTTPServer, tmp_path):
    content = _random_bytes(100_000)
    url = http_server.serve("/GSE1_RAW.tar", content)
    destination = tmp_path / "GSE1_RAW.tar"

    result = fetch_file(url, destination, sha256=_sha256(content), study=STUDY, policy=FAST)

    assert destination.read_bytes() == content and result.n_attempts == 1 and not result.resumed
    assert len(http_server.requests_for("/GSE1_RAW.tar")) == 1
    assert "range" not in http_server.requests_for("/GSE1_RAW.tar")[0].headers


def test_redirect_is_followed(http_server: FaultyHTTPServer, tmp_path):
    content = _random_bytes(1000)
    http_server.serve("/old", b"", replies=[Reply(status=301, headers={"Location": "/new"})])
    http_server.serve("/new", content)
    result = fetch_file(http_server.url("/old"), tmp_path / "f", sha256=_sha256(content), study=STUDY, policy=FAST)
    assert result.path.read_bytes() == content


@pytest.mark.parametrize("failing_status", [500, 503, 429])
def test_server_errors_are_retried(http_server: FaultyHTTPServer, tmp_path, caplog, failing_status):
    content = _random_bytes(20_000)
    url = http_server.serve("/f", content, replies=[Reply(status=failing_status), Reply(status=failing_status)])

    with caplog.at_level(logging.WARNING, logger="scgrn_assets.lib.ingest.download"):
        result = fetch_file(url, tmp_path / "f", sha256=_sha256(content), study=STUDY, policy=FAST)

    assert result.n_attempts == 3 and result.path.read_bytes() == content
    assert len(http_server.requests_for("/f")) == 3
    retry_warnings = [record for record in caplog.records if "attempt" in record.getMessage()]
    assert len(retry_warnings) == 2 and all(str(failing_status) in record.getMessage() for record in retry_warnings)


@pytest.mark.parametrize("reset_connection", [False, True], ids=["closed", "reset"])
def test_dropped_connection_resumes_with_range(http_server: FaultyHTTPServer, tmp_path, reset_connection):
    content = _random_bytes(200_000)
    n_sent_first = 70_000
    dropped = Reply(drop_after_bytes=n_sent_first, reset_connection=reset_connection)
    url = http_server.serve("/f", content, replies=[dropped])
    destination = tmp_path / "f"

    result = fetch_file(url, destination, sha256=_sha256(content), study=STUDY, policy=FAST)

    assert destination.read_bytes() == content and result.sha256 == _sha256(content)
    assert result.n_attempts == 2
    second_request = http_server.requests_for("/f")[1]
    if reset_connection:
        # An RST may discard bytes still in flight, so only a positive resume offset is certain.
        resumed_at = int(second_request.headers["range"].removeprefix("bytes=").removesuffix("-"))
        assert 0 < resumed_at <= n_sent_first or not result.resumed
    else:
        assert second_request.headers["range"] == f"bytes={n_sent_first}-"
        assert result.resumed


def test_server_ignoring_range_restarts_cleanly(http_server: FaultyHTTPServer, tmp_path):
    content = _random_bytes(100_000)
    url = http_server.serve("/f", content, replies=[Reply(drop_after_bytes=30_000), Reply(honour_range=False)])

    result = fetch_file(url, tmp_path / "f", sha256=_sha256(content), study=STUDY, policy=FAST)

    assert result.path.read_bytes() == content and not result.resumed
    assert http_server.requests_for("/f")[1].headers["range"] == "bytes=30000-"


def test_range_answered_from_the_wrong_offset_restarts(http_server: FaultyHTTPServer, tmp_path):
    content = _random_bytes(100_000)
    url = http_server.serve("/f", content, replies=[Reply(drop_after_bytes=30_000), Reply(range_start=10_000)])

    result = fetch_file(url, tmp_path / "f", sha256=_sha256(content), study=STUDY, policy=FAST)

    assert result.path.read_bytes() == content and not result.resumed
    requests = http_server.requests_for("/f")
    assert len(requests) == 3 and "range" not in requests[2].headers


def test_body_shorter_than_content_length_is_retried(http_server: FaultyHTTPServer, tmp_path):
    content = _random_bytes(50_000)
    # The server promises 50 bytes more than it sends, then closes.
    url = http_server.serve("/f", content, replies=[Reply(content_length=len(content) + 50)])

    result = fetch_file(url, tmp_path / "f", sha256=_sha256(content), study=STUDY, policy=FAST)

    assert result.path.read_bytes() == content and result.n_attempts == 2
    # The retry asked for the rest; the server said there is no rest (416), and the checksum decided.
    assert http_server.requests_for("/f")[1].headers["range"] == f"bytes={len(content)}-"


def test_short_body_on_every_attempt_keeps_the_part_for_later(http_server: FaultyHTTPServer, tmp_path):
    content = _random_bytes(50_000)
    truncated = [Reply(drop_after_bytes=1000, honour_range=False)] * 3
    url = http_server.serve("/f", content, replies=truncated)
    destination = tmp_path / "f"

    with pytest.raises(ScgrnInputError) as caught:
        fetch_file(url, destination, sha256=_sha256(content), study=STUDY, policy=FAST)

    message = str(caught.value)
    assert message.startswith("GSE98969: f: download of ") and url in message and "after 3 attempts" in message
    assert "closed after 1000 of 50000 bytes" in message and "resumed" in message
    assert not destination.exists() and _part_path(destination).read_bytes() == content[:1000]


def test_body_longer_than_content_length_is_caught_by_the_checksum(http_server: FaultyHTTPServer, tmp_path):
    content = _random_bytes(50_000)
    url = http_server.serve("/f", content, replies=[Reply(content_length=len(content) - 100)])

    result = fetch_file(url, tmp_path / "f", sha256=_sha256(content), study=STUDY, policy=FAST)

    assert result.path.read_bytes() == content and result.n_attempts == 2 and not result.resumed
    assert "range" not in http_server.requests_for("/f")[1].headers  # a wrong body is never resumed


def test_resumed_body_longer_than_announced_restarts_from_scratch(http_server: FaultyHTTPServer, tmp_path):
    content = _random_bytes(100_000)
    # The resumed 206 claims the file is 100000 bytes long but sends 4 bytes beyond that.
    overlong = Reply(body=content[30_000:] + b"junk")
    url = http_server.serve("/f", content, replies=[Reply(drop_after_bytes=30_000), overlong])

    result = fetch_file(url, tmp_path / "f", sha256=None, study=STUDY, policy=FAST)

    assert result.path.read_bytes() == content and result.n_attempts == 3 and not result.resumed
    requests = http_server.requests_for("/f")
    assert requests[1].headers["range"] == "bytes=30000-" and "range" not in requests[2].headers


def test_slow_server_times_out_in_bounded_time(http_server: FaultyHTTPServer, tmp_path):
    # Without the timeout one attempt alone would take 3 s, so the 2 s bound below can fail.
    url = http_server.serve("/f", b"x" * 100, replies=[Reply(delay_seconds=3.0)] * 2)
    policy = DownloadPolicy(max_attempts=2, backoff_seconds=0.01, timeout_seconds=0.2)

    started = time.monotonic()
    with pytest.raises(ScgrnInputError, match="after 2 attempts.*(timed out|Timeout)"):
        fetch_file(url, tmp_path / "f", sha256=None, study=STUDY, policy=policy)

    assert time.monotonic() - started < 2.0
    _assert_nothing_left(tmp_path / "f")


def test_slow_answer_then_a_quick_one_succeeds(http_server: FaultyHTTPServer, tmp_path):
    content = b"0123456789" * 100
    url = http_server.serve("/f", content, replies=[Reply(delay_seconds=1.0)])
    policy = DownloadPolicy(max_attempts=2, backoff_seconds=0.01, timeout_seconds=0.2)
    result = fetch_file(url, tmp_path / "f", sha256=_sha256(content), study=STUDY, policy=policy)
    assert result.n_attempts == 2 and result.path.read_bytes() == content


def test_redirect_loop_is_our_clear_error(http_server: FaultyHTTPServer, tmp_path):
    loop = [Reply(status=302, headers={"Location": "/loop"})] * 50
    url = http_server.serve("/loop", b"never", replies=loop)

    with pytest.raises(ScgrnInputError) as caught:
        fetch_file(url, tmp_path / "f", sha256=None, study=STUDY, policy=FAST)

    message = str(caught.value)
    assert message.startswith("GSE98969: f: ") and url in message and "redirect loop" in message
    assert "catalog entry" in message
    assert len(http_server.requests_for("/loop")) <= FAST.max_redirects + 1  # not retried
    _assert_nothing_left(tmp_path / "f")


@pytest.mark.parametrize("status", [404, 403, 410])
def test_client_errors_are_not_retried(http_server: FaultyHTTPServer, tmp_path, status):
    # Only the first reply fails: a retry would have succeeded, so success means a wrong retry.
    url = http_server.serve("/f", b"content", replies=[Reply(status=status)])

    with pytest.raises(ScgrnInputError) as caught:
        fetch_file(url, tmp_path / "f", sha256=None, study=STUDY, policy=FAST)

    assert len(http_server.requests_for("/f")) == 1
    assert f"HTTP {status}" in str(caught.value) and url in str(caught.value) and "GSE98969" in str(caught.value)
    _assert_nothing_left(tmp_path / "f")


def test_unknown_path_404_names_the_url(http_server: FaultyHTTPServer, tmp_path):
    url = http_server.url("/missing.tar")
    with pytest.raises(ScgrnInputError, match="missing.tar answered HTTP 404"):
        fetch_file(url, tmp_path / "missing.tar", sha256=None, study=STUDY, policy=FAST)
    assert len(http_server.requests) == 1


@pytest.mark.parametrize("announce_length", [True, False], ids=["content-length", "no-length"])
def test_body_over_max_bytes_is_refused(http_server: FaultyHTTPServer, tmp_path, announce_length):
    content = _random_bytes(50_000)
    replies = [] if announce_length else [Reply(content_length=-1)]
    url = http_server.serve("/f", content, replies=replies)
    policy = DownloadPolicy(max_attempts=3, backoff_seconds=0.01, max_bytes=10_000, chunk_bytes=4096)

    with pytest.raises(ScgrnInputError, match="more than the limit of 10000 bytes.*max_bytes"):
        fetch_file(url, tmp_path / "f", sha256=None, study=STUDY, policy=policy)

    assert len(http_server.requests_for("/f")) == 1
    _assert_nothing_left(tmp_path / "f")


def test_body_without_content_length_is_downloaded(http_server: FaultyHTTPServer, tmp_path):
    content = _random_bytes(30_000)
    url = http_server.serve("/f", content, replies=[Reply(content_length=-1)])
    result = fetch_file(url, tmp_path / "f", sha256=_sha256(content), study=STUDY, policy=FAST)
    assert result.path.read_bytes() == content


def test_checksum_mismatch_on_every_attempt(http_server: FaultyHTTPServer, tmp_path):
    content = _random_bytes(10_000)
    expected = _sha256(b"what the catalog promised")
    url = http_server.serve("/GSE98969_RAW.tar", content)
    destination = tmp_path / "GSE98969_RAW.tar"

    with pytest.raises(ScgrnInputError) as caught:
        fetch_file(url, destination, sha256=expected, study=STUDY, policy=FAST)

    assert str(caught.value) == (
        f"GSE98969: GSE98969_RAW.tar: sha256 mismatch (expected {expected}, got {_sha256(content)}) "
        f"after 3 attempts from {url}; the file on the server changed or the catalog's sha256 is wrong: "
        "check the catalog entry"
    )
    requests = http_server.requests_for("/GSE98969_RAW.tar")
    assert len(requests) == 3 and all("range" not in request.headers for request in requests)
    _assert_nothing_left(destination)


# --- what is already on disk ----------------------------------------------------------------------


def test_existing_correct_file_makes_no_request(http_server: FaultyHTTPServer, tmp_path):
    content = _random_bytes(5000)
    url = http_server.serve("/f", content)
    destination = tmp_path / "f"
    destination.write_bytes(content)

    result = fetch_file(url, destination, sha256=_sha256(content), study=STUDY, policy=FAST)

    assert http_server.requests == [] and result.n_attempts == 0 and result.n_bytes == len(content)


def test_existing_wrong_file_is_downloaded_again(http_server: FaultyHTTPServer, tmp_path):
    content = _random_bytes(5000)
    url = http_server.serve("/f", content)
    destination = tmp_path / "f"
    destination.write_bytes(b"stale")

    result = fetch_file(url, destination, sha256=_sha256(content), study=STUDY, policy=FAST)

    assert destination.read_bytes() == content and result.n_attempts == 1
    assert len(http_server.requests) == 1


def test_stale_part_from_an_earlier_process_is_resumed(http_server: FaultyHTTPServer, tmp_path):
    content = _random_bytes(80_000)
    url = http_server.serve("/f", content)
    destination = tmp_path / "f"
    _part_path(destination).write_bytes(content[:33_333])
    progress_calls = []

    result = fetch_file(url, destination, sha256=_sha256(content), study=STUDY, policy=FAST,
                        progress=lambda done, total: progress_calls.append((done, total)))

    assert destination.read_bytes() == content and result.resumed and result.n_attempts == 1
    assert http_server.requests_for("/f")[0].headers["range"] == "bytes=33333-"
    assert progress_calls[0][0] > 33_333 and progress_calls[-1] == (len(content), len(content))
    assert not _part_path(destination).exists()


def test_corrupt_stale_part_is_discarded_after_the_checksum_fails(http_server: FaultyHTTPServer, tmp_path):
    content = _random_bytes(80_000)
    url = http_server.serve("/f", content)
    destination = tmp_path / "f"
    _part_path(destination).write_bytes(b"\0" * 20_000)  # right length, wrong bytes

    result = fetch_file(url, destination, sha256=_sha256(content), study=STUDY, policy=FAST)

    assert destination.read_bytes() == content and result.n_attempts == 2 and not result.resumed
    requests = http_server.requests_for("/f")
    assert requests[0].headers["range"] == "bytes=20000-" and "range" not in requests[1].headers


def test_complete_stale_part_is_verified_without_a_body(http_server: FaultyHTTPServer, tmp_path):
    content = _random_bytes(8000)
    url = http_server.serve("/f", content)
    destination = tmp_path / "f"
    _part_path(destination).write_bytes(content)

    result = fetch_file(url, destination, sha256=_sha256(content), study=STUDY, policy=FAST)

    assert destination.read_bytes() == content and result.resumed
    assert len(http_server.requests_for("/f")) == 1  # answered 416: nothing more to send


# --- a file downloaded for one URL is that URL's only -------------------------------------------


def test_a_file_downloaded_for_one_url_is_not_reused_for_another(http_server: FaultyHTTPServer, tmp_path):
    url_a = http_server.serve("/a.tar", _random_bytes(5000, seed=1))
    url_b = http_server.serve("/b.tar", _random_bytes(6000, seed=2))
    destination = tmp_path / "GSE1_RAW.tar"
    fetch_file(url_a, destination, sha256=None, study="GSE1", policy=FAST)

    again = fetch_file(url_a, destination, sha256=None, study="GSE1", policy=FAST)  # the same URL: reused
    assert again.n_attempts == 0 and len(http_server.requests_for("/a.tar")) == 1

    result = fetch_file(url_b, destination, sha256=None, study="GSE1", policy=FAST)
    assert len(http_server.requests_for("/b.tar")) == 1 and result.n_attempts == 1
    assert destination.read_bytes() == _random_bytes(6000, seed=2)
    assert result.sha256 == _sha256(_random_bytes(6000, seed=2))


def test_a_partial_download_of_one_url_is_not_resumed_from_another(http_server: FaultyHTTPServer, tmp_path):
    content_b = _random_bytes(40_000, seed=4)
    url_a = http_server.serve("/a.tar", _random_bytes(40_000, seed=3),
                              replies=[Reply(drop_after_bytes=10_000, honour_range=False)] * FAST.max_attempts)
    url_b = http_server.serve("/b.tar", content_b)
    destination = tmp_path / "GSE1_RAW.tar"
    with pytest.raises(ScgrnInputError, match="partial download is kept"):
        fetch_file(url_a, destination, sha256=None, study="GSE1", policy=FAST)
    assert _part_path(destination).stat().st_size == 10_000

    result = fetch_file(url_b, destination, sha256=None, study="GSE1", policy=FAST)

    assert "range" not in http_server.requests_for("/b.tar")[0].headers  # a's bytes are not b's prefix
    assert destination.read_bytes() == content_b and not result.resumed


# --- catalogs may not reach this machine, its network or the cloud metadata service --------------


@pytest.fixture
def no_connections(monkeypatch) -> list:
    """Every connection attempt, refused and recorded: a refused URL must not get as far as connecting
    (and a test must never send traffic beyond the loopback interface, even before the fix)."""
    attempts = []

    def tripwire(address, *args, **kwargs):
        attempts.append(address)
        raise ConnectionRefusedError(f"test tripwire: no connection to {address}")

    monkeypatch.setattr(socket, "create_connection", tripwire)
    return attempts


def _resolve_names(monkeypatch, names: dict[str, list[list[str]]]) -> None:
    """getaddrinfo without DNS for ``names``: host -> its answers (address lists; empty: the name does not
    resolve), one per lookup, the last repeated; other hosts resolve as usual."""
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in names:
            return real_getaddrinfo(host, port, *args, **kwargs)
        answers = names[host].pop(0) if len(names[host]) > 1 else names[host][0]
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (address, port or 80)) for address in answers]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize("url, address_kind", [
    ("http://127.0.0.1:{port}/secret?token=abc", "loopback"),
    ("http://localhost:{port}/secret", "loopback"),
    ("http://[::1]:{port}/secret", "loopback"),
    ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", "link-local"),
    ("http://10.0.0.7:8080/internal", "private"),
    ("https://192.168.1.1/admin", "private"),
    ("http://0.0.0.0:{port}/secret", "unspecified"),
    ("http://224.0.0.1/x", "multicast"),
    ("http://[::ffff:169.254.169.254]/latest", "link-local"),
], ids=["loopback", "localhost", "ipv6-loopback", "metadata-service", "private-10", "private-192", "unspecified",
        "multicast", "ipv4-mapped"])
def test_urls_to_this_machine_or_private_networks_are_refused(monkeypatch, tmp_path, no_connections, url,
                                                             address_kind):
    ledger.record("bad_input")
    monkeypatch.delenv("SCGRN_ALLOW_HOSTS")
    server = FaultyHTTPServer()  # listening: the refusal, not a closed port, must stop the download
    try:
        server.serve("/secret", b"the secret")
        url = url.format(port=server.port)
        with pytest.raises(ScgrnInputError) as caught:
            fetch_file(url, tmp_path / "f.tar", sha256=None, study="GSE1", policy=FAST)
    finally:
        server.close()
    message = str(caught.value)
    assert message.startswith("GSE1: f.tar: ") and address_kind in message
    assert url.split("?")[0] in message and "token=abc" not in message  # no query strings in messages
    assert "SCGRN_ALLOW_HOSTS=" in caught.value.fix
    assert server.requests == [] and no_connections == []
    _assert_nothing_left(tmp_path / "f.tar")


def test_a_name_resolving_to_any_private_address_is_refused(monkeypatch, tmp_path, no_connections):
    ledger.record("bad_input")
    _resolve_names(monkeypatch, {"geo.example.org": [["93.184.216.34", "10.1.2.3"]]})
    with pytest.raises(ScgrnInputError, match=r"geo.example.org resolves to 10.1.2.3, a private address") as caught:
        fetch_file("https://geo.example.org/x.tar", tmp_path / "x.tar", sha256=None, study="GSE1", policy=FAST)
    assert "SCGRN_ALLOW_HOSTS=geo.example.org" in caught.value.fix and no_connections == []


def test_a_name_that_resolves_to_a_private_address_only_at_connect_time_is_refused(monkeypatch, tmp_path,
                                                                                no_connections):
    """DNS rebinding: the check and the connection must see the same addresses."""
    ledger.record("bad_input")
    _resolve_names(monkeypatch, {"rebind.example.org": [["93.184.216.34"], ["169.254.169.254"]]})
    with pytest.raises(ScgrnInputError, match="link-local"):
        fetch_file("http://rebind.example.org/x.tar", tmp_path / "x.tar", sha256=None, study="GSE1", policy=FAST)
    assert no_connections == []


def test_a_redirect_to_a_private_address_is_refused(http_server: FaultyHTTPServer, tmp_path, monkeypatch):
    ledger.record("bad_input")
    monkeypatch.setenv("SCGRN_ALLOW_HOSTS", http_server.allow_entry)
    attempts = []
    real_create_connection = socket.create_connection

    def loopback_only(address, *args, **kwargs):
        attempts.append(address)
        if address[0] != "127.0.0.1":
            raise ConnectionRefusedError(f"test tripwire: no connection to {address}")
        return real_create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", loopback_only)
    metadata = "http://169.254.169.254/latest/meta-data/?x=1"
    url = http_server.serve("/moved", b"", replies=[Reply(status=302, headers={"Location": metadata})])
    with pytest.raises(ScgrnInputError) as caught:
        fetch_file(url, tmp_path / "f", sha256=None, study="GSE1", policy=FAST)
    message = str(caught.value)
    assert "redirected to http://169.254.169.254/latest/meta-data/?…" in message and "link-local" in message
    assert "SCGRN_ALLOW_HOSTS=169.254.169.254" in caught.value.fix
    assert [address[0] for address in attempts] == ["127.0.0.1"]  # refused, not retried
    _assert_nothing_left(tmp_path / "f")


def test_an_allowed_host_is_fetched_and_only_on_the_allowed_port(http_server: FaultyHTTPServer, tmp_path,
                                                                monkeypatch):
    content = _random_bytes(3000)
    url = http_server.serve("/f", content)
    port = http_server.port
    monkeypatch.setenv("SCGRN_ALLOW_HOSTS", f"mirror.lan, {http_server.allow_entry}")
    assert fetch_file(url, tmp_path / "f", sha256=_sha256(content), study=STUDY, policy=FAST).n_bytes == 3000

    monkeypatch.setenv("SCGRN_ALLOW_HOSTS", f"127.0.0.1:{port + 1}")
    with pytest.raises(ScgrnInputError, match="loopback"):
        fetch_file(url, tmp_path / "g", sha256=_sha256(content), study=STUDY, policy=FAST)
    # The downloader resource's allow_hosts (the policy's) replaces the environment's.
    from scgrn_assets.resources import GeoDownloader

    policy = GeoDownloader(max_attempts=1, allow_hosts=f"mirror.lan,127.0.0.1:{port}").policy
    assert fetch_file(url, tmp_path / "g", sha256=_sha256(content), study=STUDY, policy=policy).n_bytes == 3000
    assert len(http_server.requests_for("/f")) == 2


@pytest.mark.parametrize("text", ["http://127.0.0.1", "127.0.0.1:port", "user@host", "host/path"])
def test_malformed_allow_hosts_entries_are_refused(monkeypatch, tmp_path, text):
    monkeypatch.setenv("SCGRN_ALLOW_HOSTS", text)
    with pytest.raises(ScgrnInputError, match="SCGRN_ALLOW_HOSTS") as caught:
        fetch_file("http://127.0.0.1:9/x", tmp_path / "x", sha256=None, study=STUDY, policy=FAST)
    assert "host[:port]" in str(caught.value)


def test_a_proxy_from_the_environment_may_be_local_but_catalog_urls_through_it_are_still_checked(
        http_server: FaultyHTTPServer, tmp_path, monkeypatch):
    ledger.record("bad_input")
    monkeypatch.delenv("SCGRN_ALLOW_HOSTS")
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", http_server.base_url)  # the user's proxy, on this machine
    content = _random_bytes(2000)
    http_server.serve("http://geo.example.org/x.tar", content)  # a proxy is sent the absolute URL

    _resolve_names(monkeypatch, {"geo.example.org": [[]]})  # only the proxy resolves it (and no DNS query leaves)
    result = fetch_file("http://geo.example.org/x.tar", tmp_path / "x.tar", sha256=_sha256(content), study=STUDY,
                        policy=FAST)
    assert result.n_bytes == 2000 and len(http_server.requests_for("http://geo.example.org/x.tar")) == 1

    with pytest.raises(ScgrnInputError, match="link-local"):
        fetch_file("http://169.254.169.254/latest/meta-data/", tmp_path / "m", sha256=None, study=STUDY, policy=FAST)
    assert len(http_server.requests) == 1  # the proxy was not asked for the metadata service

"""Safe downloads: retries, resume, size guard, sha256 verification and an atomic rename.

:func:`fetch_file` fetches ``https://`` (GEO supplementary files), ``http://`` (tests and local
mirrors) and ``file://`` (the offline demo) URLs through one path: the bytes go to
``<destination>.part`` beside the destination, are hashed while written, and only a verified
file is renamed (``os.replace``) to its final name, so a half-written or wrong file never
appears under the final name.

Transient failures (connection errors and resets, timeouts, HTTP 5xx and 429, a body shorter
than its ``Content-Length``) are retried with capped exponential backoff and jitter; a kept
``.part`` is resumed with ``Range: bytes=N-`` when the server answers 206 from the right
offset, otherwise the download restarts from byte 0. A checksum mismatch deletes the ``.part``
and starts again from scratch. A body longer than its ``Content-Length`` never reaches us
(http.client stops reading at the declared length), so it shows up as a sha256 mismatch and
is retried like one. Every final failure is a :class:`ScgrnInputError` naming the study, the
file or URL and the fix; intermediate failures are logged as warnings.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import random
import re
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.progress import Progress, report
from scgrn_assets.lib.storage import disk_full_error, is_disk_full, require_free_space

logger = logging.getLogger(__name__)

_MAX_BACKOFF_SECONDS = 60.0
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_PATTERN = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE_PATTERN = re.compile(r"bytes\s+\*/(\d+)")

@dataclass(frozen=True)
class DownloadPolicy:
    """How hard :func:`fetch_file` tries.

    Attributes
    ----------
    max_attempts
        Attempts per file (``file://`` sources get one: re-reading a local file gives the same bytes).
    backoff_seconds
        Wait before the second attempt; doubles each attempt, with jitter, capped at 60 s.
    timeout_seconds
        Limit for connecting and for each read, in seconds.
    max_redirects
        Redirects followed before giving up.
    max_bytes
        Refuse bodies larger than this many bytes (a runaway or decompression-bomb guard); None: no limit.
    chunk_bytes
        Bytes read and written per step.
    """

    max_attempts: int = 5
    backoff_seconds: float = 1.0
    timeout_seconds: float = 60.0
    max_redirects: int = 5
    max_bytes: int | None = None
    chunk_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.chunk_bytes < 1 or self.timeout_seconds <= 0 or self.max_redirects < 0:
            raise ValueError(f"invalid DownloadPolicy: {self}")


@dataclass(frozen=True)
class FetchResult:
    """The outcome of :func:`fetch_file`.

    Attributes
    ----------
    path
        The verified file under its final name.
    sha256
        Its sha256, lower-case hex.
    n_bytes
        Its size in bytes.
    n_attempts
        Attempts made; 0 when the destination was already in place and verified.
    resumed
        True when the successful attempt appended to bytes kept from an earlier one.
    """

    path: Path
    sha256: str
    n_bytes: int
    n_attempts: int
    resumed: bool


class _TransientFailure(Exception):
    """A failure worth another attempt (network trouble, 5xx/429, a short body)."""


class _RangeNotSatisfiable(Exception):
    """HTTP 416: the requested start is at or past the end; carries the server's total length."""

    def __init__(self, total_bytes: int | None):
        super().__init__(f"range not satisfiable (total {total_bytes})")
        self.total_bytes = total_bytes


@dataclass
class _Download:
    """Everything one fetch needs to report progress and failures."""

    url: str
    destination: Path
    part_path: Path
    study: str
    policy: DownloadPolicy
    progress: Progress | None

    @property
    def file_name(self) -> str:
        return self.destination.name

    @property
    def shown_url(self) -> str:
        return url_for_messages(self.url)

    def fail(self, problem: str, fix: str) -> ScgrnInputError:
        return ScgrnInputError(problem, study=self.study, file=self.file_name, fix=fix)


def url_for_messages(url: str) -> str:
    """``url`` as logs and errors may show it: no query string, fragment or user:password.

    Those parts can carry tokens (``?k=...``); the logs end up in the run database and the UI.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<malformed URL>"
    if parts.hostname and ":" in host:
        host = f"[{host}]"
    hidden = ("?…" if parts.query else "") + ("#…" if parts.fragment else "")
    return f"{parts.scheme}://{host}{port}{parts.path}{hidden}"


def sha256_of(path: Path) -> str:
    """The sha256 of a file as lower-case hex, read in 1 MiB chunks (never the whole file in memory)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def fetch_file(
    url: str,
    destination: Path,
    *,
    sha256: str | None,
    study: str,
    policy: DownloadPolicy = DownloadPolicy(),
    progress: Progress | None = None,
    checksum_fix: str | None = None,
) -> FetchResult:
    """Download ``url`` to ``destination`` atomically and verify its sha256 (when given).

    Parameters
    ----------
    url
        ``https://``, ``http://`` or ``file://`` URL.
    destination
        Final path; its folder is created. A file already there with the right sha256 is
        returned without any network access (with ``sha256=None``, any file there counts as
        complete, since only finished downloads are ever renamed into place).
    sha256
        Expected checksum (64 hex digits) or None to skip verification.
    study
        Study accession, named in every error and warning.
    policy
        Retries, timeouts, redirect and size limits.
    progress
        Called as ``progress(n_bytes_so_far, n_bytes_total)`` after each chunk (total 0 while the
        server has not said the size).
    checksum_fix
        The fix named when the sha256 never matches (default: check the catalog entry);
        callers whose sha256 comes from elsewhere (a trust-on-first-use pin) say where.

    Returns
    -------
    FetchResult
        ``path``, ``sha256``, ``n_bytes``, ``n_attempts`` and ``resumed``.

    Raises
    ------
    ScgrnInputError
        Unsupported scheme, a missing ``file://`` source, HTTP 4xx, a redirect loop, a body over
        ``policy.max_bytes``, a sha256 mismatch on every attempt, or transient failures on every
        attempt. The message names the study, the file or URL and the fix.
    """
    destination = Path(destination)
    expected_sha256 = _normalised_sha256(sha256, url=url, study=study, file=destination.name)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("https", "http", "file"):
        raise ScgrnInputError(
            f"unsupported URL scheme {scheme!r} in {url_for_messages(url)!r}", study=study, file=destination.name,
            fix="use an https:// URL (http:// only for local mirrors, file:// for local copies) in the catalog entry",
        )
    download = _Download(url=url, destination=destination, part_path=destination.with_name(destination.name + ".part"),
                         study=study, policy=policy, progress=progress)
    if destination.exists():
        existing_sha256 = sha256_of(destination)
        if expected_sha256 is None or existing_sha256 == expected_sha256:
            return FetchResult(destination, existing_sha256, destination.stat().st_size, n_attempts=0, resumed=False)
        logger.warning("%s: %s exists with sha256 %s, expected %s; downloading it again",
                       study, destination, existing_sha256, expected_sha256)
        # Removed now so that a failed re-download cannot leave the wrong file under the final name.
        destination.unlink()
    destination.parent.mkdir(parents=True, exist_ok=True)

    max_attempts = 1 if scheme == "file" else policy.max_attempts
    last_failure = ""
    mismatched_sha256: str | None = None
    for attempt in range(1, max_attempts + 1):
        mismatched_sha256 = None
        try:
            if scheme == "file":
                actual_sha256, n_bytes, resumed = _copy_local_file(download)
            else:
                actual_sha256, n_bytes, resumed = _download_http(download)
        except _TransientFailure as failure:
            last_failure = str(failure)
        except OSError as error:
            if is_disk_full(error):  # the .part is kept: it resumes once there is space
                raise disk_full_error(destination.parent, f"downloading {destination.name}") from None
            raise
        else:
            if expected_sha256 is None or actual_sha256 == expected_sha256:
                os.replace(download.part_path, destination)
                return FetchResult(destination, actual_sha256, n_bytes, n_attempts=attempt, resumed=resumed)
            mismatched_sha256 = actual_sha256
            last_failure = f"sha256 mismatch (expected {expected_sha256}, got {actual_sha256})"
            download.part_path.unlink(missing_ok=True)  # a wrong body must not be resumed
        if attempt < max_attempts:
            delay_seconds = _backoff_seconds(policy, attempt)
            logger.warning("%s: %s: attempt %d of %d failed: %s; retrying in %.2f s",
                           study, url_for_messages(url), attempt, max_attempts, last_failure, delay_seconds)
            time.sleep(delay_seconds)

    attempts_text = f"{max_attempts} attempt{'s' if max_attempts > 1 else ''}"
    if mismatched_sha256 is not None:
        raise download.fail(
            f"sha256 mismatch (expected {expected_sha256}, got {mismatched_sha256}) after {attempts_text} from "
            f"{url_for_messages(url)}",
            checksum_fix or "the file on the server changed or the catalog's sha256 is wrong: check the catalog entry",
        )
    raise download.fail(
        f"download of {url_for_messages(url)} failed after {attempts_text}: {last_failure}",
        "check the network connection and that the URL still answers, then run again "
        "(the partial download is kept and resumed)",
    )


def parse_url_mirrors(text: str) -> tuple[tuple[str, str], ...]:
    """Mirror rules from ``"PREFIX=REPLACEMENT[,PREFIX=REPLACEMENT...]"`` (e.g. ``SCGRN_URL_MIRROR``).

    ``https://ftp.ncbi.nlm.nih.gov=http://127.0.0.1:8000/geo`` fetches every URL under the GEO
    host from the local mirror instead. Commas or whitespace separate rules.
    """
    rules = []
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        prefix, equals, replacement = item.partition("=")
        schemes = (urlsplit(prefix).scheme.lower(), urlsplit(replacement).scheme.lower())
        if not equals or not all(s in ("https", "http", "file") for s in schemes) or not urlsplit(prefix).netloc:
            raise ScgrnInputError(f"URL mirror rule {item!r} is not PREFIX=REPLACEMENT with http(s)/file URLs",
                                  fix="e.g. SCGRN_URL_MIRROR=https://ftp.ncbi.nlm.nih.gov=http://mirror.example:8000")
        rules.append((prefix.rstrip("/"), replacement.rstrip("/")))
    return tuple(rules)


def apply_url_mirrors(url: str, mirrors: tuple[tuple[str, str], ...]) -> str:
    """``url`` with the longest matching mirror prefix replaced; unchanged when none matches.

    A prefix matches only up to a URL boundary, so ``https://ftp.ncbi.nlm.nih.gov`` does not
    capture ``https://ftp.ncbi.nlm.nih.gov.example.org/...``.
    """
    best = None
    for prefix, replacement in mirrors:
        if url.startswith(prefix) and (len(url) == len(prefix) or url[len(prefix)] in "/?#"):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, replacement)
    return url if best is None else best[1] + url[len(best[0]):]


def _normalised_sha256(sha256: str | None, *, url: str, study: str, file: str) -> str | None:
    if sha256 is None:
        return None
    normalised = sha256.strip().lower()
    if not _SHA256_PATTERN.fullmatch(normalised):
        raise ScgrnInputError(
            f"the expected sha256 for {url_for_messages(url)} is {sha256!r}, not 64 hex digits", study=study, file=file,
            fix="fix the sha256 in the catalog entry (or leave it empty to skip verification)",
        )
    return normalised


def _backoff_seconds(policy: DownloadPolicy, attempt: int) -> float:
    """Exponential in the attempt number, capped, times a jitter in [0.5, 1] so that clients do not retry in step."""
    base_seconds = min(_MAX_BACKOFF_SECONDS, policy.backoff_seconds * 2 ** (attempt - 1))
    return base_seconds * random.uniform(0.5, 1.0)


def _copy_local_file(download: _Download) -> tuple[str, int, bool]:
    """Copy a ``file://`` source to the ``.part`` file; returns (sha256, n_bytes, resumed=False)."""
    source = Path(urllib.request.url2pathname(urlsplit(download.url).path))
    if not source.is_file():
        raise download.fail(f"the source {source} of {download.shown_url} does not exist",
                            "create the local copy (for the demo: regenerate the demo data) or fix the catalog URL")
    total_bytes = source.stat().st_size
    _refuse_if_too_large(download, total_bytes)
    hasher = hashlib.sha256()
    with open(source, "rb") as source_file, open(download.part_path, "wb") as part_file:
        n_bytes = _append_body(download, source_file, part_file, hasher, n_bytes_done=0, total_bytes=total_bytes)
        _flush_to_disk(part_file)
    return hasher.hexdigest(), n_bytes, False


def _download_http(download: _Download) -> tuple[str, int, bool]:
    """One HTTP attempt into the ``.part`` file, resuming it when possible; returns (sha256, n_bytes, resumed)."""
    opener = urllib.request.build_opener(_LimitedRedirectHandler(download.policy.max_redirects))
    offset = download.part_path.stat().st_size if download.part_path.exists() else 0
    response, body_start, total_bytes = _open_body(download, opener, offset)
    hasher = hashlib.sha256()
    if body_start:
        _hash_existing_prefix(download.part_path, hasher, download.policy.chunk_bytes)
    if response is None:  # the kept .part already holds every byte; the checksum decides
        return hasher.hexdigest(), offset, True
    with response:
        _refuse_if_too_large(download, total_bytes)
        with open(download.part_path, "ab" if body_start else "wb") as part_file:
            n_bytes = _append_body(download, response, part_file, hasher, n_bytes_done=body_start,
                                   total_bytes=total_bytes)
            _flush_to_disk(part_file)
    if total_bytes is not None and n_bytes < total_bytes:
        raise _TransientFailure(f"the connection closed after {n_bytes} of {total_bytes} bytes")
    if total_bytes is not None and n_bytes > total_bytes:
        download.part_path.unlink(missing_ok=True)  # more bytes than announced: nothing in it is trustworthy
        raise _TransientFailure(f"received {n_bytes} bytes, more than the {total_bytes} announced")
    return hasher.hexdigest(), n_bytes, body_start > 0


def _open_body(download: _Download, opener: urllib.request.OpenerDirector,
               offset: int) -> tuple[http.client.HTTPResponse | None, int, int | None]:
    """Open the URL for the bytes from ``offset``.

    Returns ``(response, body_start, total_bytes)``: ``body_start`` is ``offset`` when the
    server resumed and 0 when the body starts afresh (no ``.part``, Range ignored, or a 206
    from the wrong offset); ``response`` is None when the server answers 416 with a total
    equal to ``offset`` (the ``.part`` is already complete); ``total_bytes`` is the full
    file size when the server tells it.
    """
    if offset:
        try:
            response = _open_url(download, opener, offset)
        except _RangeNotSatisfiable as answer:
            if answer.total_bytes == offset:
                return None, offset, offset
            logger.warning("%s: %s: the server refused to resume at byte %d; starting again from byte 0",
                           download.study, download.shown_url, offset)
        else:
            if response.status == 206:
                range_start, total_bytes = _content_range(response, offset)
                if range_start == offset:
                    return response, offset, total_bytes
                response.close()
                logger.warning("%s: %s: asked to resume at byte %d but the server answered %r; "
                               "starting again from byte 0", download.study, download.shown_url, offset,
                               response.headers.get("Content-Range"))
            else:
                logger.warning("%s: %s: the server ignored the request to resume at byte %d; "
                               "starting again from byte 0", download.study, download.shown_url, offset)
                return response, 0, _content_length(response)
    response = _open_url(download, opener, 0)
    return response, 0, _content_length(response)


def _open_url(download: _Download, opener: urllib.request.OpenerDirector, offset: int) -> http.client.HTTPResponse:
    """Send the request (with ``Range`` when ``offset`` > 0) and sort failures into transient and final ones."""
    request = urllib.request.Request(download.url, headers={"User-Agent": "scgrn-assets"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        return opener.open(request, timeout=download.policy.timeout_seconds)
    except urllib.error.HTTPError as error:
        with error:
            reason = f"HTTP {error.code} {error.reason}"
            if error.code == 416:
                match = _UNSATISFIED_RANGE_PATTERN.fullmatch((error.headers.get("Content-Range") or "").strip())
                raise _RangeNotSatisfiable(int(match.group(1)) if match else None) from None
            if error.code == 429 or error.code >= 500:
                raise _TransientFailure(reason) from None
            if 300 <= error.code < 400:
                raise download.fail(
                    f"{download.shown_url} could not be followed: a redirect loop, more than "
                    f"{download.policy.max_redirects} redirects or no usable Location ({reason})",
                    "open the URL in a browser to find where it really points and put that URL in the catalog entry",
                ) from None
            raise download.fail(
                f"{download.shown_url} answered {reason}",
                "check the URL in the catalog entry (the file may have moved or need different access)",
            ) from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, ssl.SSLCertVerificationError):
            raise download.fail(f"the TLS certificate of {download.shown_url} failed verification ({error.reason})",
                                "check the system CA certificates or the URL's host name") from None
        raise _TransientFailure(f"could not connect: {error.reason}") from None
    except (http.client.HTTPException, OSError) as error:
        # Timeouts and resets while waiting for the response headers.
        raise _TransientFailure(f"{type(error).__name__}: {error}") from None


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value is not None and value.strip().isdigit() else None


def _content_range(response: http.client.HTTPResponse, offset: int) -> tuple[int | None, int | None]:
    """(start, total) from a 206's ``Content-Range``; total falls back to offset + Content-Length."""
    match = _CONTENT_RANGE_PATTERN.fullmatch((response.headers.get("Content-Range") or "").strip())
    if match is None:
        return None, None
    length = _content_length(response)
    total_bytes = int(match.group(3)) if match.group(3) != "*" else (offset + length if length is not None else None)
    return int(match.group(1)), total_bytes


def _refuse_if_too_large(download: _Download, total_bytes: int | None) -> None:
    """Refuse before reading when the announced size is already over the limit."""
    max_bytes = download.policy.max_bytes
    if max_bytes is not None and total_bytes is not None and total_bytes > max_bytes:
        raise _too_large(download, f"{download.shown_url} is {total_bytes} bytes")
    if total_bytes is not None:
        kept = download.part_path.stat().st_size if download.part_path.exists() else 0
        require_free_space(download.part_path.parent, total_bytes - kept, what=f"downloading {download.file_name}")


def _too_large(download: _Download, what: str) -> ScgrnInputError:
    download.part_path.unlink(missing_ok=True)
    return download.fail(
        f"{what}, more than the limit of {download.policy.max_bytes} bytes",
        "check that the catalog URL points at the intended file, or raise DownloadPolicy.max_bytes",
    )


def _append_body(download: _Download, body: IO[bytes], part_file: IO[bytes], hasher: hashlib._Hash, *,
                 n_bytes_done: int, total_bytes: int | None) -> int:
    """Copy ``body`` to the end of ``part_file``, hashing as it goes; returns the ``.part`` size afterwards."""
    max_bytes = download.policy.max_bytes
    while True:
        try:
            chunk = body.read(download.policy.chunk_bytes)
        except (http.client.HTTPException, OSError) as error:
            # IncompleteRead, resets and read timeouts mid-body: keep what arrived for a resume.
            raise _TransientFailure(f"{type(error).__name__} after {n_bytes_done} bytes: {error}") from None
        if not chunk:
            return n_bytes_done
        n_bytes_done += len(chunk)
        if max_bytes is not None and n_bytes_done > max_bytes:
            part_file.close()
            raise _too_large(download, f"{download.shown_url} sent at least {n_bytes_done} bytes")
        part_file.write(chunk)
        hasher.update(chunk)
        report(download.progress, n_bytes_done, total_bytes if total_bytes is not None else 0)


def _hash_existing_prefix(part_path: Path, hasher: hashlib._Hash, chunk_bytes: int) -> None:
    with open(part_path, "rb") as prefix:
        while chunk := prefix.read(chunk_bytes):
            hasher.update(chunk)


def _flush_to_disk(part_file: IO[bytes]) -> None:
    """Flush and fsync, so that the rename that follows never publishes bytes still only in memory."""
    part_file.flush()
    os.fsync(part_file.fileno())


class _LimitedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """urllib's redirect handling with the policy's limit (urllib's own default is 10)."""

    def __init__(self, max_redirects: int):
        super().__init__()
        self.max_redirections = max_redirects

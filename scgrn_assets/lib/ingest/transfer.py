"""One attempt at a download: an HTTP(S) body, resumed with Range, or a local file copied, hashed as written.

:func:`download.fetch_file` retries these attempts, verifies the sha256 and renames the file into place.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import urlsplit

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.progress import Progress, report
from scgrn_assets.lib.storage import require_free_space

if TYPE_CHECKING:
    from scgrn_assets.lib.ingest.download import DownloadPolicy

logger = logging.getLogger(__name__)


_CONTENT_RANGE_PATTERN = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE_PATTERN = re.compile(r"bytes\s+\*/(\d+)")


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


class TransientFailure(Exception):
    """A failure worth another attempt (network trouble, 5xx/429, a short body)."""


class RangeNotSatisfiable(Exception):
    """HTTP 416: the requested start is at or past the end; carries the server's total length."""

    def __init__(self, total_bytes: int | None):
        super().__init__(f"range not satisfiable (total {total_bytes})")
        self.total_bytes = total_bytes


@dataclass
class Download:
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


def copy_local_file(download: Download) -> tuple[str, int, bool]:
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


def download_http(download: Download) -> tuple[str, int, bool]:
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
        raise TransientFailure(f"the connection closed after {n_bytes} of {total_bytes} bytes")
    if total_bytes is not None and n_bytes > total_bytes:
        download.part_path.unlink(missing_ok=True)  # more bytes than announced: nothing in it is trustworthy
        raise TransientFailure(f"received {n_bytes} bytes, more than the {total_bytes} announced")
    return hasher.hexdigest(), n_bytes, body_start > 0


def _open_body(download: Download, opener: urllib.request.OpenerDirector,
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
        except RangeNotSatisfiable as answer:
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


def _open_url(download: Download, opener: urllib.request.OpenerDirector, offset: int) -> http.client.HTTPResponse:
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
                raise RangeNotSatisfiable(int(match.group(1)) if match else None) from None
            if error.code == 429 or error.code >= 500:
                raise TransientFailure(reason) from None
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
        raise TransientFailure(f"could not connect: {error.reason}") from None
    except (http.client.HTTPException, OSError) as error:
        # Timeouts and resets while waiting for the response headers.
        raise TransientFailure(f"{type(error).__name__}: {error}") from None


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


def _refuse_if_too_large(download: Download, total_bytes: int | None) -> None:
    """Refuse before reading when the announced size is already over the limit."""
    max_bytes = download.policy.max_bytes
    if max_bytes is not None and total_bytes is not None and total_bytes > max_bytes:
        raise _too_large(download, f"{download.shown_url} is {total_bytes} bytes")
    if total_bytes is not None:
        kept = download.part_path.stat().st_size if download.part_path.exists() else 0
        require_free_space(download.part_path.parent, total_bytes - kept, what=f"downloading {download.file_name}")


def _too_large(download: Download, what: str) -> ScgrnInputError:
    download.part_path.unlink(missing_ok=True)
    return download.fail(
        f"{what}, more than the limit of {download.policy.max_bytes} bytes",
        "check that the catalog URL points at the intended file, or raise DownloadPolicy.max_bytes",
    )


def _append_body(download: Download, body: IO[bytes], part_file: IO[bytes], hasher: hashlib._Hash, *,
                 n_bytes_done: int, total_bytes: int | None) -> int:
    """Copy ``body`` to the end of ``part_file``, hashing as it goes; returns the ``.part`` size afterwards."""
    max_bytes = download.policy.max_bytes
    while True:
        try:
            chunk = body.read(download.policy.chunk_bytes)
        except (http.client.HTTPException, OSError) as error:
            # IncompleteRead, resets and read timeouts mid-body: keep what arrived for a resume.
            raise TransientFailure(f"{type(error).__name__} after {n_bytes_done} bytes: {error}") from None
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

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

A file (or ``.part``) is that of one URL: a hidden sidecar ``.<name>.source`` records which (a
digest of it, and the URL without its query string), so a file without a sha256 to check is
reused, and a ``.part`` resumed, only for the URL that produced it; for another URL it is
downloaded afresh. URLs whose host resolves to this machine, a private network or a metadata
service are refused unless the user allows the host (:mod:`.transfer`, ``SCGRN_ALLOW_HOSTS``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.ingest.transfer import (Download, TransientFailure, allowed_hosts_from_environment,
                                              copy_local_file, download_http, parse_allowed_hosts, record_source,
                                              recorded_source_is, url_for_messages)
from scgrn_assets.lib.progress import Progress
from scgrn_assets.lib.storage import disk_full_error, is_disk_full


logger = logging.getLogger(__name__)

_MAX_BACKOFF_SECONDS = 60.0
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")

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
    allow_hosts
        ``host[:port]`` entries URLs may reach although they resolve to this machine or a private
        network (a local mirror); None: those in ``SCGRN_ALLOW_HOSTS``, read when a download starts.
    """

    max_attempts: int = 5
    backoff_seconds: float = 1.0
    timeout_seconds: float = 60.0
    max_redirects: int = 5
    max_bytes: int | None = None
    chunk_bytes: int = 1 << 20
    allow_hosts: tuple[str, ...] | None = None

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
    reuse_unverified: bool = True,
) -> FetchResult:
    """Download ``url`` to ``destination`` atomically and verify its sha256 (when given).

    Parameters
    ----------
    url
        ``https://``, ``http://`` or ``file://`` URL.
    destination
        Final path; its folder is created. A file already there with the right sha256 is
        returned without any network access. With ``sha256=None`` a file there is returned
        only if it was downloaded from this same ``url`` (its ``.source`` sidecar says so; only
        finished downloads are ever renamed into place); from another URL, or unknown, it is
        downloaded again.
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
    reuse_unverified
        False: with ``sha256=None``, download again even a file this URL produced before (a
        trust-on-first-use pin is written only for bytes fetched now).

    Returns
    -------
    FetchResult
        ``path``, ``sha256``, ``n_bytes``, ``n_attempts`` and ``resumed``.

    Raises
    ------
    ScgrnInputError
        Unsupported scheme, a missing ``file://`` source, HTTP 4xx, a redirect loop, a body over
        ``policy.max_bytes``, a sha256 mismatch on every attempt, transient failures on every
        attempt, or a host (or redirect) resolving to a non-public address that is not allowed.
        The message names the study, the file or URL and the fix.
    """
    destination = Path(destination)
    expected_sha256 = _normalised_sha256(sha256, url=url, study=study, file=destination.name)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("https", "http", "file"):
        raise ScgrnInputError(
            f"unsupported URL scheme {scheme!r} in {url_for_messages(url)!r}", study=study, file=destination.name,
            fix="use an https:// URL (http:// only for local mirrors, file:// for local copies) in the catalog entry",
        )
    allowed = parse_allowed_hosts(policy.allow_hosts) if policy.allow_hosts is not None \
        else allowed_hosts_from_environment()
    download = Download(url=url, destination=destination, part_path=destination.with_name(destination.name + ".part"),
                        study=study, policy=policy, progress=progress, allowed_hosts=allowed)
    same_source = recorded_source_is(destination, url)
    if destination.exists():
        existing_sha256 = sha256_of(destination)
        if existing_sha256 == expected_sha256 or (expected_sha256 is None and same_source and reuse_unverified):
            return FetchResult(destination, existing_sha256, destination.stat().st_size, n_attempts=0, resumed=False)
        if expected_sha256 is not None:
            logger.warning("%s: %s exists with sha256 %s, expected %s; downloading it again",
                           study, destination, existing_sha256, expected_sha256)
        elif same_source:
            logger.info("%s: downloading %s again to pin what %s serves now", study, destination.name,
                        url_for_messages(url))
        else:
            logger.warning("%s: %s was not downloaded from %s; downloading it again",
                           study, destination, url_for_messages(url))
        # Removed now so that a failed re-download cannot leave the wrong file under the final name.
        destination.unlink()
    if expected_sha256 is None and not same_source:
        # Bytes of another URL (or of none known) must not become this URL's prefix: no checksum would notice.
        download.part_path.unlink(missing_ok=True)
    destination.parent.mkdir(parents=True, exist_ok=True)

    max_attempts = 1 if scheme == "file" else policy.max_attempts
    last_failure = ""
    mismatched_sha256: str | None = None
    for attempt in range(1, max_attempts + 1):
        mismatched_sha256 = None
        try:
            if scheme == "file":
                actual_sha256, n_bytes, resumed = copy_local_file(download)
            else:
                actual_sha256, n_bytes, resumed = download_http(download)
        except TransientFailure as failure:
            last_failure = str(failure)
        except OSError as error:
            if is_disk_full(error):  # the .part is kept: it resumes once there is space
                raise disk_full_error(destination.parent, f"downloading {destination.name}") from None
            raise
        else:
            if expected_sha256 is None or actual_sha256 == expected_sha256:
                record_source(destination, url)  # before the rename: the name never holds bytes of another URL
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

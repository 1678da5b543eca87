"""One attempt at a download: an HTTP(S) body, resumed with Range, or a local file copied, hashed as written.

:func:`download.fetch_file` retries these attempts, verifies the sha256 and renames the file into place.

Catalogs are someone else's file, so a URL may not reach this machine, its private network or a
cloud metadata service (``http://169.254.169.254/...``): before each request and each redirect the
host name is resolved and refused when ANY of its addresses is loopback, link-local, private,
reserved, multicast or unspecified, unless the user allows the host (``SCGRN_ALLOW_HOSTS``,
comma-separated ``host[:port]``; see :func:`parse_allowed_hosts`). The connection itself goes to
the addresses that were checked, resolved once more and checked again, so a name that answers a
public address to the check and a private one to the connection (DNS rebinding) is refused too.
A proxy the environment names (``https_proxy``...) is the user's choice and may be private; a name
only the proxy can resolve is left to it.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import urlsplit

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.progress import Progress, report
from scgrn_assets.lib.storage import atomic_path, require_free_space

if TYPE_CHECKING:
    from scgrn_assets.lib.ingest.download import DownloadPolicy

logger = logging.getLogger(__name__)


_CONTENT_RANGE_PATTERN = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE_PATTERN = re.compile(r"bytes\s+\*/(\d+)")

#: Environment variable naming (comma-separated ``host[:port]``) the hosts catalog URLs may reach although
#: they resolve to this machine or a private network; read when a download starts.
ALLOW_HOSTS_VARIABLE = "SCGRN_ALLOW_HOSTS"
_DEFAULT_PORTS = {"http": 80, "https": 443}


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
    #: (host, port or None for any port) the user allows although they resolve to non-public addresses.
    allowed_hosts: frozenset[tuple[str, int | None]] = field(default_factory=frozenset)

    @property
    def file_name(self) -> str:
        return self.destination.name

    @property
    def shown_url(self) -> str:
        return url_for_messages(self.url)

    def fail(self, problem: str, fix: str) -> ScgrnInputError:
        return ScgrnInputError(problem, study=self.study, file=self.file_name, fix=fix)

    def start_part(self) -> IO[bytes]:
        """Open a fresh ``.part`` for writing, first recording that its bytes come from this URL."""
        record_source(self.destination, self.url)
        return open(self.part_path, "wb")


# --- which URL the bytes under a name came from ---------------------------------------------------


def source_record_path(destination: Path) -> Path:
    """The hidden sidecar naming the URL whose bytes ``destination`` (and its ``.part``) hold."""
    return destination.with_name(f".{destination.name}.source")


def _url_key(url: str) -> str:
    # A digest, not the URL: query strings can hold tokens, which never go to disk or logs.
    return hashlib.sha256(url.encode()).hexdigest()


def recorded_source_is(destination: Path, url: str) -> bool:
    """Whether the bytes at ``destination`` (or its ``.part``) were downloaded from ``url``."""
    try:
        record = json.loads(source_record_path(destination).read_text())
    except (OSError, ValueError):
        return False  # none (an older download, or none yet), or unreadable: nothing is known
    return isinstance(record, dict) and record.get("url_sha256") == _url_key(url)


def record_source(destination: Path, url: str) -> None:
    """Record (atomically) that the bytes at ``destination`` and its ``.part`` come from ``url``."""
    if recorded_source_is(destination, url):
        return
    with atomic_path(source_record_path(destination)) as tmp:
        tmp.write_text(json.dumps({"url": url_for_messages(url), "url_sha256": _url_key(url)}) + "\n")


# --- hosts a catalog URL may reach ------------------------------------------------------------------


def parse_allowed_hosts(entries: str | Iterable[str]) -> frozenset[tuple[str, int | None]]:
    """``"host[:port],..."`` (``SCGRN_ALLOW_HOSTS``) or a list of such entries as (host, port) pairs.

    A host without a port is allowed on every port; IPv6 addresses go in brackets when a port
    follows (``[::1]:8000``). Anything else is an error naming the entry.
    """
    items = [item for entry in ([entries] if isinstance(entries, str) else entries)
             for item in re.split(r"[,\s]+", entry)]
    allowed = set()
    for item in (item.strip() for item in items):
        if not item:
            continue
        try:
            allowed.add((ipaddress.ip_address(item).compressed, None))  # a bare IPv6 address
            continue
        except ValueError:
            pass
        try:
            parts = urlsplit(f"//{item}")
            host, port = parts.hostname, parts.port
        except ValueError:
            host = port = None
        if not host or parts.username is not None or parts.path or parts.query or parts.fragment \
                or item.endswith(":"):
            raise ScgrnInputError(
                f"{ALLOW_HOSTS_VARIABLE} entry {item!r} is not host[:port]",
                fix=f"e.g. {ALLOW_HOSTS_VARIABLE}=127.0.0.1:8000,mirror.lan (no scheme, path or user; IPv6 in "
                    "brackets: [::1]:8000)")
        allowed.add((_canonical_host(host), port))
    return frozenset(allowed)


def allowed_hosts_from_environment() -> frozenset[tuple[str, int | None]]:
    return parse_allowed_hosts(os.environ.get(ALLOW_HOSTS_VARIABLE, ""))


def host_and_port(url: str) -> tuple[str, int] | None:
    """(host, port) an http(s) URL connects to, the port defaulted by scheme; None for other URLs."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return _canonical_host(parts.hostname), parts.port or _DEFAULT_PORTS[scheme]


def _canonical_host(host: str) -> str:
    host = host.lower().rstrip(".")
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host


def _is_allowed(host: str, port: int, allowed: frozenset[tuple[str, int | None]]) -> bool:
    host = _canonical_host(host)
    return (host, port) in allowed or (host, None) in allowed


def allow_entry(host: str, port: int) -> str:
    """The ``SCGRN_ALLOW_HOSTS`` entry allowing ``host`` on ``port``."""
    host = _canonical_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RefusedAddress(OSError):
    """A host that resolves to an address catalogs may not reach (an OSError, so urllib passes it through)."""

    def __init__(self, host: str, port: int, address: str, kind: str):
        super().__init__(f"{host} resolves to {address}, a {kind} address")
        self.host, self.port, self.address, self.kind = host, port, address, kind


def _address_kind(address: str) -> str | None:
    """Why an address is not a public one ("loopback", "link-local", ...), or None for a public address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) is no part of it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-public"


def _resolve_public(host: str, port: int, allowed: frozenset[tuple[str, int | None]]) -> list[tuple]:
    """``host``'s addresses (getaddrinfo), all public unless the host is allowed; raises RefusedAddress."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not _is_allowed(host, port, allowed):
        for info in infos:
            kind = _address_kind(info[4][0])
            if kind is not None:
                raise RefusedAddress(host, port, info[4][0], kind)
    return infos


def _connect_checked(address: tuple[str, int], timeout: float | object = socket._GLOBAL_DEFAULT_TIMEOUT,
                     source_address: tuple | None = None, *,
                     allowed: frozenset[tuple[str, int | None]]) -> socket.socket:
    """``socket.create_connection`` to the addresses just checked, never to a name resolved again."""
    host, port = address
    last_error: OSError | None = None
    for *_, sockaddr in _resolve_public(host, port, allowed):
        try:
            return socket.create_connection((sockaddr[0], port), timeout, source_address)
        except OSError as error:
            last_error = error
    raise last_error or OSError(f"getaddrinfo returned no address for {host}")


def _proxy_hosts() -> frozenset[tuple[str, int | None]]:
    """The proxies the environment names: urllib connects to them, not to the URL's host."""
    hosts = set()
    for scheme, proxy in urllib.request.getproxies().items():
        if scheme == "no":
            continue
        try:
            parts = urlsplit(proxy if "://" in proxy else f"//{proxy}")
            if parts.hostname:
                hosts.add((_canonical_host(parts.hostname), parts.port))
        except ValueError:
            continue
    return frozenset(hosts)


class _CheckedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, allowed: frozenset[tuple[str, int | None]], **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_connect_checked, allowed=allowed)


class _CheckedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, allowed: frozenset[tuple[str, int | None]], **kwargs):
        super().__init__(*args, **kwargs)
        # TLS still verifies the certificate against the URL's host name (server_hostname).
        self._create_connection = functools.partial(_connect_checked, allowed=allowed)


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allowed: frozenset[tuple[str, int | None]]):
        super().__init__()
        self._connection = functools.partial(_CheckedHTTPConnection, allowed=allowed)

    def http_open(self, req):
        return self.do_open(self._connection, req)


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allowed: frozenset[tuple[str, int | None]]):
        super().__init__()
        self._connection = functools.partial(_CheckedHTTPSConnection, allowed=allowed)

    def https_open(self, req):
        return self.do_open(self._connection, req, context=self._context)


def copy_local_file(download: Download) -> tuple[str, int, bool]:
    """Copy a ``file://`` source to the ``.part`` file; returns (sha256, n_bytes, resumed=False)."""
    source = Path(urllib.request.url2pathname(urlsplit(download.url).path))
    if not source.is_file():
        raise download.fail(f"the source {source} of {download.shown_url} does not exist",
                            "create the local copy (for the demo: regenerate the demo data) or fix the catalog URL")
    total_bytes = source.stat().st_size
    _refuse_if_too_large(download, total_bytes)
    hasher = hashlib.sha256()
    with open(source, "rb") as source_file, download.start_part() as part_file:
        n_bytes = _append_body(download, source_file, part_file, hasher, n_bytes_done=0, total_bytes=total_bytes)
        _flush_to_disk(part_file)
    return hasher.hexdigest(), n_bytes, False


def download_http(download: Download) -> tuple[str, int, bool]:
    """One HTTP attempt into the ``.part`` file, resuming it when possible; returns (sha256, n_bytes, resumed)."""
    _refuse_unless_public(download, download.url)
    connect_allowed = download.allowed_hosts | _proxy_hosts()
    opener = urllib.request.build_opener(_LimitedRedirectHandler(download), _CheckedHTTPHandler(connect_allowed),
                                         _CheckedHTTPSHandler(connect_allowed))
    offset = download.part_path.stat().st_size if download.part_path.exists() else 0
    response, body_start, total_bytes = _open_body(download, opener, offset)
    hasher = hashlib.sha256()
    if body_start:
        _hash_existing_prefix(download.part_path, hasher, download.policy.chunk_bytes)
    if response is None:  # the kept .part already holds every byte; the checksum decides
        return hasher.hexdigest(), offset, True
    with response:
        _refuse_if_too_large(download, total_bytes)
        with open(download.part_path, "ab") if body_start else download.start_part() as part_file:
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
        if isinstance(error.reason, RefusedAddress):  # the name resolved differently when connecting
            raise _refusal(download, download.url, error.reason) from None
        if isinstance(error.reason, ssl.SSLCertVerificationError):
            raise download.fail(f"the TLS certificate of {download.shown_url} failed verification ({error.reason})",
                                "check the system CA certificates or the URL's host name") from None
        raise TransientFailure(f"could not connect: {error.reason}") from None
    except RefusedAddress as error:
        raise _refusal(download, download.url, error) from None
    except (http.client.HTTPException, OSError) as error:
        # Timeouts and resets while waiting for the response headers.
        raise TransientFailure(f"{type(error).__name__}: {error}") from None


def _refuse_unless_public(download: Download, url: str, *, redirected_from: str | None = None) -> None:
    """Refuse ``url`` when its host resolves to any non-public address and the user has not allowed it.

    A name that does not resolve is a transient failure (the network may be down), as when connecting,
    unless a proxy from the environment will fetch it: behind a proxy that resolves names itself,
    the local resolver may know none, and the proxy is the user's choice.
    """
    target = host_and_port(url)
    if target is None or _is_allowed(*target, download.allowed_hosts):
        return
    try:
        _resolve_public(*target, download.allowed_hosts)
    except RefusedAddress as refused:
        raise _refusal(download, url, refused, redirected_from=redirected_from) from None
    except OSError as error:  # socket.gaierror
        proxies = urllib.request.getproxies()
        if urlsplit(url).scheme.lower() in proxies and not urllib.request.proxy_bypass(target[0]):
            return
        raise TransientFailure(f"could not resolve {target[0]}: {error}") from None


def _refusal(download: Download, url: str, refused: RefusedAddress, *,
             redirected_from: str | None = None) -> ScgrnInputError:
    shown = url_for_messages(url)
    what = f"{url_for_messages(redirected_from)} redirected to {shown}" if redirected_from else f"the URL {shown}"
    return download.fail(
        f"{what} is refused: {refused} (catalogs may not reach this machine, its private network or a cloud "
        f"metadata service)",
        f"if you trust the catalog and mean this host, allow it: export "
        f"{ALLOW_HOSTS_VARIABLE}={allow_entry(refused.host, refused.port)} (comma-separated host[:port]; or "
        "allow_hosts on the downloader resource)")


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
    """urllib's redirect handling with the policy's limit (urllib's own default is 10), refusing a redirect
    to anything but a public http(s) host (or one the user allows)."""

    def __init__(self, download: Download):
        super().__init__()
        self.max_redirections = download.policy.max_redirects
        self._download = download

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urlsplit(newurl).scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            fp.close()
            raise self._download.fail(
                f"{self._download.shown_url} redirected to {url_for_messages(newurl)}, which is not http(s)",
                "put the URL the file really lives at in the catalog entry")
        try:
            _refuse_unless_public(self._download, newurl, redirected_from=req.full_url)
        except (ScgrnInputError, TransientFailure):
            fp.close()
            raise
        return super().redirect_request(req, fp, code, msg, headers, newurl)

"""Trust on first use: sha256 pins for catalog files whose catalog entry carries no sha256.

GEO publishes no checksums, so the real catalog cannot pin its files in advance. The first
successful download of such a file records its sha256 in a lock file beside the catalog
(``real.yaml`` -> ``real.lock.yaml``); every later download of the same URL, on this
machine or any machine sharing the lock file, must match it or is refused. Pins are keyed by
the URL as the catalog writes it, before a mirror (``SCGRN_URL_MIRROR``) is applied, so a
mirror's copy is held to the same pins as GEO's.

A pin is written only for bytes fetched from its URL in that same call: a file already on disk
(from another catalog naming the same file, or from before the pin was deleted) is downloaded
again first, so deleting a pin re-pins what the server serves now.

Partitions download in parallel: each pin is a read-modify-write under an exclusive
``flock`` on a hidden sidecar file, and the new lock is written under a temporary name and
renamed into place (:func:`scgrn_assets.lib.storage.atomic_path`), so concurrent pins are
never lost and a reader never sees a half-written lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from scgrn_assets.lib.ingest.download import (DownloadPolicy, FetchResult, apply_url_mirrors, fetch_file,
                                              url_for_messages)
from scgrn_assets.lib.ingest.transfer import ALLOW_HOSTS_VARIABLE, allow_entry, host_and_port
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.progress import Progress
from scgrn_assets.lib.storage import atomic_path, held_file_lock
from scgrn_assets.lib.ingest.strict_yaml import load_strict_yaml

LOCK_VERSION = 1
_HEADER = ("# sha256 pins written on first download (trust on first use); keys are the catalog's URLs.\n"
           "# Commit this file to share the pins. Delete an entry to pin that file again.\n")


@dataclass(frozen=True)
class Pin:
    """What the first download of a URL produced."""

    sha256: str
    n_bytes: int
    study: str
    file: str


class ChecksumLock:
    """The lock file of one catalog: URL -> :class:`Pin`.

    Parameters
    ----------
    path
        The lock file, e.g. ``catalogs/real.lock.yaml`` (see ``Catalog.lock_path``).
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def _flock_path(self) -> Path:
        # A sidecar, not the lock itself: the lock is replaced by rename, which would orphan a flock on it.
        return self.path.with_name(f".{self.path.name}.flock")

    def pins(self) -> dict[str, Pin]:
        """Every pin in the lock file (empty when there is none yet)."""
        if not self.path.exists():
            return {}
        try:
            raw = load_strict_yaml(self.path.read_text())
        except yaml.YAMLError as error:
            raise self._malformed(f"is not valid YAML ({error})") from None
        if raw is None:
            return {}
        if not isinstance(raw, dict) or not isinstance(raw.get("files", {}), dict):
            raise self._malformed("must be a mapping with a 'files' mapping")
        pins = {}
        for url, entry in (raw.get("files") or {}).items():
            if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                    or len(entry["sha256"]) != 64:
                raise self._malformed(f"has no valid sha256 for {url_for_messages(url)}")
            pins[str(url)] = Pin(sha256=entry["sha256"].lower(), n_bytes=int(entry.get("bytes", -1)),
                                 study=str(entry.get("study", "")), file=str(entry.get("file", "")))
        return pins

    def pinned_sha256(self, url: str) -> str | None:
        pin = self.pins().get(url)
        return pin.sha256 if pin else None

    def check_writable(self, *, study: str, file: str) -> None:
        """Refuse before a download whose pin could not be written (a read-only catalog folder)."""
        folder = self.path.parent
        if not os.access(folder, os.W_OK) or (self.path.exists() and not os.access(self.path, os.W_OK)):
            raise ScgrnInputError(
                f"{file} has no sha256 in the catalog and its first download must be pinned in {self.path}, "
                f"but {folder} is not writable", study=study, file=file,
                fix=f"copy the catalog (and its lock file, if any) to a writable folder and point SCGRN_CATALOG at "
                    f"the copy, e.g. cp {self.path.with_name(self.path.name.replace('.lock.yaml', '.yaml'))} "
                    f"~/my_catalog.yaml; export SCGRN_CATALOG=~/my_catalog.yaml")

    def pin(self, url: str, sha256: str, *, n_bytes: int, study: str, file: str) -> Pin:
        """Record ``sha256`` for ``url``; a different pin already there (another process won) is an error."""
        with self._exclusive():
            pins = self.pins()
            existing = pins.get(url)
            if existing is not None:
                if existing.sha256 != sha256:
                    raise ScgrnInputError(
                        f"was just downloaded with sha256 {sha256}, but {self.path} pins {existing.sha256} "
                        f"for {url_for_messages(url)}",
                        study=study, file=file,
                        fix="the file on the server changed between two downloads: run again; if it keeps "
                            "changing, check the URL")
                return existing
            pins[url] = Pin(sha256=sha256, n_bytes=n_bytes, study=study, file=file)
            self._write(pins)
            return pins[url]

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(held_file_lock(self._flock_path))
            except PermissionError:
                fix = "copy the catalog to a writable folder and point SCGRN_CATALOG at it"
                raise ScgrnInputError(f"cannot create {self._flock_path} to update the lock file",
                                      file=self.path.name, fix=fix) from None
            yield

    def _write(self, pins: dict[str, Pin]) -> None:
        body = {"version": LOCK_VERSION,
                "files": {url: {"sha256": p.sha256, "bytes": p.n_bytes, "study": p.study, "file": p.file}
                          for url, p in sorted(pins.items())}}
        with atomic_path(self.path) as tmp:
            tmp.write_text(_HEADER + yaml.safe_dump(body, sort_keys=False, width=1000))

    def _malformed(self, problem: str) -> ScgrnInputError:
        return ScgrnInputError(f"{problem}", file=str(self.path),
                               fix="fix the lock file by hand, or delete it to pin every file again on next download")


def fetch_pinned(url: str, destination: Path, *, sha256: str | None, lock: ChecksumLock | None, study: str,
                 policy: DownloadPolicy = DownloadPolicy(), mirrors: tuple[tuple[str, str], ...] = (),
                 progress: Progress | None = None) -> FetchResult:
    """Fetch a catalog file, verified against the catalog's sha256 or else the lock's pin.

    With neither (the first download) and a ``lock``, the file is fetched (even if a file is
    already at ``destination``) and pinned once it is complete; without a ``lock`` it is fetched
    unverified. ``mirrors`` rewrite the URL's host for the transfer only: the pin stays keyed by
    ``url``. The user named the mirror, so a URL it rewrote may reach the mirror's host and port
    even when that is this machine or a private network (``SCGRN_ALLOW_HOSTS`` is not needed for it).

    Raises
    ------
    ScgrnInputError
        Download failures (see :func:`scgrn_assets.lib.ingest.download.fetch_file`); a file that no
        longer matches its pin (nothing is left under ``destination``); a lock folder that is
        not writable when a pin is due.
    """
    expected = sha256 or (lock.pinned_sha256(url) if lock is not None else None)
    first_use = expected is None and lock is not None
    if first_use:
        lock.check_writable(study=study, file=destination.name)
    checksum_fix = None
    if sha256 is None and expected is not None:
        checksum_fix = (f"the file changed since its first download pinned it in {lock.path}; if the change is "
                        f"expected, delete the entry for {url_for_messages(url)} from the lock file to pin it again")
    source = apply_url_mirrors(url, mirrors)
    mirror = host_and_port(source) if source != url else None
    if mirror is not None:
        allowed = policy.allow_hosts if policy.allow_hosts is not None else (os.environ.get(ALLOW_HOSTS_VARIABLE, ""),)
        policy = dataclasses.replace(policy, allow_hosts=(*allowed, allow_entry(*mirror)))
    result = fetch_file(source, destination, sha256=expected, study=study, policy=policy, progress=progress,
                        checksum_fix=checksum_fix, reuse_unverified=not first_use)
    if first_use:
        try:
            lock.pin(url, result.sha256, n_bytes=result.n_bytes, study=study, file=destination.name)
        except ScgrnInputError:
            destination.unlink(missing_ok=True)  # it matches no pin: it must not look verified
            raise
    return result


__all__ = ["ChecksumLock", "Pin", "fetch_pinned"]

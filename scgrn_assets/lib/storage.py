"""The one place that knows the storage layout under ``SCGRN_HOME``, and atomic writes.

Layout::

    SCGRN_HOME/
      dagster/                         the Dagster instance (DAGSTER_HOME)
      demo_geo/<study>/...             the simulated GEO files the demo catalog points at
      assets/<asset>/<partition>/...   one folder per asset key and partition
      assets/<asset>/<asset>.<ext>     unpartitioned assets
      scgrn.duckdb                     SQL views over the Parquet tables

Everything is written to a temporary name in the same folder and renamed into place, so
an interrupted run never leaves a half-written file that looks complete. The temporary's
name carries the host and process id, so the next write of the same artefact removes what
a killed process on this host left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import shlex
import shutil
import socket
import sys
import time
import uuid
from datetime import datetime, timezone
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

DEFAULT_HOME = Path("~/.scgrn")

#: Free bytes every write leaves on the disk (override with SCGRN_MIN_FREE_BYTES). HDF5 and SQLite
#: crash (SIGSEGV) rather than fail cleanly when a write meets a disk that is all but full.
MIN_FREE_BYTES_VARIABLE = "SCGRN_MIN_FREE_BYTES"
DEFAULT_MIN_FREE_BYTES = 64 << 20

#: Seconds a bounded lock wait (the DuckDB database's writers and readers) lasts before it fails naming
#: the holder (override with SCGRN_LOCK_WAIT_S): a holder that never lets go must not stall a run silently.
LOCK_WAIT_VARIABLE = "SCGRN_LOCK_WAIT_S"
DEFAULT_LOCK_WAIT_S = 600.0
#: While waiting, one line every this many seconds says who holds the lock.
LOCK_WAIT_REPORT_EVERY_S = 10.0

logger = logging.getLogger(__name__)


def scgrn_home() -> Path:
    """``$SCGRN_HOME`` or ``~/.scgrn``, absolute."""
    return Path(os.environ.get("SCGRN_HOME") or DEFAULT_HOME).expanduser().resolve()


@dataclass(frozen=True)
class StorageLayout:
    home: Path

    @classmethod
    def from_env(cls) -> "StorageLayout":
        return cls(scgrn_home())

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def demo_data(self) -> Path:
        return self.home / "demo_geo"

    @property
    def duckdb_path(self) -> Path:
        return self.home / "scgrn.duckdb"

    def asset_dir(self, asset_name: str, partition: str | None = None) -> Path:
        base = self.home / "assets" / asset_name
        return base / partition if partition else base

    def asset_path(self, asset_name: str, partition: str | None, suffix: str) -> Path:
        """E.g. ``asset_path("study_anndata", "GSE1", ".h5ad")`` -> assets/study_anndata/GSE1/GSE1.h5ad."""
        return self.asset_dir(asset_name, partition) / f"{partition or asset_name}{suffix}"


def _temporary_prefix(final: Path) -> str:
    return f".tmp-{final.name}-{socket.gethostname()}-"


def temporary_sibling(final: Path) -> Path:
    # Same folder as the target so os.replace is an atomic rename on one filesystem.
    return final.with_name(f"{_temporary_prefix(final)}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_orphaned_temporaries(final: Path) -> int:
    """Delete temporaries of ``final`` whose writer, a process of this host, no longer exists; returns how many.

    Only this host's processes can be checked: on a shared filesystem another machine's
    temporaries are left alone (a live writer there must not lose its file).
    """
    prefix = _temporary_prefix(final)
    orphans = []
    for path in final.parent.glob(f"{glob.escape(prefix)}*"):
        pid_text = path.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and not process_exists(int(pid_text)):
            orphans.append(path)
    for path in orphans:
        remove_path(path)
    return len(orphans)


def process_exists(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


@contextlib.contextmanager
def held_file_lock(lock_path: Path, *, exclusive: bool = True, wait_s: float | None = None,
                   what: str | None = None) -> Iterator[None]:
    """Hold an ``flock`` on ``lock_path`` (created if absent): exclusive, or shared among readers.

    The kernel releases it when the process dies, so a kill -9 never leaves it held.

    With ``wait_s`` the wait is bounded and visible: this process records itself as a holder
    (pid, host, command; :func:`lock_holders`) while it holds the lock, logs who holds it every
    :data:`LOCK_WAIT_REPORT_EVERY_S` seconds while it waits, and after ``wait_s`` seconds raises an
    ``ScgrnInputError`` naming the holders and what to do. Exclusive waiters go through a gate that
    new shared holders must pass, so a stream of readers cannot starve a writer. ``what`` names the
    lock in messages (default: its path). Without ``wait_s`` it waits as long as it takes.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        if wait_s is None:
            fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            record = None
        else:
            deadline = time.monotonic() + max(0.0, wait_s)
            with _gate_path(lock_path).open("a") as gate:
                # Writers hold the gate while they wait; readers only pass through it.
                _wait_for_flock(gate, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, lock_path, deadline, wait_s,
                                what, exclusive, at_gate=True)
                try:
                    _wait_for_flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, lock_path, deadline,
                                    wait_s, what, exclusive)
                finally:
                    fcntl.flock(gate, fcntl.LOCK_UN)
            record = _record_holder(lock_path, exclusive)
        try:
            yield
        finally:
            if record is not None:
                with contextlib.suppress(OSError):
                    record.unlink()
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_wait_seconds() -> float:
    """How long a bounded lock wait lasts (``SCGRN_LOCK_WAIT_S``, default 600 s = 10 minutes)."""
    text = os.environ.get(LOCK_WAIT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_LOCK_WAIT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        from scgrn_assets.lib.errors import ScgrnInputError

        raise ScgrnInputError(f"{LOCK_WAIT_VARIABLE}={text!r} is not a number of seconds",
                              fix=f"set {LOCK_WAIT_VARIABLE} to e.g. {DEFAULT_LOCK_WAIT_S:.0f} or unset it")
    return seconds


def lock_holders(lock_path: Path) -> list[str]:
    """Who holds ``lock_path`` as recorded by bounded holders: one line each (pid, host, mode, since, command).

    Best effort: records of dead processes of this host are skipped (and removed); a holder that
    took the lock without a bounded wait (or a program outside this package) leaves no record.
    """
    folder = _holders_path(lock_path)
    if not folder.is_dir():
        return []
    holders = []
    for record in sorted(folder.iterdir()):
        host, _, rest = record.name.rpartition("-pid")
        pid_text = rest.split("-", 1)[0]
        if host == socket.gethostname() and pid_text.isdigit() and not process_exists(int(pid_text)):
            with contextlib.suppress(OSError):
                record.unlink()
            continue
        with contextlib.suppress(OSError, UnicodeDecodeError):
            holders.append(record.read_text(encoding="utf-8").strip())
    return [holder for holder in holders if holder]


def _holders_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".holders")


def _gate_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".gate")


def _record_holder(lock_path: Path, exclusive: bool) -> Path | None:
    """Write this process's holder record next to the lock (best effort: a failure only loses the name)."""
    command = shlex.join(getattr(sys, "orig_argv", sys.argv))
    if len(command) > 300:
        command = command[:300] + "..."
    since = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    record = _holders_path(lock_path) / f"{socket.gethostname()}-pid{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        record.parent.mkdir(exist_ok=True)
        record.write_text(f"pid {os.getpid()} on {socket.gethostname()} ({'exclusive' if exclusive else 'shared'}, "
                          f"since {since}): {command}\n", encoding="utf-8")
    except OSError:
        return None
    return record


def _wait_for_flock(handle, flag: int, lock_path: Path, deadline: float, wait_s: float, what: str | None,
                    exclusive: bool, *, at_gate: bool = False) -> None:
    """``flock(handle, flag)`` polled until ``deadline``: a line every 10 s while waiting, then a named error."""
    started = time.monotonic()
    next_report, pause = started + LOCK_WAIT_REPORT_EVERY_S, 0.005
    while True:
        try:
            fcntl.flock(handle, flag | fcntl.LOCK_NB)
            return
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        now = time.monotonic()
        name = what or str(lock_path)
        if now >= deadline:
            from scgrn_assets.lib.errors import ScgrnInputError

            raise ScgrnInputError(
                f"gave up waiting {wait_s:g} s to {'write' if exclusive else 'read'} {name}: the lock {lock_path} is "
                f"held by {_describe_holders(lock_path, at_gate)}", file=str(lock_path),
                fix=f"wait for that process to finish or stop it (kill <pid>), then run again; "
                    f"{LOCK_WAIT_VARIABLE} sets how long to wait")
        if now >= next_report:
            logger.warning("waiting %.0f s so far to %s %s (gives up after %g s): held by %s", now - started,
                           "write" if exclusive else "read", name, wait_s, _describe_holders(lock_path, at_gate))
            next_report += LOCK_WAIT_REPORT_EVERY_S
        time.sleep(min(pause, max(0.0, deadline - now)))
        pause = min(pause * 2, 0.1)


def _describe_holders(lock_path: Path, at_gate: bool = False) -> str:
    holders = lock_holders(lock_path)
    described = "; ".join(holders) if holders else \
        "a process that left no record (another program, e.g. a duckdb shell, or an older scgrn)"
    # At the gate the one in the way is a writer queued before us; the holders are who it waits for.
    return f"a writer waiting its turn, behind {described}" if at_gate else described


def min_free_bytes() -> int:
    """The reserve of free bytes writes leave on the disk (``SCGRN_MIN_FREE_BYTES``, default 64 MiB)."""
    text = os.environ.get(MIN_FREE_BYTES_VARIABLE, "").strip()
    if not text:
        return DEFAULT_MIN_FREE_BYTES
    if not text.isdigit():
        from scgrn_assets.lib.errors import ScgrnInputError

        raise ScgrnInputError(f"{MIN_FREE_BYTES_VARIABLE}={text!r} is not a number of bytes",
                              fix=f"set {MIN_FREE_BYTES_VARIABLE} to e.g. {DEFAULT_MIN_FREE_BYTES} or unset it")
    return int(text)


def require_free_space(folder: Path, n_bytes: int = 0, *, what: str) -> None:
    """Raise a named error unless ``folder``'s disk has ``n_bytes`` plus the reserve free.

    Checked before a write starts, so a nearly full disk stops a run with a message rather
    than with a crash half-way through a file.
    """
    from scgrn_assets.lib.errors import ScgrnInputError

    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    needed = max(0, n_bytes) + min_free_bytes()
    if free < needed:
        raise ScgrnInputError(
            f"{what} needs {_mib(needed)} free on the disk of {folder} ({_mib(n_bytes)} plus a reserve of "
            f"{_mib(min_free_bytes())}), and only {_mib(free)} is free", file=str(folder),
            fix=f"free disk space, or point SCGRN_HOME at a larger disk (the reserve is {MIN_FREE_BYTES_VARIABLE})")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is the disk (or quota) running out, as the OS, h5py or pyarrow report it."""
    text = str(error)
    return getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text \
        or "errno = 28" in text or "Disk quota exceeded" in text


def disk_full_error(folder: Path, what: str):
    from scgrn_assets.lib.errors import ScgrnInputError

    return ScgrnInputError(f"the disk of {folder} ran out of space while {what}; nothing was written under the "
                           "final name", file=str(folder),
                           fix="free disk space, or point SCGRN_HOME at a larger disk, then run again")


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / (1 << 20):.1f} MiB"


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path to write a file *or folder*; rename it onto ``final`` on success.

    On any exception the temporary is removed and an existing ``final`` stays untouched. A disk
    without the reserve of free space (:func:`require_free_space`) refuses the write before it
    starts; a disk that fills up during it (ENOSPC) is a named error, not an OSError.
    Replacing a folder: the old one is moved aside first, then removed after the swap.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temporaries(final)
    require_free_space(final.parent, what=f"writing {final.name}")
    tmp = temporary_sibling(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {final}")
        replace_path(tmp, final)
    except (OSError, RuntimeError) as error:  # h5py and zarr report ENOSPC in their own words
        if is_disk_full(error):
            raise disk_full_error(final.parent, f"writing {final.name}") from None
        raise
    finally:
        remove_path(tmp)


def replace_path(source: Path, final: Path) -> None:
    """Atomically put ``source`` at ``final`` (file or folder)."""
    if source.is_dir() and final.exists():
        # Directories cannot be os.replace'd over a non-empty one: swap via a side name.
        old = temporary_sibling(final)
        os.replace(final, old)
        os.replace(source, final)
        remove_path(old)
    else:
        os.replace(source, final)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _writer_is_gone(temporary: Path) -> bool:
    """Whether ``temporary`` (``.tmp-<name>-<host>-<pid>-<id>``) was left by a dead process of this host."""
    stem, _, rest = temporary.name.rpartition("-")  # rest: the random id
    stem, _, pid_text = stem.rpartition("-")
    if not rest or not pid_text.isdigit() or not stem.endswith(f"-{socket.gethostname()}"):
        return False  # another host's writer (or not ours): it may still be writing
    return not process_exists(int(pid_text))


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the ``.tmp-*`` leftovers of killed processes in ``folder``; returns how many.

    Like :func:`remove_orphaned_temporaries` but for every artefact in the folder: only
    temporaries whose writer, a process of this host, is gone; a live writer's stays.
    """
    if not Path(folder).exists():
        return 0
    stale = [path for path in Path(folder).glob(".tmp-*") if _writer_is_gone(path)]
    for path in stale:
        remove_path(path)
    return len(stale)

"""Fault scenarios shared by the reliability tests and ``bench/reliability.py``.

* :func:`prepare_home` lays out an SCGRN_HOME holding the simulated GEO files and a user
  catalog naming some of the demo studies (so runs need no simulator and no network).
* :func:`run_demo` / :func:`start_demo` run the real ``scgrn demo --quick`` command in a
  subprocess (``--quick``: a few training steps for the demo model, small nulls).
* :func:`fingerprint_outputs` reduces every final-named artefact to a comparable digest, so
  an interrupted-then-rerun home can be compared with an uninterrupted one.
* :class:`ArtefactWatcher` opens every final-named artefact over and over while a run goes
  on and records any that is there but cannot be read or differs from the reference: the
  half-written file the storage contract promises never to show.

Later stages add their artefact to :data:`ARTEFACT_READERS` and their in-progress marker
to :data:`KILL_POINTS`; every kill test then covers them.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

@dataclass(frozen=True)
class KillPoint:
    """Kill ``delay`` seconds (drawn from ``delay_range``) after ``glob`` (under SCGRN_HOME) first matches."""

    glob: str
    delay_range: tuple[float, float] = (0.0, 0.3)


#: Stage -> when it is under way. Steps without an in-progress file of their own are reached
#: by a delay after their predecessor's artefact appears.
KILL_POINTS: dict[str, KillPoint] = {
    "download": KillPoint("assets/geo_raw_archive/*"),
    "extraction": KillPoint("assets/study_anndata/*/.tmp-*"),
    "combine": KillPoint("assets/combined_corpus/.tmp-combined_corpus.zarr-*"),
    "sql_view": KillPoint("assets/combined_corpus/corpus_studies.parquet"),
    "tokenize": KillPoint("assets/.tmp-tokenized_cells-*"),
    "model_fit": KillPoint("assets/tokenized_cells/cells.npz", (1.0, 4.0)),
    "attention": KillPoint("assets/geneformer_model/config.json", (1.0, 4.0)),
    "edge_aggregation": KillPoint("assets/edge_stability"),
}


def prepare_home(home: Path, demo_geo: Path, catalog_path: Path, accessions: list[str] | None = None) -> Path:
    """Copy the simulated GEO files into ``home`` and write a user catalog there; returns the catalog path.

    ``accessions`` keeps a subset of the catalog's studies (all by default). The catalog is
    renamed so that ``scgrn demo`` uses it as is instead of re-simulating.
    """
    raw = yaml.safe_load(Path(catalog_path).read_text())
    raw["name"] = "reliability"
    if accessions is not None:
        raw["studies"] = [s for s in raw["studies"] if s["accession"] in accessions]
    home.mkdir(parents=True, exist_ok=True)
    shutil.copytree(demo_geo, home / "demo_geo", dirs_exist_ok=True)
    catalog = home / "reliability.yaml"
    catalog.write_text(yaml.safe_dump(raw, sort_keys=False))
    return catalog


# `scgrn demo --quick`: the real command; --quick trains the demo model for a few steps only.
DEMO_COMMAND = ["-m", "scgrn_assets.cli", "demo", "--quick"]


def _environment(home: Path, catalog: Path) -> dict[str, str]:
    env = {**os.environ, "SCGRN_HOME": str(home), "SCGRN_CATALOG": str(catalog), "TQDM_DISABLE": "1"}
    env.pop("DAGSTER_HOME", None)
    return env


def _demo_argv() -> list[str]:
    return [sys.executable, *DEMO_COMMAND]


def start_demo(home: Path, catalog: Path) -> subprocess.Popen:
    """Start ``scgrn demo`` over ``home`` in its own process group (so a kill reaches every child)."""
    return subprocess.Popen(_demo_argv(), env=_environment(home, catalog), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run_demo(home: Path, catalog: Path, timeout_seconds: float = 900) -> subprocess.CompletedProcess:
    """Run ``scgrn demo`` to the end; raises AssertionError with its output when it fails."""
    result = subprocess.run(_demo_argv(), env=_environment(home, catalog), capture_output=True, text=True,
                            timeout=timeout_seconds)
    if result.returncode != 0:
        raise AssertionError(f"scgrn demo failed in {home}:\n{result.stdout}\n{result.stderr}")
    return result


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process and its group: no handler, no cleanup, like the OOM killer or a lost node."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@dataclass
class KillOutcome:
    stage: str
    killed: bool               # False when the run finished before the kill point was reached
    seconds_into_run: float


def kill_demo_at(home: Path, catalog: Path, stage: str, rng: random.Random, *,
                 timeout_seconds: float = 600) -> KillOutcome:
    """Run ``scgrn demo`` and SIGKILL it at a random delay after :data:`KILL_POINTS` ``[stage]`` is reached."""
    pattern = KILL_POINTS[stage].glob
    delay_seconds = rng.uniform(*KILL_POINTS[stage].delay_range)
    started = time.monotonic()
    process = start_demo(home, catalog)
    try:
        while process.poll() is None:
            if next(home.glob(pattern), None) is not None:
                time.sleep(delay_seconds)
                if process.poll() is not None:
                    break
                kill_group(process)
                return KillOutcome(stage, True, time.monotonic() - started)
            if time.monotonic() - started > timeout_seconds:
                raise TimeoutError(f"stage {stage} never started in {home}")
            time.sleep(0.005)
    finally:
        if process.poll() is None:
            kill_group(process)
    output = process.stdout.read() if process.stdout else ""
    if process.returncode != 0:
        raise AssertionError(f"scgrn demo failed before the {stage} kill point:\n{output}")
    return KillOutcome(stage, False, time.monotonic() - started)


def kill_demo_after(home: Path, catalog: Path, seconds: float) -> KillOutcome:
    """Run ``scgrn demo`` and SIGKILL it after ``seconds`` (a random point, whatever it is doing)."""
    started = time.monotonic()
    process = start_demo(home, catalog)
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        kill_group(process)
        return KillOutcome("random", True, time.monotonic() - started)
    return KillOutcome("random", False, time.monotonic() - started)


# --- what a reader sees -----------------------------------------------------------------------------


def _digest(*parts: bytes | str) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part if isinstance(part, bytes) else part.encode())
        hasher.update(b"\x00")
    return hasher.hexdigest()


def _anndata_digest(adata) -> str:
    import numpy as np

    matrix = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    return _digest(np.ascontiguousarray(matrix, dtype=np.float64).tobytes(), str(matrix.shape),
                   adata.obs.astype(str).to_csv(), adata.var.astype(str).to_csv())


def _read_h5ad(path: Path) -> str:
    import anndata as ad

    return _anndata_digest(ad.read_h5ad(path))


def _read_zarr(path: Path) -> str:
    from scgrn_assets.lib.corpus.build import read_corpus

    adata = read_corpus(path)
    return _digest(_anndata_digest(adata), repr(sorted(adata.uns["qc"]["cells_removed"].items())),
                   repr(adata.uns["qc"]["genes_removed"]))


def _read_parquet(path: Path) -> str:
    import pandas as pd

    return _digest(pd.read_parquet(path).to_csv(index=False))


def _read_bytes(path: Path) -> str:
    from scgrn_assets.lib.ingest.download import sha256_of

    return sha256_of(path)


def _read_npz(path: Path) -> str:
    import numpy as np

    with np.load(path, allow_pickle=False) as stored:
        return _digest(*(f"{name}{stored[name].dtype}{stored[name].shape}".encode() + stored[name].tobytes()
                         for name in sorted(stored.files)))


def _read_file_content(path: Path) -> str:
    """A digest of what a file holds, insensitive to container details (zip timestamps, pickle framing)."""
    import numpy as np

    if path.suffix == ".npz":
        return _read_npz(path)
    if path.suffix == ".npy":
        return _digest(np.load(path, allow_pickle=False).tobytes())
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        return _digest(*(name.encode() + tensors[name].tobytes() for name in sorted(tensors)))
    if path.suffix == ".pkl":
        from scgrn_assets.lib.network.dictionaries import load_pickle_restricted

        return _digest(repr(sorted(load_pickle_restricted(path).items())))
    return _read_bytes(path)


def _read_folder(path: Path) -> str:
    """A folder artefact (tokenized cells, a model): every file in it, by name and content."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{path} is empty")
    return _digest(*(f"{p.relative_to(path)}={_read_file_content(p)}" for p in files))


def _read_netcdf(path: Path) -> str:
    """A posterior trace: every variable of every group, by name and values (not file bytes: they hold dates)."""
    import xarray as xr

    parts = []
    with xr.open_datatree(path) as tree:
        for node in tree.subtree:
            for name, variable in sorted(node.dataset.data_vars.items()):
                parts.append(f"{node.path}/{name}".encode() + variable.values.tobytes())
    return _digest(*parts)


def _read_duckdb(path: Path) -> dict[str, str]:
    """One digest per view: views appear one by one during a run, each must be whole when it does."""
    from scgrn_assets.lib.sql_store import list_tables, query

    return {table: _digest(query(path, f"SELECT * FROM {table} ORDER BY ALL").to_csv(index=False))
            for table in list_tables(path)}


#: Final-name glob (relative to SCGRN_HOME) -> reader returning a digest of what a user would read
#: (or one digest per part, e.g. per SQL view, compared as ``<artefact>:<part>``).
ARTEFACT_READERS: dict[str, Callable[[Path], str | dict[str, str]]] = {
    "assets/geo_raw_archive/*/*": _read_bytes,
    "assets/gene_annotation/gene_annotation.tsv": _read_bytes,
    "assets/*/*.parquet": _read_parquet,
    "assets/study_anndata/*/*.h5ad": _read_h5ad,
    "assets/combined_corpus/combined_corpus.zarr": _read_zarr,
    "assets/tokenized_cells": _read_folder,
    "assets/geneformer_model": _read_folder,
    "assets/attention_moments/*/*.npz": _read_npz,
    "assets/nb_posterior/*.nc": _read_netcdf,
    "scgrn.duckdb": _read_duckdb,
}


def is_in_progress_name(path: Path) -> bool:
    """Temporaries and partial downloads: names no reader treats as an artefact."""
    return path.name.startswith(".") or path.name.endswith(".part") or path.name.endswith(".lock")


def final_artefacts(home: Path) -> dict[str, tuple[Path, Callable[[Path], str | dict[str, str]]]]:
    """Every final-named artefact now under ``home``: relative name -> (path, reader)."""
    found = {}
    for pattern, reader in ARTEFACT_READERS.items():
        for path in sorted(home.glob(pattern)):
            if not is_in_progress_name(path) and not any(is_in_progress_name(p) for p in path.relative_to(home).parents
                                                         if p.name):
                found[str(path.relative_to(home))] = (path, reader)
    return found


def _flatten(name: str, digest: str | dict[str, str]) -> dict[str, str]:
    return {f"{name}:{part}": value for part, value in digest.items()} if isinstance(digest, dict) else {name: digest}


def fingerprint_outputs(home: Path) -> dict[str, str]:
    """Digest of every final-named artefact under ``home`` (what an uninterrupted run is compared on)."""
    fingerprints = {}
    for name, (path, reader) in final_artefacts(home).items():
        fingerprints.update(_flatten(name, reader(path)))
    return fingerprints


@dataclass
class ArtefactWatcher:
    """A thread that reads every final-named artefact while a run goes on, comparing each with ``reference``.

    ``violations`` lists artefacts seen under their final name that could not be read or whose
    digest differed from the uninterrupted run's: half-written or wrong data a user could see.
    A file replaced while it was being read (its inode changed) is read again, not reported.
    """

    home: Path
    reference: dict[str, str]
    interval_seconds: float = 0.05
    violations: list[str] = field(default_factory=list)
    n_reads: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "ArtefactWatcher":
        self._thread = threading.Thread(target=self._watch, name="artefact-watcher", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for name, (path, reader) in final_artefacts(self.home).items():
                self._check(name, path, reader)
            self._stop.wait(self.interval_seconds)

    def _check(self, name: str, path: Path, reader: Callable[[Path], str | dict[str, str]]) -> None:
        try:
            before = os.stat(path).st_ino
        except FileNotFoundError:
            return
        try:
            digest = reader(path)
        except Exception as error:  # noqa: BLE001 - any failure to read a final-named artefact is the finding
            if _replaced_since(path, before):
                return
            self.violations.append(f"{name}: unreadable under its final name ({type(error).__name__}: {error})")
            return
        self.n_reads += 1
        if _replaced_since(path, before):
            return
        for part, value in _flatten(name, digest).items():
            if value != self.reference.get(part, "absent from the reference run"):
                self.violations.append(f"{part}: differs from the uninterrupted run's")


def _replaced_since(path: Path, inode: int) -> bool:
    try:
        return os.stat(path).st_ino != inode
    except FileNotFoundError:
        return True

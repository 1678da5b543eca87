"""The `scgrn` command line: run the demo, open the UI, see what is materialised, query tables."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from scgrn_assets.instance import single_host_dagster_yaml
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.storage import StorageLayout, atomic_path, held_file_lock, require_free_space, scgrn_home

# The CLI's runs log to scgrn_assets.run_console (step start/end lines, progress bars); warnings and errors
# are printed once each by the CLI (Dagster's console would print every failure several times with stack
# traces); the full logs stay in the instance (see `scgrn ui`).

DAGSTER_YAML = single_host_dagster_yaml()  # SQLite storage, run queue, `gpu` pool limited to the GPUs


def _prepare_instance(layout: StorageLayout):
    """Point Dagster at SCGRN_HOME/dagster (created on first use) and return the instance."""
    import dagster as dg

    layout.dagster_home.mkdir(parents=True, exist_ok=True)
    # The instance is SQLite, which crashes (SIGSEGV) rather than fails on an all-but-full disk.
    require_free_space(layout.dagster_home, what="the Dagster instance (SQLite run and event logs)")
    config = layout.dagster_home / "dagster.yaml"
    os.environ["DAGSTER_HOME"] = str(layout.dagster_home)
    # Dagster creates its SQLite schemas on first use without a lock: two first runs at once
    # would both create them ("table runs already exists"). One process initialises; the rest wait.
    with held_file_lock(layout.dagster_home / ".scgrn-init.lock"):
        if not config.exists():  # atomically: a run killed while writing it must not leave a truncated config
            with atomic_path(config) as tmp:
                tmp.write_text(DAGSTER_YAML)
        instance = dg.DagsterInstance.get()
        instance.get_runs(limit=1)  # the storages are created lazily: create them here, under the lock
        instance.event_log_storage.get_latest_materialization_events([])
        instance.schedule_storage
    release_runs_of_killed_cli_processes(instance)
    return instance


def cli_run_tags() -> dict[str, str]:
    """Tags of the runs this process starts: who started them, so a later CLI can tell a dead one."""
    return {"scgrn/source": "cli", "scgrn/host": socket.gethostname(), "scgrn/pid": str(os.getpid())}


def release_runs_of_killed_cli_processes(instance) -> int:
    """Mark failed the CLI runs whose process is gone (kill -9, OOM) and free the pool slots they held.

    A run killed inside a `gpu` pool step never gives its slot back, so every later model step
    would wait for it forever. Only runs a `scgrn` process of this host started are touched.
    Returns how many runs were released.
    """
    import dagster as dg

    from scgrn_assets.lib.storage import process_exists

    in_flight = instance.get_runs(filters=dg.RunsFilter(
        statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING],
        tags={"scgrn/source": "cli", "scgrn/host": socket.gethostname()}))
    released = 0
    for run in in_flight:
        pid = run.tags.get("scgrn/pid", "")
        if pid.isdigit() and not process_exists(int(pid)):
            instance.report_run_failed(run, f"the scgrn process (pid {pid}) running it was killed")
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            released += 1
    return released


def ensure_demo_data(layout: StorageLayout, catalog, *, echo=print) -> None:
    """Simulate the demo's GEO files unless every file the catalog names is present and intact."""
    from scgrn_assets.lib.demo.geo_layouts import write_demo_geo
    from scgrn_assets.lib.ingest.download import sha256_of
    from scgrn_assets.lib.demo.simulator import DemoConfig

    files = [(layout.demo_data / s.accession / f.name, f.sha256) for s in catalog.studies for f in s.files]
    if catalog.gene_annotation is not None:
        files.append((layout.demo_data / "truth" / catalog.gene_annotation.name, catalog.gene_annotation.sha256))
    if all(path.exists() and sha256_of(path) == sha256 for path, sha256 in files):
        return
    echo(f"Simulating the demo studies into {layout.demo_data} ...")
    from tqdm import tqdm

    with tqdm(desc="simulate", unit="file", disable=None) as bar:
        write_demo_geo(layout.demo_data, DemoConfig(), progress=lambda done, total, **detail: bar.update(1))
    stale = [str(path) for path, sha256 in files if not path.exists() or sha256_of(path) != sha256]
    if stale:
        raise ScgrnInputError(
            f"the simulator wrote files whose sha256 differs from the demo catalog ({stale[0]} and "
            f"{len(stale) - 1} more)", fix="regenerate the catalog: scgrn simulate --write-catalog "
            "scgrn_assets/catalogs/demo.yaml (after changing the simulator)")


def materialisation_plan(assets) -> list[tuple[list, bool]]:
    """Assets in runs, in dependency order: ``(assets, partitioned)`` per run.

    A partitioned run happens once per study; consecutive assets of the same kind share a
    run, so the demo takes a handful of runs rather than one per asset and partition.
    """
    keys_of = {id(a): set(a.keys) for a in assets}
    deps_of = {id(a): {k for k in a.dependency_keys} for a in assets}
    remaining = list(assets)
    plan = []
    while remaining:
        ready = [a for a in remaining if deps_of[id(a)] & set().union(*(keys_of[id(r)] for r in remaining)) == set()]
        partitioned = all(a.partitions_def is not None for a in ready)
        group = [a for a in ready if (a.partitions_def is not None) == partitioned]
        group_keys = set().union(*(keys_of[id(a)] for a in group))
        grew = True
        while grew:  # pull in same-kind assets whose inputs this run produces
            grew = False
            for a in remaining:
                if a in group or (a.partitions_def is not None) != partitioned:
                    continue
                own = deps_of[id(a)] & set().union(*(keys_of[id(r)] for r in remaining))
                if own <= group_keys:
                    group.append(a)
                    group_keys |= keys_of[id(a)]
                    grew = True
        plan.append((group, partitioned))
        remaining = [a for a in remaining if a not in group]
    return plan


def selected_assets(assets: list, selection: str | None) -> list:
    """The assets ``selection`` names, in Dagster's selection syntax (``group:ingest``,
    ``key:combined_corpus+``, ``+condition_effects``, ``group:ingest or group:corpus``); all when None."""
    if not selection:
        return list(assets)
    import warnings

    import dagster as dg

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Dagster's own deprecation notices about its internals
            keys = dg.AssetSelection.from_string(selection).resolve(assets)
    except Exception as error:  # Dagster raises several types for a bad selection string
        groups = sorted({group for a in assets for group in a.group_names_by_key.values()})
        raise ScgrnInputError(f"--select {selection!r} is not a Dagster asset selection ({error})",
                              fix=f"e.g. --select 'group:ingest or group:corpus', --select 'key:combined_corpus+'; "
                                  f"groups: {', '.join(groups)}") from None
    chosen = [a for a in assets if set(a.keys) & keys]
    if not chosen:
        raise ScgrnInputError(f"--select {selection!r} names no asset",
                              fix="list the assets with `scgrn status`; e.g. --select 'group:ingest'")
    return chosen


def materialize_everything(layout: StorageLayout, catalog_name: str, *, quick: bool = False,
                           selection: str | None = None, force: bool = False, echo=print) -> list[tuple]:
    """Materialise every asset (or those ``selection`` names), run by run in dependency order.

    Partitioned runs happen once per study, and every study is tried even when one fails; the
    failures are then raised together, each once, in one :class:`ScgrnInputError` (the runs'
    full logs stay in the instance for ``scgrn ui``). Warnings the runs logged are echoed once.

    A run whose assets (and partitions) are all up to date is skipped: materialised, with their
    code version (code, settings and catalog: :func:`scgrn_assets.definitions.with_code_versions`)
    and their inputs unchanged since (Dagster's stale status, the same the UI shows), and no
    failed check. ``force`` runs everything anyway.

    Returns
    -------
    list of (step key, partition, seconds, succeeded) for every step that ran, and (key, partition, 0.0,
    None) for every asset skipped as up to date.
    """
    from scgrn_assets import definitions
    from scgrn_assets.run_console import step_wall_times

    instance = _prepare_instance(layout)
    built = definitions.build_definitions(catalog_name, home=layout.home, quick=quick)
    resources = dict(built.resources)
    everything = [*built.assets, *built.asset_checks]
    assets = selected_assets(list(built.assets), selection)
    accessions = resources["storage"].load_catalog().accessions
    plan = materialisation_plan(assets)
    failures: list[str] = []
    timings: list[tuple] = []
    freshness = None if force else up_to_date_checker(instance, built, layout)
    # No bar over the runs: the console logger prints each step's start and end and draws the step's own bar.
    for group, partitioned in plan:
        names = ", ".join(k.to_user_string() for a in group for k in a.keys)
        for partition in (accessions if partitioned else [None]):
            if freshness is not None and freshness(group, partition):
                timings.extend((k.to_user_string(), partition, 0.0, None) for a in group for k in a.keys)
                continue
            result = execute_run(everything, group, partition, instance, resources)
            timings.extend(step_wall_times(instance, result.run_id))
            for warning in run_warnings(instance, result.run_id):
                print(warning, file=sys.stderr, flush=True)
            failure = run_failure(result, f"{names}{f' for {partition}' if partition else ''}")
            if failure:
                failures.append(failure)
        if failures:  # later assets need every study: stop here, after trying them all
            break
    echo(wall_time_summary(timings))
    if failures:
        listed = "\n".join(f"  {n}. {failure}" for n, failure in enumerate(failures, start=1))
        raise ScgrnInputError(f"{len(failures)} run(s) failed:\n{listed}\nFix each and run again (what succeeded "
                              "is kept); the runs' full logs are in `scgrn ui`.")
    return timings


CLI_JOB = "__scgrn_cli_run"


def execute_run(everything: list, group: list, partition: str | None, instance, resources: dict):
    """One in-process run of ``group`` (what ``dg.materialize`` does), with the CLI's console logger:
    a line per step start and end, and progress bars (:mod:`scgrn_assets.run_console`)."""
    import dagster as dg

    from scgrn_assets.run_console import console_logger

    defs = dg.Definitions(jobs=[dg.define_asset_job(CLI_JOB, selection=dg.AssetSelection.assets(*group))],
                          assets=everything, resources=resources)
    job = defs.resolve_job_def(CLI_JOB).with_logger_defs({"console": console_logger})
    # A job's loggers start only when the run config names them.
    return job.execute_in_process(run_config={"loggers": {"console": {}}}, instance=instance,
                                  partition_key=partition, raise_on_error=False, tags=cli_run_tags())


def up_to_date_checker(instance, built, layout: StorageLayout):
    """``fresh(group, partition)``: True when every asset of ``group`` (at ``partition``) is materialised with
    its output still on disk, is not stale by Dagster's data versions (code version and inputs unchanged),
    and no blocking (error-severity) check of it failed at that partition. None when Dagster's stale-status
    API cannot be used (then everything is recomputed)."""
    try:
        # Dagster's own stale-status resolver (what the UI's "unsynced" uses); not a public API yet.
        from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
        from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
        from dagster._core.event_api import PartitionKeyFilter
        from dagster._time import get_current_datetime

        from scgrn_assets.io_managers import stored_artefact

        asset_graph = built.resolve_asset_graph()
        check_keys = list(asset_graph.asset_check_keys)
    except Exception:  # noqa: BLE001 - when in doubt, recompute
        return None

    def failed_blocking_check(asset_key, partition: str | None) -> bool:
        keys = [key for key in check_keys if key.asset_key == asset_key]
        if not keys:
            return False
        latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            keys, partition_filter=PartitionKeyFilter(key=partition) if partition else None)
        for record in latest.values():
            if record is None:
                continue
            event = record.event.dagster_event if record.event else None
            evaluation = event.event_specific_data if event is not None else None
            if record.status.value not in ("SUCCEEDED", "FAILED"):
                return True  # planned or in progress: not a finished, passing check
            if record.status.value == "FAILED" or (evaluation is not None and not evaluation.passed and
                                                    getattr(evaluation.severity, "value", "ERROR") == "ERROR"):
                return True
        return False

    def fresh(group: list, partition: str | None) -> bool:
        try:
            # A new resolver each time: a run since the last question may have changed an input's data version.
            view = AssetGraphView(
                temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                instance=instance, asset_graph=asset_graph)
            resolver = CachingStaleStatusResolver(instance=instance, asset_graph=asset_graph, loading_context=view)
            return all(resolver.get_status(key, partition) == StaleStatus.FRESH
                       and stored_artefact(layout, asset, key, partition).exists()
                       and not failed_blocking_check(key, partition)
                       for asset in group for key in asset.keys)
        except Exception:  # noqa: BLE001 - when in doubt, recompute
            return False

    return fresh


def wall_time_summary(timings: list[tuple]) -> str:
    """Where the time went: each asset's wall time (summed over its partitions), slowest first."""
    if not timings:
        return ""
    by_asset: dict[str, list] = {}
    for key, partition, seconds, succeeded in timings:
        entry = by_asset.setdefault(key, [0.0, 0, 0, 0])
        entry[0] += seconds
        entry[1] += 1
        entry[2] += succeeded is None
        entry[3] += succeeded is False
    ran = sum(entry[0] for entry in by_asset.values())
    lines = [f"\nWall time per asset ({ran:.1f} s in steps):"]
    for key, (seconds, n, skipped, failed) in sorted(by_asset.items(), key=lambda item: -item[1][0]):
        if skipped == n:
            note = "up to date, skipped"
        else:
            note = f"{seconds:8.1f} s" + (f"  ({n - skipped} partitions)" if n - skipped > 1 else "")
            if failed:
                note += f"  ({failed} failed)"
        lines.append(f"  {key:<28} {note}")
    return "\n".join(lines)


def run_warnings(instance, run_id: str) -> list[str]:
    """The warnings a run logged (not Dagster's own events), as ``warning: <step>: <message>`` lines."""
    import logging

    return [f"warning: {entry.step_key or 'run'}: {entry.user_message}" for entry in instance.all_logs(run_id)
            if entry.level == logging.WARNING and entry.dagster_event is None]


def run_failure(result, what: str) -> str | None:
    """What went wrong in a ``materialize`` result, in one line (None when it succeeded)."""
    if result.success:
        failed_checks = [e for e in result.get_asset_check_evaluations() if not e.passed]
        if failed_checks:
            names = ", ".join(f"{e.asset_key.to_user_string()}:{e.check_name}" for e in failed_checks)
            return f"asset checks failed for {what}: {names} (open `scgrn ui` for details)"
        return None
    for event in result.all_events:
        if event.is_step_failure:
            error = event.step_failure_data.error
            message = error.message.strip() if error else "unknown error"
            # Our own errors carry the fix; show them plainly instead of a stack trace.
            cause = error.cause if error and error.cause else None
            while cause is not None and cause.cause is not None:
                cause = cause.cause
            detail = cause.message.strip() if cause else message
            detail = re.sub(r"^(scgrn_assets\.lib\.errors\.)?ScgrnInputError: ", "", detail)
            return f"{what} failed at step {event.step_key}: {detail}"
    return f"{what} failed (open `scgrn ui` for the run's logs)"


def _raise_on_failure(result, what: str) -> None:
    failure = run_failure(result, what)
    if failure:
        raise ScgrnInputError(failure)


def cmd_demo(args: argparse.Namespace) -> int:
    from scgrn_assets.settings import current_catalog

    layout = StorageLayout(scgrn_home())
    os.environ.setdefault("SCGRN_CATALOG", "demo")
    catalog = current_catalog()
    print(f"SCGRN_HOME: {layout.home}")
    if catalog.name == "demo":
        ensure_demo_data(layout, catalog)
    status = _materialise_and_report(layout, args.quick, args.select, args.force)
    from scgrn_assets.lib.benchmarks.pipeline import DEMO_SETTINGS, settings_profile
    from scgrn_assets.settings import catalog_name

    if settings_profile(catalog_name()) == "demo" and not args.quick:
        listed = ", ".join(f"{name}={value}" for name, value in DEMO_SETTINGS.items())
        print(f"  demo settings: the peers ran smaller than their published defaults ({listed}); "
              "benchmark_metrics says so in its settings column. Real catalogs use the defaults.")
    return status


def cmd_materialize(args: argparse.Namespace) -> int:
    """Every asset for SCGRN_CATALOG (e.g. ``real``), nothing simulated: files come from the catalog URLs."""
    from scgrn_assets.settings import catalog_name, current_catalog

    layout = StorageLayout(scgrn_home())
    catalog = current_catalog()
    print(f"SCGRN_HOME: {layout.home}\ncatalog:    {catalog_name()} ({catalog.path}, {len(catalog.studies)} studies)")
    if any(f.sha256 is None for s in catalog.studies for f in s.files):
        print(f"sha256 pins: {catalog.lock_path} (files without a sha256 are pinned on first download)")
    return _materialise_and_report(layout, args.quick, args.select, args.force)


def _materialise_and_report(layout: StorageLayout, quick: bool, selection: str | None = None,
                            force: bool = False) -> int:
    import time

    from scgrn_assets.settings import catalog_name

    started = time.monotonic()
    materialize_everything(layout, catalog_name(), quick=quick, selection=selection, force=force)
    print(f"Total: {time.monotonic() - started:.1f} s")
    from scgrn_assets.lib.sql_store import ensure_database

    ensure_database(layout.duckdb_path)
    print("\nDone. Outputs:")
    print(f"  artefacts:  {layout.home / 'assets'}")
    print(f"  corpus:     {layout.asset_path('combined_corpus', None, '.zarr')}")
    print(f"  SQL tables: {layout.duckdb_path}   (try: scgrn sql \"SELECT * FROM corpus_studies\")")
    print("  web UI:     scgrn ui   then open http://127.0.0.1:3000 (runs, lineage and plots are there)")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from scgrn_assets.lib.demo.geo_layouts import demo_catalog, write_catalog_yaml, write_demo_geo
    from scgrn_assets.lib.demo.simulator import DemoConfig

    config = DemoConfig(seed=args.seed) if args.n_cells is None else \
        DemoConfig.scaled(n_cells=args.n_cells, n_genes=args.n_genes, seed=args.seed)
    out = Path(args.out) if args.out else StorageLayout(scgrn_home()).demo_data
    from tqdm import tqdm

    with tqdm(desc="simulate", unit="file", disable=None) as bar:
        _, written = write_demo_geo(out, config, progress=lambda done, total, **detail: bar.update(1))
    print(f"wrote {len(written)} files under {out}")
    if args.write_catalog:
        write_catalog_yaml(demo_catalog(config, written), Path(args.write_catalog))
        print(f"wrote catalog {args.write_catalog}")
    return 0


def dagster_dev_command(port: int) -> list[str]:
    """``dagster dev`` through this interpreter, so it runs without the venv on PATH (``.venv/bin/scgrn ui``)."""
    return [sys.executable, "-m", "dagster", "dev", "-m", "scgrn_assets.definitions", "-h", "127.0.0.1",
            "-p", str(port)]


def run_until_signalled(command: list[str], env: dict[str, str], *, grace_seconds: float = 30.0) -> int:
    """Run ``command`` in its own process group; on SIGINT/SIGTERM stop it and everything it started.

    ``dagster dev`` starts a webserver, a daemon and code servers that would outlive a killed
    parent and keep serving. The child gets its own session, so a terminal's Ctrl-C reaches it
    once, through us; it is asked to stop (it shuts its children down itself), and whatever is
    left in its process group after ``grace_seconds`` is killed. If we die without a chance to
    forward (kill -9), the kernel sends the child SIGTERM (Linux's parent-death signal).
    """
    import signal

    child = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_stop_when_parent_dies)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)  # dagster dev treats SIGTERM as Ctrl-C: a clean shutdown

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    import time

    try:
        deadline = None
        while child.poll() is None:
            if received and deadline is None:
                deadline = time.monotonic() + grace_seconds
            if deadline is not None and time.monotonic() > deadline:
                break  # asked to stop and did not in time: the group is killed below
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)  # leftovers (a code server that missed the shutdown)
        child.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + received[0] if received else child.returncode


def _stop_when_parent_dies() -> None:
    """In the child, before exec: Linux sends it SIGTERM when this process dies, even by kill -9."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def cmd_ui(args: argparse.Namespace) -> int:
    layout = StorageLayout(scgrn_home())
    _prepare_instance(layout)
    print(f"Dagster UI on http://127.0.0.1:{args.port} over {layout.dagster_home} (Ctrl-C to stop)", flush=True)
    return run_until_signalled(dagster_dev_command(args.port), {**os.environ, "DAGSTER_HOME": str(layout.dagster_home)})


def cmd_status(args: argparse.Namespace) -> int:
    from scgrn_assets import definitions
    from scgrn_assets.settings import catalog_name

    layout = StorageLayout(scgrn_home())
    instance = _prepare_instance(layout)
    print(f"SCGRN_HOME: {layout.home}")
    for asset in definitions.build_definitions(catalog_name(), home=layout.home).assets:
        for key in asset.keys:
            name = key.to_user_string()
            if asset.partitions_def is not None:
                done = instance.get_materialized_partitions(key)
                total = asset.partitions_def.get_partition_keys()
                print(f"  {name:<22} {len(done & set(total))}/{len(total)} partitions  "
                      f"{', '.join(sorted(done)) or '-'}")
            else:
                event = instance.get_latest_materialization_event(key)
                print(f"  {name:<22} {'materialised ' + _iso(event.timestamp) if event else 'not materialised'}")
    return 0


def _iso(timestamp: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


#: The widest integer DuckDB binds (HUGEINT and UHUGEINT: 128 bits, 39 digits).
_SQL_INTEGER_RANGE = (-(1 << 127), (1 << 128) - 1)


def sql_parameter(text: str, position: int = 1) -> int | float | str:
    """A ``--param`` value as SQL should compare it: ``10`` an integer, ``2.5`` a number, anything else text.

    Bound as text, ``SELECT ? > ?`` with 9 and 10 compared strings ('9' > '10' is true).
    Quote a number to keep it text: ``--param "'0012'"`` binds the string 0012. A number SQL cannot
    hold (an integer past 128 bits, a float that overflows to infinity) is an error naming the
    ``position``-th ``--param``, not a traceback or a silent infinity.
    """
    if re.fullmatch(r"[-+]?\d+", text):
        digits = len(text.lstrip("+-").lstrip("0"))
        # Checked on the digits before int(): Python refuses to parse more than 4,300 of them.
        if digits <= 40 and _SQL_INTEGER_RANGE[0] <= int(text) <= _SQL_INTEGER_RANGE[1]:
            return int(text)
        raise _unbindable_number(text, position, "an integer wider than SQL's 128-bit integers")
    if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?", text):
        value = float(text)
        if abs(value) != float("inf"):
            return value
        raise _unbindable_number(text, position, "a number too large for a DOUBLE (it would be infinity)")
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1]
    return text


def _sql_seconds(text: str) -> float:
    """``--timeout``: a number of seconds, 0 (no limit) or more."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (e.g. 60; 0: no limit)")
    return seconds


def _unbindable_number(text: str, position: int, problem: str) -> ScgrnInputError:
    shown = text if len(text) <= 40 else f"{text[:20]}...{text[-10:]}, {len(text)} characters"
    return ScgrnInputError(f"--param number {position} ({shown}) is {problem}",
                           fix="give a smaller number, or quote it to bind it as text: --param \"'<digits>'\"")


def cmd_sql(args: argparse.Namespace) -> int:
    from scgrn_assets.lib.sql_store import query

    layout = StorageLayout(scgrn_home())
    parameters = [sql_parameter(value, position) for position, value in enumerate(args.param or [], start=1)]
    limits = {} if args.timeout is None else {"timeout_s": args.timeout or None}  # 0: no time limit
    if args.memory_limit is not None:
        limits["memory_limit"] = args.memory_limit
    table = query(layout.duckdb_path, args.sql, parameters, **limits)
    print(table.to_string(index=False, max_rows=args.max_rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scgrn", description=__doc__,
                                     epilog="Storage root: $SCGRN_HOME (default ~/.scgrn). "
                                            "Catalog: $SCGRN_CATALOG (a built-in name or a YAML path; default demo).")
    commands = parser.add_subparsers(dest="command", required=True)
    select_help = ("materialise only these assets, in Dagster's selection syntax: 'group:ingest', "
                   "'group:ingest or group:corpus', 'key:combined_corpus+' (and what follows it), "
                   "'+condition_effects' (and its inputs); inputs outside the selection must already be materialised")
    force_help = ("recompute even what is up to date (by default an asset materialised with the same code, "
                  "settings, catalog and inputs is skipped)")
    quick_help = "a smoke run: few model-training steps, small null draws (numbers not meaningful)"
    demo = commands.add_parser("demo", help="simulate the demo studies and materialise every asset")
    demo.add_argument("--quick", action="store_true", help=quick_help)
    demo.add_argument("--select", metavar="SELECTION", help=select_help)
    demo.add_argument("--force", action="store_true", help=force_help)
    demo.set_defaults(func=cmd_demo)
    materialize = commands.add_parser("materialize", help="materialise every asset for SCGRN_CATALOG "
                                                          "(e.g. real: downloads from GEO), nothing simulated")
    materialize.add_argument("--quick", action="store_true", help=quick_help)
    materialize.add_argument("--select", metavar="SELECTION", help=select_help)
    materialize.add_argument("--force", action="store_true", help=force_help)
    materialize.set_defaults(func=cmd_materialize)
    simulate = commands.add_parser("simulate", help="write the simulated GEO studies (and optionally a catalog)")
    simulate.add_argument("--out", help="folder (default SCGRN_HOME/demo_geo)")
    simulate.add_argument("--seed", type=int, default=7, help="random seed of the simulation (default 7, the demo's)")
    simulate.add_argument("--n-cells", type=int, help="scale option: total cells (e.g. 186000)")
    simulate.add_argument("--n-genes", type=int, default=30_000, help="with --n-cells: total genes (default 30000)")
    simulate.add_argument("--write-catalog", help="also write a catalog YAML addressing the files")
    simulate.set_defaults(func=cmd_simulate)
    ui = commands.add_parser("ui", help="start the Dagster web UI on 127.0.0.1 over SCGRN_HOME")
    ui.add_argument("--port", type=int, default=3000,
                    help="port on 127.0.0.1 to serve on (default 3000); Ctrl-C or SIGTERM stops the UI and its daemon")
    ui.set_defaults(func=cmd_ui)
    status = commands.add_parser("status", help="list what is materialised")
    status.set_defaults(func=cmd_status)
    for name, help_text in (("sql", "run read-only SQL on SCGRN_HOME/scgrn.duckdb"),
                            ("edges", "the same, for the network tables (edges, mi_edges, cmi_edges, ...)")):
        sql = commands.add_parser(name, help=help_text, description=f"{help_text}. SELECT statements only (also "
                                  "SHOW TABLES, DESCRIBE t): nothing is written, and only the registered tables "
                                  "can be read.")
        sql.add_argument("sql", metavar="SQL", help="one SELECT query, e.g. \"SELECT * FROM corpus_studies "
                                                    "WHERE n_cells > ?\"; list tables with \"SHOW TABLES\"")
        sql.add_argument("--param", action="append", metavar="VALUE",
                         help="a value bound to the next ? placeholder (repeatable); numbers are bound as numbers, "
                              "'quoted' values as text")
        sql.add_argument("--max-rows", type=int, default=50, help="rows to print at most (default 50)")
        # Defaults (None) are sql_store's: DEFAULT_QUERY_TIMEOUT_S, DEFAULT_QUERY_MEMORY_LIMIT (a test checks the help).
        sql.add_argument("--timeout", type=_sql_seconds, metavar="SECONDS",
                         help="stop the query after this many seconds (default 60; 0: no limit): a running query "
                              "holds up writers, which wait for it at most $SCGRN_LOCK_WAIT_S seconds (default 600)")
        sql.add_argument("--memory-limit", metavar="SIZE",
                         help="memory the query may use, e.g. 500MB or 8GB (default 2GB); nothing spills to disk, "
                              "so a query that needs more stops with a message")
        sql.set_defaults(func=cmd_sql)
    from scgrn_assets.cli_benchmark import add_benchmark_parser

    add_benchmark_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Our own progress bar speaks; model files are local, so the hub is never asked.
    for name, value in {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                        "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(name, value)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ScgrnInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

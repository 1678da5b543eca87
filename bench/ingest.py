"""Ingest benchmark: extract + parse + harmonise + combine a large simulated corpus.

Baseline (the floor): `gzip -dc` of the same count files (tar members piped through
`tar -xO`), i.e. the cost of just decompressing the bytes we must read. Ours: every study
streamed into its .h5ad, then the combined Zarr corpus, in a child process whose peak RSS
is measured. Goals: throughput >= 0.5 x the floor; peak RSS < 2 GB at 186k cells. On a
shared machine the floor and ours alternate (--repeat rounds) and their medians are compared.

    .venv/bin/python bench/ingest.py            # ~30k cells x 15k genes (a few minutes), 3 rounds
    .venv/bin/python bench/ingest.py --full     # 186k cells x 30k genes
    .venv/bin/python bench/ingest.py --full --data-dir /tmp/ingest_full   # simulate once, reuse later

Last line: RESULT name=ingest ratio=<ours / floor throughput> goal=0.5 peak_rss_gb=<...>
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def simulate(out: Path, n_cells: int, n_genes: int) -> Path:
    from scgrn_assets.lib.demo.geo_layouts import demo_catalog, write_catalog_yaml, write_demo_geo
    from scgrn_assets.lib.demo.simulator import DemoConfig

    config = DemoConfig.scaled(n_cells=n_cells, n_genes=n_genes)
    _, written = write_demo_geo(out / "demo_geo", config)
    catalog = out / "catalog.yaml"
    write_catalog_yaml(demo_catalog(config, written), catalog)
    return catalog


def count_files(catalog_path: Path, home: Path) -> list[Path]:
    from scgrn_assets.lib.ingest.catalog import load_catalog

    catalog = load_catalog(catalog_path, variables={"SCGRN_HOME": str(home)})
    return [home / "demo_geo" / s.accession / f.name for s in catalog.studies for f in s.files_with_role("counts")]


def _gzip_command(path: Path) -> str:
    return (f"tar -xOf '{path}' --wildcards '*.gz' | gzip -dc" if path.suffix == ".tar"
            else f"gzip -dc '{path}'")


def decompressed_bytes(files: list[Path]) -> int:
    return sum(int(subprocess.run(f"{_gzip_command(p)} | wc -c", shell=True, capture_output=True, text=True,
                                  check=True).stdout) for p in files)


def floor_seconds(files: list[Path]) -> float:
    """Wall time of decompressing every count file with gzip (the floor)."""
    start = time.perf_counter()
    for path in files:
        subprocess.run(f"{_gzip_command(path)} > /dev/null", shell=True, check=True)
    return time.perf_counter() - start


def ours_once(catalog: Path, home: Path) -> dict:
    """One ingest in a fresh process (its peak RSS is the ingest's alone); outputs removed after."""
    shutil.rmtree(home / "bench_out", ignore_errors=True)
    child = subprocess.run([sys.executable, __file__, "--child", str(catalog), str(home)], capture_output=True,
                           text=True)
    shutil.rmtree(home / "bench_out", ignore_errors=True)
    if child.returncode != 0:
        sys.exit(f"ingest failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def ours_child(catalog_path: str, home: str) -> None:
    """Runs in a fresh process so its peak RSS is the ingest's alone."""
    from scgrn_assets.lib.ingest.catalog import load_catalog
    from scgrn_assets.lib.corpus.build import combine_studies
    from scgrn_assets.lib.ingest.study_anndata import write_study_h5ad

    home_path = Path(home)
    catalog = load_catalog(catalog_path, variables={"SCGRN_HOME": home})
    start = time.perf_counter()
    outputs = {}
    for study in catalog.studies:
        outputs[study.accession] = home_path / "bench_out" / f"{study.accession}.h5ad"
        write_study_h5ad(study, home_path / "demo_geo" / study.accession, outputs[study.accession],
                         condition_levels=catalog.condition_levels)
    summary = combine_studies(outputs, home_path / "bench_out" / "corpus.zarr")
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_gb": peak_kb / 2**20, "n_cells": summary.n_cells,
                      "n_genes": summary.n_genes}))


def run_bench(home: Path, n_cells: int, n_genes: int, repeat: int) -> None:
    catalog = home / "catalog.yaml"
    if catalog.exists():
        print(f"reusing the simulated files in {home}", flush=True)
    else:
        start = time.perf_counter()
        catalog = simulate(home, n_cells, n_genes)
        print(f"simulated {n_cells} cells x {n_genes} genes in {time.perf_counter() - start:.0f} s", flush=True)
    files = count_files(catalog, home)
    compressed = sum(p.stat().st_size for p in files)
    n_bytes = decompressed_bytes(files)
    # The machine is shared: floor and ours alternate, and the medians are compared, so that a
    # burst of load elsewhere hits both alike instead of deciding the ratio.
    floors, runs = [], []
    for _ in range(repeat):
        floors.append(floor_seconds(files))
        runs.append(ours_once(catalog, home))
    floor = statistics.median(floors)
    seconds = statistics.median(r["seconds"] for r in runs)
    peak_rss_gb = max(r["peak_rss_gb"] for r in runs)
    print(f"floor (gzip -dc): {floor:.1f} s for {compressed / 1e6:.0f} MB compressed, "
          f"{n_bytes / 1e6:.0f} MB decompressed -> {n_bytes / 1e6 / floor:.0f} MB/s "
          f"(median of {', '.join(f'{f:.1f}' for f in floors)} s)", flush=True)
    print(f"ours (extract+parse+h5ad+combine): {seconds:.1f} s -> {n_bytes / 1e6 / seconds:.0f} MB/s "
          f"(median of {', '.join(f'{r:.1f}' for r in (run['seconds'] for run in runs))} s), "
          f"peak RSS {peak_rss_gb:.2f} GB, "
          f"corpus {runs[0]['n_cells']} x {runs[0]['n_genes']}")
    print(f"RESULT name=ingest ratio={floor / seconds:.2f} goal=0.5 peak_rss_gb={peak_rss_gb:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="186,000 cells x 30,000 genes")
    parser.add_argument("--n-cells", type=int, default=30_000)
    parser.add_argument("--n-genes", type=int, default=15_000)
    parser.add_argument("--workdir", help="make the temporary folder here (default: the system's)")
    parser.add_argument("--data-dir", help="keep the simulated files here and reuse them on later runs "
                                           "(simulated only when DATA_DIR/catalog.yaml is missing)")
    parser.add_argument("--simulate-only", action="store_true", help="with --data-dir: simulate, then stop")
    parser.add_argument("--repeat", type=int, help="floor and ours measured this many times each, alternately; "
                                                   "medians compared (default 3, 1 with --full)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        ours_child(*args.child)
        return
    n_cells, n_genes = (186_000, 30_000) if args.full else (args.n_cells, args.n_genes)
    repeat = args.repeat or (1 if args.full else 3)
    if args.data_dir:
        home = Path(args.data_dir).resolve()
        home.mkdir(parents=True, exist_ok=True)
        if args.simulate_only:
            if not (home / "catalog.yaml").exists():
                start = time.perf_counter()
                simulate(home, n_cells, n_genes)
                print(f"simulated {n_cells} cells x {n_genes} genes in {time.perf_counter() - start:.0f} s")
            return
        run_bench(home, n_cells, n_genes, repeat)
        return
    if args.simulate_only:
        parser.error("--simulate-only needs --data-dir")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        run_bench(Path(tmp), n_cells, n_genes, repeat)


if __name__ == "__main__":
    main()

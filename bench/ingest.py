"""Ingest benchmark: extract + parse + harmonise + combine a large simulated corpus.

Baseline (the floor): `gzip -dc` of the same count files (tar members piped through
`tar -xO`), i.e. the cost of just decompressing the bytes we must read. Ours: every study
streamed into its .h5ad, then the combined Zarr corpus, in a child process whose peak RSS
is measured. Goals: throughput >= 0.5 x the floor; peak RSS < 2 GB at 186k cells.

    .venv/bin/python bench/ingest.py            # ~30k cells x 15k genes (a few minutes)
    .venv/bin/python bench/ingest.py --full     # 186k cells x 30k genes

Last line: RESULT name=ingest ratio=<ours / floor throughput> goal=0.5 peak_rss_gb=<...>
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def simulate(out: Path, n_cells: int, n_genes: int) -> Path:
    from scgrn_assets.lib.demo_geo import demo_catalog, write_catalog_yaml, write_demo_geo
    from scgrn_assets.lib.simulate import DemoConfig

    config = DemoConfig.scaled(n_cells=n_cells, n_genes=n_genes)
    _, written = write_demo_geo(out / "demo_geo", config)
    catalog = out / "catalog.yaml"
    write_catalog_yaml(demo_catalog(config, written), catalog)
    return catalog


def count_files(catalog_path: Path, home: Path) -> list[Path]:
    from scgrn_assets.lib.catalog import load_catalog

    catalog = load_catalog(catalog_path, variables={"SCGRN_HOME": str(home)})
    return [home / "demo_geo" / s.accession / f.name for s in catalog.studies for f in s.files_with_role("counts")]


def floor_seconds(files: list[Path]) -> tuple[float, int]:
    """Wall time of decompressing every count file with gzip, and the decompressed bytes."""
    def command(path: Path) -> str:
        return (f"tar -xOf '{path}' --wildcards '*.gz' | gzip -dc" if path.suffix == ".tar"
                else f"gzip -dc '{path}'")

    n_bytes = sum(int(subprocess.run(f"{command(p)} | wc -c", shell=True, capture_output=True, text=True,
                                     check=True).stdout) for p in files)
    start = time.perf_counter()
    for path in files:
        subprocess.run(f"{command(path)} > /dev/null", shell=True, check=True)
    return time.perf_counter() - start, n_bytes


def ours_child(catalog_path: str, home: str) -> None:
    """Runs in a fresh process so its peak RSS is the ingest's alone."""
    from scgrn_assets.lib.catalog import load_catalog
    from scgrn_assets.lib.corpus import combine_studies
    from scgrn_assets.lib.study_anndata import write_study_h5ad

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="186,000 cells x 30,000 genes")
    parser.add_argument("--n-cells", type=int, default=30_000)
    parser.add_argument("--n-genes", type=int, default=15_000)
    parser.add_argument("--workdir", help="keep files here (default: a temporary folder)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        ours_child(*args.child)
        return
    n_cells, n_genes = (186_000, 30_000) if args.full else (args.n_cells, args.n_genes)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        home = Path(tmp)
        start = time.perf_counter()
        catalog = simulate(home, n_cells, n_genes)
        print(f"simulated {n_cells} cells x {n_genes} genes in {time.perf_counter() - start:.0f} s", flush=True)
        files = count_files(catalog, home)
        compressed = sum(p.stat().st_size for p in files)
        floor, n_bytes = floor_seconds(files)
        print(f"floor (gzip -dc): {floor:.1f} s for {compressed / 1e6:.0f} MB compressed, "
              f"{n_bytes / 1e6:.0f} MB decompressed -> {n_bytes / 1e6 / floor:.0f} MB/s", flush=True)
        child = subprocess.run([sys.executable, __file__, "--child", str(catalog), str(home)], capture_output=True,
                               text=True)
        if child.returncode != 0:
            sys.exit(f"ingest failed:\n{child.stderr[-3000:]}")
        ours = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"ours (extract+parse+h5ad+combine): {ours['seconds']:.1f} s -> {n_bytes / 1e6 / ours['seconds']:.0f} "
              f"MB/s, peak RSS {ours['peak_rss_gb']:.2f} GB, corpus {ours['n_cells']} x {ours['n_genes']}")
        ratio = floor / ours["seconds"]
        print(f"RESULT name=ingest ratio={ratio:.2f} goal=0.5 peak_rss_gb={ours['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()

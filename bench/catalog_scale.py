"""Catalog scale: how long loading (parsing and validating) a 10,000-study catalog takes.

Writes a catalog of ``--studies`` studies shaped like the real one (two files each, a series
matrix join, a condition rule; no sha256, so every file is left to trust on first use) to a
temporary folder and times :func:`scgrn_assets.lib.ingest.catalog.load_catalog` on it: the strict
YAML parse (aliases and duplicate keys refused, keys read as written, only true/false booleans)
and the schema validation, everything ``scgrn`` does before the first study is touched. The goal
is 5 s for 10,000 studies.

Not measured yet: the Dagster side of a large catalog (one partition per study: the per-partition
overhead of building definitions, listing partitions and launching runs).

    .venv/bin/python bench/catalog_scale.py                 # 10,000 studies, best of 3 loads
    .venv/bin/python bench/catalog_scale.py --studies 1000 --repeats 1

The last line is ``RESULT name=catalog_scale studies=<n> load_s=<seconds> goal=5``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL_SECONDS = 5


def catalog_text(n_studies: int) -> str:
    """A catalog of ``n_studies`` studies, written as a person would (block style, flow maps inline)."""
    lines = ["name: scale", "description: a synthetic catalog for bench/catalog_scale.py",
             "condition_levels: [control, AD]", "studies:"]
    for index in range(n_studies):
        accession = f"GSE{100_000 + index}"
        folder = f"https://ftp.ncbi.nlm.nih.gov/geo/series/{accession[:-3]}nnn/{accession}"
        lines += [
            f"- accession: {accession}",
            f"  title: synthetic study {index}, 5XFAD and C57BL/6 microglia",
            "  species: mouse",
            "  format: raw_tar_dense_tsv",
            "  gene_id_type: symbol",
            "  files:",
            f"  - name: {accession}_RAW.tar",
            f"    url: {folder}/suppl/{accession}_RAW.tar",
            "    role: counts",
            f"  - name: {accession}_series_matrix.txt.gz",
            f"    url: {folder}/matrix/{accession}_series_matrix.txt.gz",
            "    role: metadata",
            f"  metadata: {{file: {accession}_series_matrix.txt.gz, sample_column: geo_accession}}",
            "  condition:",
            "    column: strain",
            "    values: {5XFAD: AD, C57BL/6: control}",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3, help="loads timed; the best is reported")
    args = parser.parse_args()

    import yaml

    from scgrn_assets.lib.ingest.catalog import load_catalog

    with tempfile.TemporaryDirectory(prefix="catalog_scale_") as folder:
        path = Path(folder) / "scale.yaml"
        path.write_text(catalog_text(args.studies))
        times = []
        for _ in range(max(1, args.repeats)):
            started = time.perf_counter()
            catalog = load_catalog(path, variables={"SCGRN_HOME": folder})
            times.append(time.perf_counter() - started)
            assert len(catalog.studies) == args.studies
        size_mb = path.stat().st_size / 1e6
    print(f"catalog_scale: {args.studies} studies ({size_mb:.1f} MB of YAML), libyaml={yaml.__with_libyaml__}; "
          f"load times {', '.join(f'{t:.2f}' for t in times)} s")
    print(f"RESULT name=catalog_scale studies={args.studies} load_s={min(times):.2f} goal={GOAL_SECONDS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Writes the simulated demo studies in real GEO layouts, plus the truth and the demo catalog.

Each study takes the on-disk layout of a real GEO series, quirks included, so the same
download, extract and parse code runs on the demo as on GEO:

- GSE900001, like GSE98969: ``GSE900001_RAW.tar`` of ``GSM…_<name>.txt.gz`` (genes x cells,
  tab-separated, MARS-seq UMI counts) and an SraRunTable whose ``strain`` is 5XFAD or C57BL/6;
- GSE900002, like GSE123025: one ``…_processed_data.csv.gz`` (genes x cells, R write.csv
  quoting, cells named ``<well>.<plate>``) and a per-cell SraRunTable joined on
  ``well_id`` + ``plate_id``, where an empty plate id in one row makes pandas read plate
  ids as floats;
- GSE900003, like GSE121654: ``GSM…_<name>.dge.txt.gz`` Drop-seq DGE files in a RAW tar,
  symbols that start with a digit carry R's ``X`` prefix; no AD/control contrast;
- GSE900004: 10x ``matrix.mtx.gz`` / ``features.tsv.gz`` / ``barcodes.tsv.gz`` per sample
  in a RAW tar, genes as Ensembl IDs with symbols beside them.

Every file is written byte-for-byte deterministically (gzip mtime 0, fixed tar headers),
so the demo catalog can pin sha256 values.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml

from scgrn_assets.lib.ingest.dense_text import format_dense_text_rows
from scgrn_assets.lib.demo.simulator import DemoConfig, DemoTruth, simulate_sample_counts, simulate_truth
from scgrn_assets.lib.ingest import formats
from scgrn_assets.lib.ingest.download import sha256_of
from scgrn_assets.lib.progress import Progress, for_stage, report
from scgrn_assets.lib.storage import atomic_path

#: Demo studies by position in the simulator's design, with the GEO layout each one imitates.
DEMO_LAYOUTS = (formats.RAW_TAR_DENSE_TSV, formats.PROCESSED_CSV_WELL_PLATE, formats.RAW_TAR_DROPSEQ_DGE,
                formats.RAW_TAR_10X_MTX)
_FIXED_MTIME = 1_500_000_000  # tar member mtime: any constant keeps the archive's sha256 stable
_GZIP_LEVEL = 6
CATALOG_URL_ROOT = "file://${SCGRN_HOME}/demo_geo"


@dataclass
class WrittenFile:
    study: str
    name: str
    path: Path
    sha256: str
    role: str


def _gzip_bytes(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=_GZIP_LEVEL, mtime=0, filename="") as handle:
        handle.write(data)
    return buffer.getvalue()


class _DeterministicTar:
    """A tar written member by member (one sample in memory at a time) with fixed headers;
    a context manager that renames the archive into place only when it is complete."""

    def __init__(self, path: Path):
        self._context = atomic_path(path)

    def __enter__(self) -> "_DeterministicTar":
        self._tar = tarfile.open(self._context.__enter__(), mode="w", format=tarfile.USTAR_FORMAT)
        return self

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = _FIXED_MTIME
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def __exit__(self, *exc_info) -> None:
        self._tar.close()
        self._context.__exit__(*exc_info)


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _dense_text(symbols: list[str], counts: sp.csr_matrix, header: list[str], sep: str) -> bytes:
    # genes x cells: the transpose of the simulator's cells x genes.
    body = format_dense_text_rows(symbols, counts.T.toarray(), sep=sep)
    return (sep.join(header) + "\n").encode() + body


def _r_make_names(symbol: str) -> str:
    return f"X{symbol}" if symbol[:1].isdigit() else symbol


def _sra_run_table(rows: list[dict]) -> bytes:
    return pd.DataFrame(rows).to_csv(index=False).encode()


def write_demo_geo(out_dir: Path, config: DemoConfig = DemoConfig(), *,
                   progress: Progress | None = None) -> tuple[DemoTruth, list[WrittenFile]]:
    """Simulate and write every demo study and the truth under ``out_dir``.

    Returns the truth and the files written (with sha256) for the catalog. ``progress(done, total,
    stage=study, file=name)`` is called as each count file or archive member of a study is written.
    """
    truth = simulate_truth(config)
    written: list[WrittenFile] = []
    for design, layout in zip(config.studies, DEMO_LAYOUTS):
        study_dir = out_dir / design.accession
        study_dir.mkdir(parents=True, exist_ok=True)
        writer = _LAYOUT_WRITERS[layout]
        for name, role in writer(truth, design.accession, study_dir, for_stage(progress, design.accession)):
            path = study_dir / name
            written.append(WrittenFile(design.accession, name, path, sha256_of(path), role))
    truth_dir = out_dir / "truth"
    for name in write_truth_files(truth, truth_dir):
        path = truth_dir / name
        written.append(WrittenFile("truth", name, path, sha256_of(path), "truth"))
    return truth, written


def _study_samples(truth: DemoTruth, study: str) -> pd.DataFrame:
    return truth.samples[truth.samples["study"] == study].reset_index(drop=True)


def _write_sample_tar(truth: DemoTruth, study: str, study_dir: Path, progress: Progress | None, *,
                      member_suffix: str, corner: str, symbol_of, run_rows_of, extra_members=()) -> list[dict]:
    """A GEO ``<study>_RAW.tar`` of one gzipped genes x cells text file per sample (the layouts differ
    in the file suffix, the header's first cell and how symbols are written); returns the SRA run rows
    ``run_rows_of(index, sample)`` gives for each sample."""
    symbols_all = truth.genes["gene_symbol"].tolist()
    runs = []
    samples = _study_samples(truth, study)
    with _DeterministicTar(study_dir / f"{study}_RAW.tar") as archive:
        for index, sample in samples.iterrows():
            counts, cells, genes = simulate_sample_counts(truth, study, sample["sample"])
            header = [corner] + cells["barcode"].tolist()
            member = f"{sample['sample']}_{sample['sample_name']}{member_suffix}"
            symbols = [symbol_of(symbols_all[g]) for g in genes]
            archive.add(member, _gzip_bytes(_dense_text(symbols, counts, header, "\t")))
            report(progress, index + 1, len(samples), file=f"{study}/{member}")
            runs.extend(run_rows_of(index, sample))
        for name, data in extra_members:
            archive.add(name, data)
    return runs


def _write_raw_tar_dense_tsv(truth: DemoTruth, study: str, study_dir: Path, progress: Progress | None):
    def run_rows(index: int, sample) -> list[dict]:
        strain = {"AD": "5XFAD", "control": "C57BL/6"}.get(sample["condition"], "C57BL/6")
        # Two sequencing runs per sample, as SRA lists them.
        return [{"Run": f"SRR{9_000_000 + index * 2 + run + int(study[3:]) * 100}",
                 "Assay Type": "RNA-Seq", "AvgSpotLen": 75, "BioSample": f"SAMN{int(study[3:])}{index:03d}",
                 "Organism": "Mus musculus", "Sample Name": sample["sample"],
                 "source_name": "microglia", "strain": strain, "tissue": "brain"} for run in range(2)]

    # GEO RAW tars also carry files the reader must skip.
    runs = _write_sample_tar(truth, study, study_dir, progress, member_suffix=".txt.gz", corner="",
                             symbol_of=lambda symbol: symbol, run_rows_of=run_rows,
                             extra_members=[("filelist.txt", b"Archive\tName\n")])
    metadata_name = f"{study}_SraRunTable.csv"
    _write_bytes(study_dir / metadata_name, _sra_run_table(runs))
    return [(f"{study}_RAW.tar", "counts"), (metadata_name, "metadata")]


def _write_processed_csv_well_plate(truth: DemoTruth, study: str, study_dir: Path, progress: Progress | None):
    symbols_all = truth.genes["gene_symbol"].tolist()
    blocks, cell_columns, runs, gene_sets = [], [], [], []
    for plate_number, (_, sample) in enumerate(_study_samples(truth, study).iterrows(), start=1):
        counts, cells, genes = simulate_sample_counts(truth, study, sample["sample"])
        blocks.append(counts)
        gene_sets.append(genes)
        for cell_index, well in enumerate(cells["well_id"]):
            cell_columns.append(f"{well}.{plate_number}")
            runs.append({"Run": f"SRR{8_000_000 + len(runs)}", "Assay Type": "RNA-Seq", "AvgSpotLen": 150,
                         "Organism": "Mus musculus", "Sample Name": f"GSM{8_000_000 + len(runs)}",
                         "genotype": "5XFAD" if sample["condition"] == "AD" else "wild type",
                         "plate_id": plate_number, "well_id": well, "source_name": "microglia"})
    # A bulk control run without a plate: its empty plate_id turns the column into floats.
    runs.append({"Run": f"SRR{8_000_000 + len(runs)}", "Assay Type": "RNA-Seq", "AvgSpotLen": 150,
                 "Organism": "Mus musculus", "Sample Name": "GSM7999999", "genotype": "wild type",
                 "plate_id": None, "well_id": "bulk", "source_name": "bulk microglia"})
    genes = gene_sets[0]
    if any(not np.array_equal(g, genes) for g in gene_sets):
        raise ValueError("the processed table needs one gene set for all plates")
    counts = sp.vstack(blocks, format="csr")
    header = ['""'] + [f'"{c}"' for c in cell_columns]
    quoted = [f'"{symbols_all[g]}"' for g in genes]
    name = f"{study}_Single_myeloid_{counts.shape[0]}_cells_processed_data.csv.gz"
    _write_bytes(study_dir / name, _gzip_bytes(_dense_text(quoted, counts, header, ",")))
    report(progress, 1, 1, file=f"{study}/{name}")
    runs_table = pd.DataFrame(runs)
    runs_table["plate_id"] = runs_table["plate_id"].astype(float)  # written as 1.0, 2.0, ... like the real file
    metadata_name = f"{study}_SraRunTable.csv"
    _write_bytes(study_dir / metadata_name, runs_table.to_csv(index=False).encode())
    return [(name, "counts"), (metadata_name, "metadata")]


def _write_raw_tar_dropseq_dge(truth: DemoTruth, study: str, study_dir: Path, progress: Progress | None):
    def run_rows(index: int, sample) -> list[dict]:
        return [{"Run": f"SRR{7_000_000 + index}", "Assay Type": "RNA-Seq", "AvgSpotLen": 60,
                 "Organism": "Mus musculus", "Sample Name": sample["sample"],
                 "age": ["P5", "P30", "P100"][index % 3], "source_name": "microglia", "strain": "C57BL/6J"}]

    runs = _write_sample_tar(truth, study, study_dir, progress, member_suffix=".dge.txt.gz", corner="GENE",
                             symbol_of=_r_make_names, run_rows_of=run_rows)
    metadata_name = f"{study}_SraRunTable.csv"
    _write_bytes(study_dir / metadata_name, _sra_run_table(runs))
    return [(f"{study}_RAW.tar", "counts"), (metadata_name, "metadata")]


def _mtx_bytes(counts: sp.csr_matrix) -> bytes:
    coo = counts.T.tocoo()  # features x barcodes, as 10x writes it
    order = np.lexsort((coo.row, coo.col))
    lines = np.column_stack([coo.row[order] + 1, coo.col[order] + 1, coo.data[order]]).astype(np.int64)
    header = (b"%%MatrixMarket matrix coordinate integer general\n%metadata_json: {}\n" +
              f"{coo.shape[0]} {coo.shape[1]} {coo.nnz}\n".encode())
    body = format_dense_text_rows([str(v) for v in lines[:, 0]], lines[:, 1:], sep=" ")
    return header + body


def _write_raw_tar_10x_mtx(truth: DemoTruth, study: str, study_dir: Path, progress: Progress | None):
    genes_table = truth.genes
    tar_name = f"{study}_RAW.tar"
    runs = []
    samples = _study_samples(truth, study)
    with _DeterministicTar(study_dir / tar_name) as archive:
        for index, sample in samples.iterrows():
            counts, cells, genes = simulate_sample_counts(truth, study, sample["sample"])
            prefix = f"{sample['sample']}_{sample['sample_name']}_"
            features = "".join(f"{genes_table.at[g, 'ensembl_id']}\t{genes_table.at[g, 'gene_symbol']}\t"
                               "Gene Expression\n" for g in genes)
            barcodes = "".join(f"{b}-1\n" for b in cells["barcode"])
            # Members in barcodes, features, matrix order: the reader must not assume one.
            archive.add(prefix + "barcodes.tsv.gz", _gzip_bytes(barcodes.encode()))
            archive.add(prefix + "features.tsv.gz", _gzip_bytes(features.encode()))
            archive.add(prefix + "matrix.mtx.gz", _gzip_bytes(_mtx_bytes(counts)))
            report(progress, index + 1, len(samples), file=f"{study}/{prefix}matrix.mtx.gz")
            runs.append({"Run": f"SRR{6_000_000 + index}", "Assay Type": "RNA-Seq", "AvgSpotLen": 98,
                         "Organism": "Mus musculus", "Sample Name": sample["sample"],
                         "genotype": "5XFAD" if sample["condition"] == "AD" else "WT",
                         "source_name": "microglia"})
    metadata_name = f"{study}_SraRunTable.csv"
    _write_bytes(study_dir / metadata_name, _sra_run_table(runs))
    return [(tar_name, "counts"), (metadata_name, "metadata")]


_LAYOUT_WRITERS = {
    formats.RAW_TAR_DENSE_TSV: _write_raw_tar_dense_tsv,
    formats.PROCESSED_CSV_WELL_PLATE: _write_processed_csv_well_plate,
    formats.RAW_TAR_DROPSEQ_DGE: _write_raw_tar_dropseq_dge,
    formats.RAW_TAR_10X_MTX: _write_raw_tar_10x_mtx,
}

TRUTH_FILES = {
    "trrust": "demo_trrust_rawdata.mouse.tsv",
    "string_links": "10090.protein.links.demo.txt.gz",
    "string_info": "10090.protein.info.demo.txt.gz",
    "condition_effects": "true_condition_effects.tsv",
    "gene_annotation": "gene_annotation.tsv",
}


def write_truth_files(truth: DemoTruth, truth_dir: Path) -> list[str]:
    """The true network as TRRUST raw and STRING v12 links/info files, effects and gene lengths."""
    truth_dir.mkdir(parents=True, exist_ok=True)
    edges = truth.edges
    regulation = np.where(edges["sign"] > 0, "Activation", "Repression")
    trrust = "".join(f"{tf}\t{target}\t{kind}\t{90000000 + i}\n"
                     for i, (tf, target, kind) in enumerate(zip(edges["tf"], edges["target"], regulation)))
    _write_bytes(truth_dir / TRUTH_FILES["trrust"], trrust.encode())

    genes = truth.genes
    protein = {s: f"10090.ENSMUSP{int(e[7:]):011d}" for s, e in zip(genes["gene_symbol"], genes["ensembl_id"])}
    info = "#string_protein_id\tpreferred_name\tprotein_size\tannotation\n" + "".join(
        f"{protein[s]}\t{s}\t{300 + i % 700}\tsimulated protein\n" for i, s in enumerate(genes["gene_symbol"]))
    _write_bytes(truth_dir / TRUTH_FILES["string_info"], _gzip_bytes(info.encode()))
    # STRING lists each interaction in both directions.
    pairs = sorted({(protein[a], protein[b], int(score)) for a, b, score in
                    zip(edges["tf"], edges["target"], edges["string_score"])} |
                   {(protein[b], protein[a], int(score)) for a, b, score in
                    zip(edges["tf"], edges["target"], edges["string_score"])})
    links = "protein1 protein2 combined_score\n" + "".join(f"{a} {b} {s}\n" for a, b, s in pairs)
    _write_bytes(truth_dir / TRUTH_FILES["string_links"], _gzip_bytes(links.encode()))

    effects = genes[["gene_symbol", "beta1"]].rename(columns={"beta1": "true_log_fold_change"})
    _write_bytes(truth_dir / TRUTH_FILES["condition_effects"], effects.to_csv(sep="\t", index=False).encode())
    annotation = genes[["gene_symbol", "ensembl_id", "gene_length_bp"]]
    _write_bytes(truth_dir / TRUTH_FILES["gene_annotation"], annotation.to_csv(sep="\t", index=False).encode())
    return list(TRUTH_FILES.values())


_CONDITION_RULES = {
    formats.RAW_TAR_DENSE_TSV: {"column": "strain", "values": {"5XFAD": "AD", "C57BL/6": "control"}},
    formats.PROCESSED_CSV_WELL_PLATE: {"column": "genotype", "values": {"5XFAD": "AD", "wild type": "control"}},
    formats.RAW_TAR_10X_MTX: {"column": "genotype", "values": {"5XFAD": "AD", "WT": "control"}},
}
_TITLES = {
    formats.RAW_TAR_DENSE_TSV: "Simulated MARS-seq microglia, 5XFAD vs C57BL/6 (GSE98969 layout)",
    formats.PROCESSED_CSV_WELL_PLATE: "Simulated plate-based myeloid cells, 5XFAD vs wild type (GSE123025 layout)",
    formats.RAW_TAR_DROPSEQ_DGE: "Simulated Drop-seq microglia across ages, no AD contrast (GSE121654 layout)",
    formats.RAW_TAR_10X_MTX: "Simulated 10x Chromium microglia, 5XFAD vs WT (10x MTX layout)",
}


def demo_catalog(config: DemoConfig, written: list[WrittenFile]) -> dict:
    """The catalog (as a YAML-ready dict) addressing the written files by ``file://`` URL."""
    studies = []
    by_study: dict[str, list[WrittenFile]] = {}
    for item in written:
        by_study.setdefault(item.study, []).append(item)
    for design, layout in zip(config.studies, DEMO_LAYOUTS):
        files = by_study[design.accession]
        metadata_file = next(f.name for f in files if f.role == "metadata")
        entry = {
            "accession": design.accession,
            "title": _TITLES[layout],
            "species": "mouse",
            "format": layout,
            "gene_id_type": "ensembl" if layout == formats.RAW_TAR_10X_MTX else "symbol",
            "files": [{"name": f.name, "url": f"{CATALOG_URL_ROOT}/{design.accession}/{f.name}",
                       "sha256": f.sha256, "role": f.role} for f in files],
            "metadata": {"file": metadata_file},
            "condition": _CONDITION_RULES.get(layout) if design.has_condition else None,
        }
        if entry["condition"] is None:
            entry.pop("condition")
        studies.append(entry)
    truth = {f.name: f for f in by_study["truth"]}
    annotation = truth[TRUTH_FILES["gene_annotation"]]
    references = [
        {"name": "TRRUST", "format": "trrust", "species": "mouse",
         "files": {"edges": _truth_file(truth, "trrust")}},
        {"name": "STRING", "format": "string_v12", "species": "mouse",
         "files": {"info": _truth_file(truth, "string_info"), "links": _truth_file(truth, "string_links")},
         "options": {"min_combined_score": 700}},
    ]
    return {
        "name": "demo",
        "description": f"Simulated studies in real GEO layouts (seed {config.seed}); truth under demo_geo/truth.",
        "condition_levels": ["control", "AD"],
        # A few hundred genes, not ~20k: cells detect tens of genes, so the per-cell floor is lower.
        "qc": {"min_counts_per_cell": 500, "min_genes_per_cell": 20, "min_cells_per_gene": 3},
        "gene_annotation": {"name": annotation.name, "url": f"{CATALOG_URL_ROOT}/truth/{annotation.name}",
                            "sha256": annotation.sha256},
        "references": references,
        "studies": studies,
    }


def _truth_file(truth: dict[str, WrittenFile], kind: str) -> dict:
    item = truth[TRUTH_FILES[kind]]
    return {"name": item.name, "url": f"{CATALOG_URL_ROOT}/truth/{item.name}", "sha256": item.sha256}


def write_catalog_yaml(catalog: dict, path: Path) -> None:
    header = ("# Generated by `scgrn simulate --write-catalog` from the demo simulator; the sha256 values\n"
              "# pin its deterministic output. Regenerate after changing the simulator.\n")
    _write_bytes(path, (header + yaml.safe_dump(catalog, sort_keys=False, width=120)).encode())

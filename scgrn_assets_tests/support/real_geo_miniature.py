"""Format-faithful miniature copies of the real catalog's GEO files (GEO is not reachable from tests).

:func:`write_miniature_geo` writes, for every URL of ``catalogs/real.yaml``, a small file with
the real file name, compression, separators and quirks seen in code that read the real
files, and records what the files imply (genes per study, cells, conditions, skipped
samples). :func:`serve_miniature_geo` puts them on the test HTTP server at the URL paths of
the catalog, so the catalog's own entries fetch them with only the host swapped
(``SCGRN_URL_MIRROR``).

Quirks reproduced:

- GSE98969/GSE98971 MARS-seq: uncompressed RAW tar of ``GSM…_AB<batch>.txt.gz``; R
  ``write.table`` header listing the wells only (one field shorter than the rows); ERCC
  spike-in rows; digit-initial symbols without ``X``; ``GSM2629430_AB2425.txt.gz`` fails to
  tokenize (a short row), as it did in the original pipeline; "treatment: Alzheimer's
  disease" on every sample, controls included.
- GSE121654 Drop-seq: ``GSM…_<age>_<sex>_<id>.dge.txt.gz`` with a ``GENE`` header; per-sample
  gene sets differ; R's ``X`` prefix on digit-initial symbols (``Xist`` stays); series-matrix
  characteristic lines whose keys differ between samples on the same line.
- GSE123025/GSE123030 Smart-seq2: one R ``write.csv`` table (quoted names), cells
  ``<well>.<plate>``; metadata plate ids written as floats (``1001200107.0``); one GSM without
  well/plate (the real table has 31) and one cell without a metadata row; a bare numeric
  gene name (``100043387``), kept as written.
- GSE74995/GSE130627: GEO's NCBI-generated ``GeneID x GSM`` raw counts and the
  ``Mouse.GRCm39.annot.tsv.gz`` GeneID -> Symbol table, served from www.ncbi.nlm.nih.gov with
  query-string URLs.
"""

from __future__ import annotations

import gzip
import re
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np

from scgrn_assets.lib.ingest.catalog import Catalog
from scgrn_assets_tests.support.archives import tar_bytes

# Mouse genes (symbol, NCBI GeneID) the miniature studies draw from.
GENE_POOL = [
    ("Apoe", 11816), ("Trem2", 83433), ("Tyrobp", 22177), ("Cx3cr1", 13051), ("P2ry12", 70839),
    ("Tmem119", 231633), ("Hexb", 15212), ("Csf1r", 12978), ("Cst7", 13011), ("Lpl", 16956),
    ("Itgax", 16411), ("Cd9", 12527), ("Spp1", 20750), ("Clec7a", 56644), ("Axl", 26362),
    ("Ctsd", 13033), ("Ctsb", 13030), ("Lyz2", 17105), ("C1qa", 12259), ("C1qb", 12260),
    ("C1qc", 12262), ("Fcrls", 80891), ("Sall1", 58198), ("Gpr34", 23890), ("Siglech", 233274),
    ("Olfml3", 99543), ("Mertk", 17289), ("Aif1", 11629), ("Ptprc", 19264), ("Itgam", 16409),
    ("Cd68", 12514), ("Ccl3", 20302), ("Ccl4", 20303), ("Il1b", 16176), ("Cd74", 16149),
    ("H2-Aa", 14960), ("Ifit3", 15959), ("Irf7", 54123), ("Mki67", 17345), ("Top2a", 21973),
    ("Xist", 213742), ("Ddx3y", 26900), ("Malat1", 72289), ("Actb", 11461), ("B2m", 12010),
    ("Mrc1", 17533), ("Pf4", 56744), ("Lyve1", 114332), ("Gpnmb", 93695), ("Igf1", 16000),
    ("0610005C13Rik", 71798), ("1110008P14Rik", 68605), ("2310036O22Rik", 66257),
    ("4930481A15Rik", 74922), ("Gm42418", 115487594),
]
SYMBOLS = [s for s, _ in GENE_POOL]
GENE_ID = dict(GENE_POOL)
RIK = ["0610005C13Rik", "1110008P14Rik", "2310036O22Rik"]
BAD_MARS_SEQ_SAMPLE = "GSM2629430"

_MARS_SEQ_GENES = SYMBOLS[0:34] + RIK[:1]
_MARS_SEQ_SAMPLES = [  # (GSM, amplification batch, strain); the bad one last
    ("GSM2629355", "AB1550", "5XFAD"), ("GSM2629361", "AB1556", "C57BL/6"),
    ("GSM2629417", "AB2333", "5XFAD"), ("GSM2629436", "AB2431", "C57BL/6"),
    (BAD_MARS_SEQ_SAMPLE, "AB2425", "C57BL/6"),
]
_SUPERSERIES_SAMPLES = ("GSM2629355", "GSM2629436", BAD_MARS_SEQ_SAMPLE)
_DROPSEQ_SAMPLES = [  # (GSM, name, age, sex, treatment or "")
    ("GSM3442006", "E14_F_B10", "E14", "F", ""),
    ("GSM3442026", "P100_Male_1", "P100", "M", ""),
    ("GSM3442044", "P100_M_LPC_A4", "P100", "M", "Lysolecithin (LPC) injection"),
]
_SMART_SEQ_GENES = SYMBOLS[28:50] + RIK[1:3] + ["100043387"]
_SMART_SEQ_CELLS = [  # (well, plate, tissue, age); the last cell has no metadata row
    ("C9", "1001200107", "HIP", "P7"), ("B10", "1001200106", "OB", "P7"), ("A8", "1001200106", "OB", "P7"),
    ("D6", "1001200107", "HIP", "P60"), ("B12", "1001200106", "OB", "P60"), ("H8", "1001200140", "CP", "P60"),
    ("H9", "1001200141", "CP", "P60"),
]
_BULK = {
    "GSE74995": {"genes": SYMBOLS[0:20] + SYMBOLS[45:50],
                 "samples": [("GSM1941451", {"age": "4 months", "brain region": "hippocampus", "sex": "male"}),
                             ("GSM1941452", {"age": "4 months", "brain region": "cortex", "sex": "female"}),
                             ("GSM1941453", {"age": "22 months", "brain region": "hippocampus", "sex": "male"}),
                             ("GSM1941454", {"age": "22 months", "brain region": "cortex", "sex": "female"})]},
    "GSE130627": {"genes": SYMBOLS[5:30],
                  "samples": [(f"GSM37472{i:02d}", {"cell type": "microglia", "genotype": g, "diet": d,
                                                    "timepoint": "5 weeks"})
                              for i, (g, d) in enumerate([("WT", "control"), ("WT", "cuprizone"),
                                                          ("Trem2 KO", "control"), ("Trem2 KO", "cuprizone"),
                                                          ("WT", "cuprizone"), ("Trem2 KO", "cuprizone")])]},
}


@dataclass
class MiniatureStudy:
    """What one study's miniature files imply once read."""

    genes: set[str] = field(default_factory=set)      # harmonised symbols the study contributes
    n_cells: int = 0                                    # cells (bulk: libraries) read
    conditions: Counter = field(default_factory=Counter)  # "AD" / "control" / "NA" -> cells
    skipped_samples: list[str] = field(default_factory=list)
    n_cells_without_metadata: int = 0


@dataclass
class MiniatureGEO:
    files: dict[str, bytes]                 # catalog URL -> content
    studies: dict[str, MiniatureStudy]

    @property
    def union(self) -> set[str]:
        return set().union(*(s.genes for s in self.studies.values()))


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _counts(rng: np.random.Generator, n_genes: int, n_cells: int, scale: float = 3.0) -> np.ndarray:
    """genes x cells counts; every cell has at least one count."""
    counts = rng.poisson(rng.gamma(0.6, scale, size=(n_genes, 1)) * rng.uniform(0.3, 1.5, size=(1, n_cells)))
    counts[rng.integers(0, n_genes, size=n_cells), np.arange(n_cells)] += 1
    return counts.astype(np.int64)


def _rows(genes: list[str], counts: np.ndarray, sep: str) -> str:
    return "".join(sep.join([g, *map(str, row)]) + "\n" for g, row in zip(genes, counts))


def _series_matrix(accession: str, samples: list[dict]) -> bytes:
    """A GEO series matrix: quoted, tab-separated ``!Sample_`` lines, then an empty data table."""
    def line(key: str, values: list[str]) -> str:
        return "\t".join([key, *(f'"{v}"' for v in values)]) + "\n"

    gsms = [s["gsm"] for s in samples]
    n_lines = max(len(s["characteristics"]) for s in samples)
    text = (line("!Series_title", [f"{accession} miniature"]) + line("!Series_geo_accession", [accession]) +
            line("!Series_sample_id", [" ".join(gsms) + " "]) + "\n" +
            line("!Sample_title", [s["title"] for s in samples]) + line("!Sample_geo_accession", gsms) +
            line("!Sample_status", ["Public on Jun 12 2017"] * len(samples)) +
            line("!Sample_source_name_ch1", [s["source"] for s in samples]) +
            line("!Sample_organism_ch1", ["Mus musculus"] * len(samples)))
    for index in range(n_lines):
        text += line("!Sample_characteristics_ch1",
                     [s["characteristics"][index] if index < len(s["characteristics"]) else "" for s in samples])
    text += line("!Sample_data_processing", ["counts per gene"] * len(samples))
    text += "!series_matrix_table_begin\n" + "\t".join(['"ID_REF"', *(f'"{g}"' for g in gsms)]) + "\n"
    text += "!series_matrix_table_end\n"
    return _gzip(text.encode())


def _mars_seq(rng, files, studies, catalog: Catalog) -> None:
    members, matrix_samples = {}, {}
    wells = iter(range(660497, 661000))
    for gsm, batch, strain in _MARS_SEQ_SAMPLES:
        cells = [f"W{next(wells)}" for _ in range(4 + len(members) % 3)]
        genes = _MARS_SEQ_GENES + ["ERCC-00002", "ERCC-00003"]
        counts = _counts(rng, len(genes), len(cells))
        body = _rows(genes, counts, "\t")
        if gsm == BAD_MARS_SEQ_SAMPLE:
            lines = body.splitlines(keepends=True)
            lines[10] = "\t".join(lines[10].split("\t")[:3]) + "\n"  # a row cut short: fails to tokenize
            body = "".join(lines)
        members[gsm] = (f"{gsm}_{batch}.txt.gz", _gzip(("\t".join(cells) + "\n" + body).encode()), cells, strain)
        matrix_samples[gsm] = {"gsm": gsm, "title": batch, "source": "Whole brain",
                               "characteristics": [f"strain: {strain}", "treatment: Alzheimer's disease",
                                                   "selection marker: CD45+"]}
    for accession, gsms in (("GSE98969", [m[0] for m in _MARS_SEQ_SAMPLES]), ("GSE98971", _SUPERSERIES_SAMPLES)):
        study = catalog.study(accession)
        expected = MiniatureStudy()
        for gsm in gsms:
            name, _, cells, strain = members[gsm]
            if gsm == BAD_MARS_SEQ_SAMPLE:
                expected.skipped_samples.append(gsm)
                continue
            expected.genes.update(_MARS_SEQ_GENES)
            expected.n_cells += len(cells)
            expected.conditions[{"5XFAD": "AD", "C57BL/6": "control"}[strain]] += len(cells)
        files[study.files_with_role("counts")[0].url] = tar_bytes({members[g][0]: members[g][1] for g in gsms})
        files[study.metadata_file.url] = _series_matrix(accession, [matrix_samples[g] for g in gsms])
        studies[accession] = expected


def _r_make_names(symbol: str) -> str:
    return f"X{symbol}" if symbol[:1].isdigit() else symbol


def _dropseq(rng, files, studies, catalog: Catalog) -> None:
    study = catalog.study("GSE121654")
    expected = MiniatureStudy()
    members, matrix_samples = {}, []
    for index, (gsm, name, age, sex, treatment) in enumerate(_DROPSEQ_SAMPLES):
        genes = SYMBOLS[20 + index:45] + RIK  # each sample detects a slightly different gene set
        barcodes = ["".join(rng.choice(list("ACGT"), size=12)) for _ in range(5 + index)]
        counts = _counts(rng, len(genes), len(barcodes))
        text = "GENE\t" + "\t".join(barcodes) + "\n" + _rows([_r_make_names(g) for g in genes], counts, "\t")
        members[f"{gsm}_{name}.dge.txt.gz"] = _gzip(text.encode())
        expected.genes.update(genes)
        expected.n_cells += len(barcodes)
        expected.conditions["NA"] += len(barcodes)
        # Only the injured samples carry a treatment line, so line 2's key differs between samples.
        characteristics = [f"age: {age}"] + ([f"treatment: {treatment}"] if treatment else []) + [f"Sex: {sex}"]
        matrix_samples.append({"gsm": gsm, "title": name, "source": "microglia", "characteristics": characteristics})
    files[study.files_with_role("counts")[0].url] = tar_bytes(members)
    files[study.metadata_file.url] = _series_matrix("GSE121654", matrix_samples)
    studies["GSE121654"] = expected


def _smart_seq(rng, files, studies, catalog: Catalog) -> None:
    cells = [f"{well}.{plate}" for well, plate, _, _ in _SMART_SEQ_CELLS]
    counts = _counts(rng, len(_SMART_SEQ_GENES), len(cells), scale=300.0)
    header = '""' + "".join(f',"{c}"' for c in cells) + "\n"  # R write.csv: quoted, empty corner
    body = _rows([f'"{g}"' for g in _SMART_SEQ_GENES], counts, ",")
    csv_url = catalog.study("GSE123025").files_with_role("counts")[0].url
    files[csv_url] = _gzip((header + body).encode())
    matrix_samples = []
    for index, (well, plate, tissue, age) in enumerate(_SMART_SEQ_CELLS[:-1]):
        matrix_samples.append({"gsm": f"GSM{3491382 + index}", "title": f"{well}.{plate}",
                               "source": "Brain myeloid cell",
                               "characteristics": [f"tissue: {tissue}", f"age: {age}", "strain: C57BL6N",
                                                   f"well_id: {well}", f"plate_id: {float(plate):.1f}"]})
    # A GSM without well or plate (31 such runs in the real metadata).
    matrix_samples.append({"gsm": "GSM3493303", "title": "unannotated", "source": "Brain myeloid cell",
                           "characteristics": ["strain: C57BL6N"]})
    for accession in ("GSE123025", "GSE123030"):
        study = catalog.study(accession)
        assert study.files_with_role("counts")[0].url == csv_url  # the SuperSeries reads the subseries' table
        files[study.metadata_file.url] = _series_matrix(accession, matrix_samples)
        studies[accession] = MiniatureStudy(genes=set(_SMART_SEQ_GENES), n_cells=len(cells),
                                            conditions=Counter({"NA": len(cells)}), n_cells_without_metadata=1)


def _bulk(rng, files, studies, catalog: Catalog) -> None:
    annotation = "GeneID\tSymbol\tDescription\tTaxID\tStatus\tEnsemblGeneID\tGeneType\n" + "".join(
        f"{gene_id}\t{symbol}\t{symbol} description\t10090\tlive\t\tprotein-coding\n" for symbol, gene_id in GENE_POOL)
    for accession, design in _BULK.items():
        study = catalog.study(accession)
        gsms = [gsm for gsm, _ in design["samples"]]
        counts = _counts(rng, len(design["genes"]), len(gsms), scale=4000.0)
        text = "GeneID\t" + "\t".join(gsms) + "\n" + _rows([str(GENE_ID[g]) for g in design["genes"]], counts, "\t")
        files[study.files_with_role("counts")[0].url] = _gzip(text.encode())
        files[study.files_with_role("gene_map")[0].url] = _gzip(annotation.encode())
        files[study.metadata_file.url] = _series_matrix(accession, [
            {"gsm": gsm, "title": f"{accession}_{i}", "source": "microglia",
             "characteristics": [f"{k}: {v}" for k, v in fields.items()]}
            for i, (gsm, fields) in enumerate(design["samples"])])
        studies[accession] = MiniatureStudy(genes=set(design["genes"]), n_cells=len(gsms),
                                            conditions=Counter({"NA": len(gsms)}))


def write_miniature_geo(catalog: Catalog, seed: int = 0) -> MiniatureGEO:
    """Every file of ``catalog`` (the real one) as a miniature, keyed by its catalog URL."""
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    studies: dict[str, MiniatureStudy] = {}
    for writer in (_mars_seq, _dropseq, _smart_seq, _bulk):
        writer(rng, files, studies, catalog)
    missing = [f.url for s in catalog.studies for f in s.files if f.url not in files]
    assert not missing, f"the miniature lacks {missing}"
    return MiniatureGEO(files=files, studies=studies)


def mirror_rules(base_url: str, catalog: Catalog) -> str:
    """``SCGRN_URL_MIRROR`` sending each GEO host of ``catalog`` to its own prefix on ``base_url``."""
    hosts = sorted({f"{urlsplit(f.url).scheme}://{urlsplit(f.url).netloc}" for s in catalog.studies for f in s.files})
    return ",".join(f"{host}={base_url}/{_host_prefix(host)}" for host in hosts)


def _host_prefix(host: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", urlsplit(host).netloc.lower())


def serve_miniature_geo(server, miniature: MiniatureGEO) -> None:
    """Serve each file at its catalog URL's path (and query) under the host's mirror prefix."""
    for url, content in miniature.files.items():
        parts = urlsplit(url)
        path = f"/{_host_prefix(parts.scheme + '://' + parts.netloc)}{parts.path}"
        server.serve(path + (f"?{parts.query}" if parts.query else ""), content)

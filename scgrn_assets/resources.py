"""Resources: the storage root, the catalog and the download policy, as typed config."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from scgrn_assets.lib.ingest.catalog import Catalog, load_catalog
from scgrn_assets.lib.ingest.download import DownloadPolicy, parse_url_mirrors
from scgrn_assets.lib.storage import StorageLayout


class ScgrnStorage(dg.ConfigurableResource):
    """SCGRN_HOME and the catalog it serves; the one place assets learn where artefacts go."""

    home: str
    catalog: str = "demo"

    @property
    def layout(self) -> StorageLayout:
        return StorageLayout(Path(self.home))

    def load_catalog(self) -> Catalog:
        return load_catalog(self.catalog, variables={"SCGRN_HOME": self.home})


class GeoDownloader(dg.ConfigurableResource):
    """Retries, timeouts and size limits for fetching study files (GEO over HTTPS, or file://).

    ``url_mirror`` fetches from a mirror instead of the catalog's host
    (``https://ftp.ncbi.nlm.nih.gov=http://mirror:8000``, comma-separated rules); unset, it is
    read from ``SCGRN_URL_MIRROR`` when a download starts. Checksums and pins stay keyed by
    the catalog's URLs.
    """

    max_attempts: int = 5
    backoff_seconds: float = 1.0
    timeout_seconds: float = 60.0
    max_bytes: int | None = None
    url_mirror: str | None = None

    @property
    def policy(self) -> DownloadPolicy:
        return DownloadPolicy(max_attempts=self.max_attempts, backoff_seconds=self.backoff_seconds,
                              timeout_seconds=self.timeout_seconds, max_bytes=self.max_bytes)

    @property
    def mirrors(self) -> tuple[tuple[str, str], ...]:
        text = self.url_mirror if self.url_mirror is not None else os.environ.get("SCGRN_URL_MIRROR", "")
        return parse_url_mirrors(text)


class GeneformerSettings(dg.ConfigurableResource):
    """Which Geneformer to use and how to run it.

    With ``pretrained_model_dir`` unset (the demo), a small Geneformer-architecture model is
    trained on the corpus; set it to a published checkpoint folder (config.json +
    model.safetensors) and ``dictionary_dir`` to its token/median dictionary pickles.
    """

    pretrained_model_dir: str | None = None
    dictionary_dir: str | None = None
    convention: str = "V1"               # V1 (2048, no special tokens) or V2 (<cls>/<eos>, 4096)
    train_steps: int = 1000              # 300 left the demo model at the position-only loss (5.41 vs 5.51 nats)
    train_batch_size: int = 16
    min_loss_margin: float | None = 0.25  # nats the masked-LM loss must beat the position-only entropy by
    device: str | None = None            # None: the GPU when one is visible, else CPU
    max_genes_per_cell: int = 256        # genes entering each cell's attention block
    pcorr_method: str = "cosine_shrunk_pinv"  # or cosine_shrunk_pinv_cell_z (spread independent of cell length)
    attention_layers: list[int] | None = None  # None: the last layer; e.g. [0, 1, 2, 3] averages all (geneRNIB)
    attention_heads: list[int] | None = None   # None: every head, summed
    attention_batch_size: int = 32
    min_cells_per_edge: int = 20         # downstream stages ignore pairs seen in fewer cells
    # cross-cell partial correlation (network_moments / network_edges)
    network_features: list[str] = ["rank_value", "hidden_state", "log_expression"]
    max_universe_genes: int = 5000       # genes of the network (TFs of BenchmarkSettings.tf_list first, then HVGs)


class BenchmarkSettings(dg.ConfigurableResource):
    """Settings of the co-expression baselines and the benchmark metrics."""

    tree_max_cells: int = 1000     # cells subsampled for the tree baseline
    tree_n_trees: int = 20
    tree_max_features: str = "sqrt"  # regulators tried per split (GENIE3's K = sqrt(n))
    tf_list: str | None = None     # TF list file for the tree's regulators (None: every gene; never the truth's)
    grnboost2_max_cells: int = 1000  # cells subsampled for GRNBoost2
    grnboost2_max_estimators: int = 5000  # arboreto's cap; early stopping usually ends sooner
    regdiffusion_n_steps: int = 1000  # RegDiffusion's training epochs (its default)
    regdiffusion_max_cells: int = 2000
    n_null: int = 200              # null draws for the enrichment p-values
    top_k: int | None = None       # top-K for enrichment (None: the number of true edges)
    seed: int = 0


class ValidationSettings(dg.ConfigurableResource):
    """Mutual-information validation of the attention edges."""

    top_k: int = 15                # candidate parents per gene, in each candidate network
    candidates: list[str] = ["pcorr_rank_value", "pearson"]  # networks whose top-K MI tests (united)
    n_bins: int = 5                # per-gene quantile bins (zeros are their own bin)
    n_permutations: int = 1000     # per test, with sequential early stopping
    alpha: float = 0.05
    min_cmi_ratio: float = 0.2     # CMI min / MI below this: explained away (indirect)
    miller_madow: bool = False
    seed: int = 0


class NBModelSettings(dg.ConfigurableResource):
    """The condition-effect model."""

    method: str = "pseudobulk"     # "pseudobulk" (animals as replicates, the default) or "cell_advi" (cells as replicates)
    fdr_target: float = 0.05       # calls are made at s-value <= this (expected share of false signs among calls)
    n_top_genes: int = 3000        # at most this many expressed genes (highest base mean) are tested
    max_steps: int = 15_000        # cell_advi: ADVI steps at most (the windowed-ELBO rule usually stops earlier)
    batch_size: int = 512          # cell_advi: cells per minibatch
    device: str = "cpu"            # "gpu": JAX on the first GPU it sees
    seed: int = 0

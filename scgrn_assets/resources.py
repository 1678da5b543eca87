"""Resources, in one place: the storage root, the catalog, the download policy and each stage's settings,
as typed config, and :func:`build_resources` (with the IO managers) for one SCGRN_HOME and catalog."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from scgrn_assets.io_managers import ArtefactIOManager, TableIOManager
from scgrn_assets.lib.benchmarks import GrnPathSettings
from scgrn_assets.lib.condition_effects import NBFitConfig, PosteriorConfig
from scgrn_assets.lib.ingest import Catalog, DownloadPolicy, load_catalog, parse_url_mirrors
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
    the catalog's URLs. ``allow_hosts`` (comma-separated ``host[:port]``; unset: ``SCGRN_ALLOW_HOSTS``)
    names hosts on this machine or a private network that catalog URLs may reach (a mirror's own
    host needs no entry).
    """

    max_attempts: int = 5
    backoff_seconds: float = 1.0
    timeout_seconds: float = 60.0
    max_bytes: int | None = None
    url_mirror: str | None = None
    allow_hosts: str | None = None

    @property
    def policy(self) -> DownloadPolicy:
        return DownloadPolicy(max_attempts=self.max_attempts, backoff_seconds=self.backoff_seconds,
                              timeout_seconds=self.timeout_seconds, max_bytes=self.max_bytes,
                              allow_hosts=None if self.allow_hosts is None else (self.allow_hosts,))

    @property
    def mirrors(self) -> tuple[tuple[str, str], ...]:
        text = self.url_mirror if self.url_mirror is not None else os.environ.get("SCGRN_URL_MIRROR", "")
        return parse_url_mirrors(text)


# Defaults come from the library's own settings, so the assets and `scgrn benchmark` (which runs the
# library directly) cannot drift apart.
_GRN = GrnPathSettings()
_ADVI = NBFitConfig()
_POSTERIOR = PosteriorConfig()


def _listed(values: tuple | None) -> list | None:
    return None if values is None else list(values)


class GeneformerSettings(dg.ConfigurableResource):
    """Which Geneformer to use and how to run it (defaults: :class:`GrnPathSettings`).

    With ``pretrained_model_dir`` unset (the demo), a small Geneformer-architecture model is
    trained on the corpus; set it to a published checkpoint folder (config.json +
    model.safetensors) and ``dictionary_dir`` to its token/median dictionary pickles.
    """

    pretrained_model_dir: str | None = None
    dictionary_dir: str | None = None
    convention: str = _GRN.convention    # V1 (2048, no special tokens) or V2 (<cls>/<eos>, 4096)
    train_steps: int = _GRN.train_steps  # a ceiling: training stops once the held-out loss clears the gate
    train_batch_size: int = _GRN.train_batch_size
    # nats the masked-LM loss must beat the position-only entropy by
    min_loss_margin: float | None = _GRN.min_loss_margin
    device: str | None = _GRN.device     # None: the GPU when one is visible, else CPU
    max_genes_per_cell: int = _GRN.max_genes_per_cell  # genes entering each cell's attention block
    pcorr_method: str = _GRN.pcorr_method  # or cosine_shrunk_pinv_cell_z (spread independent of cell length)
    attention_layers: list[int] | None = _listed(_GRN.attention_layers)  # None: the last layer; [0, 1, 2, 3]: all
    attention_heads: list[int] | None = _listed(_GRN.attention_heads)    # None: every head, summed
    attention_batch_size: int = _GRN.attention_batch_size
    min_cells_per_edge: int = _GRN.min_cells_per_edge  # downstream stages ignore pairs seen in fewer cells
    # cross-cell partial correlation (network_moments / network_edges)
    network_features: list[str] = list(_GRN.network_features)
    max_universe_genes: int = _GRN.max_universe_genes  # genes of the network (TFs of BenchmarkSettings.tf_list first)


class BenchmarkSettings(dg.ConfigurableResource):
    """Settings of the co-expression baselines and the benchmark metrics (defaults: :class:`GrnPathSettings`)."""

    tree_max_cells: int = _GRN.tree_max_cells      # cells subsampled for the tree baseline
    tree_n_trees: int = _GRN.tree_n_trees
    tree_max_features: str = _GRN.tree_max_features  # regulators tried per split (GENIE3's K = sqrt(n))
    tf_list: str | None = _GRN.tf_list             # TF list file for the tree's regulators (None: every gene)
    grnboost2_max_cells: int = _GRN.grnboost2_max_cells
    grnboost2_max_estimators: int = _GRN.grnboost2_max_estimators  # arboreto's cap; early stopping ends sooner
    regdiffusion_n_steps: int = _GRN.regdiffusion_n_steps  # RegDiffusion's training epochs
    regdiffusion_max_cells: int = _GRN.regdiffusion_max_cells
    n_null: int = _GRN.n_null                      # null draws for the enrichment p-values
    top_k: int | None = _GRN.top_k                 # top-K for enrichment (None: the number of true edges)
    seed: int = _GRN.benchmark_seed


class ValidationSettings(dg.ConfigurableResource):
    """Mutual-information validation of the network edges (defaults: :class:`GrnPathSettings`)."""

    top_k: int = _GRN.mi_top_k                     # candidate parents per gene, in each candidate network
    candidates: list[str] = list(_GRN.mi_candidates)  # networks whose top-K MI tests (united)
    n_bins: int = _GRN.n_bins                      # per-gene quantile bins (zeros are their own bin)
    n_permutations: int = _GRN.n_permutations      # per test, with sequential early stopping
    alpha: float = _GRN.alpha
    min_cmi_ratio: float = _GRN.min_cmi_ratio      # CMI min / MI below this: explained away (indirect)
    miller_madow: bool = _GRN.miller_madow
    seed: int = _GRN.validation_seed


class NBModelSettings(dg.ConfigurableResource):
    """The condition-effect model (defaults: :class:`PosteriorConfig`, and :class:`NBFitConfig` for cell_advi)."""

    method: str = "pseudobulk"     # "pseudobulk" (animals as replicates, the default) or "cell_advi" (cells as replicates)
    fdr_target: float = 0.05       # calls are made at s-value <= this (expected share of false signs among calls)
    n_top_genes: int = 3000        # at most this many expressed genes (highest base mean) are tested
    max_steps: int = _ADVI.max_steps    # cell_advi: ADVI steps at most (the windowed-ELBO rule usually stops earlier)
    batch_size: int = _ADVI.batch_size  # cell_advi: cells per minibatch
    device: str = _POSTERIOR.device     # "gpu": JAX on the first GPU it sees
    seed: int = _POSTERIOR.seed


def build_resources(home: str | None = None, catalog: str | None = None, *, quick: bool = False) -> dict:
    """Every resource and IO manager of the code location, for one SCGRN_HOME and catalog
    (a built-in name or a YAML path; defaults: the environment's, read now).

    The built-in demo catalog runs the peers with :data:`scgrn_assets.lib.benchmarks.DEMO_SETTINGS`
    ("demo settings"); every other catalog gets the defaults. ``quick`` trades accuracy for time (a few
    training steps, small nulls): smoke tests only.
    """
    from scgrn_assets.lib.benchmarks.pipeline import DEMO_SETTINGS, settings_profile
    from scgrn_assets.settings import catalog_name, current_layout

    home = str(home or current_layout().home)
    catalog = catalog or catalog_name()
    benchmark = dict(DEMO_SETTINGS) if settings_profile(catalog) == "demo" else {}
    return {
        "storage": ScgrnStorage(home=home, catalog=catalog),
        "downloader": GeoDownloader(),
        # 20 steps cannot beat the position-only loss: the training gate is off in smoke tests.
        "geneformer": GeneformerSettings(train_steps=20, max_genes_per_cell=64, min_loss_margin=None) if quick
        else GeneformerSettings(),
        "benchmark": BenchmarkSettings(tree_max_cells=300, tree_n_trees=5, n_null=20, grnboost2_max_cells=300,
                                       grnboost2_max_estimators=200, regdiffusion_n_steps=20) if quick
        else BenchmarkSettings(**benchmark),
        "validation": ValidationSettings(n_permutations=50) if quick else ValidationSettings(),
        "nb_model": NBModelSettings(max_steps=300) if quick else NBModelSettings(),
        "artefact_io_manager": ArtefactIOManager(home=home),
        "table_io_manager": TableIOManager(home=home),
    }

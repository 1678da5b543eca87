"""The demo: a simulated gene regulatory network and the counts it drives, written in real GEO layouts.

Modules:

- ``design``: What the demo simulates: study designs, the configuration, and the truth
  :func:`simulator.simulate_truth` draws.
- ``draws``: The random draws behind the demo's truth and cells: genes, network, effects, samples,
  barcodes.
- ``geo_layouts``: Writes the simulated demo studies in real GEO layouts, plus the truth and the demo
  catalog.
- ``simulator``: The demo simulator: a known gene regulatory network and the single-cell counts it
  drives.

Public names are importable from the package (``from scgrn_assets.lib.demo import X``); each
module loads on first use, so importing the package stays cheap.
"""

from scgrn_assets.lib._lazy import lazy_exports

# Each module and the public names it holds.
_PUBLIC = {
    "design": ("StudyDesign", "DemoConfig", "DemoTruth", "DEFAULT_STUDIES", "GENE_LENGTH_EFFECT",
        "LIBRARY_TYPES", "PLATE_ROWS", "PLATE_COLUMNS", "WELLS_PER_PLATE"),
    "geo_layouts": ("WrittenFile", "write_demo_geo", "write_truth_files", "demo_catalog",
        "write_catalog_yaml"),
    "simulator": ("simulate_truth", "measured_gene_indices", "simulate_sample_counts", "cell_state_term",
        "sample_negative_binomial_outer"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _PUBLIC)

"""Expression-based checks of network edges: mutual information and conditional MI (numba kernels in
``_kernels.py``).

Modules:

- ``discretization``: Expression → per-gene quantile codes, zero expression its own bin: the input of
  the MI estimators.
- ``estimators``: MI and conditional MI in nats from quantile codes: single-edge references and batch
  estimators.
- ``mutual_information``: Expression-based checks of attention edges: mutual information and conditional
  MI.

Public names are importable from the package (``from scgrn_assets.lib.validation import X``); each
module loads on first use, so importing the package stays cheap.
"""

from scgrn_assets.lib._lazy import lazy_exports

# Each module and the public names it holds.
_PUBLIC = {
    "discretization": ("DiscretizedGenes", "discretize_quantiles", "discretize_expression"),
    "estimators": ("pair_mutual_information", "triplet_conditional_mutual_information",
        "mutual_information_batch", "conditional_mutual_information_batch"),
    "mutual_information": ("candidate_edges", "benjamini_hochberg", "mi_edge_table", "cmi_tables"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _PUBLIC)

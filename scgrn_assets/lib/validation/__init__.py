"""Expression-based checks of network edges: mutual information and conditional MI (numba kernels in ``_kernels.py``).

Modules:

- ``discretization``: Expression → per-gene quantile codes, zero expression its own bin: the input of the MI estimators.
- ``estimators``: MI and conditional MI in nats from quantile codes: single-edge references and batch estimators.
- ``mutual_information``: Expression-based checks of attention edges: mutual information and conditional MI.

Public names are importable from the package (``from scgrn_assets.lib.validation import X``); each
module loads on first use, so importing the package stays cheap.
"""

import importlib

# Each module and the public names it holds.
_PUBLIC = {
    "discretization": ("DiscretizedGenes", "discretize_quantiles", "discretize_expression"),
    "estimators": ("pair_mutual_information", "triplet_conditional_mutual_information",
        "mutual_information_batch", "conditional_mutual_information_batch"),
    "mutual_information": ("candidate_edges", "benjamini_hochberg", "mi_edge_table", "cmi_tables"),
}
_MODULE_OF = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__

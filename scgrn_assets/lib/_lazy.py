"""Lazy re-exports for the stage packages: ``from scgrn_assets.lib.network import tokenize_cells``
works, and importing a package loads none of its modules (torch, PyMC and JAX stay unloaded until a
name that needs them is used)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence


def lazy_exports(package: str, public: Mapping[str, Sequence[str]]) -> tuple[Callable, Callable, list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``, whose modules hold the names in ``public``
    (module name → its public names)."""
    module_of = {name: module for module, names in public.items() for name in names}
    names = sorted(module_of)

    def __getattr__(name: str):
        if name in module_of:
            return getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__, names

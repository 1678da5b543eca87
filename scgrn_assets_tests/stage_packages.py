"""Each stage package's ``__init__.py`` under ``scgrn_assets/lib/``, generated: what the stage does, its
modules (first docstring line each) and their public names (re-exported lazily).

``python -m scgrn_assets_tests.stage_packages --write`` rewrites them after a module is added, split or
renamed; ``test_stage_packages.py`` fails while one is stale.
"""

from __future__ import annotations

import ast
import pathlib
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1] / "scgrn_assets" / "lib"
SUMMARY = {
    "ingest": ("Ingest: catalogs, safe downloads and checksum pins, archives, one reader per study layout,"
        " gene harmonisation, one study as AnnData."),
    "corpus": ("Corpus: every study's cells over the union of genes, QC-filtered, as one AnnData Zarr; the"
        " integrity scans behind the checks."),
    "condition_effects": ("Condition effects: per-animal pseudobulk, the Bayesian NB model, adaptive shrinkage, the "
        "peer (PyDESeq2), calibration on structured simulations."),
    "network": ("Gene networks from the model: rank-value tokens, the Geneformer-architecture model, "
        "attention and cross-cell partial correlation, streamed moments."),
    "validation": ("Expression-based checks of network edges: mutual information and conditional MI (numba "
        "kernels in ``_kernels.py``)."),
    "benchmarks": ("Benchmarks: reference networks, co-expression and peer baselines, one implementation of "
        "each metric, the GRN path end to end."),
    "demo": ("The demo: a simulated gene regulatory network and the counts it drives, written in real "
        "GEO layouts."),
}


def init_text(pkg: str) -> str:
    summary = SUMMARY[pkg]
    d = ROOT / pkg
    lines, mapping, defined_in = [], {}, {}
    for f in sorted(d.glob("*.py")):
        if f.name.startswith("_"):
            continue
        tree = ast.parse(f.read_text())
        doc = " ".join((ast.get_docstring(tree) or "").split("\n\n")[0].split())
        explicit = None
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
                explicit = [ast.literal_eval(e) for e in node.value.elts]
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | {
            t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        names = explicit or [n.name for n in tree.body
                             if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")]
        lines.append(textwrap.fill(f"- ``{f.stem}``: {doc}", 104, subsequent_indent="  ",
                                   break_on_hyphens=False))
        for n in names:
            if n in defined:
                # Two modules of one package defining one public name would make the package's name
                # ambiguous: refuse, so it is renamed rather than silently shadowed.
                if n in defined_in:
                    raise ValueError(f"{pkg}: {n!r} is defined in both {defined_in[n]} and {f.stem}")
                defined_in[n] = f.stem
            mapping.setdefault(n, f.stem)
    # A name a module only re-exports is taken from the module that defines it.
    mapping = {n: defined_in.get(n, m) for n, m in mapping.items()}
    body = ('"""' + textwrap.fill(summary, 104, break_on_hyphens=False) + "\n\nModules:\n\n" + "\n".join(lines)
            + "\n\n") + \
        "Public names are importable from the package (``from scgrn_assets.lib." + pkg + " import X``); each\n" \
        "module loads on first use, so importing the package stays cheap.\n" + '"""\n\n'
    body += "from scgrn_assets.lib._lazy import lazy_exports\n\n"
    by_mod = {}
    for n, m in mapping.items():
        by_mod.setdefault(m, []).append(n)
    body += "# Each module and the public names it holds.\n_PUBLIC = {\n"
    for m, ns in by_mod.items():
        items = ", ".join(f'"{n}"' for n in ns) + ("," if len(ns) == 1 else "")
        body += textwrap.fill(f'"{m}": ({items}),', 108, initial_indent="    ", subsequent_indent="        ",
                              break_long_words=False, break_on_hyphens=False) + "\n"
    body += "}\n__getattr__, __dir__, __all__ = lazy_exports(__name__, _PUBLIC)\n"
    return body


if __name__ == "__main__":
    for package in SUMMARY:
        text = init_text(package)
        if "--write" in sys.argv:
            (ROOT / package / "__init__.py").write_text(text)
        else:
            print(text)

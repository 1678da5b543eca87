"""`scgrn benchmark`: the GRN path on an expression matrix plus a ground-truth network given as files.

The same library path the assets run (``scgrn_assets.lib.benchmarks.pipeline``): a small Geneformer-architecture
model trained on the given cells; cross-cell partial correlations of its rank-value tokens, of its hidden
states and of log expression; attention stability; MI and CMI-pruned edges on a chosen candidate network;
Pearson, Spearman, tree (GENIE3-style), GRNBoost2, RegDiffusion, a gene-level null and random, scored by
``scgrn_assets.lib.benchmarks.metrics`` against each truth network.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
from pathlib import Path

from scgrn_assets.lib.errors import ScgrnInputError

FAILED_METHODS_EXIT_STATUS = 3
"""``scgrn benchmark``'s exit status when some method failed but the others were scored (2: bad input, nothing
run)."""

EPILOG = """\
--values is required: `counts` (integers; each cell scaled by its library size, then log1p) or
`normalized` (simulated or already normalised values: no library-size scaling, log1p only).
--orientation auto: the gene axis is the one on which the larger fraction of labels are truth genes;
an axis whose labels repeat cannot be it; a tie is an error.
Exit status: 0 every method scored; 2 bad input (nothing written); 3 some method failed (raised, timed out or
gave NaN scores): the others are scored and every file is written, the failures listed in run.json.
Example (BEELINE's example GSD dataset): scgrn benchmark --expression GSD/ex1/ExpressionData.csv
  --truth GSD/GroundTruthNetwork.csv --values normalized --out gsd"""


def add_benchmark_parser(commands) -> None:
    """Add the ``benchmark`` sub-command to the ``scgrn`` parser."""
    # Light imports only: this runs for every `scgrn` command (the GRN path imports torch when it runs).
    from scgrn_assets.lib.benchmarks.expression_files import ORIENTATIONS, VALUE_KINDS
    from scgrn_assets.lib.benchmarks.references import TRUTH_FORMATS

    parser = commands.add_parser(
        "benchmark", help="run the GRN path on an expression file and score it against a ground-truth network",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expression", required=True,
                        help="expression matrix: delimited text (BEELINE/SERGIO csv, scanpy txt), .h5ad or .zarr")
    parser.add_argument("--truth", required=True, action="append",
                        help="ground-truth network file (repeatable): BEELINE GroundTruthNetwork.csv, an edge list "
                             "with a header (regulator,target[,sign]), a two-column list, or TRRUST raw")
    parser.add_argument("--values", required=True, choices=VALUE_KINDS,
                        help="counts: library-size scale then log1p; normalized: log1p only (no library-size step)")
    parser.add_argument("--out", required=True, help="output folder (Parquet, CSV, Markdown, run.json)")
    parser.add_argument("--orientation", default="auto", choices=ORIENTATIONS, help="text matrices only")
    parser.add_argument("--clip-negative", action="store_true", help="set negative values to 0 instead of failing")
    parser.add_argument("--truth-format", default="auto", choices=TRUTH_FORMATS)
    parser.add_argument("--truth-undirected", action="store_true",
                        help="the truth lists associations, not regulator -> target (e.g. STRING-like lists)")
    parser.add_argument("--allow-missing-genes", action="store_true",
                        help="evaluate on the truth genes present instead of failing when some are absent")
    parser.add_argument("--tf-list", metavar="FILE",
                        help="candidate regulators of the tree baseline: a TF list (BEELINE's mouse-tfs.csv / "
                             "human-tfs.csv, or one symbol per line; case ignored); default every gene. Never the "
                             "truth's regulators: that would leak the answer into one method")
    parser.add_argument("--name", help="dataset name in the outputs (default: the expression file's folder)")
    parser.add_argument("--duckdb", help="also register the tables as views in this DuckDB file")
    parser.add_argument("--table", default="grn_benchmark",
                        help="view name in --duckdb (metrics; <table>_predictions for the predictions)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, permutations, trees and nulls")
    parser.add_argument("--train-steps", type=int, help="ceiling on model training steps; training stops earlier once "
                        f"the held-out loss clears the gate (default: the assets'; `scgrn benchmark` prints what it used)")
    parser.add_argument("--n-permutations", type=int,
                        help="MI/CMI permutations per test (default: the assets')")
    parser.add_argument("--n-null", type=int, help="enrichment null draws (default: the assets')")
    parser.add_argument("--min-cells-per-edge", type=int, help="attention pairs seen in fewer cells are dropped "
                                                                  "(default: the assets', 20)")
    parser.add_argument("--device", help="torch device for the model (default: a GPU when visible, else CPU)")
    parser.add_argument("--grnboost2-max-estimators", type=int,
                        help="GRNBoost2's tree cap per target (default 5000, arboreto's; early stopping usually ends "
                             "sooner)")
    parser.add_argument("--regdiffusion-steps", type=int, help="RegDiffusion training epochs (default 1000, its own)")
    parser.add_argument("--method-time-limit", type=float, metavar="SECONDS",
                        help="a method (model readout, baseline, MI) still running after this many seconds is "
                             "recorded as failed and the others go on (default: no limit)")
    parser.add_argument("--mi-candidates", help="comma-separated methods whose top-K neighbours per gene MI and CMI "
                                                "test (default: pcorr_rank_value,pearson)")
    parser.set_defaults(func=cmd_benchmark)


def cmd_benchmark(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from scgrn_assets.lib.ingest.download import sha256_of
    from scgrn_assets.lib.benchmarks.expression_files import genes_missing_from, read_expression
    from scgrn_assets.lib.benchmarks.references import load_ground_truth

    if args.duckdb and not re.fullmatch(r"[a-z_][a-z0-9_]*", args.table):
        raise ScgrnInputError(f"--table {args.table!r} is not a plain SQL name", fix="use lower-case letters, digits, _")
    expression_path = Path(args.expression)
    references = {}
    for truth_path in args.truth:
        truth = load_ground_truth(truth_path, format=args.truth_format, directed=not args.truth_undirected)
        name = str(truth["reference"].iloc[0]) if len(truth) else Path(truth_path).name
        if name in references:
            raise ScgrnInputError(f"two truth files are both named {name!r}", file=truth_path,
                                  fix="rename one of them (the reference is named after the file)")
        if truth.empty:
            raise ScgrnInputError("the truth network has no edges", file=truth_path, fix="check the file")
        references[name] = truth
    truth_genes = sorted({gene for truth in references.values() for gene in (*truth["source"], *truth["target"])})
    data = read_expression(expression_path, values=args.values, orientation=args.orientation,
                           truth_genes=truth_genes, clip_negative=args.clip_negative)
    missing = genes_missing_from(data, truth_genes)
    if len(missing) == len(truth_genes) or (missing and not args.allow_missing_genes):
        raise ScgrnInputError(
            f"{len(missing)} of the truth's {len(truth_genes)} genes are not genes of the expression matrix "
            f"(e.g. {', '.join(missing[:5])}); read as {data.orientation}", file=str(expression_path),
            fix="check --orientation and that truth and expression use the same gene identifiers"
                + ("" if len(missing) == len(truth_genes) else
                   ", or pass --allow-missing-genes to evaluate on the genes present"))
    if args.tf_list:  # checked before the model trains: a missing file or no listed TF among the genes
        from scgrn_assets.lib.benchmarks.references import load_tf_list

        listed = {symbol.upper() for symbol in load_tf_list(args.tf_list)}  # case ignored, as the path does
        if not listed & {str(gene).upper() for gene in data.gene_names}:
            raise ScgrnInputError(f"none of the {len(listed)} TFs in the TF list is a gene of the expression matrix",
                                  file=args.tf_list, fix="check the TF list's species and symbol case")
    dataset = args.name or expression_path.parent.name or expression_path.stem
    print(f"{dataset}: {data.n_cells} cells x {data.n_genes} genes, read as {data.orientation}; "
          f"values: {data.value_kind}; truth: {', '.join(f'{n} ({len(t)} edges)' for n, t in references.items())}")
    # The GRN path imports torch: only once the inputs are known to be good.
    from scgrn_assets.lib.benchmarks.outputs import (failures_markdown, headline_markdown, headline_table,
                                                    write_benchmark_outputs)
    from scgrn_assets.lib.benchmarks.grn_benchmark import run_grn_benchmark
    from scgrn_assets.lib.benchmarks.pipeline import GrnPathSettings

    overrides = {name: getattr(args, name) for name in ("train_steps", "n_permutations", "n_null",
                                                        "min_cells_per_edge", "device", "grnboost2_max_estimators")
                 if getattr(args, name) is not None}
    if args.regdiffusion_steps is not None:
        overrides["regdiffusion_n_steps"] = args.regdiffusion_steps
    if args.method_time_limit is not None:
        if not args.method_time_limit > 0:
            raise ScgrnInputError(f"--method-time-limit {args.method_time_limit} is not a positive number of seconds",
                                  fix="pass e.g. --method-time-limit 3600, or leave it out for no limit")
        overrides["method_time_limit_s"] = args.method_time_limit
    if args.mi_candidates:
        overrides["mi_candidates"] = tuple(m.strip() for m in args.mi_candidates.split(",") if m.strip())
    settings = GrnPathSettings(**overrides, model_seed=args.seed, validation_seed=args.seed,
                               benchmark_seed=args.seed, tf_list=args.tf_list)
    bars: dict[str, tqdm] = {}

    def progress(done: int, total: int, /, *, stage: str, **detail: object) -> None:
        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[stage] = tqdm(total=total, desc=stage, disable=None, leave=False)
        bar.update(done - bar.n)

    try:
        result = run_grn_benchmark(data, references, settings, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
    inputs = [expression_path, *map(Path, args.truth), *([Path(args.tf_list)] if args.tf_list else [])]
    run_info = {
        "command": "scgrn benchmark", "expression": str(expression_path), "truth": args.truth,
        "tf_list": args.tf_list,
        "sha256": {str(path): sha256_of(path) for path in inputs if path.is_file()},
        "values": data.value_kind, "orientation": data.orientation, "clip_negative": args.clip_negative,
        "n_cells": data.n_cells, "n_genes": data.n_genes, "missing_truth_genes": missing,
        "python": platform.python_version(),
    }
    paths = write_benchmark_outputs(result, args.out, dataset=dataset, run_info=run_info)
    if args.duckdb:
        from scgrn_assets.lib.sql_store import register_view

        register_view(Path(args.duckdb), args.table, paths["benchmark_metrics.parquet"].resolve())
        register_view(Path(args.duckdb), f"{args.table}_predictions", paths["predictions.parquet"].resolve())
        database_folder = Path(args.duckdb).resolve().parent
        if not Path(args.out).resolve().is_relative_to(database_folder):
            print(f"note: `scgrn sql` reads only files under {database_folder}; with --out outside it, query "
                  f"these views with duckdb itself (or put --out under that folder)")
    training = result.training
    print(f"held-out masked-LM loss {training['final_loss']:.3f} vs position-only entropy "
          f"{training['position_only_entropy']:.3f} nats (margin {training['margin']:.3f}; {training['n_steps']} "
          f"steps, gate cleared at step {training.get('cleared_at_step')})")
    if training.get("beats_position_only") is False:
        print(f"warning: the model did not beat the position-only loss by {training['required_margin']} nats; "
              f"its attention and hidden-state rows read a model that learnt positions, not genes "
              f"(raise the ceiling: --train-steps {2 * settings.train_steps})")
    print(f"\n{dataset} (universe all_pairs; EPR and AUPRC ratio: 1 = random)\n")
    print(headline_markdown(headline_table(result.metrics)))
    if result.failures:
        print(f"\nFailed (not scored):\n{failures_markdown(result.failures)}")
    print(f"\nwrote {len(paths)} files under {Path(args.out)}"
          + (f"; views {args.table}, {args.table}_predictions in {args.duckdb}" if args.duckdb else ""))
    if result.failures:
        names = ", ".join(f"{f.method} ({f.step}: {f.reason})" for f in result.failures)
        count = len(result.failures)
        print(f"error: {count} method{' failed' if count == 1 else 's failed'}: {names}. The other methods were "
              f"scored and every file written; the failures are in run.json's failed_methods (with tracebacks) and "
              f"the metrics' error column. Fix or leave out the method, or raise --method-time-limit if it timed "
              f"out", file=sys.stderr)
        return FAILED_METHODS_EXIT_STATUS
    return 0

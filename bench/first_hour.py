"""A newcomer's first hour: `scgrn demo` from a fresh SCGRN_HOME, an immediate rerun, and the test suite.

    .venv/bin/python bench/first_hour.py                 # demo + rerun (a few minutes)
    .venv/bin/python bench/first_hour.py --tests         # + `make test` (about 10 more minutes on 2 cores)
    .venv/bin/python bench/first_hour.py --configs       # the demo model: time to the held-out gate per configuration
    .venv/bin/python bench/first_hour.py --configs --home ~/.scgrn   # the same on a home where the demo has run
    .venv/bin/python bench/first_hour.py --peers --home ~/.scgrn     # RegDiffusion / GRNBoost2 size against EPR

Prints the wall time per asset of the first run (the demo's own summary), then

    RESULT name=first_hour demo_s=… model_s=… gate_margin=… steps=… rerun_s=… tests_s=… goal_demo_s=300 goal_rerun_s=20

``model_s`` is the training time of ``geneformer_model`` (its ``training_report.json``), ``gate_margin`` the nats by
which its held-out masked-LM loss cleared the position-only entropy (the gate asks for 0.25), ``steps`` where it
stopped. ``--configs`` trains the demo model (on the demo's tokens, from the first run) with several architectures
and batch settings and prints, per configuration, the seconds and steps to the gate; the ratio printed is the
default configuration's time against the slowest one measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCGRN = ROOT / ".venv" / "bin" / "scgrn"

CONFIGS = {
    "default: 4 layers x 128, batch 16, 256 tokens, 30% masking, length-bucketed": {},
    "Geneformer's 15% masking": {"mask_probability": 0.15},
    "40% masking": {"mask_probability": 0.4},
}


def run_demo(home: Path) -> float:
    started = time.perf_counter()
    subprocess.run([str(SCGRN), "demo"], check=True, env={**os.environ, "SCGRN_HOME": str(home)})
    return time.perf_counter() - started


def training_report(home: Path) -> dict:
    return json.loads((home / "assets" / "geneformer_model" / "training_report.json").read_text())


def run_tests() -> float:
    started = time.perf_counter()
    subprocess.run(["make", "test"], check=True, cwd=ROOT)
    return time.perf_counter() - started


def time_configs(home: Path, max_steps: int) -> None:
    sys.path.insert(0, str(ROOT))
    from scgrn_assets.lib.network.model import SmallGeneformerConfig, train_small_geneformer, training_report as report_of
    from scgrn_assets.lib.network.dictionaries import load_geneformer_dictionaries
    from scgrn_assets.lib.network.tokens import TokenizedCells

    folder = home / "assets" / "tokenized_cells"
    cells = TokenizedCells.load_npz(folder / "cells.npz")
    dictionaries = load_geneformer_dictionaries(folder)
    dictionaries.convention = cells.convention
    rows = []
    for name, overrides in CONFIGS.items():
        config = SmallGeneformerConfig(**{"max_steps": max_steps, **overrides})
        trained = train_small_geneformer(cells, dictionaries, config, device="cpu")
        report = report_of(trained, config.min_loss_margin)
        rows.append((name, report))
        print(f"{name}: {report['seconds']:.1f} s, {report['n_steps']} steps, cleared at "
              f"{report['cleared_at_step']}, margin {report['margin']:.3f}", flush=True)
    print("\n| configuration | seconds | steps | cleared at step | held-out margin (nats) |")
    print("| --- | --- | --- | --- | --- |")
    for name, report in rows:
        print(f"| {name} | {report['seconds']:.0f} | {report['n_steps']} | {report['cleared_at_step']} | "
              f"{report['margin']:.3f} |")
    default_seconds = rows[0][1]["seconds"]
    slowest = max(report["seconds"] for _, report in rows)
    print(f"RESULT name=first_hour_configs ratio={slowest / default_seconds:.2f} default_s={default_seconds:.1f}")


def time_peers(home: Path) -> None:
    """RegDiffusion's epochs and GRNBoost2's size against their scores on the demo (TRRUST and STRING EPR,
    ``all_pairs``): what the demo settings cost in quality. Reads the corpus, universe and references of
    a home where the demo has run."""
    sys.path.insert(0, str(ROOT))
    import duckdb

    from scgrn_assets.lib.benchmarks import log_normalized
    from scgrn_assets.lib.benchmarks.baselines import grnboost2_edges, regdiffusion_edges
    from scgrn_assets.lib.benchmarks.pipeline import score_methods
    from scgrn_assets.lib.corpus import read_corpus

    corpus = read_corpus(home / "assets" / "combined_corpus" / "combined_corpus.zarr")
    genes = json.loads((home / "assets" / "gene_universe" / "gene_universe.json").read_text())["genes"]
    expression = log_normalized(corpus.X[:, corpus.var_names.get_indexer(genes)],
                                corpus.obs["n_counts"].to_numpy()).toarray()
    groups = corpus.obs["study"].astype(str).to_numpy()
    with duckdb.connect(str(home / "scgrn.duckdb"), read_only=True) as connection:
        reference = connection.execute("SELECT * FROM reference_edges").df()
    references = {name: group.reset_index(drop=True) for name, group in reference.groupby("reference")}
    runs = {f"RegDiffusion {n} epochs": lambda n=n: regdiffusion_edges(expression, genes, n_steps=n, max_cells=2000,
                                                                       seed=0, groups=groups)
            for n in (100, 300, 1000)}
    runs["GRNBoost2 300 cells, 100 trees"] = lambda: grnboost2_edges(expression, genes, max_cells=300,
                                                                     max_estimators=100, seed=0, groups=groups)
    print("| peer run | seconds | TRRUST EPR | STRING EPR |\n| --- | --- | --- | --- |")
    for name, run in runs.items():
        started = time.perf_counter()
        edges = run()
        seconds = time.perf_counter() - started
        table, _ = score_methods({name: edges}, references, genes, top_k=None, n_null=5, seed=0)
        epr = table[(table["universe"] == "all_pairs") & (table["metric"] == "epr")].set_index("reference")["value"]
        print(f"| {name} | {seconds:.0f} | {epr.get('TRRUST', float('nan')):.2f} | "
              f"{epr.get('STRING', float('nan')):.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", action="store_true", help="also time `make test`")
    parser.add_argument("--configs", action="store_true", help="time the demo model's configurations to the gate")
    parser.add_argument("--max-steps", type=int, default=2000, help="--configs: ceiling per configuration")
    parser.add_argument("--keep", help="SCGRN_HOME to use and keep (default: a temporary folder, removed)")
    parser.add_argument("--home", help="--configs / --peers: use this SCGRN_HOME, where the demo has run")
    parser.add_argument("--peers", action="store_true", help="with --home: the peers' run time against their EPR")
    args = parser.parse_args()
    if args.peers and args.home:
        time_peers(Path(args.home))
        return
    if args.configs and args.home:
        time_configs(Path(args.home), args.max_steps)
        return
    home = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="scgrn-first-hour-"))
    try:
        demo_s = run_demo(home)
        report = training_report(home)
        rerun_s = run_demo(home)
        if args.configs:
            time_configs(home, args.max_steps)
        tests_s = run_tests() if args.tests else float("nan")
        print(f"RESULT name=first_hour demo_s={demo_s:.1f} model_s={report['seconds']:.1f} "
              f"gate_margin={report['margin']:.3f} steps={report['n_steps']} rerun_s={rerun_s:.1f} "
              f"tests_s={tests_s:.1f} goal_demo_s=300 goal_rerun_s=20 goal_tests_s=600")
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()

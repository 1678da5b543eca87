"""Benchmark: condition effects, calibration and speed, ours beside PyDESeq2 (and the cell-level ADVI model).

Calibration: designs with animals within conditions within studies (``lib/condition_effects/simulate.py``):
tau (animal x gene sd) in {0, 0.1, 0.25, 0.4}, balanced (2 studies x 4 animals per arm) and
unbalanced (3 studies, 3-5 animals per arm), 100-1,000 cells per animal, 1,000 genes, plus
null-only mock comparisons and a confounded design (which must be refused). Every method is
scored by one function (``lib/de_calibration.score_calls``): 90% interval coverage, FDR among
calls at a 5% target, power.

Speed: one corpus of cells (``--full``: 186k cells x 3,000 genes, 2 studies x 8 animals),
pseudobulked and fitted by ours; PyDESeq2 on the same pseudobulk, in the same run.

Last line: ``RESULT name=de_calibration ratio=<PyDESeq2 s / ours s> goal=0.1 fdr=… coverage90=… power=…
pydeseq2_power=…`` (fdr, coverage and power are ours, averaged over the calibration designs).

Usage::

    .venv/bin/python bench/de_calibration.py                 # 1 seed per design, 20k cells for speed (~10 min)
    .venv/bin/python bench/de_calibration.py --seeds 3 --cell-advi --full
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import pandas as pd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scgrn_assets.lib.condition_effects.calibration import run_cell_advi, run_methods  # noqa: E402
from scgrn_assets.lib.condition_effects.simulate import DesignConfig, simulate_comparison  # noqa: E402
from scgrn_assets.lib.errors import ScgrnInputError  # noqa: E402
from scgrn_assets.lib.condition_effects.pseudobulk import Pseudobulk, check_design, pseudobulk_by_animal  # noqa: E402

TAUS = (0.0, 0.1, 0.25, 0.4)
UNBALANCED = ((3, 5), (4, 3), (5, 4))


def calibration(seeds: int, cell_advi: bool) -> pd.DataFrame:
    rows = []
    for seed in range(seeds):
        for tau in TAUS:
            for design, arms, n_studies in (("balanced", 4, 2), ("unbalanced", UNBALANCED, 3)):
                config = DesignConfig(n_studies=n_studies, n_animals_per_arm=arms, tau=tau, design=design,
                                      seed=1000 * seed + int(100 * tau) + (7 if design == "unbalanced" else 0))
                rows += run_methods(config)
                print(pd.DataFrame(rows[-2:]).to_string(index=False, header=len(rows) == 2), flush=True)
        for mock_seed in range(2):
            rows += run_methods(DesignConfig(n_animals_per_arm=5, tau=0.25, design="null_mock",
                                             seed=5000 + 10 * seed + mock_seed))
            print(pd.DataFrame(rows[-2:]).to_string(index=False, header=False), flush=True)
        if cell_advi:
            for tau in (0.0, 0.25):
                rows.append(run_cell_advi(DesignConfig(n_animals_per_arm=4, tau=tau, cells_per_animal=(100, 400),
                                                       seed=9000 + seed + int(100 * tau))))
                print(pd.DataFrame(rows[-1:]).to_string(index=False, header=False), flush=True)
    return pd.DataFrame(rows)


def confounded_is_refused() -> bool:
    simulated = simulate_comparison(DesignConfig(n_studies=2, design="confounded", n_genes=200, seed=1))
    # Study 2 keeps both arms, so drop its AD animals: study 1 all AD, study 2 all control.
    animals = simulated.animals
    keep = ~((animals["study"] == animals["study"].iloc[-1]) & (animals["condition"] == "AD"))
    pseudobulk = Pseudobulk(simulated.pseudobulk[keep.to_numpy()], animals[keep].reset_index(drop=True),
                            simulated.genes["gene"].tolist())
    try:
        check_design(pseudobulk)
    except ScgrnInputError as error:
        print(f"confounded design refused: {error}")
        return True
    return False


def speed(n_cells: int, n_genes: int) -> dict:
    """Ours (pseudobulk from cells + fit + table) vs PyDESeq2 on the same pseudobulk, wall seconds."""
    from scgrn_assets.lib.condition_effects.pipeline import select_expressed_genes
    from scgrn_assets.lib.condition_effects.peer import pydeseq2_effects
    from scgrn_assets.lib.condition_effects.model import effect_draws, effect_table, fit_pseudobulk_model

    per_animal = n_cells // 16
    started = time.perf_counter()
    simulated = simulate_comparison(DesignConfig(n_studies=2, n_animals_per_arm=4, n_genes=n_genes, tau=0.25,
                                                 cells_per_animal=(per_animal, per_animal), seed=42),
                                    keep_cells=True)
    print(f"simulated {simulated.cell_counts.shape[0]} cells x {n_genes} genes in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    started = time.perf_counter()
    pseudobulk = pseudobulk_by_animal(simulated.cell_counts, simulated.cells, simulated.genes["gene"].tolist(),
                                      ("control", "AD"))
    pseudobulk = pseudobulk.subset(genes=select_expressed_genes(pseudobulk))
    table = effect_table(effect_draws(fit_pseudobulk_model(pseudobulk)), pseudobulk)
    ours = time.perf_counter() - started
    peer = pydeseq2_effects(pseudobulk)
    return {"n_cells": simulated.cell_counts.shape[0], "n_genes": pseudobulk.n_genes, "ours_seconds": ours,
            "pydeseq2_seconds": peer.attrs["seconds"], "n_called": int(table["called"].sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=1, help="seeds per calibration design (README: 3)")
    parser.add_argument("--cell-advi", action="store_true", help="also score the cell-level ADVI model (slow)")
    parser.add_argument("--full", action="store_true", help="speed at 186k cells x 3,000 genes (default 20k x 3,000)")
    parser.add_argument("--out", default=None, help="write the calibration table as CSV here")
    parser.add_argument("--speed-only", action="store_true", help="skip the calibration designs")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    if args.speed_only:
        timing = speed(186_000 if args.full else 20_000, 3000)
        print(f"speed: {timing}")
        print(f"RESULT name=de_calibration ratio={timing['pydeseq2_seconds'] / timing['ours_seconds']:.2f} goal=0.1 "
              f"ours_seconds={timing['ours_seconds']:.0f} n_cells={timing['n_cells']} (speed only)")
        return
    table = calibration(args.seeds, args.cell_advi)
    if args.out:
        table.to_csv(args.out, index=False)
    real = table[table["design"] != "null_mock"]
    summary = (real.groupby(["method", "tau"])[["coverage90", "fdr", "power"]].mean().round(3))
    print("\nby method and tau (mean over designs and seeds):\n" + summary.to_string())
    mock = table[table["design"] == "null_mock"].groupby("method")["called_fraction"].mean()
    print("\nnull-only mock comparisons, share of genes called:\n" + mock.round(4).to_string())
    refused = confounded_is_refused()
    timing = speed(186_000 if args.full else 20_000, 3000)
    print(f"\nspeed: {timing}")
    ours = real[real["method"].str.startswith("ours")]
    peer = real[real["method"] == "PyDESeq2"]
    print(f"RESULT name=de_calibration ratio={timing['pydeseq2_seconds'] / timing['ours_seconds']:.2f} goal=0.1 "
          f"fdr={ours['fdr'].mean():.3f} coverage90={ours['coverage90'].mean():.3f} power={ours['power'].mean():.3f} "
          f"pydeseq2_power={peer['power'].mean():.3f} pydeseq2_fdr={peer['fdr'].mean():.3f} "
          f"mock_called={mock.get('ours (pseudobulk NB, ash)', float('nan')):.4f} confounded_refused={refused} "
          f"ours_seconds={timing['ours_seconds']:.0f} n_cells={timing['n_cells']}")


if __name__ == "__main__":
    main()

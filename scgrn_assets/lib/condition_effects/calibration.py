"""Calibration of condition-effect methods on simulated designs: coverage, false discovery rate, power.

One scorer for every method (ours, PyDESeq2, the cell-level ADVI model), so their numbers are
comparable; used by ``bench/de_calibration.py`` and the tests.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from scgrn_assets.lib.condition_effects.simulate import DesignConfig, SimulatedComparison, simulate_comparison
from scgrn_assets.lib.condition_effects.pseudobulk import Pseudobulk


def score_calls(truth_log2fc: np.ndarray, mean: np.ndarray, low: np.ndarray, high: np.ndarray,
                called: np.ndarray) -> dict:
    """Coverage of the intervals, and FDR and power of the calls, against the simulated truth.

    A call is false when the gene has no effect or its sign is wrong; power is the share of
    genes with an effect called with the right sign.
    """
    called = np.asarray(called, dtype=bool)
    false = called & ((truth_log2fc == 0) | (np.sign(truth_log2fc) != np.sign(mean)))
    n_effects = int((truth_log2fc != 0).sum())
    return {"coverage90": float(np.mean((low <= truth_log2fc) & (truth_log2fc <= high))),
            "n_called": int(called.sum()), "n_false": int(false.sum()),
            "fdr": float(false.sum() / called.sum()) if called.any() else 0.0,
            "power": float((called & ~false).sum() / n_effects) if n_effects else float("nan"),
            "called_fraction": float(called.mean())}


def simulated_pseudobulk(simulated: SimulatedComparison) -> tuple[Pseudobulk, np.ndarray]:
    """The expressed genes (>= 5 counts in >= 3 animals) of a simulated comparison, and their true log2FC."""
    from scgrn_assets.lib.condition_effects.pipeline import select_expressed_genes

    pseudobulk = Pseudobulk(simulated.pseudobulk, simulated.animals, simulated.genes["gene"].tolist())
    genes = select_expressed_genes(pseudobulk)
    return pseudobulk.subset(genes=genes), simulated.genes["log2fc"].to_numpy()[genes]


def run_methods(config: DesignConfig, *, fdr_target: float = 0.05) -> list[dict]:
    """Ours (the default pseudobulk model) and PyDESeq2 on one simulated design: one row per method."""
    from scgrn_assets.lib.condition_effects.peer import pydeseq2_effects
    from scgrn_assets.lib.condition_effects.model import effect_draws, effect_table, fit_pseudobulk_model

    pseudobulk, truth = simulated_pseudobulk(simulate_comparison(config))
    rows = []
    started = time.perf_counter()
    ours = effect_table(effect_draws(fit_pseudobulk_model(pseudobulk)), pseudobulk, fdr_target=fdr_target)
    seconds = time.perf_counter() - started
    rows.append({"method": "ours (pseudobulk NB, ash)", "seconds": seconds,
                 **score_calls(truth, ours["log2fc_mean"].to_numpy(), ours["log2fc_q05"].to_numpy(),
                               ours["log2fc_q95"].to_numpy(), ours["called"].to_numpy())})
    peer = pydeseq2_effects(pseudobulk, fdr_target=fdr_target)
    rows.append({"method": "PyDESeq2", "seconds": peer.attrs["seconds"],
                 **score_calls(truth, peer["log2FoldChange"].fillna(0).to_numpy(), peer["log2fc_q05"].to_numpy(),
                               peer["log2fc_q95"].to_numpy(), peer["called"].to_numpy())})
    design = {"tau": config.tau, "design": config.design, "n_studies": config.n_studies,
              "animals_per_arm": str(config.animals_per_arm()), "seed": config.seed, "n_genes": pseudobulk.n_genes}
    return [{**design, **row} for row in rows]


def run_cell_advi(config: DesignConfig, *, max_steps: int = 3000, fdr_target: float = 0.05) -> dict:
    """The original cell-level minibatch ADVI model (cells as replicates) on the same kind of design, scored
    the same way: its calls are lfsr-ranked s-values of its own posterior."""
    from scgrn_assets.lib.condition_effects.cell_model_inference import fit_nb_posterior
    from scgrn_assets.lib.condition_effects.cell_model import NBFitConfig
    from scgrn_assets.lib.condition_effects.model import effect_table

    simulated = simulate_comparison(config, keep_cells=True)
    pseudobulk, truth = simulated_pseudobulk(simulated)
    columns = pd.Index(simulated.genes["gene"]).get_indexer(pseudobulk.gene_names)
    cells = simulated.cells
    studies = sorted(cells["study"].unique())
    started = time.perf_counter()
    posterior = fit_nb_posterior(
        counts=simulated.cell_counts[:, columns], library_size=cells["n_counts"].to_numpy(float),
        condition=(cells["condition"] == "AD").to_numpy(float),
        study_index=np.searchsorted(studies, cells["study"].to_numpy()),
        gene_length_bp=np.full(len(columns), np.nan), study_names=studies, gene_names=pseudobulk.gene_names,
        config=NBFitConfig(max_steps=max_steps, min_steps=min(max_steps, 1000), seed=config.seed))
    seconds = time.perf_counter() - started
    draws = posterior.idata.posterior["beta1"].values.reshape(-1, len(columns)) / np.log(2)
    table = effect_table(draws, pseudobulk, fdr_target=fdr_target)
    return {"tau": config.tau, "design": config.design, "n_studies": config.n_studies,
            "animals_per_arm": str(config.animals_per_arm()), "seed": config.seed, "n_genes": pseudobulk.n_genes,
            "method": "cell-level ADVI (cells as replicates)", "seconds": seconds,
            **score_calls(truth, table["log2fc_mean"].to_numpy(), table["log2fc_q05"].to_numpy(),
                          table["log2fc_q95"].to_numpy(), table["called"].to_numpy())}

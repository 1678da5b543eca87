"""PyDESeq2 on the same per-animal pseudobulk: the peer a user puts beside our answer.

Same animals, same genes, same design (``~ study + condition`` when several studies hold both
conditions), so a difference between the two tables is a difference of method, not of input.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from scgrn_assets.lib.condition_effects.pseudobulk import Pseudobulk


def pydeseq2_effects(pseudobulk: Pseudobulk, *, fdr_target: float = 0.05, n_cpus: int = 1) -> pd.DataFrame:
    """PyDESeq2's Wald test of condition (case vs reference), with study as a covariate.

    Returns
    -------
    pd.DataFrame
        One row per gene in ``pseudobulk`` order, PyDESeq2's vocabulary plus ours: ``gene``,
        ``baseMean``, ``log2FoldChange``, ``lfcSE``, ``stat``, ``pvalue``, ``padj``, ``called``
        (``padj <= fdr_target``), ``log2fc_q05`` / ``log2fc_q95`` (Wald 90% interval),
        and the wall time in ``attrs["seconds"]``.
    """
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats

    started = time.perf_counter()
    reference, case = pseudobulk.levels
    samples = pseudobulk.samples
    index = [f"s{i}" for i in range(pseudobulk.n_samples)]
    # Factor levels as safe identifiers (PyDESeq2's formula parser dislikes "/" or spaces).
    metadata = pd.DataFrame({"condition": np.where(pseudobulk.is_case, "case", "reference"),
                             "study": ["study" + str(code) for code in pd.factorize(samples["study"])[0]]},
                            index=index)
    counts = pd.DataFrame(pseudobulk.counts, index=index, columns=[f"g{j}" for j in range(pseudobulk.n_genes)])
    design = "~study + condition" if metadata["study"].nunique() > 1 else "~condition"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(counts=counts, metadata=metadata, design=design, quiet=True,
                           inference=DefaultInference(n_cpus=n_cpus))
        dds.deseq2()
        result = DeseqStats(dds, contrast=["condition", "case", "reference"], alpha=fdr_target, quiet=True,
                            inference=DefaultInference(n_cpus=n_cpus))
        result.summary()
    table = result.results_df.reindex(counts.columns)
    z = stats.norm.ppf(0.95)
    out = pd.DataFrame({"gene": pseudobulk.gene_names,
                        "baseMean": table["baseMean"].to_numpy(),
                        "log2FoldChange": table["log2FoldChange"].to_numpy(),
                        "lfcSE": table["lfcSE"].to_numpy(),
                        "stat": table["stat"].to_numpy(),
                        "pvalue": table["pvalue"].to_numpy(),
                        "padj": table["padj"].to_numpy()})
    out["called"] = (out["padj"] <= fdr_target).fillna(False).astype(bool)
    out["log2fc_q05"] = out["log2FoldChange"] - z * out["lfcSE"]
    out["log2fc_q95"] = out["log2FoldChange"] + z * out["lfcSE"]
    out.attrs["seconds"] = time.perf_counter() - started
    out.attrs["levels"] = f"{case} vs {reference}"
    return out


def agreement_with_peer(ours: pd.DataFrame, peer: pd.DataFrame) -> dict:
    """How our table and the peer's agree: Spearman correlation of effects, overlap of calls."""
    merged = ours[["gene", "log2fc_mean", "called"]].merge(
        peer[["gene", "log2FoldChange", "called"]], on="gene", suffixes=("_ours", "_peer"))
    finite = np.isfinite(merged["log2FoldChange"].to_numpy())
    rho = stats.spearmanr(merged.loc[finite, "log2fc_mean"], merged.loc[finite, "log2FoldChange"]).statistic \
        if finite.sum() > 2 else float("nan")
    ours_called, peer_called = merged["called_ours"].to_numpy(), merged["called_peer"].to_numpy()
    both = int((ours_called & peer_called).sum())
    either = int((ours_called | peer_called).sum())
    return {"spearman_log2fc": float(rho), "n_called_ours": int(ours_called.sum()),
            "n_called_peer": int(peer_called.sum()), "n_called_both": both,
            "jaccard_calls": float(both / either) if either else 1.0}

"""The GRN path's shared steps (lib/benchmarks/pipeline.py) called as a library, without the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgrn_assets.lib.benchmarks.expression_files import ExpressionData
from scgrn_assets.lib.benchmarks.grn_benchmark import attention_network
from scgrn_assets.lib.benchmarks.pipeline import GrnPathSettings


def tiny_expression(n_cells: int = 120, n_genes: int = 12, seed: int = 0) -> ExpressionData:
    """Counts of ``n_genes`` genes in ``n_cells`` cells, every cell expressing several genes."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(2.0, 2.0, size=n_genes), size=(n_cells, n_genes)).astype(float)
    counts[:, 0] += 1  # no empty cell
    var = pd.DataFrame(index=pd.Index([f"G{i}" for i in range(n_genes)], name="gene_symbol"))
    return ExpressionData(values=sp.csr_matrix(counts), var=var, n_counts=counts.sum(axis=1), value_kind="counts",
                          orientation="cells-x-genes", path="tiny")


def test_attention_network_runs_without_a_progress_callback(one_torch_thread):
    # progress=None used to raise TypeError ('NoneType' object is not callable) at the first training step.
    edges, loss_curve = attention_network(tiny_expression(), GrnPathSettings(train_steps=3, train_batch_size=4),
                                          progress=None)
    assert len(loss_curve) == 3 and np.isfinite(loss_curve).all()
    assert len(edges) > 0 and (edges["gene_i"] < edges["gene_j"]).all()

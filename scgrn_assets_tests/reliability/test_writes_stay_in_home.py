"""Nothing is written outside SCGRN_HOME: dependencies that write into the current folder are given a place.

RegDiffusion's default logger makes ``./result_logs/<date>/`` in whatever folder ``scgrn demo`` was
started from; the library call is run here in an empty working folder, which must stay empty.
"""

from __future__ import annotations

import numpy as np

from scgrn_assets.lib.benchmarks.baselines import regdiffusion_edges
from scgrn_assets_tests.reliability import ledger


def test_regdiffusion_leaves_nothing_in_the_current_folder(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    counts = np.random.default_rng(3).poisson(2.0, size=(60, 5)).astype(float)
    names = [f"g{i}" for i in range(5)]
    ledger.record("fault")
    edges = regdiffusion_edges(np.log1p(counts), names, n_steps=2, max_cells=60, seed=1)
    assert len(edges) == 5 * 4 and np.isfinite(edges["score"]).all()
    assert sorted(path.name for path in cwd.rglob("*")) == []

"""Per-animal pseudobulk against a pandas groupby, and the design rules that decide what can be estimated."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.condition_effects.pseudobulk import Pseudobulk, check_design, pseudobulk_by_animal


def _cells(rng, n_cells=300, n_genes=7):
    obs = pd.DataFrame({"study": rng.choice(["GSE2", "GSE1"], n_cells),
                        "sample": rng.choice(["GSM1", "GSM2", "GSM3", "GSM4"], n_cells),
                        "n_counts": rng.integers(100, 1000, n_cells).astype(float)})
    obs["animal"] = obs["sample"]
    # Condition is a property of the animal.
    obs["condition"] = np.where(obs["sample"].isin(["GSM1", "GSM2"]), "control", "AD")
    obs.loc[rng.random(n_cells) < 0.1, "condition"] = None  # unknown: left out
    counts = sp.random(n_cells, n_genes, density=0.4, random_state=rng, data_rvs=lambda k: rng.integers(1, 9, k))
    return sp.csr_matrix(counts), obs


def test_sums_equal_a_pandas_groupby():
    rng = np.random.default_rng(0)
    counts, obs = _cells(rng)
    result = pseudobulk_by_animal(counts, obs, [f"g{i}" for i in range(7)], ("control", "AD"))
    known = obs["condition"].notna().to_numpy()
    frame = pd.DataFrame(counts.toarray()[known]).assign(study=obs["study"].to_numpy()[known],
                                                         animal=obs["animal"].to_numpy()[known])
    expected = frame.groupby(["study", "animal"]).sum()
    for row, sample in result.samples.iterrows():
        np.testing.assert_array_equal(result.counts[row], expected.loc[(sample["study"], sample["animal"])].to_numpy())
        cells = known & (obs["study"] == sample["study"]).to_numpy() & (obs["animal"] == sample["animal"]).to_numpy()
        assert sample["n_cells"] == cells.sum()
        assert sample["library_size"] == pytest.approx(obs.loc[cells, "n_counts"].sum())
    assert list(result.samples["study"]) == sorted(result.samples["study"])


def test_sample_is_the_animal_when_no_animal_column_and_mixed_animals_are_refused():
    rng = np.random.default_rng(1)
    counts, obs = _cells(rng)
    without = pseudobulk_by_animal(counts, obs.drop(columns="animal"), list("abcdefg"), ("control", "AD"))
    assert set(without.samples["animal"]) == {"GSM1", "GSM2", "GSM3", "GSM4"}
    obs.loc[obs.index[obs["condition"].notna()][0], "condition"] = \
        "AD" if obs.loc[obs.index[obs["condition"].notna()][0], "condition"] == "control" else "control"
    with pytest.raises(ScgrnInputError, match="both conditions"):
        pseudobulk_by_animal(counts, obs, list("abcdefg"), ("control", "AD"))


def _design(arms: dict[str, tuple[int, int]], cells=100) -> Pseudobulk:
    rows = [{"study": study, "animal": f"{study}_{i}", "condition": label, "n_cells": cells, "library_size": 1e5}
            for study, (n_control, n_case) in arms.items()
            for i, label in enumerate(["control"] * n_control + ["AD"] * n_case)]
    return Pseudobulk(counts=np.ones((len(rows), 3), dtype=np.int64), samples=pd.DataFrame(rows),
                      gene_names=["a", "b", "c"])


def test_design_roles():
    report = check_design(_design({"GSE1": (3, 3), "GSE2": (4, 0), "GSE3": (1, 3)}))
    roles = dict(zip(report.studies["study"], report.studies["role"]))
    assert roles == {"GSE1": "contrast", "GSE2": "baseline_only", "GSE3": "excluded"}
    assert report.modelled_studies == ["GSE1", "GSE2"]


def test_confounded_design_is_refused_naming_the_studies():
    with pytest.raises(ScgrnInputError) as error:
        check_design(_design({"GSE1": (0, 4), "GSE2": (4, 0)}))
    assert "GSE1" in str(error.value) and "GSE2" in str(error.value) and "only AD" in str(error.value)


def test_single_cell_animals_are_refused_with_the_catalog_fix():
    with pytest.raises(ScgrnInputError, match="animal_column"):
        check_design(_design({"GSE1": (30, 30)}, cells=1))

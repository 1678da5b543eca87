"""Tests of the demo simulator: the truth it draws and the counts that follow from it."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import scipy.sparse
import scipy.stats

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.demo.simulator import (
    DEFAULT_STUDIES,
    WELLS_PER_PLATE,
    DemoConfig,
    StudyDesign,
    cell_state_term,
    measured_gene_indices,
    sample_negative_binomial_outer,
    simulate_sample_counts,
    simulate_truth,
)
from scgrn_assets.lib.demo.draws import _draw_barcodes


@pytest.fixture(scope="module")
def truth():
    return simulate_truth(DemoConfig())


def _study_counts(truth, study):
    """Counts, cell tables (with the sample's condition) and measured genes of a whole study."""
    matrices, tables = [], []
    for row in truth.samples[truth.samples["study"] == study].itertuples():
        counts, cells, measured = simulate_sample_counts(truth, study, row.sample)
        matrices.append(counts)
        tables.append(cells.assign(sample=row.sample, condition=row.condition))
    return scipy.sparse.vstack(matrices).tocsr(), pd.concat(tables, ignore_index=True), measured


@pytest.fixture(scope="module")
def umi_study(truth):
    return _study_counts(truth, "GSE900001")


# --------------------------------------------------------------------------- sampler


@pytest.mark.parametrize(
    ("mean", "phi"),
    [
        (0.3, 7.0),  # sparse bursts of size ~1
        (10.0, 0.05),  # sparse bursts with large logarithmic sizes
        (2.0, 1.0),  # sparse bursts, about one per cell
        (6.0, 4.0),  # drawn cell by cell
    ],
)
def test_sampler_matches_scipy_negative_binomial(mean, phi):
    rng = np.random.default_rng(11)
    n_cells = 20_000
    counts = sample_negative_binomial_outer(rng, np.full(n_cells, 100.0), np.array([mean / 100.0]), np.array([phi]))
    values = counts.toarray().ravel()
    expected = scipy.stats.nbinom(phi, phi / (phi + mean))
    edges = np.r_[np.arange(0, 8), np.inf]  # 0..7 and a tail bin
    observed_bins = np.histogram(values, bins=edges - 0.5)[0]
    expected_bins = n_cells * np.diff(expected.cdf(edges - 1))
    keep = expected_bins > 5
    observed_kept = np.r_[observed_bins[keep], observed_bins[~keep].sum()]
    expected_kept = np.r_[expected_bins[keep], expected_bins[~keep].sum()]
    nonempty = expected_kept > 0
    statistic, p_value = scipy.stats.chisquare(observed_kept[nonempty], expected_kept[nonempty])
    assert p_value > 1e-3, (statistic, observed_kept, expected_kept)
    assert abs(values.mean() - mean) < 5 * expected.std() / np.sqrt(n_cells)


def test_sampler_follows_per_cell_means_and_zeros():
    rng = np.random.default_rng(5)
    n_cells, n_genes = 3000, 40
    library_sizes = np.exp(rng.normal(np.log(3000), 0.5, n_cells))
    gene_means = np.exp(rng.uniform(np.log(1e-5), np.log(5e-3), n_genes))
    phi = np.exp(rng.normal(np.log(5), 0.5, n_genes))
    counts = sample_negative_binomial_outer(rng, library_sizes, gene_means, phi).toarray()
    assert counts.dtype == np.int32 and counts.shape == (n_cells, n_genes)
    means = library_sizes[:, None] * gene_means[None, :]
    p_zero = scipy.stats.nbinom.pmf(0, phi, phi / (phi + means))
    # Per gene: zeros and totals agree with the NB law cell by cell (within 5 standard errors).
    zeros_se = np.sqrt((p_zero * (1 - p_zero)).sum(axis=0))
    assert np.all(np.abs((counts == 0).sum(axis=0) - p_zero.sum(axis=0)) < 5 * zeros_se + 1)
    total_se = np.sqrt((means + means**2 / phi).sum(axis=0))
    assert np.all(np.abs(counts.sum(axis=0) - means.sum(axis=0)) < 5 * total_se)
    # Larger cells get more counts: the burst cell index really follows library size.
    big = library_sizes > np.median(library_sizes)
    assert counts[big].sum() > 1.5 * counts[~big].sum()


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_truth_and_counts(truth):
    again = simulate_truth(DemoConfig())
    pd.testing.assert_frame_equal(truth.genes, again.genes)
    pd.testing.assert_frame_equal(truth.edges, again.edges)
    pd.testing.assert_frame_equal(truth.samples, again.samples)
    np.testing.assert_array_equal(truth.study_effects, again.study_effects)
    # Samples drawn in a different order, from a fresh truth, are identical.
    first = simulate_sample_counts(truth, "GSE900004", "GSM9000043")
    simulate_sample_counts(again, "GSE900001", "GSM9000012")
    second = simulate_sample_counts(again, "GSE900004", "GSM9000043")
    assert (first[0] != second[0]).nnz == 0
    pd.testing.assert_frame_equal(first[1], second[1])
    np.testing.assert_array_equal(first[2], second[2])


def test_different_seed_or_sample_gives_different_data(truth):
    other = simulate_truth(DemoConfig(seed=8))
    assert not np.allclose(truth.genes["beta0"], other.genes["beta0"])
    assert not truth.edges[["tf", "target"]].equals(other.edges[["tf", "target"]])
    counts, _, _ = simulate_sample_counts(truth, "GSE900001", "GSM9000011")
    other_counts, _, _ = simulate_sample_counts(other, "GSE900001", "GSM9000011")
    neighbour_counts, _, _ = simulate_sample_counts(truth, "GSE900001", "GSM9000012")
    assert (counts != other_counts).nnz > 0
    assert (counts != neighbour_counts).nnz > 0


# --------------------------------------------------------------------------- truth


def test_truth_parameters_follow_the_stated_model(truth):
    genes, config = truth.genes, truth.config
    assert len(genes) == config.n_genes and list(genes.index) == list(range(config.n_genes))
    proportions = np.exp(genes["beta0"] + truth.gamma * np.log(genes["gene_length_bp"] / 1000.0))
    assert proportions.sum() == pytest.approx(1.0)
    # Heavy tail: a few genes take most of the library, the median gene very little.
    assert np.sort(proportions)[::-1][:10].sum() > 0.5
    assert np.median(proportions) < 1e-3
    beta1 = genes["beta1"].to_numpy()
    condition_genes = beta1 != 0
    assert condition_genes.sum() == round(config.condition_gene_fraction * config.n_genes)
    assert np.all((np.abs(beta1[condition_genes]) >= 0.4) & (np.abs(beta1[condition_genes]) <= 1.5))
    assert (beta1 > 0).any() and (beta1 < 0).any()
    assert truth.study_effects.shape == (len(config.studies), config.n_genes)
    assert 0.15 < truth.study_effects.std() < 0.35
    assert 3.0 < np.median(genes["phi"]) < 12.0
    assert genes["is_tf"].sum() == config.n_tfs and genes["in_network"].sum() == config.n_network_genes
    assert genes.loc[genes["in_network"], "grn_sd"].between(0.3, 0.6).all()
    assert (genes.loc[~genes["in_network"], "grn_sd"] == 0).all()


def test_samples_table(truth):
    samples = truth.samples
    assert list(samples.columns[:5]) == ["study", "sample", "sample_name", "condition", "n_cells"]
    assert samples["sample"].is_unique
    for design in DEFAULT_STUDIES:
        rows = samples[samples["study"] == design.accession]
        assert len(rows) == design.n_samples and rows["n_cells"].sum() == design.n_cells
        if design.has_condition:
            assert set(rows["condition"]) == {"AD", "control"}
            assert all(name.startswith(cond) for name, cond in zip(rows["sample_name"], rows["condition"]))
        else:
            assert rows["condition"].isna().all()


def test_network_edges_signs_and_scores(truth):
    edges = truth.edges
    symbols = truth.genes.set_index("gene_symbol")
    assert set(edges["sign"]) == {-1, 1}
    assert (edges["weight"] > 0).all()
    assert edges["string_score"].between(150, 999).all()
    assert scipy.stats.spearmanr(edges["weight"], edges["string_score"])[0] > 0.5
    assert symbols.loc[edges["tf"], "is_tf"].all()
    assert symbols.loc[edges["target"], "in_network"].all()
    assert not edges.duplicated(["tf", "target"]).any()
    # Every non-master network gene has a regulator; master TFs have none.
    regulated = set(edges["target"])
    layer = symbols["tf_layer"]
    network_genes = symbols.index[symbols["in_network"]]
    assert {gene for gene in network_genes if layer[gene] != 0} == regulated
    # Two-layer chains: a master TF regulates a secondary TF that has targets of its own.
    tf_to_tf = edges[symbols.loc[edges["target"], "is_tf"].to_numpy()]
    assert (symbols.loc[tf_to_tf["tf"], "tf_layer"] == 0).all()
    assert tf_to_tf["target"].isin(edges["tf"]).any()


def test_out_degree_is_heavy_tailed(truth):
    out_degree = truth.edges.groupby("tf").size()
    assert out_degree.max() >= 4 * out_degree.median()


def test_cell_state_term_has_the_stated_scale_and_coefficients(truth):
    rng = np.random.default_rng(3)
    n_cells = 20_000
    cell_state = rng.choice(len(truth.state_probabilities), size=n_cells, p=truth.state_probabilities)
    term = cell_state_term(truth, cell_state, rng)
    genes = truth.genes.iloc[: truth.config.n_network_genes]
    np.testing.assert_allclose(term.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(term.std(axis=0), genes["grn_sd"], rtol=0.06)
    # Least squares of each target on its regulators recovers the signed edge weights.
    position = {symbol: index for index, symbol in enumerate(genes["gene_symbol"])}
    for target, regulators in list(truth.edges.groupby("target"))[:40]:
        design = term[:, [position[tf] for tf in regulators["tf"]]]
        fitted = np.linalg.lstsq(design, term[:, position[target]], rcond=None)[0]
        np.testing.assert_allclose(fitted, regulators["sign"] * regulators["weight"], atol=0.03)


def test_gene_symbols_follow_the_naming_rules(truth):
    symbols = truth.genes["gene_symbol"]
    assert symbols.str.lower().is_unique
    assert symbols.str.match(r"^[0-9]").mean() >= 0.03
    assert not symbols.str.match(r"^X[0-9]").any()
    assert symbols.str.match(r"^X[a-z]").sum() >= 2
    assert symbols.str.match(r"^[A-Za-z0-9]+$").all()
    ensembl = truth.genes["ensembl_id"]
    assert ensembl.is_unique and ensembl.str.fullmatch(r"ENSMUSG\d{11}").all()
    lengths = truth.genes["gene_length_bp"]
    assert lengths.dtype.kind == "i" and 1500 < lengths.median() < 3500 and (lengths > 0).all()


def test_measured_genes_keep_network_and_condition_genes(truth):
    genes = truth.genes
    must_keep = np.flatnonzero(genes["in_network"] | (genes["beta1"] != 0))
    for design in DEFAULT_STUDIES:
        measured = measured_gene_indices(truth, design.accession)
        assert np.all(np.diff(measured) > 0)
        assert measured.size == round(design.gene_fraction * truth.config.n_genes)
        assert np.isin(must_keep, measured).all()


# --------------------------------------------------------------------------- counts


def test_sample_counts_shape_and_cell_table(truth):
    counts, cells, measured = simulate_sample_counts(truth, "GSE900003", "GSM9000032")
    assert isinstance(counts, scipy.sparse.csr_matrix) and counts.dtype == np.int32
    assert counts.shape == (250, measured.size) and len(cells) == 250
    assert counts.data.min() > 0
    assert cells["barcode"].str.fullmatch(r"[ACGT]{16}").all() and cells["barcode"].is_unique
    assert set(cells["cell_state"]) <= set(range(truth.config.n_cell_states))


def test_umi_barcodes_are_unique_within_a_study(truth, umi_study):
    _, cells, _ = umi_study
    assert cells["barcode"].is_unique
    # Even samples that happened to share a random stream could not collide.
    same_stream = [_draw_barcodes(np.random.default_rng(0), 20_000, index, 6) for index in range(6)]
    assert len(set(np.concatenate(same_stream))) == 6 * 20_000


def test_plate_study_cells_are_wells_of_one_plate(truth):
    _, cells, _ = simulate_sample_counts(truth, "GSE900002", "GSM9000023")
    assert (cells["barcode"] == cells["well_id"]).all() and cells["well_id"].is_unique
    assert cells["well_id"].str.fullmatch(r"[A-P]([1-9]|1[0-9]|2[0-4])").all()
    assert (cells["plate_id"] == 3).all()


def test_library_sizes_and_zero_fraction_per_library_type(truth, umi_study):
    counts, cells, _ = umi_study
    totals = np.asarray(counts.sum(axis=1)).ravel()
    assert 2000 < np.median(cells["library_size_target"]) < 5000
    assert 2000 < np.median(totals) < 5000
    # Observed totals track s_i (the fitted model's offset) cell by cell.
    # (0.85, not 0.9: each animal's own deviation also moves its few dominant genes, whose noise the totals carry.)
    assert np.corrcoef(np.log(totals), np.log(cells["library_size_target"]))[0, 1] > 0.85
    assert 0.85 <= 1 - counts.nnz / np.prod(counts.shape) <= 0.92
    for study in ("GSE900003", "GSE900004"):
        sample = truth.samples.loc[truth.samples["study"] == study, "sample"].iloc[0]
        sample_counts, _, _ = simulate_sample_counts(truth, study, sample)
        assert 0.82 <= 1 - sample_counts.nnz / np.prod(sample_counts.shape) <= 0.92
    plate_counts, plate_cells, _ = simulate_sample_counts(truth, "GSE900002", "GSM9000021")
    plate_totals = np.asarray(plate_counts.sum(axis=1)).ravel()
    assert 1e5 < np.median(plate_cells["library_size_target"]) < 5e5
    assert 1e5 < np.median(plate_totals) < 5e5


def test_mean_counts_estimate_beta0_and_beta1(truth, umi_study):
    counts, cells, measured = umi_study
    genes = truth.genes.iloc[measured]
    is_ad = (cells["condition"] == "AD").to_numpy()
    library_size = cells["library_size_target"].to_numpy()

    def detected(rows):
        return np.asarray((counts[rows] > 0).sum(axis=0)).ravel() >= 50

    expressed = detected(~is_ad) & detected(is_ad)
    genes = genes[expressed]

    def log_rate(rows):
        return np.log(np.asarray(counts[rows][:, expressed].mean(axis=0)).ravel() / library_size[rows].mean())

    control_rate, ad_rate = log_rate(~is_ad), log_rate(is_ad)
    beta1 = genes["beta1"].to_numpy()
    condition_genes = beta1 != 0
    assert condition_genes.sum() >= 40
    estimate = ad_rate - control_rate
    assert np.corrcoef(estimate[condition_genes], beta1[condition_genes])[0, 1] > 0.9
    # Animals differ (sd tau per gene), so a null gene's AD-vs-control estimate from n animals per arm
    # has sd ~ tau * sqrt(2 / n) on top of sampling noise: its median |value| is ~0.674 of that.
    n_per_arm = len(truth.samples[(truth.samples["study"] == "GSE900001") & (truth.samples["condition"] == "AD")])
    animal_noise = 0.674 * truth.config.animal_effect_sd * np.sqrt(2 / n_per_arm)
    assert 0.5 * animal_noise < np.median(np.abs(estimate[~condition_genes])) < animal_noise + 0.1
    # Outside the network, control cells' rates estimate beta0 + b + gamma * log(L / 1 kb) (+ the mean of
    # the control animals' own deviations, sd tau / sqrt(n)).
    background = ~genes["in_network"].to_numpy()
    predicted = (
        genes["beta0"].to_numpy()
        + truth.study_effects[0, genes.index]
        + truth.gamma * np.log(genes["gene_length_bp"].to_numpy() / 1000.0)
    )
    assert background.sum() >= 20
    assert np.median(np.abs(control_rate[background] - predicted[background])) < \
        0.1 + 0.674 * truth.config.animal_effect_sd / np.sqrt(n_per_arm)


def test_strong_edges_leave_a_signed_coexpression_footprint(truth, umi_study):
    counts, _, measured = umi_study
    totals = np.asarray(counts.sum(axis=1)).ravel()
    log_normalised = np.log1p(counts.multiply(1e4 / totals[:, None]).toarray())
    column = {gene: position for position, gene in enumerate(measured)}
    symbol_index = {symbol: index for index, symbol in enumerate(truth.genes["gene_symbol"])}
    edges = truth.edges[truth.edges["weight"] >= truth.edges["weight"].median()]
    correlations = np.array(
        [
            scipy.stats.spearmanr(
                log_normalised[:, column[symbol_index[edge.tf]]], log_normalised[:, column[symbol_index[edge.target]]]
            )[0]
            for edge in edges.itertuples()
        ]
    )
    assert np.mean(np.sign(correlations) == edges["sign"].to_numpy()) >= 0.75
    # Imperfect: far from a deterministic relation.
    assert np.median(np.abs(correlations)) < 0.5


# --------------------------------------------------------------------------- scale and errors


def test_scaled_config_has_the_requested_totals_without_generating():
    config = DemoConfig.scaled(n_cells=186_000, n_genes=30_000)
    assert config.n_cells == 186_000 and config.n_genes == 30_000
    assert [study.accession for study in config.studies] == [study.accession for study in DEFAULT_STUDIES]
    assert config.n_network_genes == 300
    plate = config.study("GSE900002")
    assert plate.library == "plate_reads" and plate.sample_n_cells(0) <= WELLS_PER_PLATE
    for n_cells in (1_000, 12_345, 999_983):
        assert DemoConfig.scaled(n_cells=n_cells, n_genes=2_000).n_cells == n_cells


def test_scaled_truth_and_one_sample():
    truth = simulate_truth(DemoConfig.scaled(n_cells=8_000, n_genes=5_000))
    assert len(truth.genes) == 5_000 and truth.samples["n_cells"].sum() == 8_000
    assert truth.genes["gene_symbol"].str.lower().is_unique
    sample = truth.samples.loc[truth.samples["study"] == "GSE900004"].iloc[0]
    counts, cells, measured = simulate_sample_counts(truth, "GSE900004", sample["sample"])
    assert counts.shape == (sample["n_cells"], measured.size) == (len(cells), round(0.85 * 5_000))
    assert 2000 < np.median(np.asarray(counts.sum(axis=1))) < 5000


def test_bad_requests_raise_input_errors(truth):
    with pytest.raises(ScgrnInputError, match="GSE900001.*GSM9999999"):
        simulate_sample_counts(truth, "GSE900001", "GSM9999999")
    with pytest.raises(ScgrnInputError, match="GSE123"):
        simulate_sample_counts(truth, "GSE123", "GSM9000011")
    with pytest.raises(ScgrnInputError, match=re.escape(f"at most {WELLS_PER_PLATE}")):
        DemoConfig(studies=(StudyDesign("GSE1", "plate_reads", n_samples=2, cells_per_sample=400, has_condition=True),))
    with pytest.raises(ScgrnInputError, match="library"):
        DemoConfig(studies=(StudyDesign("GSE1", "smartseq", n_samples=2, cells_per_sample=10, has_condition=True),))
    with pytest.raises(ScgrnInputError, match="n_tfs"):
        DemoConfig(n_tfs=400)

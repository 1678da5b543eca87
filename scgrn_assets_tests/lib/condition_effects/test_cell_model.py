"""Tests of the hierarchical NB model: likelihood against scipy, inference against simulated truth."""

from __future__ import annotations

import arviz as az
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scipy.stats
from scipy.special import gammaln

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.condition_effects.cell_model_inference import fit_nb_posterior, posterior_to_inference_data, windowed_elbo_converged
from scgrn_assets.lib.condition_effects.cell_model_data import (
    SMALL_COUNT_TABLE_SIZE,
    prepare_nb_data,
    select_model_genes,
    sufficient_statistics,
)
from scgrn_assets.lib.condition_effects.cell_model import NBFitConfig, NBPosterior, build_nb_model, nb_log_likelihood
from scgrn_assets.lib.condition_effects.cell_model_readout import condition_effect_table, load_posterior, save_posterior
from scgrn_assets.lib.condition_effects.cell_model_plots import plot_cell_model_volcano, plot_elbo, plot_ppc
from scgrn_assets.lib.condition_effects.cell_model_ppc import posterior_predictive_check, ppc_misfit_summary
from scgrn_assets_tests.support.condition_effects import NULL_CALL_RATE_LIMIT, SimulatedCorpus, fit_inputs, simulate_nb_corpus


def truth_inference_data(corpus: SimulatedCorpus, n_draws=40, phi_factor=1.0, jitter=0.01, seed=0):
    """An InferenceData whose draws sit at the simulator's truth (plus tiny jitter)."""
    rng = np.random.default_rng(seed)
    n_studies, n_genes = corpus.study_effect.shape

    def around(value):
        value = np.asarray(value, dtype=float)
        return value + jitter * rng.standard_normal((n_draws, *value.shape))

    draws = {
        "beta0_centred": around(corpus.beta0),
        "beta1": around(corpus.beta1),
        "log_phi": around(np.log(corpus.phi * phi_factor)),
        "z": around(corpus.study_effect),
        "sigma_b": np.ones(n_draws),
        "gamma": around(corpus.gamma),
        "mu0": around(-11.0),
        "sigma0": np.ones(n_draws),
        "sigma1": np.ones(n_draws),
        "phi_log_mean": around(0.3),
        "phi_log_sd": np.ones(n_draws) * 0.6,
    }
    data = prepare_nb_data(*fit_inputs(corpus))
    # posterior_to_inference_data derives beta0 = beta0_centred - beta1 * mean condition.
    draws["beta0_centred"] = draws["beta0_centred"] + draws["beta1"] * data.condition.mean()
    return posterior_to_inference_data(draws, data, np.linspace(-2e4, -1e4, 50))


# ---------------------------------------------------------------- likelihood

def test_fast_likelihood_equals_scipy_logpmf_up_to_data_constants():
    corpus = simulate_nb_corpus(n_cells=400, n_genes=40, seed=3)
    counts = corpus.counts.toarray()
    # Large counts exercise the lgamma tail beyond the small-count table.
    counts[:5, :3] = [[SMALL_COUNT_TABLE_SIZE + 1, 40, 250]] * 5
    corpus.counts = sp.csr_matrix(counts)
    assert (counts == 0).mean() > 0.5 and counts.max() > SMALL_COUNT_TABLE_SIZE
    data = prepare_nb_data(*fit_inputs(corpus))
    rng = np.random.default_rng(0)
    beta0 = rng.normal(-10, 1, 40)
    beta1 = rng.normal(0, 0.5, 40)
    study_effect = rng.normal(0, 0.3, (3, 40))
    gamma, phi = 0.2, np.exp(rng.normal(0, 1, 40))
    log_mu = (
        np.log(corpus.library_size)[:, None] + beta0 + beta1 * corpus.condition[:, None]
        + study_effect[corpus.study_index] + gamma * np.log(corpus.gene_length_bp / 1000)
    )
    mu = np.exp(log_mu)
    reference = scipy.stats.nbinom.logpmf(counts, phi, phi / (phi + mu)).sum()
    data_only_constant = -gammaln(counts + 1).sum()
    ours = nb_log_likelihood(data, beta0, beta1, study_effect, gamma, phi)
    assert ours == pytest.approx(reference - data_only_constant, rel=2e-5)


def test_sufficient_statistics_against_a_loop():
    corpus = simulate_nb_corpus(n_cells=200, n_genes=10, seed=5)
    counts = corpus.counts.toarray()
    counts[0, 0], counts[1, 0], counts[2, 4] = 30, 30, 100
    corpus.counts = sp.csr_matrix(counts)
    stats = sufficient_statistics(prepare_nb_data(*fit_inputs(corpus)))
    for gene in range(10):
        for k in range(SMALL_COUNT_TABLE_SIZE):
            assert stats.exceed_counts[k, gene] == np.sum(counts[:, gene] > k)
    tail = {(g, v): n for g, v, n in zip(stats.tail_gene, stats.tail_value, stats.tail_multiplicity)}
    expected = {}
    for gene in range(10):
        for value in counts[:, gene][counts[:, gene] > SMALL_COUNT_TABLE_SIZE]:
            expected[(gene, float(value))] = expected.get((gene, float(value)), 0) + 1
    assert tail == expected


# ---------------------------------------------------------------- minibatch alignment

def test_one_minibatch_slices_counts_offsets_condition_and_study_together():
    import pytensor
    from pymc.data import MinibatchOp
    from pytensor.graph.traversal import ancestors
    from pytensor.tensor.random.op import RandomVariable

    n_cells = 300
    corpus = simulate_nb_corpus(n_cells=n_cells, n_genes=5, seed=2)
    # Each cell's row carries its own id in every input, so misalignment is visible.
    cell_id = np.arange(n_cells)
    counts = np.tile(cell_id[:, None], (1, 5)).astype(np.float32)
    corpus.counts = sp.csr_matrix(counts)
    corpus.library_size = np.exp(cell_id / 100.0)
    corpus.study_index = cell_id % 3
    corpus.condition = (cell_id % 2).astype(float)
    data = prepare_nb_data(*fit_inputs(corpus))
    model = build_nb_model(data, batch_size=64)
    observed = model.rvs_to_values[model["counts_obs"]]
    minibatch_nodes = {
        variable.owner for variable in ancestors([model.logp()]) if variable.owner and isinstance(variable.owner.op, MinibatchOp)
    }
    # logp() may hold clones of the one Minibatch node; the clones share its inputs and its RNG.
    assert len({tuple(node.inputs) for node in minibatch_nodes}) == 1
    node = next(node for node in minibatch_nodes if observed in node.outputs)
    assert {input_.name for input_ in node.inputs[:4]} == {"counts", "log_library_size", "condition", "study_index"}
    compiled = model.compile_logp(mode="FAST_COMPILE").f.maker.fgraph
    random_nodes = [apply for apply in compiled.apply_nodes if isinstance(apply.op, RandomVariable)]
    assert len(random_nodes) == 1  # one index draw feeds all four slices

    counts_batch, log_size_batch, condition_batch, study_batch = [
        node.outputs[[i.name for i in node.inputs].index(name)]
        for name in ("counts", "log_library_size", "condition", "study_index")
    ]
    draw = pytensor.function([], [counts_batch, log_size_batch, condition_batch, study_batch], mode="FAST_COMPILE")
    for _ in range(3):
        rows, log_size, condition, study = draw()
        ids = rows[:, 0].astype(int)
        assert len(ids) == 64
        assert np.allclose(log_size, ids / 100.0, atol=1e-5)
        assert np.array_equal(condition, ids % 2)
        assert np.array_equal(study, ids % 3)


# ---------------------------------------------------------------- summaries of draws

def test_condition_effect_table_against_brute_force():
    rng = np.random.default_rng(1)
    n_draws, n_genes = 200, 12
    beta1 = rng.normal(rng.normal(0, 1, n_genes), 0.5, (n_draws, n_genes))
    idata = az.from_dict(
        posterior={
            "beta1": beta1[None],
            "beta0": rng.normal(-9, 1, (1, n_draws, n_genes)),
            "phi": rng.gamma(2, 1, (1, n_draws, n_genes)),
        },
        coords={"gene": [f"g{g}" for g in range(n_genes)]},
        dims={"beta1": ["gene"], "beta0": ["gene"], "phi": ["gene"]},
    )
    table = condition_effect_table(idata)
    assert list(table["gene"]) == [f"g{g}" for g in range(n_genes)]
    n_inside = int(np.floor(0.94 * n_draws))
    for gene in range(n_genes):
        draws = beta1[:, gene]
        positive = sum(1 for value in draws if value > 0) / n_draws
        negative = sum(1 for value in draws if value < 0) / n_draws
        assert table.loc[gene, "prob_positive"] == pytest.approx(positive)
        assert table.loc[gene, "lfsr"] == pytest.approx(min(1 - negative, 1 - positive))
        ordered = sorted(draws)
        widths = [(ordered[i + n_inside] - ordered[i], i) for i in range(n_draws - n_inside)]
        _, first = min(widths)
        assert table.loc[gene, "beta1_low_94"] == pytest.approx(ordered[first])
        assert table.loc[gene, "beta1_high_94"] == pytest.approx(ordered[first + n_inside])
        assert table.loc[gene, "beta1_mean"] == pytest.approx(np.mean(draws))
        assert table.loc[gene, "beta1_sd"] == pytest.approx(np.std(draws, ddof=1))


# ---------------------------------------------------------------- posterior predictive check

@pytest.fixture(scope="module")
def overdispersed_corpus():
    return simulate_nb_corpus(n_cells=2500, n_genes=120, seed=11)


def test_ppc_passes_at_the_truth(overdispersed_corpus):
    ppc = posterior_predictive_check(truth_inference_data(overdispersed_corpus), *fit_inputs(overdispersed_corpus)[:5], n_cells=1500, n_draws=30)
    summary = ppc_misfit_summary(ppc)
    assert summary["passed"], summary
    assert summary["fraction_outside_zero_band"] < 0.15


@pytest.mark.parametrize("phi_factor", [0.05, 1e5])
def test_ppc_fails_with_wrong_dispersion(overdispersed_corpus, phi_factor):
    """Too much (phi x 0.05) or no overdispersion (phi x 1e5, ~Poisson) must be flagged."""
    idata = truth_inference_data(overdispersed_corpus, phi_factor=phi_factor)
    ppc = posterior_predictive_check(idata, *fit_inputs(overdispersed_corpus)[:5], n_cells=1500, n_draws=30)
    summary = ppc_misfit_summary(ppc)
    assert not summary["passed"], summary


def test_ppc_fails_on_zero_inflated_data(overdispersed_corpus):
    inflated = simulate_nb_corpus(n_cells=2500, n_genes=120, seed=11, zero_inflation=0.4)
    ppc = posterior_predictive_check(truth_inference_data(overdispersed_corpus), *fit_inputs(inflated)[:5], n_cells=1500, n_draws=30)
    assert not ppc_misfit_summary(ppc)["passed"]


# ---------------------------------------------------------------- storage and pictures

def test_saved_posterior_opens_with_arviz_and_holds_no_data_matrix(tmp_path, overdispersed_corpus):
    idata = truth_inference_data(overdispersed_corpus)
    posterior = NBPosterior(idata=idata, elbo_history=np.asarray(idata["elbo"]["elbo"]), n_steps=50, converged=True, seconds=1.0)
    path = tmp_path / "nb_posterior.nc"
    save_posterior(posterior, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nb_posterior.nc"]
    reopened = az.from_netcdf(path)
    n_cells = overdispersed_corpus.counts.shape[0]
    for group in reopened.groups():
        for variable in reopened[group].data_vars.values():
            assert n_cells not in variable.shape, (group, variable.name)
    assert reopened.posterior["beta1"].dims == ("chain", "draw", "gene")
    assert list(reopened.posterior["study"].values) == overdispersed_corpus.study_names
    loaded = load_posterior(path)
    assert np.array_equal(loaded.elbo_history, posterior.elbo_history)
    assert loaded.converged and loaded.n_steps == 50


def test_plots_are_png(overdispersed_corpus):
    idata = truth_inference_data(overdispersed_corpus)
    ppc = posterior_predictive_check(idata, *fit_inputs(overdispersed_corpus)[:5], n_cells=300, n_draws=5)
    for picture in (plot_elbo(np.asarray(idata["elbo"]["elbo"])), plot_cell_model_volcano(condition_effect_table(idata)), plot_ppc(ppc)):
        assert picture[:8] == b"\x89PNG\r\n\x1a\n" and len(picture) > 2000


# ---------------------------------------------------------------- inputs, genes, stopping rule

def test_unknown_condition_cells_are_excluded_and_bad_inputs_named():
    corpus = simulate_nb_corpus(n_cells=100, n_genes=5, seed=4)
    corpus.condition[:10] = np.nan
    data = prepare_nb_data(*fit_inputs(corpus))
    assert data.n_cells == 90
    assert np.allclose(np.exp(data.log_library_size), corpus.library_size[10:], rtol=1e-5)
    negative = corpus.counts.copy()
    negative.data[0] = -1
    with pytest.raises(ScgrnInputError, match="raw UMI counts"):
        prepare_nb_data(negative, *fit_inputs(corpus)[1:])
    with pytest.raises(ScgrnInputError, match="library_size has shape"):
        prepare_nb_data(corpus.counts, corpus.library_size[:-1], *fit_inputs(corpus)[2:])


def test_select_model_genes_matches_scanpy_and_clamps():
    import anndata
    import scanpy as sc

    corpus = simulate_nb_corpus(n_cells=600, n_genes=80, seed=6)
    adata = anndata.AnnData(
        X=corpus.counts.copy(),
        obs=pd.DataFrame({"study": [corpus.study_names[k] for k in corpus.study_index]}, index=[f"c{i}" for i in range(600)]),
        var=pd.DataFrame(index=corpus.gene_names),
    )
    chosen = select_model_genes(adata, n_top_genes=20)
    reference = adata.copy()
    sc.pp.highly_variable_genes(reference, flavor="seurat_v3", n_top_genes=20, batch_key="study")
    assert np.array_equal(chosen, np.flatnonzero(reference.var["highly_variable"]))
    assert "highly_variable" not in adata.var  # the input is not modified
    assert np.array_equal(select_model_genes(adata, n_top_genes=3000), np.arange(80))


def test_windowed_elbo_rule_waits_for_a_plateau():
    rng = np.random.default_rng(0)
    rising = -1e5 + 5 * np.arange(2000) + rng.normal(0, 100, 2000)
    plateau = -1e5 + rng.normal(0, 100, 2000)
    assert not windowed_elbo_converged(rising, window=200, tolerance=1e-4)
    assert windowed_elbo_converged(plateau, window=200, tolerance=1e-4)
    assert not windowed_elbo_converged(plateau[:300], window=200, tolerance=1e-4)


# ---------------------------------------------------------------- the fit against the truth

@pytest.fixture(scope="module")
def fitted():
    corpus = simulate_nb_corpus(n_cells=4000, n_genes=300, seed=1)
    config = NBFitConfig(max_steps=3000, min_steps=1000, n_posterior_draws=300, seed=0)
    return corpus, fit_nb_posterior(*fit_inputs(corpus), config=config)


@pytest.mark.slow
def test_fit_recovers_the_true_condition_effects(fitted):
    corpus, posterior = fitted
    beta1 = posterior.idata.posterior["beta1"].values.reshape(-1, corpus.beta1.size)
    assert np.corrcoef(beta1.mean(axis=0), corpus.beta1)[0, 1] >= 0.9
    low, high = np.quantile(beta1, [0.05, 0.95], axis=0)
    coverage = np.mean((low <= corpus.beta1) & (corpus.beta1 <= high))
    assert 0.8 <= coverage <= 0.98
    table = condition_effect_table(posterior.idata)
    null = corpus.beta1 == 0
    assert np.mean(table["lfsr"][null] < 0.05) <= NULL_CALL_RATE_LIMIT
    assert np.mean(table["lfsr"][~null] < 0.05) >= 0.5  # and it still finds most true effects
    assert len(posterior.elbo_history) == posterior.n_steps
    ppc = posterior_predictive_check(posterior.idata, *fit_inputs(corpus)[:5], n_cells=1500, n_draws=30)
    assert ppc_misfit_summary(ppc)["passed"]


@pytest.mark.slow
def test_fit_on_the_demo_simulator_recovers_its_condition_effects():
    """The cell-level model on the demo simulator's output (cell-state term included), with animals that do
    not differ: the only setting where cells are valid replicates. With animal effects (the demo's default)
    this model is overconfident; the default model is the pseudobulk one (de/test_model.py)."""
    from scgrn_assets.lib.demo.simulator import DemoConfig, simulate_sample_counts, simulate_truth

    truth = simulate_truth(DemoConfig(animal_effect_sd=0.0))
    blocks, library_size, condition, study_index, study_names, measured_sets = [], [], [], [], [], []
    contrast_studies = [design for design in truth.config.studies if design.has_condition]
    for design in contrast_studies:
        for _, sample in truth.samples[truth.samples["study"] == design.accession].iterrows():
            counts, _, measured = simulate_sample_counts(truth, design.accession, sample["sample"])
            blocks.append((counts, measured))
            library_size.append(np.asarray(counts.sum(axis=1)).ravel())
            condition.append(np.full(counts.shape[0], 1.0 if sample["condition"] == "AD" else 0.0))
            study_index.append(np.full(counts.shape[0], len(study_names)))
            measured_sets.append(set(measured))
        study_names.append(design.accession)
    # Genes every contrast study measures, so a missing gene is never read as zeros.
    shared_genes = np.array(sorted(set.intersection(*measured_sets)))
    counts = sp.vstack([block[:, np.searchsorted(measured, shared_genes)] for block, measured in blocks], format="csr")
    genes = truth.genes.iloc[shared_genes]
    config = NBFitConfig(max_steps=4000, min_steps=1500, n_posterior_draws=300, seed=0)
    posterior = fit_nb_posterior(
        counts,
        np.concatenate(library_size),
        np.concatenate(condition),
        np.concatenate(study_index),
        genes["gene_length_bp"].to_numpy(),
        study_names,
        list(genes["gene_symbol"]),
        config=config,
    )
    true_beta1 = genes["beta1"].to_numpy()
    beta1 = posterior.idata.posterior["beta1"].values.reshape(-1, true_beta1.size)
    assert np.corrcoef(beta1.mean(axis=0), true_beta1)[0, 1] >= 0.9
    low, high = np.quantile(beta1, [0.05, 0.95], axis=0)
    assert 0.8 <= np.mean((low <= true_beta1) & (true_beta1 <= high)) <= 0.98
    lfsr = condition_effect_table(posterior.idata)["lfsr"].to_numpy()
    assert np.mean(lfsr[true_beta1 == 0] < 0.05) <= NULL_CALL_RATE_LIMIT


def _corpus_for_selection(rng):
    import anndata as ad

    n_cells, genes = 60, [f"g{i}" for i in range(8)]
    obs = pd.DataFrame({
        "study": np.repeat(["S1", "S2", "S3"], 20),
        # S3 has no known condition: its cells are left out, and so is its say on which genes count.
        "condition": pd.array(["AD", "control"] * 20 + [pd.NA] * 20, dtype="string"),
    }, index=[f"c{i}" for i in range(n_cells)])
    obs.loc["c3", "condition"] = pd.NA
    var = pd.DataFrame(index=genes)
    var["measured_in_S1"] = True
    var["measured_in_S2"] = [g not in ("g2", "g5") for g in genes]
    var["measured_in_S3"] = [g != "g7" for g in genes]
    counts = sp.csr_matrix(rng.poisson(3.0, size=(n_cells, len(genes))).astype(np.int64))
    return ad.AnnData(X=counts, obs=obs, var=var)


def test_select_model_inputs_keeps_known_cells_and_genes_measured_in_their_studies():
    from scgrn_assets.lib.condition_effects.cell_model_data import select_model_inputs

    rng = np.random.default_rng(3)
    corpus = _corpus_for_selection(rng)
    inputs = select_model_inputs(corpus, n_top_genes=100, levels=("control", "AD"))

    # Brute force: every cell with a condition; every gene measured in each study such cells come from.
    cells = [c for c, label in corpus.obs["condition"].items() if not pd.isna(label)]
    studies = sorted({corpus.obs.loc[c, "study"] for c in cells})
    genes = [g for g in corpus.var_names if all(corpus.var.loc[g, f"measured_in_{s}"] for s in studies)]
    assert inputs.studies == studies == ["S1", "S2"]
    assert list(inputs.adata.obs_names) == cells
    assert list(inputs.adata.var_names) == genes  # g2, g5 dropped (S2); g7 kept (only S3 lacks it)
    expected_condition = [1.0 if corpus.obs.loc[c, "condition"] == "AD" else 0.0 for c in cells]
    np.testing.assert_array_equal(inputs.condition, expected_condition)
    np.testing.assert_array_equal(inputs.study_index, [studies.index(corpus.obs.loc[c, "study"]) for c in cells])
    np.testing.assert_array_equal(inputs.adata.X.toarray(), corpus[cells, genes].X.toarray())


def test_select_model_inputs_refuses_a_corpus_with_one_condition_level():
    from scgrn_assets.lib.condition_effects.cell_model_data import select_model_inputs

    corpus = _corpus_for_selection(np.random.default_rng(4))
    corpus.obs.loc[corpus.obs["condition"] == "AD", "condition"] = "control"
    with pytest.raises(ScgrnInputError, match="both condition levels"):
        select_model_inputs(corpus, n_top_genes=100, levels=("control", "AD"))

"""Minibatch ADVI for the hierarchical NB model: initialisation, training loop, stopping rule, draws.

The model (the maths) is in :mod:`scgrn_assets.lib.condition_effects.cell_model`; this module only trains it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.progress import Progress, report
from scgrn_assets.lib.condition_effects.cell_model_data import NBData, prepare_nb_data
from scgrn_assets.lib.condition_effects.cell_model import NBFitConfig, NBPosterior, build_nb_model

#: progress(step, max_steps, elbo=...) is called every this many steps.
PROGRESS_EVERY = 100


def initial_estimates(data: NBData) -> dict[str, np.ndarray]:
    """Cheap per-gene starting values for the variational means.

    beta0/beta1 from pooled rates per condition (counts per unit library size, +0.5 pseudo-count);
    log_phi from the method of moments (variance beyond Poisson and beyond what library-size
    spread explains), clipped to [0.05, 100]; study effects and gamma at zero.

    Returns
    -------
    dict
        Keyed by the model's value-variable names (``sigma0_log__`` etc.), float64 arrays.
    """
    counts = data.counts
    library_size = np.exp(data.log_library_size.astype(np.float64))
    is_condition = data.condition > 0.5
    rate_control = (np.asarray(counts[~is_condition].sum(axis=0)).ravel() + 0.5) / library_size[~is_condition].sum()
    rate_condition = (np.asarray(counts[is_condition].sum(axis=0)).ravel() + 0.5) / library_size[is_condition].sum()
    beta0 = np.log(rate_control)
    beta1 = np.log(rate_condition) - beta0
    mean_count = np.asarray(counts.mean(axis=0)).ravel()
    second_moment = np.asarray(counts.multiply(counts).mean(axis=0)).ravel()
    variance = second_moment - mean_count**2
    # Library-size spread alone adds rate^2 var(s) to the variance; that part is not overdispersion.
    excess = variance - mean_count - np.exp(2 * beta0) * library_size.var()
    log_phi = np.log(np.clip(mean_count**2 / np.maximum(excess, 1e-6), 0.05, 100.0))
    return {
        "mu0": np.array(beta0.mean()),
        "sigma0_log__": np.array(np.log(max(beta0.std(), 0.1))),
        "beta0_centred": beta0 + beta1 * data.condition.mean(),
        "sigma1_log__": np.array(np.log(max(np.std(beta1), 0.05))),
        "beta1": beta1,
        "sigma_b_log__": np.array(np.log(0.1)),
        "z": np.zeros((data.n_studies, data.n_genes)),
        "gamma": np.array(0.0),
        "phi_log_mean": np.array(log_phi.mean()),
        "phi_log_sd_log__": np.array(np.log(max(log_phi.std(), 0.1))),
        "log_phi": log_phi,
    }


def _static_mean_field_class():
    """MeanField whose parameter vectors have static shapes, which PyMC's JAX backend needs.

    Stock MeanField stores ``mu``/``rho`` as shared vectors of unknown length; JAX then meets
    slice arithmetic on traced shapes when it reshapes the flat vector into each variable.
    """
    import pytensor
    from pymc.variational.approximations import MeanField, MeanFieldGroup

    class StaticMeanFieldGroup(MeanFieldGroup):
        __param_spec__ = MeanFieldGroup.__param_spec__
        short_name = "static_mean_field"
        alias_names = frozenset(["static_mf"])

        def create_shared_params(self, start=None, start_sigma=None):
            params = super().create_shared_params(start, start_sigma)
            return {
                name: pytensor.shared(value.get_value(), name, shape=value.get_value().shape)
                for name, value in params.items()
            }

    class StaticMeanField(MeanField):
        _group_class = StaticMeanFieldGroup

    return StaticMeanField


@contextlib.contextmanager
def jax_device(device: str):
    """Place JAX arrays and computation on the requested device."""
    import jax

    if device == "cpu":
        platform_devices = jax.devices("cpu")
    elif device == "gpu":
        try:
            platform_devices = jax.devices("gpu")
        except RuntimeError:
            platform_devices = []
        if not platform_devices:
            raise ScgrnInputError(
                "device='gpu' requested but JAX sees no GPU",
                study="nb_posterior",
                fix="install jax with CUDA support on the gpu pool, or set the resource's device to 'cpu'",
            )
    else:
        raise ScgrnInputError(f"unknown device {device!r}", study="nb_posterior", fix="use 'cpu' or 'gpu'")
    with jax.default_device(platform_devices[0]):
        yield


def windowed_elbo_converged(elbo_history: np.ndarray, window: int, tolerance: float) -> bool:
    """The stopping rule: the ELBO's mean over the last ``window`` steps no longer beats the window before.

    Converged when the gain of the latest window mean over the previous one is below both
    ``tolerance`` x |ELBO| and two standard errors of that difference: the averages smooth the
    minibatch noise, and a gain smaller than the noise left in them is no evidence of progress.
    """
    if len(elbo_history) < 2 * window:
        return False
    latest = np.asarray(elbo_history[-window:], dtype=np.float64)
    previous = np.asarray(elbo_history[-2 * window : -window], dtype=np.float64)
    gain = latest.mean() - previous.mean()
    standard_error = np.sqrt((latest.var(ddof=1) + previous.var(ddof=1)) / window)
    return gain <= max(tolerance * abs(previous.mean()), 2.0 * standard_error)


@dataclass
class CompiledAdviStep:
    """One compiled ADVI step of the fast model and the handles the training loop needs.

    ``step()`` runs one Adam update on a fresh minibatch and returns the negative ELBO estimate.
    """

    step: Callable[[], float]
    model: object
    group: object
    learning_rate: object


def compile_advi_step(data: NBData, config: NBFitConfig) -> CompiledAdviStep:
    """Build the fast model, start the mean field at :func:`initial_estimates`, compile through JAX.

    Call inside ``pytensor.config.change_flags(floatX="float32")`` and :func:`jax_device`.
    """
    import pymc as pm
    import pytensor

    model = build_nb_model(data, batch_size=config.batch_size, likelihood="fast")
    with model:
        start = initial_estimates(data)
        approximation = _static_mean_field_class()(
            start=start,
            start_sigma={name: config.initial_sd for name in start},
            random_seed=config.seed,
        )
        learning_rate = pytensor.shared(np.float32(config.learning_rate), name="learning_rate")
        step = pm.KLqp(approximation).objective.step_function(
            obj_optimizer=pm.adam(learning_rate=learning_rate),
            score=True,
            compile_kwargs={"mode": "JAX"},
        )
    _keep_data_on_device(step, [model.rvs_to_values[model["counts_obs"]].owner.inputs[index] for index in range(4)])
    return CompiledAdviStep(step=step, model=model, group=approximation.groups[0], learning_rate=learning_rate)


def _keep_data_on_device(step, data_variables) -> None:
    """Hand the compiled step its data as JAX device arrays, once.

    PyTensor keeps shared data as numpy arrays and JAX would copy them to the device on every
    call (the whole counts matrix per step); device arrays in the input storage are reused.
    """
    import jax

    for function_input, container in zip(step.maker.inputs, step.input_storage):
        if any(function_input.variable is variable for variable in data_variables):
            container.storage[0] = jax.device_put(container.storage[0])


def fit_nb_posterior(
    counts,
    library_size,
    condition,
    study_index,
    gene_length_bp,
    study_names,
    gene_names,
    config: NBFitConfig | None = None,
    progress: Progress | None = None,
) -> NBPosterior:
    """Fit the hierarchical NB model by minibatch ADVI and draw from the approximation.

    Cells whose condition is unknown (NaN) are excluded from the fit.

    Parameters
    ----------
    counts : scipy.sparse matrix, shape (n_cells, n_genes)
        Raw integer counts of the modelled genes.
    library_size : array, shape (n_cells,)
        Total counts per cell over all genes.
    condition : array, shape (n_cells,)
        1 = condition (e.g. AD), 0 = control, NaN = unknown.
    study_index : array of int, shape (n_cells,)
        Index into ``study_names``.
    gene_length_bp : array, shape (n_genes,)
    study_names, gene_names : sequence of str
    config : NBFitConfig, optional
    progress : Progress, optional
        ``progress(step, max_steps, elbo=elbo)`` every 100 steps.

    Returns
    -------
    NBPosterior
    """
    import pytensor

    config = config or NBFitConfig()
    data = prepare_nb_data(counts, library_size, condition, study_index, gene_length_bp, study_names, gene_names)
    started = time.perf_counter()
    with pytensor.config.change_flags(floatX="float32"), jax_device(config.device):
        compiled = compile_advi_step(data, config)
        step, learning_rate, model = compiled.step, compiled.learning_rate, compiled.model
        group = compiled.group
        mean_param, rho_param = group.params_dict["mu"], group.params_dict["rho"]
        elbo_history: list[float] = []
        converged = False
        while len(elbo_history) < config.max_steps:
            elbo_history.append(-float(step()))
            n_steps = len(elbo_history)
            if n_steps % PROGRESS_EVERY == 0:
                report(progress, n_steps, config.max_steps, elbo=elbo_history[-1])
            if n_steps >= config.min_steps and n_steps % config.convergence_window == 0 and windowed_elbo_converged(
                np.asarray(elbo_history), config.convergence_window, config.convergence_tolerance
            ):
                converged = True
                break
        # Polyak averaging at a lower rate: the mean of the iterates sits closer to the optimum
        # than any single minibatch-jittered iterate.
        learning_rate.set_value(np.float32(config.learning_rate / 10))
        mean_sum = np.zeros_like(mean_param.get_value(), dtype=np.float64)
        rho_sum = np.zeros_like(mean_sum)
        for _ in range(config.averaging_steps):
            elbo_history.append(-float(step()))
            mean_sum += mean_param.get_value()
            rho_sum += rho_param.get_value()
        if config.averaging_steps:
            mean_param.set_value((mean_sum / config.averaging_steps).astype(np.float32))
            rho_param.set_value((rho_sum / config.averaging_steps).astype(np.float32))
    seconds = time.perf_counter() - started
    draws = draw_from_mean_field(model, group, config.n_posterior_draws, seed=config.seed)
    elbo = np.asarray(elbo_history)
    idata = posterior_to_inference_data(draws, data, elbo)
    return NBPosterior(idata=idata, elbo_history=elbo, n_steps=len(elbo), converged=converged, seconds=seconds, config=config)


def draw_from_mean_field(model, group, n_draws: int, seed: int) -> dict[str, np.ndarray]:
    """Draws of every free variable (constrained space) from a fitted mean-field group.

    Sampled in numpy from the group's means and scales (softplus of rho) and mapped through
    each variable's transform, so no second graph has to be compiled.

    Returns
    -------
    dict
        Variable name -> array of shape (n_draws, *variable_shape), float64.
    """
    import pytensor.tensor as pt

    generator = np.random.default_rng(seed)
    means = group.params_dict["mu"].get_value().astype(np.float64)
    scales = np.logaddexp(0.0, group.params_dict["rho"].get_value().astype(np.float64))
    flat = means + scales * generator.standard_normal((n_draws, means.size))
    value_to_rv = {value.name: rv for value, rv in model.values_to_rvs.items()}
    draws = {}
    for value_name, slice_, shape, _ in group.ordering.values():
        rv = value_to_rv[value_name]
        values = flat[:, slice_].reshape((n_draws, *shape))
        transform = model.rvs_to_transforms[rv]
        if transform is not None:
            values = transform.backward(pt.as_tensor(values)).eval()
        draws[rv.name] = np.asarray(values, dtype=np.float64)
    return draws


def posterior_to_inference_data(draws: dict[str, np.ndarray], data: NBData, elbo_history: np.ndarray):
    """ArviZ InferenceData with one chain of draws, named coords, and the ELBO in its own group."""
    from scgrn_assets.lib.quiet_imports import import_arviz
    az = import_arviz()
    import xarray as xr

    draws = dict(draws)
    posterior = {}
    posterior["beta0"] = draws.pop("beta0_centred") - draws["beta1"] * data.condition.mean()
    posterior["phi"] = np.exp(draws["log_phi"])
    posterior["b"] = draws["sigma_b"][:, None, None] * draws["z"]
    posterior.update(draws)
    dims = {name: ["gene"] for name in ("beta0", "beta1", "log_phi", "phi")}
    dims.update({"z": ["study", "gene"], "b": ["study", "gene"]})
    idata = az.from_dict(
        posterior={name: value[None] for name, value in posterior.items()},
        coords={"gene": data.gene_names, "study": data.study_names},
        dims=dims,
        attrs={"n_cells": data.n_cells, "n_genes": data.n_genes, "inference": "minibatch ADVI (mean field)"},
    )
    elbo = xr.Dataset({"elbo": ("step", np.asarray(elbo_history, dtype=np.float64))}, coords={"step": np.arange(len(elbo_history))})
    with _quiet_arviz_group_warning():
        idata.add_groups(elbo=elbo)
    return idata


@contextlib.contextmanager
def _quiet_arviz_group_warning():
    """ArviZ warns about any group outside its schema; ``elbo`` is ours on purpose."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*group.*", category=UserWarning)
        yield


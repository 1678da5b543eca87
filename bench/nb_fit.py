"""Benchmark: hierarchical NB minibatch ADVI, straightforward PyMC vs ours, in one run.

Straightforward = the same model with a dense ``pm.NegativeBinomial`` likelihood on the
minibatch, stock mean-field ADVI, PyMC's default compile (C backend, float64).
Ours = ``scgrn_assets.lib.condition_effects.cell_model_inference`` (exact sparse/sufficient-statistic decomposition,
float32, JAX backend).

Measures steps/s of both on 512 x n_genes minibatches of the same simulated corpus, then the
time for ours to fit that corpus to the accuracy of issue 3 (r(beta1) >= 0.9, 90% interval
coverage in [0.8, 0.98], null genes called at lfsr < 0.05 at most 15%).

Usage::

    .venv/bin/python bench/nb_fit.py            # 20k cells x 3000 genes, < 10 min on 2 cores
    .venv/bin/python bench/nb_fit.py --full     # 186k cells x 3000 genes
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scgrn_assets.lib.condition_effects.cell_model_inference import compile_advi_step, fit_nb_posterior, jax_device  # noqa: E402
from scgrn_assets.lib.condition_effects.cell_model import NBFitConfig, build_nb_model  # noqa: E402
from scgrn_assets.lib.condition_effects.cell_model_readout import condition_effect_table  # noqa: E402
from scgrn_assets.lib.condition_effects.cell_model_data import prepare_nb_data  # noqa: E402
from scgrn_assets_tests.support.condition_effects import NULL_CALL_RATE_LIMIT, fit_inputs, simulate_nb_corpus  # noqa: E402


def steps_per_second(step, seconds: float, min_steps: int = 5) -> tuple[float, int]:
    """Run ``step`` for about ``seconds`` (after one warm-up call) and return (steps/s, steps)."""
    step()
    n_steps, started = 0, time.perf_counter()
    while n_steps < min_steps or time.perf_counter() - started < seconds:
        step()
        n_steps += 1
    return n_steps / (time.perf_counter() - started), n_steps


def straightforward_step(data, batch_size: int, seed: int):
    """Stock PyMC: dense pm.NegativeBinomial, pm.ADVI, default compile mode and floatX."""
    import pymc as pm

    model = build_nb_model(data, batch_size=batch_size, likelihood="dense")
    with model:
        advi = pm.ADVI(random_seed=seed)
        return advi.objective.step_function(obj_optimizer=pm.adam(learning_rate=0.02), score=True)


def accuracy(corpus, posterior) -> dict:
    beta1 = posterior.idata.posterior["beta1"].values.reshape(-1, corpus.beta1.size)
    low, high = np.quantile(beta1, [0.05, 0.95], axis=0)
    table = condition_effect_table(posterior.idata)
    null = corpus.beta1 == 0
    result = {
        "r_beta1": float(np.corrcoef(beta1.mean(axis=0), corpus.beta1)[0, 1]),
        "coverage_90": float(np.mean((low <= corpus.beta1) & (corpus.beta1 <= high))),
        "null_called": float(np.mean(table["lfsr"][null] < 0.05)),
        "true_called": float(np.mean(table["lfsr"][~null] < 0.05)),
    }
    result["accurate"] = (
        result["r_beta1"] >= 0.9 and 0.8 <= result["coverage_90"] <= 0.98 and result["null_called"] <= NULL_CALL_RATE_LIMIT
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="186k cells x 3000 genes")
    parser.add_argument("--n-cells", type=int, default=20_000)
    parser.add_argument("--n-genes", type=int, default=3000)
    parser.add_argument("--rate-seconds", type=float, default=20.0, help="timing window per method")
    parser.add_argument("--max-steps", type=int, default=6000)
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--skip-fit", action="store_true", help="only the step rates")
    args = parser.parse_args()
    n_cells = 186_000 if args.full else args.n_cells
    warnings.filterwarnings("ignore")

    started = time.perf_counter()
    corpus = simulate_nb_corpus(n_cells=n_cells, n_genes=args.n_genes, seed=0)
    zero_fraction = 1 - corpus.counts.nnz / np.prod(corpus.counts.shape)
    print(f"corpus: {n_cells} cells x {args.n_genes} genes, {zero_fraction:.1%} zeros, simulated in {time.perf_counter() - started:.0f} s", flush=True)
    data = prepare_nb_data(*fit_inputs(corpus))
    config = NBFitConfig(max_steps=args.max_steps, device=args.device)

    import pytensor

    started = time.perf_counter()
    baseline = straightforward_step(data, config.batch_size, config.seed)
    baseline_compile = time.perf_counter() - started
    baseline_rate, baseline_steps = steps_per_second(baseline, args.rate_seconds)
    print(f"straightforward PyMC ADVI: {baseline_rate:.2f} steps/s ({baseline_steps} steps, compile {baseline_compile:.0f} s)", flush=True)
    del baseline

    with pytensor.config.change_flags(floatX="float32"), jax_device(args.device):
        started = time.perf_counter()
        ours = compile_advi_step(data, config).step
        ours_compile = time.perf_counter() - started
        ours_rate, ours_steps = steps_per_second(ours, args.rate_seconds)
    print(f"ours (sparse-exact, float32, JAX): {ours_rate:.2f} steps/s ({ours_steps} steps, compile {ours_compile:.0f} s)", flush=True)
    ratio = ours_rate / baseline_rate
    print(f"step-rate ratio ours/straightforward: {ratio:.1f}", flush=True)
    del ours

    if not args.skip_fit:
        posterior = fit_nb_posterior(*fit_inputs(corpus), config=config)
        result = accuracy(corpus, posterior)
        print(
            f"fit: {posterior.seconds:.0f} s (compile included), {posterior.n_steps} steps, converged={posterior.converged}, "
            + ", ".join(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}" for key, value in result.items()),
            flush=True,
        )
        print(f"time_to_accuracy_s={posterior.seconds:.0f} accurate={result['accurate']} device={args.device}")
    print(f"RESULT name=nb_fit ratio={ratio:.1f} goal=5")


if __name__ == "__main__":
    main()
